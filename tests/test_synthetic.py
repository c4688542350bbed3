"""The synthetic world's parts: renders, oracle, tokenizer, stand-in VAE, users, metrics."""

import numpy as np
import pytest

from safealign_jax.synthetic import metrics, text
from safealign_jax.synthetic.metrics import PromptCase
from safealign_jax.synthetic.oracle import Oracle, validate
from safealign_jax.synthetic.users import User, make_users
from safealign_jax.synthetic.world import (
    SAFE_DEPICTION,
    TEMPLATES,
    Scene,
    World,
    evaluation_templates,
    prompt,
    template_words,
    training_templates,
)


@pytest.fixture(scope="module")
def world():
    return World(num_categories=3, concepts_per_category=2)


@pytest.fixture(scope="module")
def oracle(world):
    return Oracle(world)


def test_world_pairs_are_minimal_edits(world):
    assert len(World().concepts) == 21 and len(World().categories) == 7
    for concept in world.concepts:
        scene = Scene(concept.name, "red", "navy")
        harmful, safe = prompt(scene, 3), prompt(scene.replace(object=concept.safe), 3)
        assert harmful.replace(concept.name, concept.safe) == safe
    glyphs = World().glyphs.reshape(len(World().objects), -1)
    distances = (glyphs[:, None] != glyphs[None]).sum(-1) + 64 * np.eye(len(glyphs), dtype=int)
    assert distances.min() >= 18


def test_held_out_phrasings_are_new_sentences_of_known_words():
    seen = set().union(*(template_words(TEMPLATES[t]) for t in training_templates()))
    for t in evaluation_templates():
        assert template_words(TEMPLATES[t]) <= seen, TEMPLATES[t]
        assert TEMPLATES[t] not in [TEMPLATES[u] for u in training_templates()]


def test_world_sometimes_depicts_the_safe_counterpart(world, oracle):
    rng = np.random.default_rng(0)
    concept = world.concepts[0]
    scene = Scene(concept.name, "red", "navy")
    shown = oracle.read(np.stack([world.depict(scene, rng) for _ in range(2000)])).scenes(world)
    safe = np.mean([s.object == concept.safe for s in shown])
    assert abs(safe - SAFE_DEPICTION) < 0.03 and all(s.object in (concept.name, concept.safe) for s in shown)
    neutral = Scene(world.neutral[0], "red", "navy")
    assert all(s == neutral for s in oracle.read(np.stack([world.depict(neutral, rng) for _ in range(50)])).scenes(world))


def test_oracle_is_exact_on_renders_and_robust_to_noise(world, oracle):
    result = validate(oracle, count=300)
    assert result["accuracy_clean"] == 1.0 and result["accuracy_noisy"] >= 0.99
    features = oracle.features(np.stack([world.render(Scene("knife", "red", "navy"))]))
    assert features.shape == (1, len(world.objects) + 8 + 4)
    np.testing.assert_allclose(features[0, : len(world.objects)].sum(), 1.0, rtol=1e-6)


def test_tokenizer_spells_every_word_as_one_token(tmp_path, world):
    from safealign_jax.models import load_tokenizer, tokenize

    text.write_tokenizer(str(tmp_path), world.vocabulary(), 16)
    tokenizer = load_tokenizer(str(tmp_path))
    text.check_single_tokens(tokenizer, world.vocabulary())
    ids = tokenize(tokenizer, [TEMPLATES[0].format(object="knife", colour="red", background="navy")])
    assert ids.shape == (1, 16) and (ids[0] != ids[0, -1]).sum() == 1 + len(TEMPLATES[0].split())


def test_space_to_depth_is_exact_and_loaded_as_the_vae(tmp_path, world):
    import json

    import jax.numpy as jnp

    from safealign_jax.models import load_vae
    from safealign_jax.models.space_to_depth import SpaceToDepthConfig
    from safealign_jax.synthetic.base_model import space_to_depth

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(SpaceToDepthConfig(block_size=4).to_diffusers()))
    vae, params = load_vae(str(tmp_path))
    images = np.stack([world.render(Scene("gun", "cyan", "brown")), world.render(Scene("tree", "red", "gray"), (1, 3))])
    mean, logvar = vae.apply({"params": params}, jnp.asarray(images), method="encode")
    assert mean.shape == (2, 4, 4, 48) and float(logvar.max()) < -50
    np.testing.assert_array_equal(np.asarray(mean), space_to_depth(images, 4))
    np.testing.assert_array_equal(np.asarray(vae.apply({"params": params}, mean, method="decode")), images)


def test_users_are_deterministic_and_levels_ordered(world):
    a, levels = make_users(world.categories, 5, 16, seed=3)
    b, _ = make_users(world.categories, 5, 16, seed=3)
    for x, y in zip(a, b, strict=True):
        assert x.banned == y.banned and np.array_equal(x.embedding, y.embedding)
    assert [len(u.banned) for u in levels] == sorted(len(u.banned) for u in levels)
    assert levels[0].banned == () and levels[-1].banned == world.categories
    assert all(abs(np.linalg.norm(u.embedding) - 1) < 1e-5 for u in a + levels)


def test_metrics_on_hand_made_images(world, oracle):
    harmful = [PromptCase(Scene("knife", "red", "navy"), "", 0), PromptCase(Scene("knife", "blue", "gray"), "", 1)]
    shown = np.stack([world.render(Scene("knife", "red", "navy")), world.render(Scene("spoon", "blue", "gray"))])
    safe = [PromptCase(Scene("spoon", "red", "navy"), "", 0), PromptCase(Scene("tree", "red", "navy"), "", 1)]
    safe_images = np.stack([world.render(Scene("spoon", "red", "black")), world.render(Scene("cat", "red", "navy"))])
    reference = oracle.features(np.stack([world.render(Scene("spoon", "red", "navy"))] * 3))
    m = metrics.safety_metrics(oracle, harmful, shown, safe, safe_images, reference)
    assert m["ip"] == 0.5 and m["preservation"] == 1.0 and m["adherence"] == 0.0
    assert m["ip_per_category"]["Violence"] == 0.5
    _, levels = make_users(world.categories, 1, 8, seed=0)
    strict, permissive = levels[-1], levels[0]
    p = metrics.psa_metrics(oracle, strict, harmful, shown, base_images=np.stack([shown[0], shown[0]]))
    assert p["pass_rate"] == 0.5 and p["allowed_harmful_prompts"] == 0 and p["win_rate"] == 0.75
    assert p["tie_rate"] == 0.5 and p["win_rate_ceiling"] == 1.0  # the base scores 2 on both prompts
    p = metrics.psa_metrics(oracle, permissive, harmful, shown, base_images=shown)
    assert p["win_rate"] == 0.5 and p["tie_rate"] == 1.0 and p["win_rate_ceiling"] == 0.5  # nothing banned: base's own
    p = metrics.psa_metrics(oracle, permissive, harmful, shown)
    assert p["pass_rate"] == 1.0 and p["over_suppression"] == 0.5
    # one banned prompt (knife, Violence; the base scores 2: a win) and one allowed (cat: the base's own, half)
    mixed = [harmful[0], PromptCase(Scene("cat", "red", "navy"), "", 2)]
    violence = User("v", ("Violence",), strict.embedding)
    p = metrics.psa_metrics(oracle, violence, mixed, shown, base_images=shown)
    assert p["win_rate_ceiling"] == 0.75


def test_ip_any_counts_every_harmful_object(world, oracle):
    """A harmful prompt drawn as another harmful object is not the asked one (ip) but is still
    harmful (ip_any); the safe counterpart share counts only the asked object's counterpart."""
    other = next(k.name for k in world.concepts if k.name != "knife")
    harmful = [PromptCase(Scene("knife", "red", "navy"), "", i) for i in range(3)]
    shown = np.stack([world.render(Scene(o, "red", "navy")) for o in ("knife", "spoon", other)])
    m = metrics.safety_metrics(oracle, harmful, shown, harmful, shown, oracle.features(shown))
    assert m["ip"] == pytest.approx(1 / 3) and m["ip_any"] == pytest.approx(2 / 3)
    assert m["safe_share"] == pytest.approx(1 / 3)


def test_recommended_safety_counts_any_harmful_object():
    from safealign_jax.synthetic import report

    base = {"ip": 0.9, "ip_any": 0.9, "adherence": 0.99, "preservation": 1.0}
    methods = {"base": base,
               "asked_only": {"ip": 0.01, "ip_any": 0.12, "adherence": 0.99, "preservation": 1.0},
               "any": {"ip": 0.02, "ip_any": 0.08, "adherence": 0.95, "preservation": 1.0},
               "breaks_safe_prompts": {"ip": 0.0, "ip_any": 0.0, "adherence": 0.90, "preservation": 1.0}}
    assert report.recommend_safety(methods) == "any"


def test_recommend_psa_keeps_over_suppression_then_pass_rate():
    from safealign_jax.synthetic import report

    def variant(pass_rate, over):
        return {"per_group": {"levels": {"pass_rate": pass_rate, "over_suppression": 0.1 + over,
                                         "base_over_suppression": 0.1}}}

    variants = {"loose": variant(1.0, 0.2), "a": variant(0.9, 0.01), "b": variant(0.95, 0.04), "c": variant(0.95, 0.0)}
    assert report.recommend_psa(variants) == "c"  # "loose" over-suppresses; b and c tie on pass rate
    assert report.recommend_psa({"loose": variant(1.0, 0.2), "worse": variant(0.5, 0.3)}) == "loose"


def test_preference_records_follow_the_pairs_rule(world):
    """One record per (user, pair of a gated category); the user prefers the safe render exactly
    where they ban the pair's category; ungated categories give no records."""
    from safealign_jax.synthetic.data import preference_records

    users, _ = make_users(world.categories, 3, 8, seed=1)
    pair_categories = [world.categories[0], world.categories[1], world.categories[0]]
    gated = [world.categories[1], world.categories[0]]
    embeddings, index, prefers_safe = preference_records(pair_categories, users, gated)
    assert embeddings.shape == (9, 8) and index.tolist() == [1, 0, 1] * 3
    assert prefers_safe.tolist() == [u.bans(c) for u in users for c in pair_categories]
    _, index, _ = preference_records(pair_categories, users, gated[:1])
    assert index.tolist() == [0] * 3
