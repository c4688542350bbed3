"""The device mesh (axes "data", "fsdp") and the shardings of params, trainable state and batches.

- Batches: the leading (pair) axis is split over ("data", "fsdp"); everything else replicated.
- Frozen base params: replicated, unless `mesh.shard_params` is set, in which case every leaf
  with at least `mesh.shard_min_size` scalars is split over "fsdp" along its largest axis that
  the fsdp size divides (leaves with no such axis stay replicated).
- Trainable tree (LoRA), optimizer state, step and rng: replicated (they are small).
"""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from safealign_jax.errors import UserError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, device_count: int) -> tuple[int, int]:
    """Resolves -1 (fill) in (data, fsdp) and checks the product equals `device_count`."""
    sizes = [data, fsdp]
    if -1 in sizes:
        other = sizes[1 - sizes.index(-1)]
        if device_count % other:
            raise UserError(
                f"--config.mesh: {other} does not divide the {device_count} available devices."
            )
        sizes[sizes.index(-1)] = device_count // other
    if sizes[0] * sizes[1] != device_count:
        raise UserError(
            f"--config.mesh data={data} x fsdp={fsdp} = {sizes[0] * sizes[1]} devices, "
            f"but {device_count} are available (use -1 to fill one axis)."
        )
    return sizes[0], sizes[1]


def make_mesh(config) -> Mesh:
    """A ("data", "fsdp") mesh over all devices of all processes, sized by `config.mesh`; axes are
    Auto (XLA propagates shardings from the explicit in/out shardings of the step)."""
    shape = mesh_shape(config.mesh.data, config.mesh.fsdp, jax.device_count())
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=jax.devices())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits the leading axis over every device; use for all batch leaves."""
    return NamedSharding(mesh, P(BATCH_AXES))


def param_spec(shape: tuple[int, ...], fsdp: int, shard: bool, min_size: int) -> P:
    """PartitionSpec of one frozen param: fsdp on its largest divisible axis, or replicated."""
    if not shard or fsdp == 1 or int(np.prod(shape)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(params, mesh: Mesh, config):
    """A tree of NamedShardings for the frozen base params (see module docstring)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(
            mesh, param_spec(x.shape, fsdp, config.mesh.shard_params, config.mesh.shard_min_size)
        ),
        params,
    )


def replicated_like(tree, mesh: Mesh):
    """A tree of replicated shardings with the structure of `tree`."""
    return jax.tree.map(lambda _: replicated(mesh), tree)


def put_global(tree, shardings):
    """Places host arrays identical on every process as global arrays with `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree, shardings,
    )


def global_batch(local: dict, sharding: NamedSharding, global_rows: int) -> dict:
    """Global batch arrays from this process's rows (`jax.make_array_from_process_local_data`)."""
    return jax.tree.map(
        lambda v: jax.make_array_from_process_local_data(sharding, v, (global_rows, *v.shape[1:])),
        local,
    )


def local_rows(sharding: NamedSharding, global_rows: int) -> slice:
    """The contiguous range of batch rows this process must feed."""
    index = sharding.addressable_devices_indices_map((global_rows,))
    starts = [i[0].start or 0 for i in index.values()]
    stops = [global_rows if i[0].stop is None else i[0].stop for i in index.values()]
    return slice(min(starts), max(stops))
