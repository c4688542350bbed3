"""The trainer's train step for a config, ready to AOT-compile: the same optimizer, trainable
tree, loss and caption dropout (`train.loop.make_step_fn`), shardings and `step.compile_step`
as `train.loop.train`, with real arrays or ShapeDtypeStructs. Used by scripts/benchmark.py and
`bench.memory`.
"""

import dataclasses
from collections.abc import Callable

import jax
import optax

from safealign_jax.perf.flops import model_flops
from safealign_jax.train import loop
from safealign_jax.train import mesh as mesh_lib
from safealign_jax.train import state as state_lib
from safealign_jax.train.state import TrainState
from safealign_jax.train.step import compile_step


@dataclasses.dataclass
class TrainStep:
    """fn(state, params, batch, empty) -> (state, metrics), its arguments and their mesh."""

    fn: Callable
    optimizer: optax.GradientTransformation
    state: TrainState
    params: dict
    batch: dict
    empty: jax.Array | jax.ShapeDtypeStruct
    mesh: jax.sharding.Mesh
    config: object  # the training config (ml_collections)

    @property
    def shardings(self) -> tuple:
        """(state, params, batch, replicated) shardings, as the trainer lays them out."""
        replicated = mesh_lib.replicated(self.mesh)
        return (mesh_lib.replicated_like(self.state, self.mesh),
                mesh_lib.param_shardings(self.params, self.mesh, self.config),
                mesh_lib.batch_sharding(self.mesh), replicated)

    def compile(self):
        """`step.compile_step` at the shapes of the arguments (explicit shardings, donated state)."""
        state_sh, params_sh, batch_sh, replicated = self.shardings
        return compile_step(self.fn, self.state, state_sh, self.params, params_sh, self.batch, batch_sh,
                            self.empty, replicated)

    def put(self):
        """(state, params, batch, empty) placed on the mesh with those shardings (real arrays)."""
        state_sh, params_sh, batch_sh, replicated = self.shardings
        return (mesh_lib.put_global(self.state, state_sh), mesh_lib.put_global(self.params, params_sh),
                mesh_lib.put_global(self.batch, jax.tree.map(lambda _: batch_sh, self.batch)),
                mesh_lib.put_global(self.empty, replicated))


def build_train_step(config, module, params, batch: dict, empty, trainable: dict | None = None,
                     mesh=None) -> TrainStep:
    """The trainer's step of `config` for `module` and `params` (arrays or ShapeDtypeStructs).

    Args:
      batch: one global batch (rows = config.train.pairs_per_device x devices), as a source yields.
      empty: the empty-prompt text states (S, D).
      trainable: the trainable tree; default `loop.init_trainable(config, params)`.
      mesh: default `mesh.make_mesh(config)`.
    """
    mesh = mesh or mesh_lib.make_mesh(config)
    global_pairs = config.train.pairs_per_device * mesh.size
    optimizer = state_lib.make_optimizer(config, global_pairs)
    trainable = loop.init_trainable(config, params) if trainable is None else trainable
    state = state_lib.init_state(trainable, optimizer, config.seed)
    return TrainStep(loop.make_step_fn(config, module, optimizer), optimizer, state, params, batch, empty,
                     mesh, config)


def step_model_flops(step: TrainStep, module) -> int:
    """`flops.model_flops` of `step` (built for `module`)."""
    return model_flops(lambda m: loop.make_step_fn(step.config, m, step.optimizer), module,
                       step.state, step.params, step.batch, step.empty)
