"""FLOPs from one jaxpr count: 2 x the multiply-adds of every dot_general and
conv_general_dilated, sub-jaxprs included (a scan's body times its length). Elementwise work,
softmax and norms are not counted; custom calls (cuDNN attention) are invisible to a jaxpr, so
`model_flops` counts a step traced with XLA attention and no remat.
"""

import jax
import numpy as np


def matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of the matmuls and convolutions of a (closed) jaxpr."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(out)) * int(np.prod([lhs[i] for i in contract]))
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
            per_output = rhs[spec[1]] * int(np.prod([rhs[i] for i in spec[2:]]))
            total += 2 * int(np.prod(out)) * per_output
        repeat = eqn.params.get("length", 1) if name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += repeat * matmul_flops(inner)
    return total


def count_flops(fn, *args) -> int:
    """`matmul_flops` of fn traced at the shapes of args (arrays or ShapeDtypeStructs)."""
    return matmul_flops(jax.make_jaxpr(fn)(*args))


def model_flops(make_step, module, *args) -> int:
    """FLOPs of one train step as the model defines them: `make_step(module')` with module' =
    `module` with XLA attention (dense scores, so every implementation counts alike) and no remat
    (recomputation is not counted), traced at the shapes of args, never compiled."""
    return count_flops(make_step(module.clone(attention="xla", remat_policy="none")), *args)
