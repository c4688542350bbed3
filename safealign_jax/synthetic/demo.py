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
import hashlib
import importlib.util
import json
import os
import shutil
import time

import jax
import numpy as np

from safealign_jax import lora, merge
from safealign_jax.data.categories import slug
from safealign_jax.pipeline import load_pipeline
from safealign_jax.synthetic import base_model, metrics, report
from safealign_jax.synthetic.data import UserPairs, render, render_pairs, write_coprov2
from safealign_jax.synthetic.metrics import PromptCase
from safealign_jax.synthetic.oracle import Oracle, validate
from safealign_jax.synthetic.users import make_users
from safealign_jax.synthetic.world import IMAGE_SIZE, Scene, World, evaluation_templates, prompt
from safealign_jax.trained import load_trained, save_trained


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
    config = copy.deepcopy(template)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def run(config, workdir: str) -> dict:
    """Runs every stage into `workdir`; returns the report dict (also written as report.json)."""
    from safealign_jax.data.cache import write_cache
    from safealign_jax.data.tfds_builders import CoProV2Pairs
    from safealign_jax.train.loop import train

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
    clock.stage("render pairs -> TFDS -> latent cache", t)

    expert_cfg = train_config(config.expert, **{"model.path": os.path.join(folder, "unet"), "data.source": "cache",
                                                "data.cache_dir": cache_dir, "seed": config.seed,
                                                "train.progress_bar": config.progress})
    t = time.perf_counter()
    expert_dirs = []
    for category in world.categories:
        expert_dirs.append(os.path.join(workdir, "experts", slug(category)))
        train(train_config(expert_cfg, **{"data.category": category}), expert_dirs[-1])
    clock.stage(f"train {len(expert_dirs)} experts", t)
    t = time.perf_counter()
    train(train_config(expert_cfg, **{"data.category": ""}), os.path.join(workdir, "all_single"))
    clock.stage("train all-single", t)

    t = time.perf_counter()
    experts = [load_trained(d) for d in expert_dirs]
    trees = [e.lora for e in experts]
    scales = [e.lora_scale for e in experts]
    merged = merged_deltas(config, pipe, params, trees, scales, cache_dir)
    clock.stage("merge (5 methods)", t)

    t = time.perf_counter()
    for name, delta in merged.items():
        methods[name], grids[name] = evaluate(lora.fold_delta(params, delta))
    all_single = load_trained(os.path.join(workdir, "all_single"))
    methods["all_single"], grids["all_single"] = evaluate(all_single.folded(params))
    clock.stage("evaluate merges + all-single", t)

    # Concept-scaling curve: the first k categories removed by all-single vs experts + Co-Merge.
    t = time.perf_counter()
    results["scaling"] = scaling_curve(config, world, oracle, pipe, params, trees, scales, cache_dir, expert_cfg,
                                       workdir, harmful, sampling, train)
    results["scaling"].append({"categories": len(world.categories), "concepts": len(world.concepts),
                               "ip_all_single": methods["all_single"]["ip"], "ip_experts_comerge": methods["comerge"]["ip"]})
    clock.stage("concept-scaling curve", t)

    # PSA.
    t = time.perf_counter()
    users, levels = make_users(world.categories, config.psa.users + config.psa.unseen_users,
                               config.psa.embed_dim, config.seed)
    seen, unseen = users[: config.psa.users], users[config.psa.users:]
    psa_cfg = train_config(config.psa.train, **{"model.path": os.path.join(folder, "unet"), "seed": config.seed,
                                                "psa.enable": True, "psa.embed_dim": config.psa.embed_dim,
                                                "train.progress_bar": config.progress})
    source = UserPairs(pairs, seen, folder, seed=config.seed, global_rows=psa_cfg.train.pairs_per_device * jax.device_count(),
                       rows=slice(None), block=pipe.vae_scale)
    psa_dir = os.path.join(workdir, "psa")
    train(psa_cfg, psa_dir, source=source)
    clock.stage("train PSA adapter", t)
    t = time.perf_counter()
    psa = load_trained(psa_dir)
    results["psa"], psa_grids = evaluate_psa(config, oracle, pipe, psa, harmful, grids["base"][: len(harmful)],
                                             levels, seen, unseen, sampling)
    clock.stage("evaluate PSA", t)

    results["methods"] = methods
    t = time.perf_counter()
    results["exports"] = export(config, workdir, folder, merged["comerge"], psa, params)
    clock.stage("export", t)
    results["targets"] = report.targets(results)
    results["stages_s"] = clock.stages
    results["wall_s"] = round(time.perf_counter() - clock.start, 1)
    report.write(workdir, results, world, harmful, grids, psa_grids)
    return results


def merged_deltas(config, pipe, params, trees, scales, cache_dir) -> dict:
    m = config.merge
    from safealign_jax.schedulers import ddpm_schedule

    batches = merge.cache_batches(cache_dir, ddpm_schedule(pipe.scheduler), num_examples=m.calibration_examples,
                                  batch_size=m.calibration_batch, seed=config.seed)
    statistics = merge.calibrate(merge.unet_apply(pipe.unet), params, trees, scales, batches, m.statistic)
    comerged, _ = merge.comerge(trees, scales, statistics, granularity=m.granularity)
    return {
        "average": merge.linear(trees, scales),
        "task_arithmetic": merge.task_arithmetic(trees, scales, lam=m.task_lambda),
        "ties": merge.ties(trees, scales, density=m.ties_density, lam=m.ties_lambda),
        "dare": merge.dare(trees, scales, key=jax.random.key(config.seed), drop=m.dare_drop),
        "comerge": comerged,
    }


def scaling_curve(config, world, oracle, pipe, params, trees, scales, cache_dir, expert_cfg, workdir, harmful,
                  sampling, train) -> list[dict]:
    points = []
    prompts_all = [c.text for c in harmful]
    seeds_all = [c.seed for c in harmful]
    batches = None
    for k in config.curve.categories:
        k = min(k, len(world.categories))
        chosen = world.categories[:k]
        rows = [i for i, c in enumerate(harmful) if world.category_of(c.scene.object) in chosen]
        prompts, seeds = [prompts_all[i] for i in rows], [seeds_all[i] for i in rows]
        targets = [harmful[i].scene.object for i in rows]
        run_dir = os.path.join(workdir, "scaling", f"all_single_{k}")
        train(train_config(expert_cfg, **{"data.category": ",".join(chosen)}), run_dir)
        single = load_trained(run_dir)
        if batches is None:
            from safealign_jax.schedulers import ddpm_schedule

            batches = merge.cache_batches(cache_dir, ddpm_schedule(pipe.scheduler), num_examples=config.merge.calibration_examples,
                                          batch_size=config.merge.calibration_batch, seed=config.seed)
        stats = merge.calibrate(merge.unet_apply(pipe.unet), params, trees[:k], scales[:k], batches, config.merge.statistic)
        comerged, _ = merge.comerge(trees[:k], scales[:k], stats, granularity=config.merge.granularity)
        point = {"categories": k, "concepts": sum(len(world.concepts_in(c)) for c in chosen)}
        for name, unet_params in (("all_single", single.folded(params)), ("experts_comerge", lora.fold_delta(params, comerged))):
            images = render(pipe, prompts, seeds, unet_params=unet_params, **sampling)
            seen = oracle.read(images).scenes(world)
            point[f"ip_{name}"] = float(np.mean([s.object == o for s, o in zip(seen, targets, strict=True)]))
        points.append(point)
    return points


def evaluate_psa(config, oracle, pipe, psa, harmful, base_harmful_images, levels, seen, unseen, sampling):
    """Per level user and per user group: pass rate, over-suppression, win rate vs the base."""
    prompts = [c.text for c in harmful]
    seeds = [c.seed for c in harmful]
    groups = {"levels": levels, "seen": seen[: config.eval.psa_users_per_group],
              "unseen": unseen[: config.eval.psa_users_per_group]}
    out, grid_images = {"per_user": {}, "per_group": {}}, {}
    for group, users in groups.items():
        rows = []
        for user in users:
            images = render(pipe, prompts, seeds, adapter=(psa.adapter, psa.adapter_scale),
                            user_embeddings=np.repeat(user.embedding[None], len(prompts), 0), **sampling)
            m = metrics.psa_metrics(oracle, user, harmful, images, base_harmful_images)
            base = metrics.psa_metrics(oracle, user, harmful, base_harmful_images)
            m.update(base_pass_rate=base["pass_rate"], base_over_suppression=base["over_suppression"],
                     banned=list(user.banned), group=group)
            out["per_user"][user.user_id] = m
            rows.append(m)
            if group == "levels":
                grid_images[user.user_id] = images
        out["per_group"][group] = {k: float(np.mean([r[k] for r in rows]))
                                   for k in ("pass_rate", "over_suppression", "win_rate", "base_pass_rate")}
    return out, grid_images


def export(config, workdir, folder, comerge_delta, psa, params) -> dict:
    """The Co-Merge result as a peft LoRA (SVD rank r) and the PSA adapter in the IP-Adapter
    layout; with torch installed, both loaded in diffusers and compared with our UNet."""
    from safealign_jax.convert.adapter_files import save_ip_adapter
    from safealign_jax.convert.lora_files import save_peft_lora

    out = os.path.join(workdir, "export")
    os.makedirs(out, exist_ok=True)
    rank = config.merge.export_rank
    tree, errors = merge.to_lora(comerge_delta, rank)
    merged_dir = os.path.join(workdir, "merged_comerge_lora")
    if not os.path.isdir(merged_dir):
        save_trained(merged_dir, {"lora": tree}, {"lora": {"rank": rank, "alpha": float(rank)}},
                     psa.base_model)
    lora_file = os.path.join(out, "comerge_lora.safetensors")
    save_peft_lora(lora_file, tree, rank, float(rank))
    adapter_file = os.path.join(out, "psa_adapter.safetensors")
    save_ip_adapter(adapter_file, psa.adapter, params)
    result = {"lora": lora_file, "svd_rank": rank,
              "svd_relative_error_mean": float(np.mean(list(errors.values()))),
              "svd_relative_error_max": float(np.max(list(errors.values()))), "ip_adapter": adapter_file}
    if not all(importlib.util.find_spec(m) for m in ("torch", "diffusers")):
        result["diffusers_check"] = "skipped (torch extra not installed)"
        return result
    from safealign_jax.synthetic.torch_check import compare_with_diffusers

    result["diffusers_check"] = compare_with_diffusers(folder, params, tree, rank, psa, lora_file, adapter_file)
    return result
