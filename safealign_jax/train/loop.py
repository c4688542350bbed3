"""The training loop: mesh, base model + LoRA, AOT-compiled step, checkpoints, metrics.

Multi-host: with `config.distributed.initialize`, `jax.distributed.initialize()` runs first;
every process builds the same mesh over all devices and feeds only its rows of each global
batch (`jax.make_array_from_process_local_data`). Metrics stay on device inside the loop and
are fetched every `train.log_every` steps; process 0 writes workdir/metrics.jsonl (one line per
step: the step's metrics, `lr` = the learning rate of the update the step belongs to, `wall_time`
= Unix seconds when the step's metrics were fetched), TensorBoard events in workdir/tensorboard
(with `train.tensorboard` and tensorboardX installed: the `tensorboard` extra), a tqdm bar and
workdir/summary.json. Each start-up stage (base model, data, resume, compile, first step) prints
one line with its time (`cli.status`; with `train.progress_bar`, not with --verbosity=-2).

Reliability (RELIABILITY.md, `train/reliability.py`): resuming uses the newest readable checkpoint
and truncates metrics.jsonl to its step; metrics are written before each checkpoint; SIGTERM /
SIGINT save a final checkpoint and raise `Preempted`; a step with a non-finite loss or gradient
applies no update and stops the run (or is skipped with `train.skip_nonfinite`).
"""

import json
import os
import time

import jax
import numpy as np

from safealign_jax import adapter, cli, gated, lora
from safealign_jax.errors import UserError
from safealign_jax.perf.cache import enable_compilation_cache
from safealign_jax.perf.flops import model_flops
from safealign_jax.perf.peak import Peak, device_peak
from safealign_jax.runs import Checkpoints, abstract_like
from safealign_jax.train import mesh as mesh_lib
from safealign_jax.train import objective, reliability
from safealign_jax.train import state as state_lib
from safealign_jax.train.config import validate
from safealign_jax.train.data import SyntheticPairs
from safealign_jax.train.model import load_base
from safealign_jax.train.samples import SampleGrids
from safealign_jax.train.step import compile_step, make_train_step


def initialize_distributed(config) -> None:
    """`jax.distributed.initialize` from `config.distributed` (empty fields = auto-detect)."""
    d = config.distributed
    if d.initialize:
        jax.distributed.initialize(
            coordinator_address=d.coordinator or None,
            num_processes=d.num_processes or None,
            process_id=d.process_id if d.process_id >= 0 else None,
            initialization_timeout=d.initialization_timeout_s,
            heartbeat_timeout_seconds=d.heartbeat_timeout_s,
            shutdown_timeout_seconds=d.shutdown_timeout_s,
        )


def _checked_cache(source, config, module):
    """`source` (a cache reader) once its text states' width is the UNet's cross-attention width."""
    if source.empty_embedding.shape[-1] != module.config.cross_attention_dim:
        raise UserError(f"--config.data.cache_dir={config.data.cache_dir}: text states of width "
                        f"{source.empty_embedding.shape[-1]}, but the UNet expects "
                        f"{module.config.cross_attention_dim} (cache made with another pipeline?).")
    return source


def make_source(config, module, global_rows: int, rows: slice):
    """The batch source of `config.data.source` delivering this process's `rows`."""
    if config.data.source == "sage_cache":
        from safealign_jax.data.sage_cache import SageCachedPairs

        g = config.psa.gated
        routed = (gated.category_names(g.experts, g.categories)
                  if config.psa.enable and config.psa.variant == "gated" and g.route else None)
        return _checked_cache(
            SageCachedPairs(config.data.cache_dir, config.data.embeddings, seed=config.seed,
                            global_rows=global_rows, rows=rows, embed_dim=config.psa.embed_dim,
                            flip=config.data.flip, num_threads=config.data.num_threads,
                            missing_embedding=config.data.missing_embedding, gated_categories=routed),
            config, module)
    if config.data.source == "cache":
        from safealign_jax.data.cache import CachedPairs

        return _checked_cache(
            CachedPairs(config.data.cache_dir, seed=config.seed, global_rows=global_rows, rows=rows,
                        category=config.data.category or None,
                        both_captions=config.data.both_captions, flip=config.data.flip,
                        num_threads=config.data.num_threads),
            config, module)
    cfg = module.config
    added = None
    if cfg.addition_embed_type == "text_time":
        added = (cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, 6)
    return SyntheticPairs(config.seed, global_rows, rows, config.data.resolution // 8,
                          config.data.latent_channels, config.data.seq_len,
                          cfg.cross_attention_dim, added,
                          user_dim=config.psa.embed_dim if config.psa.enable else 0)


def lora_config(config) -> lora.LoRAConfig:
    """The LoRA settings of a training config (rank, alpha, target-path regex)."""
    return lora.LoRAConfig(rank=config.lora.rank, alpha=config.lora.alpha, targets=config.lora.targets)


def gated_experts(config) -> tuple[list[dict], list[str]]:
    """(category delta trees, category names) of `config.psa.gated`: each run folder of
    psa.gated.experts read with `load_trained` (a LoRA becomes its dense delta s a b)."""
    from safealign_jax.merge.trees import check_same_base, delta_tree, expert_deltas
    from safealign_jax.trained import load_trained

    g = config.psa.gated
    folders = [f.strip() for f in g.experts.split(",") if f.strip()]
    if not folders:
        raise UserError("--config.psa.gated.experts is empty: give one LoRA or delta run folder per category.")
    names = gated.category_names(g.experts, g.categories)
    if len(names) != len(folders):
        raise UserError(f"--config.psa.gated.categories names {len(names)} categories for "
                        f"{len(folders)} runs in --config.psa.gated.experts.")
    runs = [load_trained(f) for f in folders]
    for folder, run in zip(folders, runs, strict=True):
        if run.lora is None and run.delta is None:
            raise UserError(f"--config.psa.gated.experts: {folder} holds no LoRA or delta.")
    check_same_base([run.base_model for run in runs], names)
    trees = [run.lora if run.lora is not None else run.delta for run in runs]
    scales = [run.lora_scale if run.lora is not None else 1.0 for run in runs]
    layers = [expert_deltas([t], [s], [n])[0] for t, s, n in zip(trees, scales, names, strict=True)]
    return [delta_tree(x) for x in layers], names


def initial_lora(config, params) -> dict:
    """The LoRA a run starts from: `lora.init`, or with `lora.init_from` (a run folder holding a
    delta or a LoRA, e.g. a closed-form edit of `scripts/erase.py`) its rank-r fit
    (`lora.from_delta`), which DPO then refines."""
    key = jax.random.key(config.seed + 1)
    if not config.lora.init_from:
        return lora.init(key, params, lora_config(config))
    from safealign_jax.trained import load_trained

    start = load_trained(config.lora.init_from).trainable
    if start.kind not in ("lora", "delta"):
        raise UserError(f"--config.lora.init_from={config.lora.init_from}: the run holds no LoRA or delta.")
    tree = start.delta()
    lora.check_fits(params, tree, f"--config.lora.init_from={config.lora.init_from}")
    return lora.from_delta(key, params, lora_config(config), tree)


def init_trainable(config, params) -> dict:
    """The fresh trainable tree: {"lora"} (SafetyDPO), {"adapter"} (PSA) or both (psa.train_lora),
    or {"gated"} (psa.variant=gated: gates over the psa.gated.experts deltas)."""
    if config.psa.enable and config.psa.variant not in ("adapter", "gated"):
        raise UserError(f"--config.psa.variant={config.psa.variant!r} is invalid (expected adapter or gated).")
    if config.psa.enable and config.psa.variant == "gated":
        deltas, _ = gated_experts(config)
        g = config.psa.gated
        tree = gated.init(deltas, config.psa.embed_dim, rank=g.rank or None, init_bias=g.init_bias)
        gated.check_matches(tree, params, "--config.psa.gated.experts")
        return {"gated": tree}
    trainable = {}
    if not config.psa.enable or config.psa.train_lora:
        trainable["lora"] = initial_lora(config, params)
    if config.psa.enable:
        trainable["adapter"] = adapter.init(jax.random.key(config.seed + 2), params,
                                            config.psa.embed_dim, config.psa.num_tokens)
    return trainable


def winner_warning(records: list[dict]) -> str | None:
    """One warning line when the winner's error rose over the reference (mean `mse_w_diff` of
    the logged `records` > 0, i.e. the DPO margin comes from the loser), else None."""
    rises = [r["mse_w_diff"] for r in records if "mse_w_diff" in r]
    if not rises or not np.mean(rises) > 0:
        return None
    return (f"warning: steps {records[0]['step']}-{records[-1]['step']}: winner's error rose by "
            f"{np.mean(rises):.3g} over the reference: the margin comes from the loser; consider "
            f"dpo.sft_weight / dpo.sdpo")


def make_step_fn(config, module, optimizer):
    """The train step of `config` for `module` (`step.make_train_step` of the objective's loss);
    the one build shared by the trainer and `safealign_jax.bench` (benchmark, memory)."""
    schedule = objective.training_schedule(config.model.path, config.model.prediction_type)
    loss_fn = objective.make_loss_fn(module, lora_config(config).scale, schedule, config.dpo.beta,
                                     config.psa.scale, train_gated_experts=config.psa.gated.train_experts,
                                     options=objective.options_from_config(config), kind=config.dpo.objective,
                                     route_gates=config.psa.enable and config.psa.variant == "gated" and config.psa.gated.route)
    return make_train_step(loss_fn, optimizer, config.dpo.caption_dropout)


def record_lr(config, global_pairs: int):
    """step -> the learning rate of the optimizer update that micro-step `step` (1-based, as
    logged) belongs to: the schedule at update (step - 1) // optim.grad_accum."""
    schedule = state_lib.lr_schedule(config, state_lib.learning_rate(config, global_pairs))
    return lambda step: float(schedule((step - 1) // config.optim.grad_accum))


def finished_summary(workdir: str, step: int) -> dict:
    """The summary of a run that already reached `step`: its summary.json (if any) with
    `already_finished` set; summary.json itself is left as the finished run wrote it."""
    summary = {}
    path = os.path.join(workdir, "summary.json")
    if os.path.isfile(path):
        with open(path) as f:
            summary = json.load(f)
    return {**summary, "already_finished": True, "finished_step": step}


class _Stage:
    """`with _Stage("compiling the train step", talk):` prints the stage when it starts and
    its duration when it ends (`cli.status`); `talk=False` prints nothing."""

    def __init__(self, name: str, talk: bool):
        self.name, self.talk = name, talk

    def __enter__(self):
        if self.talk:
            cli.status(f"{self.name} ...")
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        if self.talk and exc[0] is None:
            cli.status(f"{self.name}: {self.seconds:.1f} s")


def speed(steps: int, seconds: float, global_pairs: int, flops: int, peak: Peak) -> dict:
    """The log step's speed over its `steps` steps: pairs/s, TFLOP/s (model FLOPs, all devices)
    and MFU against the peak of all devices (`perf.peak`: datasheet, or measured on CPU)."""
    tflops = steps * flops / seconds / 1e12
    return {"pairs_per_s": steps * global_pairs / seconds, "tflops_per_s": tflops,
            "mfu": tflops * 1e12 / (peak.flops * jax.device_count())}


class _Logger:
    """metrics.jsonl + TensorBoard + tqdm on process 0; nothing elsewhere."""

    def __init__(self, workdir: str, config):
        self.main = jax.process_index() == 0
        self.talk = config.train.progress_bar and cli.talking()
        self.file = self.tb = self.bar = None
        if not self.main:
            return
        self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close)
        if config.train.get("tensorboard", True):
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:
                pass

    def start_bar(self, done: int, total: int) -> None:
        """The tqdm bar from step `done` (after the start-up lines, which it would garble)."""
        if self.main and self.talk:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc="train", dynamic_ncols=True)

    def write(self, records: list[dict], pairs_per_second: float) -> None:
        if not self.main:
            return
        for r in records:
            self.file.write(json.dumps(r) + "\n")
            if self.tb:
                for k, v in r.items():
                    if k not in ("step", "wall_time"):
                        self.tb.add_scalar(f"train/{k}", v, r["step"], walltime=r["wall_time"])
        self.file.flush()
        if self.bar:
            last = records[-1]
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last.get('implicit_accuracy', np.nan):.2f}",
                                 pairs_s=f"{pairs_per_second:.1f}")
            self.bar.update(len(records))
        message = winner_warning(records)
        if message and cli.talking():
            (self.bar.write if self.bar else print)(message)

    def close(self) -> None:
        for handle in (self.file, self.tb, self.bar):
            if handle:
                handle.close()


def train(config, workdir: str, source=None):
    """Trains (or resumes) the LoRA and/or PSA adapter of `config` in `workdir`.

    `source`: a batch source object (see `safealign_jax.train.data`) used instead of
    `config.data.source`; with psa.enable its batches must carry user_embedding (B, E).
    Returns (final TrainState, summary); a run that had already reached `train.steps` returns
    its restored state and `finished_summary` (summary["already_finished"] is True).
    """
    validate(config)
    options = objective.options_from_config(config)
    initialize_distributed(config)
    talk = config.train.progress_bar and cli.talking() and jax.process_index() == 0
    retain = None  # the preservation term's retain prompts, encoded once
    if options.preserve_weight:
        prompts = objective.read_retain_prompts(config.dpo.retain_prompts)
        retain = objective.RetainPrompts.encode(config.model.path, prompts)
    cli.output_folder(workdir)
    mesh = mesh_lib.make_mesh(config)
    replicated = mesh_lib.replicated(mesh)
    with _Stage(f"loading the base UNet ({config.model.path or 'tiny random'})", talk):
        module, params, base_ref = load_base(config)
    lora_cfg = lora_config(config)
    global_pairs = config.train.pairs_per_device * jax.device_count()
    optimizer = state_lib.make_optimizer(config, global_pairs)
    with _Stage("initialising the trainable weights and the optimizer", talk):
        trainable = init_trainable(config, params)
        if "gated" in trainable and not config.psa.gated.train_experts:
            optimizer = gated.freeze_experts(optimizer)
        state = state_lib.init_state(trainable, optimizer, config.seed)
        state_sh = mesh_lib.replicated_like(state, mesh)
        params_sh = mesh_lib.param_shardings(params, mesh, config)
        params = mesh_lib.put_global(params, params_sh)
    batch_sh = mesh_lib.batch_sharding(mesh)
    rows = mesh_lib.local_rows(batch_sh, global_pairs)
    if source is None:
        with _Stage(f"building the data ({config.data.source})", talk):
            source = make_source(config, module, global_pairs, rows)

    ckpts = Checkpoints(workdir, config.train.keep_checkpoints, config.train.async_checkpoints)
    restored = ckpts.restore_latest_good(abstract_like(state, state_sh), base_ref, config.to_dict())
    if restored is not None:
        state, data_state, last_saved = restored
        source.set_state(data_state)
    else:
        state, last_saved = mesh_lib.put_global(state, state_sh), None
    first = int(jax.device_get(state.step))
    if first >= config.train.steps:
        ckpts.close()
        return state, finished_summary(workdir, first)
    if talk:
        cli.status(f"resumed at step {first} of {config.train.steps}" if restored is not None
                   else f"starting at step 0 of {config.train.steps}")
    if jax.process_index() == 0:  # lines after the restored step are redone by this run
        reliability.truncate_metrics(os.path.join(workdir, "metrics.jsonl"), first)

    # after every input check (model, data, resume), so that a refused run leaves its workdir as it was
    cache = enable_compilation_cache(config.train.compilation_cache or cli.command_cache()
                                     or os.path.join(workdir, "compilation_cache"))
    with _Stage("preparing the step, sample grids and logs", talk):
        step_fn = make_step_fn(config, module, optimizer)
        empty = getattr(source, "empty_embedding", None)  # the cached "" embedding, else zeros
        if empty is None:
            empty = np.zeros((config.data.seq_len, module.config.cross_attention_dim), np.float32)
        empty = mesh_lib.put_global(empty, replicated)
        total = config.train.steps
        grids = SampleGrids(config, module, params, workdir)
        logger = _Logger(workdir, config)
        lr_of = record_lr(config, global_pairs)
    compiled, compile_s, flops, peak = None, 0.0, 0, None
    pending, last_time, last_step, run_start, records = [], None, first, None, []
    ids, skipped = {}, 0
    signals = reliability.StopSignals()
    try:
        signals.install()
        for step in range(first, total):
            local = next(source)
            if retain is not None:
                local = {**local, **retain.draw(config.seed, step, rows, global_pairs)}
            batch = mesh_lib.global_batch(local, batch_sh, global_pairs)
            ids[step + 1] = reliability.batch_ids(source)
            if compiled is None:
                with _Stage(f"compiling the train step (cache {cache})", talk) as stage:
                    compiled = compile_step(step_fn, state, state_sh, params, params_sh, batch, batch_sh,
                                            empty, replicated)
                compile_s = stage.seconds
                with _Stage("counting the step's FLOPs and the device peak", talk):
                    flops = model_flops(lambda m: make_step_fn(config, m, optimizer), module, state,
                                        params, batch, empty)
                    peak = device_peak(n=1024)
                run_start = last_time = time.perf_counter()
                with _Stage(f"step {step + 1}", talk):
                    state, metrics = jax.block_until_ready(compiled(state, params, batch, empty))
                logger.start_bar(step, total)
            else:
                state, metrics = compiled(state, params, batch, empty)
            for value in metrics.values():
                value.copy_to_host_async()
            pending.append((step + 1, metrics))
            done = step + 1 == total
            stop = signals.requested()
            save = (step + 1) % config.train.checkpoint_every == 0 or done or stop
            if (step + 1) % config.train.log_every == 0 or save:  # metrics before the checkpoint
                fetched = jax.device_get([m for _, m in pending])
                now, wall = time.perf_counter(), time.time()
                records = [{"step": s, **{k: float(v) for k, v in m.items()}, "lr": lr_of(s), "wall_time": wall}
                           for (s, _), m in zip(pending, fetched, strict=True)]
                bad = [r for r in records if r.get("nonfinite")]
                reports = [reliability.write_nonfinite(workdir, r, ids.get(r["step"]), last_saved)
                           for r in bad]
                if bad and not config.train.skip_nonfinite:
                    logger.write([r for r in records if r["step"] <= bad[0]["step"]], 0.0)
                    raise UserError(
                        f"step {bad[0]['step']}: non-finite loss {bad[0]['loss']} or gradient norm "
                        f"{bad[0]['grad_norm']}; stopped (last good checkpoint: {last_saved}), batch ids "
                        f"in {reports[0]}; rerun with --config.train.skip_nonfinite=True to skip such steps.")
                skipped += len(bad)
                records[-1].update(speed(step + 1 - last_step, now - last_time, global_pairs, flops, peak))
                logger.write(records, records[-1]["pairs_per_s"])
                pending, last_time, last_step = [], now, step + 1
                ids = {}
            grids.maybe_save(step + 1, params, state.trainable, lora_cfg.scale, done)
            if save:
                ckpts.save(step + 1, state, config.to_dict(), source.get_state(), base_ref)
                last_saved = step + 1
            if stop and not done:
                ckpts.wait()
                raise reliability.Preempted(stop, step + 1, ckpts.directory)
        ckpts.wait()
    finally:
        signals.restore()
        logger.close()
        ckpts.close()
    elapsed = (time.perf_counter() - run_start) if run_start else 0.0
    steps_run = total - first
    summary = {
        "steps": total, "steps_this_run": steps_run, "devices": jax.device_count(),
        "processes": jax.process_count(), "mesh": dict(mesh.shape), "global_pairs_per_step": global_pairs,
        "trainable_parameters": lora.count(state.trainable),
        "fsdp_sharded_param_leaves": sum(not s.is_fully_replicated for s in jax.tree.leaves(params_sh)),
        "compile_s": compile_s,
        "model_flops_per_step": flops, "peak": peak.source if peak else None,
        "steps_per_s": steps_run / elapsed if elapsed else 0.0,
        "pairs_per_s": steps_run * global_pairs / elapsed if elapsed else 0.0,
        "final": records[-1] if records else {},
        "skipped_nonfinite_steps": skipped,
    }
    if jax.process_index() == 0:
        path = os.path.join(workdir, "summary.json")
        with open(f"{path}.tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(f"{path}.tmp", path)
    return state, summary
