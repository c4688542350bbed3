"""The end-to-end safety-alignment run in the synthetic world (scripts/demo.py drives it).

Stages (each reuses its output when re-run in the same workdir):
  1. world + oracle validation;  2. pretrain the tiny base (cached by its settings);
  3. the base renders CoProV2-style pairs -> CSV + PNGs -> TFDS -> latent cache;
  4. one LoRA expert per category + the all-single baseline (the trainer, source=cache);
  5. merges: average, task arithmetic, TIES, DARE, Co-Merge (calibrated on the cache);
  6. PSA adapter trained on user-conditioned pairs;
  7. evaluation by the oracle on held-out phrasings and seeds;  8. exports (+ diffusers check).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import time

import jax
import numpy as np

from safealign_jax import gated, lora, merge
from safealign_jax.data.categories import slug
from safealign_jax.pipeline import load_pipeline
from safealign_jax.runs import save_trained
from safealign_jax.synthetic import base_model, metrics, prompt_sets, report
from safealign_jax.synthetic.data import (
    UserPairs,
    preference_records,
    render,
    render_pairs,
    write_coprov2,
)
from safealign_jax.synthetic.metrics import PromptCase
from safealign_jax.synthetic.oracle import Oracle, validate
from safealign_jax.synthetic.users import make_users
from safealign_jax.synthetic.world import IMAGE_SIZE, Scene, World, evaluation_templates, prompt
from safealign_jax.trainable import Trainable
from safealign_jax.trained import load_trained


class Stopwatch:
    """Wall time per stage, printed as it goes."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def stage(self, name: str, began: float) -> None:
        self.stages[name] = round(time.perf_counter() - began, 1)
        print(f"[demo] {name}: {self.stages[name]:.1f} s (total {time.perf_counter() - self.start:.0f} s)", flush=True)


def base_folder(config, workdir: str, world: World) -> tuple[str, dict]:
    """The pretrained base pipeline folder (built once per base settings) and its summary."""
    settings = {"world": world.definition(), "base": config.base.to_dict(), "seed": config.seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = config.base_cache or os.path.join(workdir, "base_cache")
    folder = os.path.join(root, f"world_base_{key}")
    marker = os.path.join(folder, "pretrain.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            return folder, {**json.load(f), "reused": True}
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    b = config.base
    base_model.build_pipeline(world, tmp, base_model.unet_config(tuple(b.block_out_channels), b.text_width, b.block_size),
                              config.seed, text_width=b.text_width, prediction_type=b.prediction_type)
    summary = base_model.pretrain(world, tmp, steps=b.steps, batch=b.batch, learning_rate=b.learning_rate,
                                  seed=config.seed, progress=config.progress)
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump({**summary, "settings": settings}, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder, {**summary, "reused": False}


def evaluation_cases(world: World, config) -> tuple[list[PromptCase], list[PromptCase], list[Scene]]:
    """Harmful and safe evaluation prompts (held-out phrasings, fresh seeds) and the safe scenes."""
    rng = np.random.default_rng([config.seed, 77])
    harmful, safe = [], []
    seed = 10_000_000
    for concept in world.concepts:
        for _ in range(config.eval.scenes_per_concept):
            scene = Scene(concept.name, world.colours[rng.integers(len(world.colours))],
                          world.backgrounds[rng.integers(len(world.backgrounds))])
            for t in evaluation_templates():
                harmful.append(PromptCase(scene, prompt(scene, t), seed))
                counterpart = scene.replace(object=concept.safe)
                safe.append(PromptCase(counterpart, prompt(counterpart, t), seed))
                seed += 1
    for obj in world.neutral:
        for _ in range(config.eval.scenes_per_neutral):
            scene = Scene(obj, world.colours[rng.integers(len(world.colours))], world.backgrounds[rng.integers(len(world.backgrounds))])
            t = int(rng.integers(len(list(evaluation_templates()))))
            safe.append(PromptCase(scene, prompt(scene, t), seed))
            seed += 1
    return harmful, safe, [c.scene for c in safe]


def train_config(template, **overrides):
    """A copy of `template` with `overrides` ({"a.b": value}, ml_collections' flattened form) set."""
    config = copy.deepcopy(template)
    config.update_from_flattened_dict(overrides)
    return config


def run(config, workdir: str) -> dict:
    """Runs every stage into `workdir`; returns the report dict (also written as report.json)."""
    from safealign_jax.data.cache import write_cache
    from safealign_jax.data.tfds_builders import CoProV2Pairs

    os.makedirs(workdir, exist_ok=True)
    # Experts, baselines and PSA share step shapes: compile once, reuse from the disk cache.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    clock, results = Stopwatch(), {"targets": {}}
    t = time.perf_counter()
    world = World(config.world.num_categories, config.world.concepts_per_category, config.seed)
    oracle = Oracle(world)
    results["oracle"] = validate(oracle)
    results["world"] = {"categories": list(world.categories), "harmful_concepts": len(world.concepts),
                        "objects": len(world.objects), "image_size": IMAGE_SIZE}
    clock.stage("world + oracle", t)

    t = time.perf_counter()
    folder, results["base_pretraining"] = base_folder(config, workdir, world)
    pipe = load_pipeline(folder)
    params = pipe.unet_params
    clock.stage("base model", t)

    sampling = {"steps": config.sampling.steps, "guidance": config.sampling.guidance, "batch": config.sampling.batch}
    harmful, safe, safe_scenes = evaluation_cases(world, config)
    ref_rng = np.random.default_rng([config.seed, 78])
    reference = oracle.features(np.stack([world.render_random(s, ref_rng) for s in safe_scenes]))
    prompts = [c.text for c in harmful + safe]
    seeds = [c.seed for c in harmful + safe]

    def evaluate(unet_params) -> tuple[dict, np.ndarray]:
        images = render(pipe, prompts, seeds, unet_params=unet_params, **sampling)
        h, s = images[: len(harmful)], images[len(harmful):]
        return metrics.safety_metrics(oracle, harmful, h, safe, s, reference), images

    t = time.perf_counter()
    methods, grids = {}, {}
    methods["base"], grids["base"] = evaluate(params)
    methods["base"]["recipe"] = "the pretrained world model"
    clock.stage("evaluate base", t)

    # CoProV2-style data through the real data path.
    t = time.perf_counter()
    data_dir = os.path.join(workdir, "data")
    cache_dir = os.path.join(data_dir, "cache")
    pairs = render_pairs(world, pipe, config.data.pairs_per_concept, config.seed,
                         steps=config.sampling.steps, guidance=config.sampling.guidance)
    if not os.path.isfile(os.path.join(cache_dir, "metadata.json")):
        table, images = write_coprov2(pairs, os.path.join(data_dir, "coprov2"))
        builder = CoProV2Pairs(table=table, images=images, data_dir=os.path.join(data_dir, "tfds"), policy="fail")
        builder.download_and_prepare()
        write_cache(str(builder.data_dir), folder, cache_dir, resolution=IMAGE_SIZE, batch_size=64,
                    progress=config.progress)
    results["data"] = {"pairs": len(pairs.categories), "pairs_per_concept": config.data.pairs_per_concept}
    preserved_prompts = prompt_sets.preserved(pairs, world, config.seed)
    retain_file = os.path.join(data_dir, "retain_prompts.txt")
    with open(retain_file, "w") as f:
        f.write("\n".join(preserved_prompts) + "\n")
    clock.stage("render pairs -> TFDS -> latent cache", t)

    deltas = {}

    def add(name: str, recipe: str, delta: dict | None = None, unet_params=None) -> None:
        methods[name], grids[name] = evaluate(lora.fold_delta(params, delta) if unet_params is None else unet_params)
        methods[name]["recipe"] = recipe
        if delta is not None:
            methods[name]["delta_norm"] = merge.delta_norm(delta)
            deltas[name] = delta

    # Closed-form cross-attention edit of every concept at once (no training).
    t = time.perf_counter()
    states = prompt_sets.EditStates.encode(pipe, pairs, world, preserved_prompts)
    for weight in (config.erase.preserve_weight, *config.erase.other_preserve_weights):
        erased, fit = states.edit(params, world.categories, keep_other_categories=False, preserve_weight=weight,
                                  ridge=config.erase.ridge)
        name = "erase" if weight == config.erase.preserve_weight else f"erase_w{weight:g}"
        add(name, f"closed-form to_k/to_v edit of every concept (preserve weight {weight:g})", erased)
        methods[name]["edit_fit"] = fit
    clock.stage("closed-form edit", t)

    expert_cfg = train_config(config.expert, **{"model.path": os.path.join(folder, "unet"), "data.source": "cache",
                                                "data.cache_dir": cache_dir, "seed": config.seed,
                                                "train.progress_bar": config.progress})
    results["experts"], paper_experts = {}, None
    for objective, overrides in config.objectives.items():
        t = time.perf_counter()
        overrides = {f"dpo.{k}": v for k, v in overrides.items()}
        if overrides.get("dpo.preserve_weight"):
            overrides["dpo.retain_prompts"] = retain_file
        objective_cfg = train_config(expert_cfg, **overrides)
        label = objective_label(objective_cfg.dpo)
        experts = train_experts(objective_cfg, world, os.path.join(workdir, "experts", objective))
        clock.stage(f"train {len(experts)} experts ({objective})", t)
        t = time.perf_counter()
        results["experts"][objective] = expert_table(world, oracle, pipe, params, experts, harmful, safe, sampling)
        clock.stage(f"evaluate experts alone ({objective})", t)
        t = time.perf_counter()
        loaded = [load_trained(d) for d in experts.values()]
        merged = merged_deltas(config, pipe, params, world, states, loaded, cache_dir,
                               paper=objective == "dpo")
        for method, (recipe, delta) in merged.items():
            add(method if objective == "dpo" else f"{objective}_{method}", f"{label} + {recipe}", delta)
        if objective == "dpo":
            paper_experts = loaded
        clock.stage(f"merge + evaluate ({objective})", t)

    t = time.perf_counter()
    steps = config.expert.train.steps * len(world.categories)
    all_single_dir = os.path.join(workdir, "all_single")
    train(train_config(expert_cfg, **{"data.category": "", "train.steps": steps, "train.checkpoint_every": steps}),
          all_single_dir)
    add("all_single", f"one DPO LoRA on all categories, {steps} steps (as many as all experts)",
        unet_params=load_trained(all_single_dir).folded(params))
    clock.stage("train + evaluate all-single (fair)", t)

    # Concept-scaling curve: the first k categories removed by all-single vs experts + Co-Merge.
    t = time.perf_counter()
    curve = CurveSetup(world, oracle, pipe, params, harmful, sampling, expert_cfg, merge_settings(config, cache_dir),
                       os.path.join(workdir, "scaling"))
    results["scaling"] = scaling_curve(config, curve, merge.Experts.of(world.categories, paper_experts))
    results["scaling"].append({"categories": len(world.categories), "concepts": len(world.concepts),
                               "ip_all_single": methods["all_single"]["ip"], "ip_experts_comerge": methods["comerge"]["ip"]})
    clock.stage("concept-scaling curve", t)
    results["methods"] = methods

    # PSA: the paper's adapter and the user-gated per-category edits.
    t = time.perf_counter()
    users, levels = make_users(world.categories, config.psa.users + config.psa.unseen_users,
                               config.psa.embed_dim, config.seed)
    seen, unseen = users[: config.psa.users], users[config.psa.users:]
    groups = {"levels": levels, "seen": seen[: config.eval.psa_users_per_group],
              "unseen": unseen[: config.eval.psa_users_per_group]}

    def psa_config(template, **overrides):
        return train_config(template, **{"model.path": os.path.join(folder, "unet"), "seed": config.seed,
                                          "psa.enable": True, "psa.embed_dim": config.psa.embed_dim,
                                          "train.progress_bar": config.progress, **overrides})

    def render_harmful(**kwargs) -> np.ndarray:
        return render(pipe, [c.text for c in harmful], [c.seed for c in harmful], **kwargs, **sampling)

    def user_pairs(train_cfg) -> UserPairs:
        return UserPairs(pairs, seen, folder, seed=config.seed, rows=slice(None), block=pipe.vae_scale,
                         global_rows=train_cfg.train.pairs_per_device * jax.device_count(),
                         gated_categories=list(world.categories))

    base_harmful = grids["base"][: len(harmful)]
    clock.stage("PSA users and user-conditioned pairs", t)
    variants, psa_grids, psa_runs = {}, {}, {}

    def psa_variant(name: str, make_run, render_for_user, recipe: str) -> None:
        """Makes the PSA variant `name` (`make_run(run_dir)` trains or fits it there;
        `render_for_user(run, user)` gives its images) and evaluates it."""
        t = time.perf_counter()
        run_dir = os.path.join(workdir, "psa", name)
        make_run(run_dir)
        psa_runs[name] = load_trained(run_dir)
        clock.stage(f"train PSA {name}", t)
        t = time.perf_counter()
        variants[name], psa_grids[name] = evaluate_psa(oracle, harmful, base_harmful, groups,
                                                       lambda user: render_for_user(psa_runs[name], user))
        variants[name]["recipe"] = recipe
        clock.stage(f"evaluate PSA {name}", t)

    def trained_by(train_cfg):
        return lambda run_dir: train(train_cfg, run_dir, source=user_pairs(train_cfg))

    def render_folded(run, user) -> np.ndarray:
        return render_harmful(unet_params=run.folded_for_user(params, user.embedding))

    adapter_cfg = psa_config(config.psa.train)
    psa_variant("adapter", trained_by(adapter_cfg),
                lambda run, user: render_harmful(adapter=(run.adapter, run.adapter_scale),
                                                 user_embeddings=np.repeat(user.embedding[None], len(harmful), 0)),
                f"paper: user adapter, N={config.psa.train.psa.num_tokens} token, "
                f"user-conditioned DPO (beta {config.psa.train.dpo.beta:g})")

    t = time.perf_counter()
    category_runs = category_edits(config, workdir, world, states, params, psa_runs["adapter"].base_model)
    clock.stage("closed-form edit per category", t)
    gated_cfg = psa_config(config.psa.gated, **{"psa.gated.experts": ",".join(category_runs),
                                                "psa.gated.categories": ",".join(world.categories)})
    psa_variant("gated", trained_by(gated_cfg), render_folded,
                "user-gated closed-form edits per category, gates sigmoid(W u + b) learned "
                f"with user-conditioned DPO (beta {config.psa.gated.dpo.beta:g}"
                f"{', category-routed' if config.psa.gated.psa.gated.route else ''})")

    def fit_gated(run_dir: str) -> None:
        run_config = {"psa": {"enable": True, "variant": "gated", "embed_dim": config.psa.embed_dim,
                              "gated": {"categories": ",".join(world.categories), "hard": config.psa.fit.hard}},
                      "fit": {**config.psa.fit.to_dict(), "users": config.psa.users, "edits": config.erase.to_dict()}}
        if current_run(run_dir, run_config):
            return
        tree = gated.init([load_trained(r).delta for r in category_runs], config.psa.embed_dim)
        records = preference_records(pairs.categories, seen, list(world.categories))
        tree["gate"] = gated.fit_gates(*records, len(world.categories), l2=config.psa.fit.l2)
        save_trained(run_dir, {"gated": tree}, run_config, psa_runs["adapter"].base_model)

    psa_variant("gated_fit", fit_gated, render_folded,
                "user-gated closed-form edits per category, gates fitted to the training users' "
                f"preferences (Bradley-Terry, L2 {config.psa.fit.l2:g}){', thresholded' if config.psa.fit.hard else ''}")

    results["psa"] = {"variants": variants}
    results["recommended"] = {"safety": report.recommend_safety(methods), "psa": report.recommend_psa(variants)}
    t = time.perf_counter()
    recommended = results["recommended"]["safety"]
    results["exports"] = export(config, workdir, folder, {n: deltas[n] for n in dict.fromkeys(["comerge", recommended])
                                                          if n in deltas}, recommended, psa_runs["adapter"], params)
    clock.stage("export", t)
    results["targets"] = report.targets(results)
    results["stages_s"] = clock.stages
    results["wall_s"] = round(time.perf_counter() - clock.start, 1)
    report.write(workdir, results, world, harmful, grids, psa_grids[results["recommended"]["psa"]])
    return results


def current_run(run_dir: str, settings: dict) -> bool:
    """Whether `run_dir` holds a run saved with `settings` as its config; a run saved with other
    settings is removed (so it is made again)."""
    if os.path.isdir(run_dir) and load_trained(run_dir).config == settings:
        return True
    shutil.rmtree(run_dir, ignore_errors=True)
    return False


def category_edits(config, workdir: str, world: World, states, params, base_model: dict) -> list[str]:
    """One closed-form edit run per category (workdir/erase/<category>/): its harmful prompts ->
    safe rewrites, the preserved prompts and the other categories' harmful prompts kept. A run
    made with other settings is made again."""
    folders = []
    for category in world.categories:
        run_dir = os.path.join(workdir, "erase", slug(category))
        settings = {"erase": config.erase.to_dict(), "category": category}
        if not current_run(run_dir, settings):
            delta, _ = states.edit(params, (category,), keep_other_categories=True,
                                   preserve_weight=config.erase.preserve_weight, ridge=config.erase.ridge)
            save_trained(run_dir, {"delta": delta}, settings, base_model)
        folders.append(run_dir)
    return folders


def objective_label(dpo) -> str:
    """The expert objective in words, e.g. "DPO (beta 1000) + SFT x1 + preservation x10 experts"."""
    terms = [f"DPO (beta {dpo.beta:g})"]
    if dpo.get("sft_weight", 0.0):
        terms.append(f"SFT x{dpo.sft_weight:g}")
    if dpo.get("preserve_weight", 0.0):
        terms.append(f"preservation x{dpo.preserve_weight:g}")
    if dpo.get("sdpo", False):
        terms.append("SDPO safeguard")
    return " + ".join(terms) + " experts"


def train(config, workdir: str, source=None) -> None:
    """The library trainer, skipped when `workdir` already holds its final checkpoint."""
    from safealign_jax.train.loop import train as train_run

    done = os.path.join(workdir, "checkpoints", str(config.train.steps))
    if not os.path.isdir(done):
        train_run(config, workdir, source=source)


def train_experts(config, world: World, root: str) -> dict[str, str]:
    """One expert per category under `root`; {category: run folder}."""
    runs = {}
    for category in world.categories:
        runs[category] = os.path.join(root, slug(category))
        train(train_config(config, **{"data.category": category}), runs[category])
    return runs


def final_metrics(run_dir: str, last: int = 20) -> dict:
    """Mean of each per-step metric over the last `last` steps of a run's metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()][-last:]
    keys = set.intersection(*(set(r) for r in records)) - {"step"}
    return {k: float(np.mean([r[k] for r in records])) for k in sorted(keys)}


def expert_table(world, oracle, pipe, params, experts: dict[str, str], harmful, safe, sampling) -> dict:
    """Per expert, alone: IP and the share drawn as the safe counterpart on its own category's
    harmful prompts, adherence on every safe prompt, and the winner's / loser's error change
    against the reference at the end of training (metrics.jsonl)."""
    out = {}
    for category, run_dir in experts.items():
        own = [c for c in harmful if world.category_of(c.scene.object) == category]
        cases = own + safe
        images = render(pipe, [c.text for c in cases], [c.seed for c in cases],
                        unet_params=load_trained(run_dir).folded(params), **sampling)
        seen = oracle.read(images).scenes(world)
        shown = [s.object for s in seen[: len(own)]]
        trained = final_metrics(run_dir)
        out[category] = {
            "own_ip": float(np.mean([o == c.scene.object for o, c in zip(shown, own, strict=True)])),
            "safe_share": float(np.mean([o == world.concept_of[c.scene.object].safe for o, c in zip(shown, own, strict=True)])),
            "adherence": float(np.mean([s == c.scene for s, c in zip(seen[len(own):], safe, strict=True)])),
            "mse_w_diff": trained["mse_w_diff"], "mse_l_diff": trained["mse_l_diff"],
        }
    return out


def merge_settings(config, cache_dir: str):
    """configs/merge.py's settings for the demo's merges: config.merge's Co-Merge calibrated on
    `cache_dir` (seed config.seed), fusion with the closed-form edit's preserve weight and ridge
    and Co-Merge on the other layers."""
    from safealign_jax.configs import merge as merge_configs

    m = config.merge
    return train_config(merge_configs.get_config(), **{
        "seed": config.seed, "comerge.granularity": m.granularity, "comerge.statistic": m.statistic,
        "calibration.cache_dir": cache_dir, "calibration.num_examples": m.calibration_examples,
        "calibration.batch_size": m.calibration_batch, "calibration.seed": config.seed,
        "fusion_preserve_weight": config.erase.preserve_weight, "fusion_ridge": config.erase.ridge,
        "fusion_rest": "comerge"})


def merged_deltas(config, pipe, params, world, states, experts, cache_dir, paper: bool) -> dict:
    """{method: (recipe, delta tree)} of the experts' merges: Co-Merge and least-squares fusion
    of the text-keyed layers always; averaging, task arithmetic, TIES, DARE and Co-Merge with
    own-category statistics for the paper's experts."""
    from safealign_jax.schedulers import ddpm_schedule

    m, settings = config.merge, merge_settings(config, cache_dir)
    group = merge.Experts.of(world.categories, experts)
    base = merge.Base(pipe.unet, params, ddpm_schedule(pipe.scheduler))

    def merged(method, statistics=None, text_states=None, **overrides) -> merge.Merged:
        return merge.merge_experts(method, group, train_config(settings, **overrides), base, statistics=statistics,
                                   text_states=text_states)

    comerged = merged("comerge")
    text_states = merge.FusionStates([states.sources[c] for c in world.categories], states.preserved)
    out = {"comerge": ("Co-Merge", comerged.delta),
           "fusion": ("least-squares fusion of to_k/to_v, Co-Merge elsewhere",
                      merged("fusion", comerged.statistics, text_states).delta)}
    if paper:
        out.update({
            "average": ("average", merged("linear").delta),
            "task_arithmetic": (f"task arithmetic (lambda {m.task_lambda:g})",
                                merged("task_arithmetic", lam=m.task_lambda).delta),
            "ties": ("TIES", merged("ties", density=m.ties_density, lam=m.ties_lambda).delta),
            "dare": ("DARE", merged("dare", drop=m.dare_drop).delta),
            "comerge_own": ("Co-Merge, statistics from each expert's own category",
                            merged("comerge", statistics_from="own_category").delta),
        })
    return out


@dataclasses.dataclass(frozen=True)
class CurveSetup:
    """What the concept-scaling curve trains, merges and scores with: the world and its oracle,
    the base pipeline and UNet params, the harmful cases and sampling settings, the experts'
    training config, the merge settings (`merge_settings`) and the folder of its all-single runs."""

    world: World
    oracle: Oracle
    pipe: object
    params: dict
    harmful: list[PromptCase]
    sampling: dict
    expert_config: object
    merge_settings: object
    folder: str


def scaling_curve(config, setup: CurveSetup, experts: merge.Experts) -> list[dict]:
    """IP on the first k categories' harmful prompts, for k in config.curve.categories: all-single
    trained on those k categories for k x the expert steps vs Co-Merge of their k experts."""
    from safealign_jax.schedulers import ddpm_schedule

    world, pipe, params = setup.world, setup.pipe, setup.params
    base = merge.Base(pipe.unet, params, ddpm_schedule(pipe.scheduler))
    points = []
    for k in config.curve.categories:
        k = min(k, len(world.categories))
        chosen = world.categories[:k]
        cases = [c for c in setup.harmful if world.category_of(c.scene.object) in chosen]
        run_dir = os.path.join(setup.folder, f"all_single_{k}")
        steps = config.expert.train.steps * k
        train(train_config(setup.expert_config, **{"data.category": ",".join(chosen), "train.steps": steps,
                                                   "train.checkpoint_every": steps}), run_dir)
        single = load_trained(run_dir)
        comerged = merge.merge_experts("comerge", experts.first(k), setup.merge_settings, base).delta
        point = {"categories": k, "concepts": sum(len(world.concepts_in(c)) for c in chosen)}
        for name, unet_params in (("all_single", single.folded(params)), ("experts_comerge", lora.fold_delta(params, comerged))):
            images = render(pipe, [c.text for c in cases], [c.seed for c in cases], unet_params=unet_params,
                            **setup.sampling)
            seen = setup.oracle.read(images).scenes(world)
            point[f"ip_{name}"] = float(np.mean([s.object == c.scene.object for s, c in zip(seen, cases, strict=True)]))
        points.append(point)
    return points


def evaluate_psa(oracle, harmful, base_harmful_images, groups: dict, render_for_user) -> tuple[dict, dict]:
    """Per user and per user group: pass rate, over-suppression (and the base's), win rate vs the
    base; `render_for_user(user)` gives the images of `harmful` for that user. Returns (results,
    {level user id: images})."""
    out, grid_images = {"per_user": {}, "per_group": {}}, {}
    for group, users in groups.items():
        rows = []
        for user in users:
            images = render_for_user(user)
            m = metrics.psa_metrics(oracle, user, harmful, images, base_harmful_images)
            base = metrics.psa_metrics(oracle, user, harmful, base_harmful_images)
            m.update(base_pass_rate=base["pass_rate"], base_over_suppression=base["over_suppression"],
                     banned=list(user.banned), group=group)
            out["per_user"][user.user_id] = m
            rows.append(m)
            if group == "levels":
                grid_images[user.user_id] = images
        out["per_group"][group] = {k: float(np.mean([r[k] for r in rows])) for k in
                                   ("pass_rate", "base_pass_rate", "over_suppression", "base_over_suppression", "win_rate",
                                    "tie_rate", "win_rate_ceiling")}
    return out, grid_images


def export(config, workdir, folder, merged: dict, checked: str, psa, params) -> dict:
    """Each of `merged` ({method: delta}) as a peft LoRA (SVD rank r) and as a run folder, and the
    PSA adapter in the IP-Adapter layout; with torch installed, the LoRA of method `checked` and
    the adapter loaded in diffusers and compared with our UNet."""
    from safealign_jax.convert.adapter_files import save_ip_adapter
    from safealign_jax.convert.lora_files import save_peft_lora

    out = os.path.join(workdir, "export")
    os.makedirs(out, exist_ok=True)
    rank = config.merge.export_rank
    result, trees = {"svd_rank": rank}, {}
    for name, delta in merged.items():
        trees[name], errors = merge.to_lora(delta, rank)
        run_dir = os.path.join(workdir, "merged", name)
        if not os.path.isdir(run_dir):
            save_trained(run_dir, Trainable({"lora": trees[name]}), {}, psa.base_model)
        lora_file = os.path.join(out, f"{name}_lora.safetensors")
        save_peft_lora(lora_file, trees[name], rank, float(rank))
        result[name] = {"lora": lora_file, "svd_relative_error_mean": float(np.mean(list(errors.values()))),
                        "svd_relative_error_max": float(np.max(list(errors.values())))}
    adapter_file = os.path.join(out, "psa_adapter.safetensors")
    save_ip_adapter(adapter_file, psa.adapter, params)
    result["ip_adapter"] = adapter_file
    if not all(importlib.util.find_spec(m) for m in ("torch", "diffusers")):
        result["diffusers_check"] = "skipped (torch extra not installed)"
        return result
    from safealign_jax.synthetic.torch_check import compare_with_diffusers

    result["diffusers_check"] = compare_with_diffusers(folder, params, trees[checked], rank, psa,
                                                       result[checked]["lora"], adapter_file)
    result["diffusers_check"]["lora_of"] = checked
    return result
