"""A random model of any size built leaf by leaf, its selected kernels quantized one layer at a time.

`Owl(cfg)` with `cfg.quant` initializes the whole float model before swapping its linear layers, which a
7B model cannot afford on a small host. `random_model` instead fills the abstract (quantized) model one
leaf at a time on the host: a kernel is drawn one `(K, N)` layer slice at a time and either quantized
(`arrays.quantize_host`) or rounded to its dtype straight into the leaf's buffer, so no float copy of a
stacked kernel is ever held. Each leaf is copied to its devices as it is finished, and its host buffer
dropped. It serves benchmarks and memory checks, where the weights' values do not matter but their sizes
and the programs that read them do.

The values follow the model's own initialisation in spirit (LeCun-normal kernels, unit-variance token
embeddings, norms at one, biases at zero, the rest N(0, 0.02)); they are not `Owl(cfg)`'s exact values.
They depend on the seed and the float model's layout only: the quantized model of a config holds the
quantization of its float model's kernels (the same float32 draws), so the two can be compared.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from owl_jax.checkpoint.leaves import (
    Path,
    abstract_model,
    assemble,
    empty_aligned,
    flat_shardings,
    largest_first,
    leaf_shapes,
)
from owl_jax.config import OwlConfig
from owl_jax.modeling import Owl
from owl_jax.quant.arrays import quantize_host, stored_dtypes, stored_shapes
from owl_jax.quant.leaves import quantized_kernels
from owl_jax.quant.spec import QSCALE, QVALUE, QuantSpec


def random_model(cfg: OwlConfig, seed: int = 0, *, mesh: jax.sharding.Mesh | None = None) -> Owl:
    """`Owl(cfg)` with random weights, quantized as `cfg.quant` says (float when None), built leaf by
    leaf; on `mesh`'s shards when given."""
    graphdef, abstract = abstract_model(cfg)
    shardings = flat_shardings(abstract, mesh) if mesh is not None else {}
    # (a copy the runtime owns: a jitted step can then reuse the buffer of a donated argument, which it
    # cannot do with one that aliases host memory, as a plain `device_put` of an aligned array does)
    place = lambda path, x: jax.device_put(jnp.array(x, copy=True), shardings.get(path))  # noqa: E731
    float_shapes = leaf_shapes(abstract_model(cfg.replace(quant=None))[1])
    targets = quantized_kernels(cfg)
    index = {path: i for i, path in enumerate(sorted(float_shapes))}  # each leaf's draws, whatever the order
    specs = {p: jax.ShapeDtypeStruct(shape, dtype) for p, (shape, dtype) in float_shapes.items()}
    leaves: dict[Path, jax.Array] = {}
    for path in largest_first(specs):  # the largest temporaries while little is held
        shape, dtype = float_shapes[path]
        draws = (seed, index[path])
        if path[-1] == "kernel" and path[:-1] in targets:
            qvalue, qscale = _quantized_kernel(draws, shape, cfg.quant)
            leaves[path[:-1] + (QVALUE,)] = place(path[:-1] + (QVALUE,), qvalue)
            leaves[path[:-1] + (QSCALE,)] = place(path[:-1] + (QSCALE,), qscale)
        elif path[-1] == "kernel":
            leaves[path] = place(path, _float_kernel(draws, shape, np.dtype(dtype)))
        else:
            leaves[path] = place(path, _other_leaf(draws, path[-1], shape, np.dtype(dtype)))
    return assemble(graphdef, abstract, leaves)


def _kernel_slice(draws: tuple[int, int], i: int, k: int, n: int) -> np.ndarray:
    """Layer slice `i` of a kernel: `(K, N)` float32, LeCun-normal."""
    rng = np.random.default_rng([*draws, i])
    return rng.standard_normal((k, n), np.float32) * np.float32(k**-0.5)


def _quantized_kernel(draws: tuple[int, int], shape: tuple[int, ...], spec: QuantSpec) -> tuple[np.ndarray, ...]:
    *lead, k, n = shape
    (q_shape, s_shape), (q_dtype, s_dtype) = stored_shapes(shape, spec), stored_dtypes(spec)
    qvalue, qscale = empty_aligned(q_shape, q_dtype), empty_aligned(s_shape, s_dtype)
    q_slices, s_slices = qvalue.reshape(-1, *q_shape[-2:]), qscale.reshape(-1, *s_shape[-2:])
    for i in range(q_slices.shape[0]):
        q_slices[i], s_slices[i] = quantize_host(_kernel_slice(draws, i, k, n), spec)
    return qvalue, qscale


def _float_kernel(draws: tuple[int, int], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    *lead, k, n = shape
    out = empty_aligned(shape, dtype)
    slices = out.reshape(-1, k, n)
    for i in range(slices.shape[0]):
        slices[i] = _kernel_slice(draws, i, k, n).astype(dtype)
    return out


def _other_leaf(draws: tuple[int, int], name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    out = empty_aligned(shape, dtype)
    if name in ("scale", "bias"):  # norms at one, biases at zero
        out[...] = 1 if name == "scale" else 0
        return out
    std = np.float32(1.0 if name == "embed_tokens" else 0.02)
    rng = np.random.default_rng(draws)
    slices = out.reshape(shape[0] if len(shape) > 2 else 1, -1)
    for i in range(slices.shape[0]):  # (a stacked leaf: one layer's float32 draws at a time)
        slices[i] = (rng.standard_normal(slices.shape[1], np.float32) * std).astype(dtype)
    return out
