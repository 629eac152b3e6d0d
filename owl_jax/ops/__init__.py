"""Numerics: every backend- and precision-specific route of the model, behind a few functions.

The model (`owl_jax.modeling`) calls these and never asks which platform it runs on; each takes the
model's `Numerics` option (`owl_jax.config.Numerics`), and `numerics.resolve` is the one place where
"auto" becomes a platform's choice.

- `matmul`: every weight product (half-precision custom VJPs; the CPU route; prepared frozen kernels);
- `attention`: the reference, `jax`, cuDNN and Pallas splash implementations;
- `take_rows`: embedding lookups;
- `elementwise`, `in_float32`, `recomputed`: float32 elementwise chains recomputed in the backward pass;
- `layer`: one layer of a stacked tower's parameters;
- `compiler_options`: XLA options for a program that runs the model.
"""

from owl_jax.config import Numerics
from owl_jax.ops.attention import attention, resolve_implementation
from owl_jax.ops.cpu import PreparedKernel, prepare_kernel
from owl_jax.ops.elementwise import dropout, elementwise, in_float32, recomputed
from owl_jax.ops.gather import take_rows
from owl_jax.ops.matmul import matmul
from owl_jax.ops.numerics import compiler_options, is_half, resolve
from owl_jax.ops.stack import layer

__all__ = [
    "Numerics",
    "PreparedKernel",
    "attention",
    "compiler_options",
    "dropout",
    "elementwise",
    "in_float32",
    "is_half",
    "layer",
    "matmul",
    "prepare_kernel",
    "recomputed",
    "resolve",
    "resolve_implementation",
    "take_rows",
]
