"""The device's peak FLOP/s and model FLOPs utilisation (MFU).

Accelerators: the datasheet's dense bf16 peak (`DATASHEET_TFLOPS`, matched against
`device.device_kind`). Elsewhere (CPU, unknown devices): a measured peak, the median rate of a
jitted n x n x n fp32 matmul, labelled "measured" so nobody mistakes it for a datasheet figure.
"""

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

# Dense bf16 TFLOP/s per chip (vendor datasheets), keyed by a substring of device_kind; the
# first match wins, so more specific names come first.
DATASHEET_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports "TPU v5"
    ("TPU v4", 275.0),
)


@dataclasses.dataclass(frozen=True)
class Peak:
    """flops: peak FLOP/s; source: "datasheet: ..." or "measured: ..."."""

    flops: float
    source: str


def datasheet_peak(device) -> Peak | None:
    """The datasheet peak of `device`, or None when its kind is not in the table."""
    for name, tflops in DATASHEET_TFLOPS:
        if name.lower() in device.device_kind.lower():
            return Peak(tflops * 1e12, f"datasheet: {name} dense bf16 {tflops:g} TFLOP/s")
    return None


def measured_peak(device, n: int = 2048, repeats: int = 7) -> Peak:
    """The median FLOP/s of a jitted n x n x n fp32 matmul on `device`."""
    a, b = (jax.device_put(jax.random.normal(jax.random.key(i), (n, n), jnp.float32), device)
            for i in range(2))
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    flops = 2 * n**3 / statistics.median(times)
    return Peak(flops, f"measured: fp32 {n}^3 matmul on {device.platform} ({flops / 1e12:.3g} TFLOP/s)")


def device_peak(device=None, n: int = 2048) -> Peak:
    """The datasheet peak of an accelerator, else the measured one."""
    device = device or jax.devices()[0]
    return datasheet_peak(device) or measured_peak(device, n)


def mfu(flops_per_step: float, step_seconds: float, peak: Peak, devices: int = 1) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of `devices` devices."""
    return flops_per_step / step_seconds / (peak.flops * devices)
