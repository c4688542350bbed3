"""User-gated PSA (`safealign_jax.gated`): gates, the per-example Dense seam vs folding one user,
SVD factors, the DPO gradient on the gates, frozen experts, and a tiny gated training run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util
from train_helper import tiny_config

from safealign_jax import adapter, gated
from safealign_jax.errors import UserError
from safealign_jax.models.layers import Dense
from safealign_jax.runs import save_trained
from safealign_jax.train import objective
from safealign_jax.train.data import SyntheticPairs
from safealign_jax.train.loop import init_trainable, train
from safealign_jax.train.model import load_base
from safealign_jax.trained import load_trained

EMBED = 6
TARGETS = ("to_k", "to_v")


@pytest.fixture(scope="module")
def base():
    """(module, params, base reference, UNet inputs for 2 examples) of the tiny training UNet."""
    module, params, reference = load_base(tiny_config({}))
    rng = np.random.default_rng(0)
    inputs = (jnp.asarray(rng.standard_normal((2, 8, 8, 4), np.float32)), jnp.array([20, 700]),
              jnp.asarray(rng.standard_normal((2, 3, 32), np.float32)))
    return module, params, reference, inputs


def attn2_deltas(params, count: int, seed: int = 0, scale: float = 0.3) -> list[dict]:
    """`count` random delta trees on every attn2 to_k / to_v of `params`."""
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(seed)
    trees = []
    for _ in range(count):
        trees.append(traverse_util.unflatten_dict({
            (*p[:-1], "delta"): scale * rng.standard_normal(v.shape).astype(np.float32)
            for p, v in flat.items() if p[-1] == "kernel" and "attn2" in p and p[-2] in TARGETS}))
    return trees


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def test_gates_are_the_sigmoid_of_a_linear_map():
    deltas = [{"layer": {"delta": np.eye(3, 2, dtype=np.float32)}}] * 3
    tree = gated.init(deltas, EMBED, init_bias=-1.5, key=jax.random.key(0))
    assert tree["gate"]["kernel"].shape == (EMBED, 3) and float(jnp.abs(tree["gate"]["kernel"]).max()) > 0
    np.testing.assert_array_equal(np.asarray(gated.init(deltas, EMBED)["gate"]["kernel"]), 0)
    tree["gate"]["bias"] = jnp.array([0.5, -1.0, 2.0])
    users = np.random.default_rng(1).standard_normal((4, EMBED)).astype(np.float32)
    kernel, bias = np.asarray(tree["gate"]["kernel"], np.float64), np.array([0.5, -1.0, 2.0])
    expected = 1.0 / (1.0 + np.exp(-(users.astype(np.float64) @ kernel + bias)))
    np.testing.assert_allclose(np.asarray(gated.gates(tree, users)), expected, rtol=1e-6)
    with pytest.raises(UserError, match=r"shape \(4, 5\), expected \(B, 6\)"):
        gated.gates(tree, users[:, :5])


def test_hard_gates_threshold_the_logits():
    tree = {"gate": {"kernel": jnp.array([[1.0, -1.0, 0.0]]), "bias": jnp.array([-0.5, 0.2, 0.0])}}
    np.testing.assert_array_equal(np.asarray(gated.gates(tree, jnp.array([[1.0], [0.1]]), hard=True)),
                                  [[1, 0, 0], [0, 1, 0]])


def test_fit_gates_is_the_regularised_bradley_terry_optimum():
    """Each category's gate is the ridge logistic fit of its own records: the objective's gradient
    vanishes there, and on separable records the gate opens exactly for the users who ban it."""
    rng = np.random.default_rng(0)
    users = rng.standard_normal((40, 5))
    bans = np.stack([users[:, 0] > 0.3, users[:, 1] + users[:, 2] < 0], axis=1)
    rows = [(u, c) for u in range(40) for c in range(2)]
    emb = users[[u for u, _ in rows]]
    cat = np.array([c for _, c in rows])
    safe = np.array([bans[u, c] for u, c in rows])
    l2 = 1e-3
    gate = gated.fit_gates(emb, cat, safe, 2, l2=l2)
    assert gate["kernel"].shape == (5, 2) and gate["bias"].shape == (2,)
    for c in range(2):
        w = np.append(np.asarray(gate["kernel"][:, c], np.float64), float(gate["bias"][c]))
        x = np.concatenate([emb[cat == c], np.ones(((cat == c).sum(), 1))], axis=1)
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - safe[cat == c]) / len(p) + l2 * w
        assert np.abs(grad).max() < 1e-4
    g = np.asarray(gated.gates({"gate": gate}, users, hard=True))
    np.testing.assert_array_equal(g, bans.astype(np.float32))
    with pytest.raises(UserError, match="no preference records for category 2"):
        gated.fit_gates(emb, cat, safe, 3)


def test_svd_factors_are_exact_at_full_rank_and_missing_paths_are_zero():
    rng = np.random.default_rng(2)
    first = {"x": {"delta": rng.standard_normal((5, 3)).astype(np.float32)},
             "y": {"delta": rng.standard_normal((2, 4)).astype(np.float32)}}
    second = {"x": {"delta": rng.standard_normal((5, 3)).astype(np.float32)}}
    tree = gated.init([first, second], EMBED)
    assert tree["experts"]["x"]["a"].shape == (2, 5, 3) and tree["experts"]["x"]["b"].shape == (2, 3, 3)
    assert tree["experts"]["y"]["a"].shape == (2, 2, 2)  # r = min(in, out)
    back = gated.category_deltas(tree)
    np.testing.assert_allclose(back[0]["x"]["delta"], first["x"]["delta"], atol=1e-5)
    np.testing.assert_allclose(back[0]["y"]["delta"], first["y"]["delta"], atol=1e-5)
    np.testing.assert_allclose(back[1]["x"]["delta"], second["x"]["delta"], atol=1e-5)
    np.testing.assert_array_equal(back[1]["y"]["delta"], 0)
    # rank 1 of a rank-1 delta is exact; of a full-rank one it is the best rank-1 fit (Eckart-Young)
    u, v = rng.standard_normal((5, 1)), rng.standard_normal((1, 3))
    low = gated.init([{"x": {"delta": (u @ v).astype(np.float32)}}, first], EMBED, rank=1)
    np.testing.assert_allclose(gated.category_deltas(low)[0]["x"]["delta"], u @ v, atol=1e-5)
    s = np.linalg.svd(first["x"]["delta"].astype(np.float64), compute_uv=False)
    err = np.linalg.norm(gated.category_deltas(low)[1]["x"]["delta"] - first["x"]["delta"])
    np.testing.assert_allclose(err, np.sqrt((s[1:] ** 2).sum()), rtol=1e-4)
    with pytest.raises(UserError, match=r"x: the categories' deltas have shapes"):
        gated.init([first, {"x": {"delta": np.zeros((3, 5), np.float32)}}], EMBED)


def test_per_example_gates_equal_folding_each_user(base):
    """Two users with different gates share a batch (and the batch doubled as [uncond; cond])."""
    module, params, _, (x, t, context) = base
    tree = gated.init(attn2_deltas(params, 3), EMBED)
    tree["gate"]["kernel"] = tree["gate"]["kernel"].at[0].set(jnp.array([2.0, -2.0, 1.0]))
    users = jnp.asarray(np.random.default_rng(3).standard_normal((2, EMBED)), jnp.float32)
    users = users.at[:, 0].set(jnp.array([1.0, -1.0]))
    g = np.asarray(gated.gates(tree, users))  # user 0: (.88, .12, .73), user 1: (.12, .88, .27)
    assert np.abs(g[0] - g[1]).min() > 0.4
    mixed = np.asarray(module.apply({"params": params, "lora": gated.variables(tree, users)}, x, t, context))
    doubled = np.asarray(module.apply({"params": params, "lora": gated.variables(tree, users)},
                                      jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                                      jnp.concatenate([context, context[::-1]])))
    scale = np.abs(mixed).max()
    for b in range(2):
        folded = gated.fold_for_user(params, tree, users[b])
        alone = np.asarray(module.apply({"params": folded}, x, t, context))
        np.testing.assert_allclose(mixed[b], alone[b], atol=1e-5 * scale)
        np.testing.assert_allclose(doubled[b], alone[b], atol=1e-5 * scale)  # row b: user b
        swapped = np.asarray(module.apply({"params": folded}, x, t, context[::-1]))
        np.testing.assert_allclose(doubled[2 + b], swapped[b], atol=1e-5 * scale)  # row 2 + b: user b
    other = np.asarray(module.apply({"params": gated.fold_for_user(params, tree, users[1])}, x, t, context))
    assert np.abs(other[0] - mixed[0]).max() > 1e-3 * scale  # the user matters


def test_closed_gates_are_the_base_exactly(base):
    module, params, _, (x, t, context) = base
    tree = gated.init(attn2_deltas(params, 2), EMBED, init_bias=-1e9)
    users = jnp.ones((2, EMBED))
    np.testing.assert_array_equal(np.asarray(gated.gates(tree, users)), 0)
    out = module.apply({"params": params, "lora": gated.variables(tree, users)}, x, t, context)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(module.apply({"params": params}, x, t, context)))


class Toy(nn.Module):
    """A linear "UNet": prediction = sample @ W (W = 0), the signature the DPO loss calls."""

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond=None, user_tokens=None):
        return Dense(sample.shape[-1], use_bias=False, name="proj")(sample)


def toy_gated_dpo():
    """(Toy module, its params, a gated tree over the deltas +0.2 I and -0.2 I, a batch of 8 pairs
    with x_w = 3, x_l = 0 and positive user embeddings)."""
    params = {"proj": {"kernel": jnp.zeros((4, 4))}}
    eye = 0.2 * np.eye(4, dtype=np.float32)
    tree = gated.init([{"proj": {"delta": eye}}, {"proj": {"delta": -eye}}], EMBED)
    users = jnp.asarray(np.abs(np.random.default_rng(4).standard_normal((8, EMBED))) + 0.1, jnp.float32)
    batch = {"latents_w": 3.0 * jnp.ones((8, 8, 8, 4)), "latents_l": jnp.zeros((8, 8, 8, 4)),
             "encoder_hidden_states": jnp.zeros((8, 1, 4)), "user_embedding": users}
    return Toy(), params, tree, batch


def test_dpo_gradient_opens_the_gate_of_a_helpful_category():
    """x0-prediction, x_w = 3, x_l = 0: the delta c I moves the winner's prediction c x_t towards
    x_w (d m_w / dc = -2 sqrt(abar) 9 + noise terms) and leaves the loser's error flat in
    expectation, so its gate's gradient is negative (descent opens it); for -c I it is positive."""
    module, params, tree, batch = toy_gated_dpo()
    schedule = objective.training_schedule("", "sample")
    loss_fn = objective.make_loss_fn(module, 1.0, schedule, 50.0, train_gated_experts=False)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)({"gated": tree}, params, batch,
                                                                       jax.random.key(0))
    # both gates at 0.5: the two deltas cancel, the policy is the reference, loss = log 2
    assert float(metrics["implicit_accuracy"]) == 0.5 and abs(float(loss) - np.log(2)) < 1e-6
    bias, kernel = np.asarray(grads["gated"]["gate"]["bias"]), np.asarray(grads["gated"]["gate"]["kernel"])
    assert bias[0] < 0 < bias[1]
    assert (kernel[:, 0] < 0).all() and (kernel[:, 1] > 0).all()  # users > 0
    for leaf in jax.tree.leaves(grads["gated"]["experts"]):  # frozen experts: stop_gradient
        np.testing.assert_array_equal(np.asarray(leaf), 0)
    unfrozen = objective.make_loss_fn(module, 1.0, schedule, 50.0)
    grads = jax.grad(lambda tr: unfrozen(tr, params, batch, jax.random.key(0))[0])({"gated": tree})
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(grads["gated"]["experts"]))


def test_route_keeps_each_rows_own_category_gate():
    gate = jnp.asarray([[0.2, 0.7, 0.9], [0.4, 0.5, 0.6], [0.3, 0.8, 0.1]])
    collection = {"blk": {"proj": {"gated_a": jnp.ones((3, 2, 1)), "gated_b": jnp.ones((3, 1, 2)), "gate": gate}}}
    routed = gated.route(collection, jnp.asarray([1, -1, 2]))
    np.testing.assert_allclose(np.asarray(routed["blk"]["proj"]["gate"]),
                               [[0, 0.7, 0], [0, 0, 0], [0, 0, 0.1]], rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(routed["blk"]["proj"]["gated_a"]), 1)


def test_routed_gates_learn_only_from_their_own_categorys_pairs():
    """Every pair is about category 0: routed, gate 1 gets exactly zero gradient (unrouted it gets
    the same-sized opposite push, as its delta -c I hurts those pairs); the loss with routing
    equals the loss with gate 1 closed by hand; a routed loss without category_index is refused."""
    module, params, tree, batch = toy_gated_dpo()
    batch["category_index"] = jnp.zeros((8,), jnp.int32)
    schedule = objective.training_schedule("", "sample")
    routed = objective.make_loss_fn(module, 1.0, schedule, 50.0, train_gated_experts=False, route_gates=True)
    (loss, _), grads = jax.value_and_grad(routed, has_aux=True)({"gated": tree}, params, batch, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(grads["gated"]["gate"]["kernel"][:, 1]), 0)
    assert float(grads["gated"]["gate"]["bias"][1]) == 0 and float(grads["gated"]["gate"]["bias"][0]) < 0
    closed = {**tree, "experts": {"proj": {k: v.at[1].set(0) for k, v in tree["experts"]["proj"].items()}}}
    plain = objective.make_loss_fn(module, 1.0, schedule, 50.0, train_gated_experts=False)
    np.testing.assert_allclose(float(loss), float(plain({"gated": closed}, params, batch, jax.random.key(0))[0]),
                               rtol=1e-6)
    unrouted = jax.grad(lambda tr: plain(tr, params, batch, jax.random.key(0))[0])({"gated": tree})
    assert float(unrouted["gated"]["gate"]["bias"][1]) > 0
    with pytest.raises(UserError, match="yields no 'category_index'"):
        routed({"gated": tree}, params, {k: v for k, v in batch.items() if k != "category_index"}, jax.random.key(0))


def test_frozen_experts_get_no_update_and_no_optimizer_state():
    tree = gated.init([{"proj": {"delta": np.eye(3, dtype=np.float32)}}] * 2, EMBED)
    trainable = {"gated": tree}
    optimizer = gated.freeze_experts(optax.adamw(0.1, weight_decay=0.5))
    state = optimizer.init(trainable)
    moments = sum(x.size for x in jax.tree.leaves(state))
    assert moments == 2 * (EMBED * 2 + 2) + 1  # mu and nu of the gate, the step count
    ones = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = optimizer.update(ones, state, trainable)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["gated"]["experts"]))
    assert all(float(jnp.abs(u).min()) > 0 for u in jax.tree.leaves(updates["gated"]["gate"]))


@pytest.fixture(scope="module")
def expert_runs(base, tmp_path_factory):
    """Two delta runs ("hate", "violence") on the tiny base."""
    _, params, reference, _ = base
    root = tmp_path_factory.mktemp("experts")
    folders = []
    for name, tree in zip(("hate", "violence"), attn2_deltas(params, 2, seed=5, scale=0.1), strict=True):
        save_trained(str(root / name), {"delta": tree}, tiny_config({}).to_dict(), reference)
        folders.append(str(root / name))
    return folders


GATED = {"psa.enable": True, "psa.variant": "gated", "psa.embed_dim": EMBED, "optim.learning_rate": 1e-1,
         "train.steps": 3, "train.checkpoint_every": 3, "train.log_every": 3, "dpo.caption_dropout": 0.0,
         "dpo.beta": 500.0, "data.resolution": 32, "data.seq_len": 3, "psa.gated.init_bias": -2.0}


def test_gated_training_run_writes_a_checkpoint_load_trained_reads(base, expert_runs, tmp_path):
    module, params, _, (x, t, context) = base
    config = tiny_config({**GATED, "psa.gated.experts": ",".join(expert_runs)})
    fresh = init_trainable(config, params)
    assert list(fresh) == ["gated"]
    source = SyntheticPairs(7, 2, slice(0, 2), 4, 4, 3, 32, user_dim=EMBED)
    _, summary = train(config, str(tmp_path / "run"), source=source)
    assert summary["final"]["nonfinite"] == 0
    run = load_trained(str(tmp_path / "run"))
    assert run.step == 3 and run.categories == ("hate", "violence") and run.lora is None
    # the gate trained, the frozen experts did not
    assert np.abs(run.gated["gate"]["bias"] - np.asarray(fresh["gated"]["gate"]["bias"])).max() > 1e-3
    for path, leaf in flat(fresh["gated"]["experts"]).items():
        np.testing.assert_array_equal(flat(run.gated["experts"])[path], np.asarray(leaf))
    user = np.random.default_rng(6).standard_normal(EMBED).astype(np.float32)
    folded = run.folded_for_user(params, user)
    out = module.apply({"params": folded}, x, t, context)
    mixed = module.apply({"params": params, "lora": gated.variables(run.gated, np.stack([user, user]))}, x, t, context)
    np.testing.assert_allclose(np.asarray(out), np.asarray(mixed), atol=1e-5 * float(jnp.abs(out).max()))
    with pytest.raises(UserError, match="depends on the user"):
        run.unet_variables()


def test_gated_config_errors(base, expert_runs):
    _, params, _, _ = base
    for overrides, fragment in [
        ({"psa.gated.experts": ""}, "psa.gated.experts is empty"),
        ({"psa.gated.experts": ",".join(expert_runs), "psa.gated.categories": "hate"}, "names 1 categories for 2"),
        ({"psa.variant": "gates"}, "psa.variant='gates' is invalid"),
    ]:
        with pytest.raises(UserError, match=fragment):
            init_trainable(tiny_config({**GATED, **overrides}), params)


def test_two_user_tokens_give_w_k_a_gradient(base):
    """N = 1: softmax over one user key is 1, so W_k' gets no gradient (up to the attention's
    round-off, measured ~3e-8 of W_v''s); N = 2: a real one. beta = 1 keeps the loss unsaturated."""
    module, params, _, _ = base
    batch = next(SyntheticPairs(0, 2, slice(0, 2), 4, 4, 3, 32, user_dim=EMBED))
    loss_fn = objective.make_loss_fn(module, 1.0, objective.training_schedule("", "epsilon"), 1.0)
    for tokens in (1, 2):
        tree = adapter.init(jax.random.key(1), params, EMBED, num_tokens=tokens)
        tree["attn"] = jax.tree.map(lambda w: 0.1 * jax.random.normal(jax.random.key(2), w.shape), tree["attn"])
        grads = jax.grad(lambda tr: loss_fn(tr, params, batch, jax.random.key(3))[0])({"adapter": tree})
        layers = flat(grads["adapter"]["attn"])
        for path in [p for p in layers if p[-1] == "to_k_ip"]:
            k_ip = float(jnp.abs(layers[path]).max())
            v_ip = float(jnp.abs(layers[(*path[:-1], "to_v_ip")]).max())
            assert v_ip > 0, path
            assert (k_ip <= 1e-6 * v_ip) if tokens == 1 else (k_ip >= 1e-2 * v_ip), (tokens, path, k_ip, v_ip)


@pytest.mark.slow
def test_two_user_token_training_run(tmp_path):
    config = tiny_config({**GATED, "psa.variant": "adapter", "psa.num_tokens": 2})
    _, summary = train(config, str(tmp_path / "run"),
                       source=SyntheticPairs(7, 2, slice(0, 2), 4, 4, 3, 32, user_dim=EMBED))
    run = load_trained(str(tmp_path / "run"))
    assert run.adapter["proj"]["kernel"].shape == (EMBED, 2 * 32) and summary["final"]["nonfinite"] == 0
    k_ip = [v for p, v in flat(run.adapter["attn"]).items() if p[-1] == "to_k_ip"]
    assert all(np.abs(v).max() > 0 for v in k_ip)  # W_k' moves once W_v' is non-zero
