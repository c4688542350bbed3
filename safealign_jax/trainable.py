"""A trainable thing: the trees a run trains (or a merge produces) with their scales, and the one
place that turns them into the UNet's variable collections.

`tree` has one or more of these entries (a training state's `trainable` dict):
    "lora":    LoRA tree {P: {"a": (in, r), "b": (r, out)}}; scale s = alpha / r (`lora.LoRAConfig`)
    "delta":   full-rank delta tree {P: {"delta": (in, out)}}; the scale multiplies the delta
    "adapter": PSA adapter tree (`safealign_jax.adapter`); scale = lambda (config psa.scale)
    "gated":   user-gated PSA tree (`safealign_jax.gated`); depends on the user, scale unused
The kind names the entries present, e.g. "lora", "lora+adapter", "gated".

    t = Trainable({"lora": tree}, {"lora": 0.5})
    out = unet.apply({"params": params, **t.collections()}, x, t_steps, context)
    out = unet.apply({"params": params, **t.collections(users)}, x, t_steps, context,
                     user_tokens=t.user_tokens(users))           # PSA: users (B, E)
    params_1 = t.folded(params)                                    # W + s a b, for export / sampling

A run folder records where its scales come from in its config: a merge or edit writes
{"trainable": {"kind", "scales"}} (`record`); a training run's scales follow from its lora.rank /
lora.alpha and psa.scale (`scales_of` reads both).
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from safealign_jax import adapter, gated, lora
from safealign_jax.errors import check

KINDS = ("lora", "delta", "adapter", "gated")


@dataclasses.dataclass(frozen=True)
class Trainable:
    """Trees by entry (some of KINDS) and each entry's scale (missing: 1.0)."""

    tree: Mapping[str, dict]
    scales: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The entries present, in KINDS order, joined by "+" (e.g. "lora+adapter")."""
        return "+".join(k for k in KINDS if k in self.tree)

    def scale(self, entry: str) -> float:
        return self.scales.get(entry, 1.0)

    def validate(self, where: str) -> "Trainable":
        """Itself, or a UserError naming `where` when the entries cannot form one model."""
        entries = sorted(self.tree) if isinstance(self.tree, Mapping) else type(self.tree).__name__
        check(isinstance(self.tree, Mapping) and bool(self.tree) and set(self.tree) <= set(KINDS),
              f"{where}: the trainable tree has entries {entries}, expected some of {KINDS}.")
        check(not ("lora" in self.tree and "delta" in self.tree),
              f"{where}: holds both a LoRA and a full delta; fold one into the base first.")
        check(not ("gated" in self.tree and len(self.tree) > 1),
              f"{where}: holds a gated PSA tree with {sorted(set(self.tree) - {'gated'})}; a gated run holds it alone.")
        return self

    def collections(self, user_embedding=None) -> dict:
        """The extra collections for `UNet.apply`: "lora" (the LoRA with s folded into every b,
        the delta times its scale, or the gated tree's per-example gates for `user_embedding`
        (B, E)) and "adapter" (lambda folded into to_v_ip). The adapter acts only when the UNet
        also gets `user_tokens`."""
        out = {}
        if "lora" in self.tree:
            out["lora"] = _scaled(self.tree["lora"], self.scale("lora"), ("b",))
        elif "delta" in self.tree:
            out["lora"] = _scaled(self.tree["delta"], self.scale("delta"), ("delta",))
        elif "gated" in self.tree:
            check(user_embedding is not None, "a user-gated PSA tree needs the user embeddings (B, E).")
            out["lora"] = gated.variables(self.tree["gated"], user_embedding)
        if "adapter" in self.tree:
            out["adapter"] = adapter.variables(self.tree["adapter"], self.scale("adapter"))
        return out

    def user_tokens(self, user_embedding):
        """(B, N, D) user tokens of the PSA adapter for `user_embedding` (B, E); None without one."""
        if "adapter" not in self.tree:
            return None
        return adapter.user_tokens(self.tree["adapter"], user_embedding)

    @property
    def user_width(self) -> int | None:
        """The width E of the user embedding this needs (PSA adapter, gated tree); None: no user."""
        if "gated" in self.tree:
            return int(self.tree["gated"]["gate"]["kernel"].shape[0])
        if "adapter" in self.tree:
            return int(self.tree["adapter"]["proj"]["kernel"].shape[0])
        return None

    def delta(self, user_embedding=None, hard_gates: bool = False) -> dict | None:
        """The full-rank delta {P: {"delta": (in, out)}} float32 of the foldable entry: s a b, s
        delta, or the gated sum_c g_c(u) a_c b_c for one user (E,) (`hard_gates`: `gated.gates`
        thresholded); None without one."""
        if "lora" in self.tree:
            return lora.delta(self.tree["lora"], self.scale("lora"))
        if "delta" in self.tree:
            scale = float(self.scale("delta"))
            return jax.tree.map(lambda d: scale * jnp.asarray(d, jnp.float32), self.tree["delta"])
        if "gated" in self.tree:
            check(user_embedding is not None, "a user-gated PSA tree is folded for one user: give the embedding (E,).")
            return gated.user_delta(self.tree["gated"], user_embedding, hard_gates)
        return None

    def folded(self, params: dict, user_embedding=None, where: str = "the checkpoint",
               hard_gates: bool = False) -> dict:
        """`params` with `delta(user_embedding)` added to the kernels (the adapter is not foldable);
        UserError naming `where` when the trees were made for another UNet."""
        for entry in ("lora", "delta"):
            if entry in self.tree:
                lora.check_fits(params, self.tree[entry], where)
        delta = self.delta(user_embedding, hard_gates)
        return params if delta is None else lora.fold_delta(params, delta)

    def lora_rank_alpha(self) -> tuple[int, float]:
        """(r, alpha = s r) of the LoRA entry, as peft / kohya files record them."""
        check("lora" in self.tree, f"a {self.kind!r} trainable has no LoRA rank.")
        rank = int(next(leaf.shape[1] for path, leaf in traverse_util.flatten_dict(self.tree["lora"]).items()
                        if path[-1] == "a"))
        return rank, self.scale("lora") * rank


def expert(tree: dict, scale: float = 1.0) -> Trainable:
    """A safety expert: a LoRA tree (leaves "a", "b") or a delta tree (leaves "delta") with its scale."""
    entry = "lora" if any(path[-1] == "a" for path in traverse_util.flatten_dict(tree)) else "delta"
    return Trainable({entry: tree}, {entry: scale})


def scales_of(config: Mapping) -> dict[str, float]:
    """The scales a run folder's config gives its trees: the recorded {"trainable": {"scales"}} of a
    merge or edit, else a training config's lora s = alpha / rank (alpha missing: = rank) and
    adapter lambda = psa.scale (1.0 when missing)."""
    recorded = config.get("trainable")
    if recorded:
        return {k: float(v) for k, v in recorded["scales"].items()}
    ranked = config.get("lora", {})
    lora_scale = lora.LoRAConfig(rank=ranked.get("rank", 1), alpha=ranked.get("alpha")).scale
    return {"lora": float(lora_scale), "adapter": float(config.get("psa", {}).get("scale", 1.0))}


def record(trainable: Trainable) -> dict:
    """{"kind", "scales"} of `trainable` (its entries' scales), as a run folder's config holds it."""
    return {"kind": trainable.kind, "scales": {k: float(trainable.scale(k)) for k in KINDS if k in trainable.tree}}


def _scaled(tree: dict, scale, leaves: tuple[str, ...]) -> dict:
    """`tree` with its leaves named in `leaves` times `scale` (the tree itself for a concrete 1)."""
    if not isinstance(scale, jax.Array) and np.all(np.asarray(scale) == 1):
        return tree
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({p: v * scale if p[-1] in leaves else v for p, v in flat.items()})
