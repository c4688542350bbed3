"""merge.merge_experts (the one merge call of scripts/merge.py and the demo) on random LoRA
experts of the tiny SD pipeline: each method equals the library calls it dispatches to (Co-Merge
calibrated on all categories or on each expert's own category, fusion with given text states and
reused statistics, the tree-arithmetic methods), and settings errors are raised before any model
is loaded."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util
from test_merge_script import experts, world  # noqa: F401  (module fixtures)

from safealign_jax import erase, merge
from safealign_jax.configs import merge as merge_configs
from safealign_jax.errors import UserError
from safealign_jax.pipeline import load_pipeline

CATEGORIES = ("Hate", "Shocking", "Sexual")


def settings(method, cache_dir, **fields):
    config = merge_configs.get_config(method)
    config.calibration.cache_dir = str(cache_dir)
    config.calibration.num_examples, config.calibration.batch_size = 4, 2
    config.update(fields)
    return config


def assert_trees_equal(got, want):
    got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
    assert got.keys() == want.keys()
    for path, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=str(path))


@pytest.fixture(scope="module")
def loaded(experts, world):  # noqa: F811
    experts_dir, _ = experts
    names, trained = merge.load_experts(merge.expert_paths(str(experts_dir)))
    group = dataclasses.replace(merge.Experts.of(names, trained), categories=CATEGORIES)
    return group, merge.load_base(trained), world[2], world[1]


def test_comerge_equals_calibrate_then_select(loaded):
    group, base, cache_dir, _ = loaded
    trees, scales = list(group.trees), list(group.scales)
    apply = merge.unet_apply(base.module)

    def batches(category=None):
        return merge.cache_batches(str(cache_dir), base.schedule, num_examples=4, batch_size=2, seed=0,
                                   category=category)

    for statistics_from, inputs in (("all", batches()), ("own_category", [batches(c) for c in CATEGORIES])):
        got = merge.merge_experts("comerge", group, settings("comerge", cache_dir, statistics_from=statistics_from), base)
        statistics = merge.calibrate(apply, base.params, trees, scales, inputs, "mean_abs")
        delta, wins = merge.comerge(trees, scales, statistics, "weight")
        assert_trees_equal(got.delta, delta)
        assert got.wins == wins and set(got.timings_s) == {"calibration_data_s", "calibration_s", "selection_s"}
        assert got.delta_norm == pytest.approx(merge.delta_norm(delta))
        for mine, theirs in zip(got.statistics, statistics, strict=True):
            assert_trees_equal(mine, theirs)
    again = merge.merge_experts("comerge", group, settings("comerge", cache_dir, statistics_from="own_category"), base,
                                statistics=got.statistics)
    assert_trees_equal(again.delta, got.delta)
    assert "calibration_s" not in again.timings_s  # the given statistics were used


def test_fusion_with_text_states_and_reused_statistics(loaded):
    group, base, cache_dir, pipeline = loaded
    trees, scales = list(group.trees), list(group.scales)
    pipe = load_pipeline(str(pipeline), unet=(base.module, base.params))
    states = merge.FusionStates([erase.preserved_states(pipe, [f"a {name} thing"]) for name in group.names],
                                erase.preserved_states(pipe, ["a table"]))
    config = settings("fusion", cache_dir, fusion_rest="comerge", fusion_ridge=0.01)
    comerged = merge.merge_experts("comerge", group, config, base)
    got = merge.merge_experts("fusion", group, config, base, statistics=comerged.statistics, text_states=states)
    fused = merge.fuse(base.params, trees, states.concepts, states.preserved, ridge=0.01, scales=scales)
    assert_trees_equal(got.delta, merge.combine(fused, comerged.delta))
    keyed = {"/".join(p[:-1]) for p in traverse_util.flatten_dict(fused)}
    assert keyed and got.wins == {layer: w for layer, w in comerged.wins.items() if layer not in keyed}
    linear_rest = merge.merge_experts("fusion", group, settings("fusion", cache_dir, fusion_ridge=0.01), base,
                                      text_states=states)
    assert_trees_equal(linear_rest.delta, merge.combine(fused, merge.linear(trees, scales)))


def test_tree_arithmetic_methods_need_no_base(loaded):
    group, _, cache_dir, _ = loaded
    trees, scales = list(group.trees), list(group.scales)
    cases = {
        "linear": ({"weights": "0.5,0.25,0.25"}, merge.linear(trees, scales, [0.5, 0.25, 0.25])),
        "task_arithmetic": ({"lam": 0.7}, merge.task_arithmetic(trees, scales, lam=0.7)),
        "ties": ({"density": 0.3, "lam": 0.9}, merge.ties(trees, scales, density=0.3, lam=0.9)),
        "dare": ({"drop": 0.25, "seed": 3}, merge.dare(trees, scales, key=jax.random.key(3), drop=0.25)),
    }
    for method, (fields, want) in cases.items():
        got = merge.merge_experts(method, group, settings(method, cache_dir, **fields), None)
        assert_trees_equal(got.delta, want)
        assert got.wins == {} and got.statistics is None and set(got.timings_s) == {"merge_s"}


def test_settings_errors_before_loading(loaded):
    group, _, cache_dir, _ = loaded
    cases = [
        ("comerge", settings("comerge", ""), "calibration.cache_dir is empty"),
        ("comerge", settings("comerge", cache_dir, statistics_from="mine"), "statistics_from='mine' is unknown"),
        ("fusion", settings("fusion", cache_dir), "fusion_concepts is empty"),
        ("fusion", settings("fusion", cache_dir, fusion_concepts="c.csv", fusion_rest="ties"), "fusion_rest='ties'"),
        ("magic", settings("linear", cache_dir), "--config.method='magic' is unknown"),
        ("comerge", settings("comerge", cache_dir), "comerge runs the base model"),
        ("linear", settings("linear", cache_dir, weights="1,x"), "--config.weights='1,x' is invalid"),
        ("linear", settings("linear", cache_dir, weights="1,1"), "has 2 values for 3 experts"),
    ]
    for method, config, message in cases:
        with pytest.raises(UserError, match=message):
            merge.merge_experts(method, group, config, None)
    merge.check_settings("fusion", settings("fusion", cache_dir), merge.FusionStates([], None))  # states given
