"""Merging SafetyDPO safety experts (one LoRA per category) into one model (docs/METHODS.md
section 2; SafetyDPO, arXiv 2412.10493).

Every method maps the experts (LoRA trees {P: {"a": (in, r), "b": (r, out)}} with scales
alpha / r, or delta trees) to one delta tree {P: {"delta": (in, out)}} with the same paths,
foldable into the UNet (`lora.fold_delta`) or read by `Dense` from the "lora" collection:

    linear(trees, scales, weights=None)             sum_i w_i dW_i (default: the average)
    task_arithmetic(trees, scales, lam=1.0)         lam * sum_i dW_i
    ties(trees, scales, density=0.2, lam=1.0)       trim / elect sign / disjoint mean
    dare(trees, scales, key=key, drop=0.5, weights=None)   drop + rescale, then linear
    comerge(trees, scales, statistics, granularity="weight") -> (delta tree, wins per layer)
        with statistics = calibrate(unet_apply(module), params, trees, scales, batches, "mean_abs")
        and batches = cache_batches(cache_dir, schedule, num_examples=, batch_size=, seed=)
    to_lora(delta_tree, rank) -> (LoRA tree with scale 1, relative error per layer)
    fuse(params, trees, concept_states, preserved, scales=) -> delta tree of the text-keyed
        layers (cross-attention to_k / to_v) keeping each expert's own concepts (least squares);
        combine(fused, other_merge) fills in the other layers; delta_norm(tree) -> Frobenius norm

`load_experts(expert_paths(spec))` reads expert checkpoints and checks that they share their base
model and their layers / shapes. One call runs a whole merge with the settings of configs/merge.py
(used by scripts/merge.py and the synthetic demo):

    merge_experts(method, Experts.of(names, trained), config, load_base(trained)) -> Merged
        (.delta, .wins, .statistics, .timings_s, .delta_norm); summarize(...) -> merge_summary.json
"""

from safealign_jax.merge.calibration import STATISTICS, cache_batches, calibrate, unet_apply
from safealign_jax.merge.comerge import GRANULARITIES, comerge
from safealign_jax.merge.experts import expert_name, expert_paths, load_experts
from safealign_jax.merge.fusion import combine, fuse, read_concepts
from safealign_jax.merge.methods import dare, linear, task_arithmetic, ties, trim
from safealign_jax.merge.pipeline import (
    METHODS,
    RUN_BASE,
    Base,
    Experts,
    FusionStates,
    Merged,
    check_settings,
    fusion_states,
    load_base,
    merge_experts,
)
from safealign_jax.merge.refactor import to_lora
from safealign_jax.merge.summary import summarize
from safealign_jax.merge.trees import (
    TEXT_KEYED,
    check_compatible,
    check_same_base,
    delta_norm,
    delta_tree,
    expert_deltas,
)

__all__ = [
    "GRANULARITIES", "METHODS", "RUN_BASE", "STATISTICS", "TEXT_KEYED", "Base", "Experts", "FusionStates", "Merged",
    "cache_batches", "calibrate", "check_compatible", "check_same_base", "check_settings", "combine", "comerge",
    "dare", "delta_norm", "delta_tree", "expert_deltas", "expert_name", "expert_paths", "fuse", "fusion_states",
    "linear", "load_base", "load_experts", "merge_experts", "read_concepts", "summarize", "task_arithmetic", "ties",
    "to_lora", "trim", "unet_apply",
]
