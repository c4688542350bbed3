"""PSA training: the loss w.r.t. {"adapter"} (+ "lora"), the reference is the bare base, and the
trainer (synthetic source with users, or a source object passed in) yields an adapter whose
output depends on the user; `load_trained` reads its checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helper import tiny_config

from safealign_jax import adapter
from safealign_jax.errors import UserError
from safealign_jax.train import objective
from safealign_jax.train.data import SyntheticPairs
from safealign_jax.train.loop import init_trainable, train
from safealign_jax.train.model import load_base
from safealign_jax.trained import load_trained

EMBED = 16
PSA = {"psa.enable": True, "psa.embed_dim": EMBED, "optim.learning_rate": 1e-2,
       "train.steps": 3, "train.checkpoint_every": 3, "train.log_every": 3, "dpo.caption_dropout": 0.0,
       "data.resolution": 32, "data.seq_len": 3}


@pytest.fixture(scope="module")
def base():
    config = tiny_config(PSA)
    module, params, _ = load_base(config)
    source = SyntheticPairs(0, 2, slice(0, 2), 4, 4, 3, module.config.cross_attention_dim, user_dim=EMBED)
    schedule = objective.training_schedule("", "epsilon")
    loss_fn = objective.make_loss_fn(module, 1.0, schedule, 5000.0, adapter_scale=1.0)
    return config, module, params, next(source), jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def loss_and_grads(base, trainable, batch):
    params, grad_fn = base[2], base[4]
    return grad_fn(trainable, params, batch, jax.random.key(3))


def nonzero(tree) -> dict:
    return {jax.tree_util.keystr(p): bool(jnp.any(x != 0)) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_gradients_reach_only_the_adapter(base):
    _, _, params, batch, _ = base
    trainable = init_trainable(base[0], params)
    assert sorted(trainable) == ["adapter"]
    (loss, metrics), grads = loss_and_grads(base, trainable, batch)
    # zero-initialised adapter: the policy equals the reference
    assert float(metrics["implicit_accuracy"]) == 0.5 and abs(float(loss) - np.log(2)) < 1e-6
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    moved = nonzero(grads)
    v_ip = [k for k in moved if k.endswith("['to_v_ip']")]
    k_ip = [k for k in moved if k.endswith("['to_k_ip']")]
    assert v_ip and all(moved[k] for k in v_ip)
    # N = 1: softmax over one user key is 1, so W_k' gets exactly zero gradient (docs/METHODS.md section 3)
    assert k_ip and not any(moved[k] for k in k_ip)
    # the reference ignores the adapter: other adapter values, same reference errors
    moved_tree = {"adapter": {**trainable["adapter"],
                              "attn": jax.tree.map(lambda w: w + 0.05, trainable["adapter"]["attn"])}}
    (_, other), _ = loss_and_grads(base, moved_tree, batch)
    for key in ("mse_ref_w", "mse_ref_l"):
        assert float(other[key]) == float(metrics[key])
    assert float(other["mse_policy_w"]) != float(metrics["mse_policy_w"])


@pytest.mark.parametrize(
    ("width", "drop", "message"),
    [(EMBED + 1, False, r"user_embedding has shape \(2, 16\), expected \(B, 17\)"),
     (EMBED, True, "yields no 'user_embedding'")],
)
def test_bad_user_batches_are_refused(base, width, drop, message):
    _, _, params, batch, _ = base
    trainable = {"adapter": adapter.init(jax.random.key(1), params, width)}
    if drop:
        batch = {k: v for k, v in batch.items() if k != "user_embedding"}
    with pytest.raises(UserError, match=message):
        loss_and_grads(base, trainable, batch)


def predict(module, params, run, users):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((len(users), 8, 8, 4), np.float32))
    context = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, 32), np.float32))
    context = jnp.tile(context, (len(users), 1, 1))
    return np.asarray(module.apply({"params": params, **run.unet_variables()}, x,
                                   jnp.array([500] * len(users)), context,
                                   user_tokens=adapter.user_tokens(run.adapter, jnp.asarray(users))))


def test_trained_adapter_and_lora_depend_on_the_user(base, tmp_path):
    """One tiny run (psa.train_lora, a SyntheticPairs source object with users passed in)."""
    _, module, params, _, _ = base
    config = tiny_config({**PSA, "psa.train_lora": True})
    source = SyntheticPairs(7, 2, slice(0, 2), 4, 4, 3, 32, user_dim=EMBED)
    _, summary = train(config, str(tmp_path / "run"), source=source)
    assert source.index == 3  # the given source fed every step
    run = load_trained(str(tmp_path / "run"))
    assert run.step == 3 and run.lora is not None and run.adapter is not None and run.adapter_scale == 1.0
    assert summary["trainable_parameters"] == adapter.count(run.adapter)["total"] + sum(
        x.size for x in jax.tree.leaves(run.lora))
    assert any(v for k, v in nonzero(run.lora).items() if k.endswith("['b']"))  # B starts at zero
    assert any(nonzero(run.adapter["attn"]).values())  # to_v_ip starts at zero
    users = np.random.default_rng(5).standard_normal((2, EMBED)).astype(np.float32)
    out = predict(module, params, run, np.stack([users[0], users[0]]))
    other = predict(module, params, run, users)
    scale = np.abs(out).max()
    assert np.abs(out[0] - other[0]).max() == 0  # same user, same output
    assert np.abs(out[1] - other[1]).max() > 1e-3 * scale  # another user changes it


def test_presets_and_config_errors():
    import importlib.util

    from train_helper import ROOT

    spec = importlib.util.spec_from_file_location("train_config", ROOT / "configs/train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sd15, sdxl = module.get_config("psa_sd15"), module.get_config("psa_sdxl")
    assert sd15.psa.enable and (sd15.psa.embed_dim, sd15.psa.num_tokens, sd15.psa.scale) == (3584, 1, 1.0)
    assert (sd15.optim.name, sd15.optim.learning_rate, sd15.optim.scale_lr_by_pairs) == ("adamw", 5e-6, False)
    assert (sd15.optim.warmup_steps, sd15.train.steps, sd15.dpo.beta) == (500, 5000, 5000.0)
    assert sd15.train.pairs_per_device * 8 == 192 and sdxl.train.pairs_per_device * 8 == 128
    assert (sdxl.optim.name, sdxl.data.resolution, sdxl.data.source) == ("adafactor", 1024, "sage_cache")
    from safealign_jax.train.config import validate

    for overrides, fragment in [
        ({"psa.enable": True, "data.source": "cache", "data.cache_dir": "x"}, "CoProV2 pairs have no users"),
        ({"psa.enable": True, "train.sample_every": 5}, "sample users with scripts/sample.py"),
        ({"data.source": "sage_cache", "data.cache_dir": "x", "data.embeddings": "e"}, "psa.enable"),
        ({"psa.enable": True, "data.source": "sage_cache", "data.cache_dir": "x"}, "data.embeddings"),
        ({"psa.enable": True, "psa.num_tokens": 0}, "psa.num_tokens"),
    ]:
        with pytest.raises(UserError, match=fragment):
            validate(tiny_config(overrides))
