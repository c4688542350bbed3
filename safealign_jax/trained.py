"""What a training run or a merge produced, in the form the sampler, exporter and evaluator use.

A checkpoint's trainable tree (`TrainState.trainable`, or a merge's result) is a dict with one
or more of these entries:
    "lora":    LoRA tree {P: {"a": (in, r), "b": (r, out)}}; scale = config lora.alpha / lora.rank
    "delta":   full-rank delta tree {P: {"delta": (in, out)}} (a merge kept at full rank)
    "adapter": PSA adapter tree (see `safealign_jax.adapter`); lambda = config psa.scale (1.0)
    "gated":   user-gated PSA tree (see `safealign_jax.gated`); category names from config
               psa.gated.categories (else the expert folder names). It depends on the user, so
               it is used through `folded_for_user(params, embedding)`, not `unet_variables`.

    trained = load_trained("runs/expert_hate")          # a workdir, checkpoints/ or checkpoints/<step>
    out = unet.apply({"params": params, **trained.unet_variables()}, ...)
    save_trained("runs/merged", {"lora": tree}, config, trained.base_model)   # same layout
"""

import dataclasses
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from safealign_jax import adapter, gated, lora
from safealign_jax.errors import UserError, check
from safealign_jax.train.checkpoint import read_trainable

KINDS = ("lora", "delta", "adapter", "gated")


@dataclasses.dataclass(frozen=True)
class Trained:
    """A checkpoint's trainable trees (numpy) with their scales, config and base model."""

    step: int
    lora: dict | None
    lora_scale: float
    delta: dict | None
    adapter: dict | None
    adapter_scale: float
    config: dict
    base_model: dict  # {"path", "sha256"} of the frozen base the trees were trained on
    gated: dict | None = None
    categories: tuple[str, ...] = ()  # the gated tree's categories, in gate order

    def unet_variables(self, adapter_scale: float | None = None) -> dict:
        """Extra collections for `UNet.apply`: "lora" (LoRA or delta) and "adapter" if present.

        The adapter's collection only acts when the UNet is also given `user_tokens`
        (`adapter.user_tokens(trained.adapter, embeddings)`). A gated run raises (use
        `folded_for_user`, or `gated.variables(trained.gated, embeddings)` for mixed users).
        """
        self._refuse_gated("unet_variables")
        out = {}
        if self.lora is not None:
            out["lora"] = lora.variables(self.lora, self.lora_scale)
        elif self.delta is not None:
            out["lora"] = self.delta
        if self.adapter is not None:
            scale = self.adapter_scale if adapter_scale is None else adapter_scale
            out["adapter"] = adapter.variables(self.adapter, scale)
        return out

    def check_fits(self, params: dict, where: str) -> None:
        """UserError naming the first layer whose LoRA / delta shape differs from the kernel of
        the UNet `params` (a run made for another model); `where` names the run."""
        for tree in (self.lora, self.delta):
            if tree is not None:
                lora.check_fits(params, tree, where)

    def folded(self, params: dict, where: str = "the checkpoint") -> dict:
        """`params` with the LoRA or delta merged into the kernels (the adapter is not foldable)."""
        self._refuse_gated("folded")
        self.check_fits(params, where)
        if self.lora is not None:
            return lora.fold(params, self.lora, self.lora_scale)
        if self.delta is not None:
            return lora.fold_delta(params, self.delta)
        return params

    def folded_for_user(self, params: dict, embedding) -> dict:
        """`params` with a gated run's sum_c g_c(u) a_c b_c merged in for the user embedding (E,)."""
        check(self.gated is not None, "folded_for_user needs a user-gated PSA run (psa.variant=gated).")
        return gated.fold_for_user(params, self.gated, embedding)

    def _refuse_gated(self, method: str) -> None:
        check(self.gated is None, f"Trained.{method}: a user-gated PSA run depends on the user; "
                                  "use folded_for_user(params, embedding).")


def _categories(config: dict, count: int) -> tuple[str, ...]:
    """The gated categories named by the config (psa.gated.categories, else the expert folders)."""
    g = config.get("psa", {}).get("gated", {})
    names = [n.strip() for n in g.get("categories", "").split(",") if n.strip()]
    if not names:
        names = [os.path.basename(os.path.normpath(f.strip())) for f in g.get("experts", "").split(",") if f.strip()]
    return tuple(names) if len(names) == count else tuple(f"category_{c}" for c in range(count))


def _scales(config: dict) -> tuple[float, float]:
    rank_alpha = config.get("lora", {})
    lora_scale = float(rank_alpha.get("alpha", 1.0)) / float(rank_alpha.get("rank", 1.0) or 1.0)
    adapter_scale = float(config.get("psa", {}).get("scale", 1.0))
    return lora_scale, adapter_scale


def from_tree(trainable: dict, config: dict, base_model: dict, step: int = 0, where: str = "tree") -> Trained:
    """A `Trained` from a trainable dict (entries of KINDS) and its run config."""
    check(isinstance(trainable, dict) and bool(trainable) and set(trainable) <= set(KINDS),
          f"{where}: the trainable tree has entries {sorted(trainable) if isinstance(trainable, dict) else type(trainable).__name__}, "
          f"expected some of {KINDS}.")
    check(not ("lora" in trainable and "delta" in trainable),
          f"{where}: holds both a LoRA and a full delta; fold one into the base first.")
    check(not ("gated" in trainable and len(trainable) > 1),
          f"{where}: holds a gated PSA tree with {sorted(set(trainable) - {'gated'})}; a gated run holds it alone.")
    lora_scale, adapter_scale = _scales(config)
    tree = trainable.get("gated")
    categories = _categories(config, gated.num_categories(tree)) if tree is not None else ()
    return Trained(step=step, lora=trainable.get("lora"), lora_scale=lora_scale,
                   delta=trainable.get("delta"), adapter=trainable.get("adapter"),
                   adapter_scale=adapter_scale, config=config, base_model=base_model,
                   gated=tree, categories=categories)


def load_trained(path: str, step: int | None = None) -> Trained:
    """The trained trees of a training or merge workdir (latest checkpoint unless `step`)."""
    run = read_trainable(path, step)
    return from_tree(run["trainable"], run["config"], run["base_model"], run["step"], where=path)


def save_trained(workdir: str, trainable: dict, config: dict, base_model: dict, step: int = 0) -> str:
    """Writes `trainable` as `workdir/checkpoints/<step>/` in the layout of a training checkpoint,
    so every script that accepts a training run accepts it. Returns the checkpoint folder.

    Raises UserError if that checkpoint already exists (a merge never overwrites a result).
    """
    from_tree(trainable, config, base_model, step, where=workdir)  # validates the entries
    folder = os.path.join(os.path.abspath(workdir), "checkpoints")
    if os.path.isdir(os.path.join(folder, str(step))):
        raise UserError(f"{workdir}: already holds a checkpoint {step}; choose another workdir.")
    tree = jax.tree.map(lambda x: np.asarray(x, np.float32), trainable)
    with ocp.CheckpointManager(folder) as manager:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"step": np.int32(step), "trainable": tree}),
            config=ocp.args.JsonSave(config),
            base_model=ocp.args.JsonSave(base_model),
        ))
        manager.wait_until_finished()
    return os.path.join(folder, str(step))
