"""Basic layers shared by the ports, with the seams used by LoRA and merged deltas.

Trainable additions never live in the frozen "params" collection. An adapted `Dense`
reads, when present, its own entries of the "lora" collection, whose tree mirrors the
paths of the params tree:

  {"a": (in, r), "b": (r, out)}  ->  y = x W + (x a) b        (scale already folded into b)
  {"delta": (in, out)}           ->  y = x W + x delta         (a merged full-rank delta)
  {"gated_a": (C, in, r), "gated_b": (C, r, out), "gate": (G, C)}
                                 ->  y[n] = x[n] W + sum_c gate[n % G, c] (x[n] a_c) b_c
                                     (user-gated PSA, per example; see `safealign_jax.gated`)

The gated rows: x (B, ..., in) with B = k G; example n uses gate row n % G, i.e. the gates are
repeated as a block ([g; g; ...]), matching how the DPO loss ([x_w; x_l]) and the sampler
([unconditional; conditional], `safealign_jax.pipeline`) concatenate their batches.

so `module.apply({"params": base, "lora": lora_vars}, ...)` runs the adapted model and
omitting "lora" runs the base (the DPO reference). See `safealign_jax.lora`.

Calibration (Co-Merge, `safealign_jax.merge`): when the "calibration" collection is mutable
(`apply(..., mutable=["calibration"])`), every Dense adds the per-input-channel sums of |x| and
x^2 over all its input rows ("abs_sum", "sq_sum", (in,) float32) and the row count ("count");
otherwise nothing is computed.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

LORA = "lora"
CALIBRATION = "calibration"

Dtype = jnp.dtype


class Dense(nn.Module):
    """A linear layer `y = x W + b` (W stored (in, out)), LoRA-aware.

    Attributes:
      features: output width.
      use_bias: whether the layer has a bias.
      dtype: compute dtype; `param_dtype`: storage dtype of W and b.
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype
        )
        x = x.astype(self.dtype)
        if self.is_mutable_collection(CALIBRATION):
            self._sow_input_statistics(x)
        y = jnp.dot(x, kernel.astype(self.dtype))
        if self.has_variable(LORA, "a"):
            a = self.get_variable(LORA, "a").astype(self.dtype)
            b = self.get_variable(LORA, "b").astype(self.dtype)
            y = y + jnp.dot(jnp.dot(x, a), b)
        if self.has_variable(LORA, "delta"):
            y = y + jnp.dot(x, self.get_variable(LORA, "delta").astype(self.dtype))
        if self.has_variable(LORA, "gated_a"):
            y = y + self._gated_delta(x)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(
                self.dtype
            )
        return y

    def _gated_delta(self, x: jax.Array) -> jax.Array:
        """sum_c gate[n % G, c] (x[n] a_c) b_c for x (B, ..., in), B a multiple of G."""
        a = self.get_variable(LORA, "gated_a").astype(self.dtype)
        b = self.get_variable(LORA, "gated_b").astype(self.dtype)
        gate = self.get_variable(LORA, "gate")
        if x.shape[0] % gate.shape[0]:
            raise ValueError(f"Dense: batch {x.shape[0]} is not a multiple of the {gate.shape[0]} gate rows.")
        gate = jnp.tile(gate, (x.shape[0] // gate.shape[0], 1)).astype(self.dtype)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        h = jnp.einsum("bti,cir->btcr", rows, a) * gate[:, None, :, None]
        return jnp.einsum("btcr,cro->bto", h, b).reshape(*x.shape[:-1], b.shape[-1])

    def _sow_input_statistics(self, x: jax.Array) -> None:
        rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        for name, value in (("abs_sum", jnp.abs(rows).sum(0)), ("sq_sum", jnp.square(rows).sum(0)),
                            ("count", jnp.float32(rows.shape[0]))):
            self.sow(CALIBRATION, name, value, init_fn=lambda: 0.0, reduce_fn=jnp.add)


def conv(
    features: int,
    kernel_size: int,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    stride: int = 1,
    padding: int | None = None,
) -> nn.Conv:
    """A 2-D convolution on NHWC inputs with PyTorch's symmetric padding (default: "same")."""
    pad = kernel_size // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def group_norm(num_groups: int, epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str):
    """GroupNorm over NHWC channels, grouped contiguously exactly as torch.nn.GroupNorm."""
    return nn.GroupNorm(num_groups=num_groups, **_torch_norm_settings(epsilon, dtype, param_dtype, name))


def layer_norm(epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str, use_bias: bool = True):
    """LayerNorm over the last axis, as torch.nn.LayerNorm."""
    return nn.LayerNorm(use_bias=use_bias, **_torch_norm_settings(epsilon, dtype, param_dtype, name))


def _torch_norm_settings(epsilon: float, dtype: Dtype, param_dtype: Dtype, name: str) -> dict:
    """The settings every normalisation of the ports shares: torch's two-pass variance
    E[(x - mean)^2] (not Flax's fast E[x^2] - mean^2), in the given dtypes."""
    return dict(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


class DtypeModule(nn.Module):
    """Base of the ports' modules: computes in `dtype`, stores its parameters in `param_dtype`
    (keyword-only fields, so subclasses declare theirs positionally before them), and builds its
    sub-layers in those dtypes with `dense` / `conv` / `group_norm` / `layer_norm`; `dtypes` is
    the keyword pair to hand to a sub-module."""

    dtype: Dtype = dataclasses.field(default=jnp.float32, kw_only=True)
    param_dtype: Dtype = dataclasses.field(default=jnp.float32, kw_only=True)

    @property
    def dtypes(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    @nn.nowrap
    def dense(self, features: int, name: str, use_bias: bool = True) -> Dense:
        return Dense(features, use_bias=use_bias, name=name, **self.dtypes)

    @nn.nowrap
    def conv(self, features: int, kernel_size: int, name: str | None, stride: int = 1,
             padding: int | None = None) -> nn.Conv:
        """See `conv`; `name` None names it by the `setup` attribute it is assigned to."""
        return conv(features, kernel_size, self.dtype, self.param_dtype, name, stride, padding)

    @nn.nowrap
    def group_norm(self, num_groups: int, epsilon: float, name: str) -> nn.GroupNorm:
        return group_norm(num_groups, epsilon, self.dtype, self.param_dtype, name)

    @nn.nowrap
    def layer_norm(self, epsilon: float, name: str, use_bias: bool = True) -> nn.LayerNorm:
        return layer_norm(epsilon, self.dtype, self.param_dtype, name, use_bias)
