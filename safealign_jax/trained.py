"""What a training run or a merge produced, in the form the sampler, exporter and evaluator use.

A checkpoint's trainable tree (`TrainState.trainable`, or a merge's result) is a
`safealign_jax.trainable.Trainable`: entries "lora", "delta", "adapter" and/or "gated" with
their scales (`trainable.scales_of` the run config). A user-gated run ("gated") depends on the
user: it is used through `folded_for_user(params, embedding)`, not `unet_variables`; its
category names come from config psa.gated.categories (else the expert folder names).

    trained = load_trained("runs/expert_hate")          # a workdir, checkpoints/ or checkpoints/<step>
    out = unet.apply({"params": params, **trained.unet_variables()}, ...)
    runs.save_trained("runs/merged", Trainable({"lora": tree}), config, trained.base_model)  # safealign_jax.runs
"""

import dataclasses

from safealign_jax import gated
from safealign_jax.errors import check
from safealign_jax.runs import read_trainable
from safealign_jax.trainable import Trainable, scales_of


@dataclasses.dataclass(frozen=True)
class Trained:
    """A checkpoint's `Trainable` (numpy trees and scales), config, base model and step."""

    step: int
    trainable: Trainable
    config: dict
    base_model: dict  # {"path", "sha256"} of the frozen base the trees were trained on
    categories: tuple[str, ...] = ()  # the gated tree's categories, in gate order

    # The trainable's entries (None when absent) and scales, as the scripts read them.
    lora = property(lambda self: self.trainable.tree.get("lora"))
    delta = property(lambda self: self.trainable.tree.get("delta"))
    adapter = property(lambda self: self.trainable.tree.get("adapter"))
    gated = property(lambda self: self.trainable.tree.get("gated"))
    lora_scale = property(lambda self: self.trainable.scale("lora"))
    adapter_scale = property(lambda self: self.trainable.scale("adapter"))

    def unet_variables(self, adapter_scale: float | None = None) -> dict:
        """Extra collections for `UNet.apply` (`Trainable.collections`), the adapter's lambda
        replaced by `adapter_scale` when given. A gated run raises (use `folded_for_user`, or
        `Trainable.collections(embeddings)` for mixed users)."""
        self._refuse_gated("unet_variables")
        trainable = self.trainable
        if adapter_scale is not None:
            trainable = dataclasses.replace(trainable, scales={**trainable.scales, "adapter": adapter_scale})
        return trainable.collections()

    def folded(self, params: dict, where: str = "the checkpoint") -> dict:
        """`params` with the LoRA or delta merged into the kernels (the adapter is not foldable)."""
        self._refuse_gated("folded")
        return self.trainable.folded(params, where=where)

    @property
    def hard_gates(self) -> bool:
        """Whether the run's gates act thresholded (config psa.gated.hard): each category on or off."""
        return bool(self.config.get("psa", {}).get("gated", {}).get("hard", False))

    def folded_for_user(self, params: dict, embedding) -> dict:
        """`params` with a gated run's sum_c g_c(u) a_c b_c merged in for the user embedding (E,)
        (gates thresholded when the run says so, `hard_gates`)."""
        check(self.gated is not None, "folded_for_user needs a user-gated PSA run (psa.variant=gated).")
        return self.trainable.folded(params, embedding, hard_gates=self.hard_gates)

    def _refuse_gated(self, method: str) -> None:
        check(self.gated is None, f"Trained.{method}: a user-gated PSA run depends on the user; "
                                  "use folded_for_user(params, embedding).")


def _categories(config: dict, count: int) -> tuple[str, ...]:
    """The gated categories named by the config (psa.gated.categories, else the expert folders)."""
    g = config.get("psa", {}).get("gated", {})
    names = gated.category_names(g.get("experts", ""), g.get("categories", ""))
    return tuple(names) if len(names) == count else tuple(f"category_{c}" for c in range(count))


def from_tree(trainable: dict, config: dict, base_model: dict, step: int = 0, where: str = "tree") -> Trained:
    """A `Trained` from a trainable dict (entries of `trainable.KINDS`) and its run config (`scales_of`)."""
    run = Trainable(trainable, scales_of(config)).validate(where)
    tree = run.tree.get("gated")
    categories = _categories(config, gated.num_categories(tree)) if tree is not None else ()
    return Trained(step=step, trainable=run, config=config, base_model=base_model, categories=categories)


def load_trained(path: str, step: int | None = None) -> Trained:
    """The trained trees of a training or merge workdir (latest checkpoint unless `step`)."""
    run = read_trainable(path, step)
    return from_tree(run["trainable"], run["config"], run["base_model"], run["step"], where=path)
