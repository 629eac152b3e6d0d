"""Parameter bytes of a model: what it really holds, by tower, and its linear layers against bfloat16.

`param_bytes(model)` sums the bytes of the arrays the model holds (each `jax.Array`'s own `nbytes`: an
int8 `qvalue` counts one byte per weight, a packed int4 one byte per two). `linear_bytes(model, towers)`
compares the linear layers' held bytes (kernels, or integers plus scales) with what their kernels would
take in bfloat16 (2 bytes per weight), the figure the quantization docs and benchmarks report.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from owl_jax.modeling.linear import Linear
from owl_jax.quant.linear import QuantLinear


def _value(var: Any) -> Any:
    return var.get_value() if hasattr(var, "get_value") else var.value


def param_bytes(model: nnx.Module) -> dict[str, int]:
    """`{tower: bytes}` of every parameter the model holds, with `"total"`."""
    out: dict[str, int] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        tower = str(path[0])
        out[tower] = out.get(tower, 0) + int(_value(var).nbytes)
    out["total"] = sum(out.values())
    return out


def linear_bytes(model: nnx.Module, towers: tuple[str, ...] = ("language_model",)) -> dict[str, int]:
    """The linear layers of `towers` (adapters and biases left out): `held` bytes (float kernels, or
    integers and scales), `bf16` bytes of the same kernels in bfloat16, and `quantized` bytes of the
    quantized ones alone with `quantized_bf16`, their kernels' bfloat16 bytes."""
    held = bf16 = quantized = quantized_bf16 = 0
    for path, node in nnx.iter_graph(model):
        if not path or str(path[0]) not in towers:
            continue
        if isinstance(node, QuantLinear):
            q, s = _value(node.qvalue), _value(node.qscale)
            *lead, rows, n = q.shape
            k = rows * (2 if node.spec.mode == "int4" else 1)
            weights = k * n
            for d in lead:
                weights *= d
            quantized += int(q.nbytes + s.nbytes)
            quantized_bf16 += 2 * weights
            held, bf16 = held + int(q.nbytes + s.nbytes), bf16 + 2 * weights
        elif isinstance(node, Linear):
            kernel = _value(node.kernel)
            held, bf16 = held + int(kernel.nbytes), bf16 + 2 * int(kernel.size)
    return {"held": held, "bf16": bf16, "quantized": quantized, "quantized_bf16": quantized_bf16}
