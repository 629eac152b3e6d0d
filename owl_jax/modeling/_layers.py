"""Building blocks shared by the three towers: linear (LoRA-capable), norms, dropout, activations.

Conventions:
- Every parameter is an `nnx.Param` (adapters: `nnx.LoRAParam`) with an `axes` metadata tuple of logical
  axis names (see `owl_jax.sharding`).
- Layers of a tower are stacked: a module built with `stack=L` holds every parameter with a leading
  `layers` axis of size L and is applied one slice at a time by `_stack.apply_layers`.
- Matmuls run in the compute dtype with float32 accumulation and are cast back to the compute dtype;
  norms and softmax always compute in float32 (as the released model does).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax.config import LoRAConfig

Array = jax.Array


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _stacked(stack: int | None, shape: Sequence[int], axes: Sequence[str | None]):
    if stack is None:
        return tuple(shape), tuple(axes)
    return (stack, *shape), ("layers", *axes)


def _row_major_transpose(a: Array) -> Array:
    """`a` with its last two axes swapped (`a.T` of a matrix) as a real row-major copy. XLA folds a plain
    transpose into the dot that uses it, and the CPU's fast bf16 GEMM path only takes untransposed operands
    (a folded transpose runs ~2.5x slower); flattening the swapped axes behind an optimization barrier
    forces the copy, which costs one pass over the operand. Leading axes stay as they are (and keep their
    sharding)."""
    t = jnp.swapaxes(a, -1, -2)
    return jax.lax.optimization_barrier(t.reshape(*t.shape[:-2], -1)).reshape(t.shape)


# XLA's CPU backend computes a dynamic slice or update of a bf16/fp16 array in float32, converting the
# whole array both ways: for a scan over layers that is every stacked weight and every stacked
# activation saved for the backward pass, in every step. The same 16 bits as uint16 are sliced as they
# are. `_CPU_SCAN_BITS` turns the workaround on (it exists to be measured against its absence).
_CPU_SCAN_BITS = True


def scan_bits(dtype) -> bool:
    """Whether arrays of `dtype` go through scans as bit patterns here (see `_CPU_SCAN_BITS`)."""
    return _CPU_SCAN_BITS and _is_half(dtype) and _cpu_matmul_path()


def as_bits(a: Array) -> Array:
    """A half-precision CPU array as its uint16 bit pattern (see `_CPU_SCAN_BITS`); others unchanged."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if scan_bits(a.dtype) else a


def from_bits(a: Array, dtype) -> Array:
    """Undo `as_bits` (`dtype`: the array's dtype before)."""
    return jax.lax.bitcast_convert_type(a, dtype) if a.dtype == jnp.uint16 and _is_half(dtype) else a


@jax.custom_jvp
def _take_rows_by_bits(table: Array, ids: Array) -> Array:
    return jax.lax.bitcast_convert_type(
        jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0), table.dtype)


@_take_rows_by_bits.defjvp
def _take_rows_by_bits_jvp(primals, tangents):
    (table, ids), (t_table, _) = primals, tangents
    return _take_rows_by_bits(table, ids), jnp.take(t_table, ids, axis=0)


def take_rows(table: Array, ids: Array) -> Array:
    """`table[ids]` (an embedding lookup). XLA's CPU backend gathers from a half-precision table through a
    float32 copy of the whole table, made on every call (a 32000 x 4096 vocabulary: 0.5 GB per decode
    step); on the CPU a half-precision table is gathered as its bit pattern instead."""
    if _is_half(table.dtype) and _cpu_matmul_path():
        return _take_rows_by_bits(table, ids)
    return jnp.take(table, ids, axis=0)


def bits_residuals(*arrays: Array | None) -> tuple:
    """Residuals of a custom VJP as bit patterns (a scan over layers stacks residuals), each beside an empty
    array that carries its dtype to `from_bits_residuals`; None (nothing kept) stays None."""
    return tuple(None if a is None else (as_bits(a), jnp.zeros((0,), a.dtype)) for a in arrays)


def from_bits_residuals(res: tuple) -> tuple:
    """The arrays `bits_residuals` saved."""
    return tuple(None if r is None else from_bits(r[0], r[1].dtype) for r in res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _half_matmul(x: Array, w: Array, cpu: bool, out_dtype: str) -> Array:
    if cpu and x.shape[0] == 1:
        # XLA's CPU backend multiplies a single half-precision row through a float32 copy of the whole
        # weight, made on every call; from two rows on it takes its bf16 GEMM (1 x 1024 by 1024 x 4096 in
        # bf16: 1.34 ms for one row, 0.46 ms for two). So one row (batch-1 decoding) is multiplied as two.
        return jnp.matmul(jnp.concatenate([x, jnp.zeros_like(x)]), w, preferred_element_type=jnp.dtype(out_dtype))[:1]
    return jnp.matmul(x, w, preferred_element_type=jnp.dtype(out_dtype))


def _half_matmul_fwd(x, w, cpu: bool, out_dtype: str):
    # (symbolic zeros: each gradient needs only the other operand, so a frozen kernel's product keeps no `x`)
    return (_half_matmul(x.value, w.value, cpu, out_dtype),
            bits_residuals(x.value if w.perturbed else None, w.value if x.perturbed else None))


def _half_matmul_bwd(cpu: bool, out_dtype: str, res, g: Array):
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    x, w = from_bits_residuals(res)
    dtype = (w if x is None else x).dtype
    g = g.astype(dtype)  # the cotangent back in the compute dtype (as under torch.autocast)
    dx = dw = None
    if cpu:  # float32 results from physically transposed operands, then cast
        if w is not None:
            dx = jnp.matmul(g, _row_major_transpose(w), preferred_element_type=jnp.float32).astype(dtype)
        if x is not None:
            dw = jnp.matmul(_row_major_transpose(x), g, preferred_element_type=jnp.float32).astype(dtype)
    else:  # accumulated in float32 by the matrix unit, written in the compute dtype
        if w is not None:
            dx = jnp.matmul(g, w.T, preferred_element_type=dtype)
        if x is not None:
            dw = jnp.matmul(x.T, g, preferred_element_type=dtype)
    return dx, dw


_half_matmul.defvjp(_half_matmul_fwd, _half_matmul_bwd, symbolic_zeros=True)


@jax.custom_vjp
def _cpu_f32_matmul(x: Array, w: Array) -> Array:
    """`x @ w` for float32 matrices on the CPU, with the weight gradient's transposed copy chosen by size:
    of `x` (`x^T g`), or of `g` and the result (`(g^T x)^T`), whichever copies fewer elements. Left to
    itself XLA copies the wide operand for a LoRA factor's gradient (`g`, 1024 x 768, for `B`'s 8 x 768)
    and multiplies on its slow generic path."""
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def _cpu_f32_matmul_fwd(x, w):
    # (symbolic zeros: `x` and `w` say whether they are differentiated. Each gradient needs only the other
    # operand, so only what a needed gradient reads is kept: a frozen kernel's product keeps no `x`.)
    return _cpu_f32_matmul(x.value, w.value), (x.value if w.perturbed else None, w.value if x.perturbed else None)


def _cpu_f32_matmul_bwd(res, g: Array):
    x, w = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return None, None
    dx = None if w is None else jnp.matmul(g, w.T, preferred_element_type=jnp.float32)
    dw = None
    if x is not None:
        (rows, n_in), n_out = x.shape, g.shape[-1]
        if (rows + n_in) * n_out < rows * n_in:
            # (the barrier keeps XLA from folding the transpose back into the product's operands)
            dw = jax.lax.optimization_barrier(
                jnp.matmul(_row_major_transpose(g), x, preferred_element_type=jnp.float32)).T
        else:
            dw = jnp.matmul(_row_major_transpose(x), g, preferred_element_type=jnp.float32)
    return dx, dw


_cpu_f32_matmul.defvjp(_cpu_f32_matmul_fwd, _cpu_f32_matmul_bwd, symbolic_zeros=True)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class PreparedKernel:
    """A frozen linear kernel made ready once per train state rather than once per step: `w` is the
    kernel in the compute dtype and `w_t` its transpose as a row-major copy. A half-precision CPU step
    multiplies its input gradients by `w_t` directly, where a plain kernel is cast and transposed again in
    every step (see `_row_major_transpose`). A stacked kernel keeps its leading layer axis for scanned
    layers; for an unrolled loop `w` and `w_t` are tuples of per-layer arrays, which `layer(i)` picks
    without the copy that slicing a stack makes. Built by the trainer (`Trainer(prepare_frozen=...)`) for
    weights that never change during training; `Linear` accepts it in place of its kernel.
    """

    w: Array | tuple[Array, ...]
    w_t: Array | tuple[Array, ...]
    bits_of: str | None = None  # set while `w` and `w_t` hold the uint16 bits of this dtype (in a scan)

    def tree_flatten(self):
        return (self.w, self.w_t), self.bits_of

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, aux)

    def to_bits(self) -> "PreparedKernel":
        """Stacked arrays as their bit patterns for a scan over layers (see `_CPU_SCAN_BITS`)."""
        if self.per_layer or self.bits_of or not scan_bits(self.w.dtype):
            return self
        return PreparedKernel(as_bits(self.w), as_bits(self.w_t), jnp.dtype(self.w.dtype).name)

    def from_bits(self) -> "PreparedKernel":
        if not self.bits_of:
            return self
        return PreparedKernel(from_bits(self.w, self.bits_of), from_bits(self.w_t, self.bits_of))

    @property
    def per_layer(self) -> bool:
        return isinstance(self.w, tuple)

    def layer(self, i: int) -> "PreparedKernel":
        """Layer `i` of a stacked kernel (a pick from per-layer tuples, a slice of arrays)."""
        return PreparedKernel(self.w[i], self.w_t[i])

    def __getitem__(self, index):  # `variable[...]` reads the whole value
        if index is not Ellipsis:
            raise TypeError("a PreparedKernel is read whole (`[...]`); use `layer(i)` for one layer")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.w), *self.w[0].shape) if self.per_layer else self.w.shape

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.bits_of) if self.bits_of else (self.w[0] if self.per_layer else self.w).dtype


def prepare_kernel(w: Array, dtype, *, per_layer: bool = False, scanned: bool = False) -> PreparedKernel:
    """`PreparedKernel` of `w` in `dtype`; with `per_layer`, `w`'s leading axis split into layers. A stack
    for a scan is held as its bit patterns where `to_bits` would make them (once here, not per step)."""
    w = w.astype(dtype)
    if per_layer:
        layers = tuple(w[i] for i in range(w.shape[0]))
        return PreparedKernel(layers, tuple(_row_major_transpose(x) for x in layers))
    prepared = PreparedKernel(w, _row_major_transpose(w))
    return prepared.to_bits() if scanned else prepared


def layer_slice(value, i: int):
    """Layer `i` of a stacked parameter value (a `PreparedKernel` or an array)."""
    return value.layer(i) if isinstance(value, PreparedKernel) else value[i]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _prepared_matmul(x: Array, w: Array, w_t: Array, out_dtype: str) -> Array:
    return jnp.matmul(x, from_bits(w, x.dtype), preferred_element_type=jnp.dtype(out_dtype))


def _prepared_matmul_fwd(x: Array, w: Array, w_t: Array, out_dtype: str):
    # Only the input gradient is needed (prepared kernels are frozen), so only `w_t` is kept, as it came
    # in: when it is a bit pattern sliced from a scan's stack, the scan forwards the stack to the backward
    # pass instead of stacking a copy of it.
    return _prepared_matmul(x, w, w_t, out_dtype), (w_t, jnp.zeros((0,), x.dtype))


def _prepared_matmul_bwd(out_dtype: str, res, g: Array):
    w_t, like = res
    dx = jnp.matmul(g.astype(like.dtype), from_bits(w_t, like.dtype), preferred_element_type=jnp.float32)
    return dx.astype(like.dtype), None, None


_prepared_matmul.defvjp(_prepared_matmul_fwd, _prepared_matmul_bwd)


def _cpu_matmul_path() -> bool:
    return jax.default_backend() == "cpu"


def _is_half(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def matmul_f32(x: Array, w: Array, dtype: jnp.dtype, *, out_dtype=jnp.float32) -> Array:
    """`x @ w` with inputs in `dtype`, accumulated in float32 and returned in float32 (or `out_dtype`).

    In bf16/fp16 the backward pass multiplies in the compute dtype too: the output's cotangent is cast
    back first, as under `torch.autocast`. (Left to JAX's own rule, a half-precision dot with a float32
    output has float32 × float32 backward dots, with every weight upcast, at a fraction of the tensor
    cores' bf16 rate.) Accelerators write half-precision results straight from their float32
    accumulators. On the CPU results are float32 and cast, and the backward operands are physically
    transposed copies (see `_row_major_transpose`): a bf16 train step's matmuls then run on the fast GEMM
    path (measured: 1.7x faster for a two-layer MLP step, 166 -> 286 GFLOP/s). A `PreparedKernel` brings
    its transposed copy along. In float32 this is a plain matmul.
    """
    if isinstance(w, PreparedKernel):
        if w.dtype == jnp.dtype(dtype) and _is_half(dtype) and _cpu_matmul_path():
            lead = x.shape[:-1]
            y = _prepared_matmul(x.astype(dtype).reshape(-1, x.shape[-1]), w.w, w.w_t, "float32")
            return y.reshape(*lead, w.shape[-1]).astype(out_dtype)
        w = w.from_bits().w  # prepared for another dtype or device: the plain path
    x, w = x.astype(dtype), w.astype(dtype)
    if _is_half(dtype):
        cpu = _cpu_matmul_path()
        out = jnp.dtype(jnp.float32 if cpu else out_dtype)
        lead = x.shape[:-1]
        y = _half_matmul(x.reshape(-1, x.shape[-1]), w, cpu, out.name)
        return y.reshape(*lead, w.shape[-1]).astype(out_dtype)
    if x.dtype == jnp.float32 and w.ndim == 2 and _cpu_matmul_path():
        y = _cpu_f32_matmul(x.reshape(-1, x.shape[-1]), w)
        return y.reshape(*x.shape[:-1], w.shape[-1]).astype(out_dtype)
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(out_dtype)


def matmul(x: Array, w: Array, dtype: jnp.dtype) -> Array:
    """`x @ w` in `dtype`, accumulated in float32 (see `matmul_f32`)."""
    return matmul_f32(x, w, dtype, out_dtype=dtype)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout; the identity when `key` is None (evaluation) or `rate` is 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


_FLOAT32_ELEMENTWISE = True


def in_float32(fn: Callable[..., Array], *xs: Array) -> Array:
    """`fn` applied to float32 copies of `xs`, its result rounded once to the dtype of `xs[0]`.

    Elementwise chains in half precision round after every op, and XLA's CPU backend computes each such op
    in float32 between two conversions, so a chain of them costs several times the float32 chain (a
    `silu(a) * b` on 1024 x 2048 bfloat16: 2.7 ms against 1.2 ms). One rounding at the end is also the more
    accurate result. The identity on float32 inputs. `_FLOAT32_ELEMENTWISE = False` applies `fn` as is
    (it exists to be measured against)."""
    if not _FLOAT32_ELEMENTWISE:
        return fn(*xs)
    return fn(*(x.astype(jnp.float32) for x in xs)).astype(xs[0].dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recomputed(fn: Callable[..., Array], *xs: Array) -> Array:
    return fn(*xs)


def _recomputed_fwd(fn: Callable[..., Array], *xs: Array):
    return fn(*xs), bits_residuals(*xs)


def _recomputed_bwd(fn: Callable[..., Array], res, g: Array):
    return jax.vjp(fn, *from_bits_residuals(res))[1](g)


_recomputed.defvjp(_recomputed_fwd, _recomputed_bwd)


def recomputed(fn: Callable[..., Array], *xs: Array) -> Array:
    """`fn(*xs)` whose backward pass keeps only `xs` (half-precision ones as bit patterns on the CPU, see
    `_CPU_SCAN_BITS`) and runs `fn` again to differentiate it.

    For functions that compute in float32 on half-precision inputs (`in_float32`, the norms), autodiff
    would keep the float32 intermediates instead, each twice the size of a half-precision input: in the
    traced stage-2 step of LLaMA-7B with scanned layers at 8 x 1024 tokens, five float32 copies of SwiGLU's
    11008-wide activations and four of the RMSNorms' inputs per layer, 70 GiB stacked by the scan.
    Recomputing costs one more pass of cheap elementwise work in the backward pass."""
    return _recomputed(fn, *xs)


def elementwise(fn: Callable[..., Array], *xs: Array) -> Array:
    """An elementwise `fn` of `xs`, computed as `in_float32` does; in half precision, `recomputed`."""
    if not _FLOAT32_ELEMENTWISE or not _is_half(xs[0].dtype):
        return fn(*xs)
    return recomputed(functools.partial(in_float32, fn), *xs)


def _silu_mul(gate: Array, up: Array) -> Array:
    return jax.nn.silu(gate) * up


def swiglu(gate: Array, up: Array) -> Array:
    """`silu(gate) * up` (see `elementwise`)."""
    return elementwise(_silu_mul, gate, up)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def lora_targeted(lora: LoRAConfig | None, hf_name: str, stack: int | None) -> bool:
    """Whether the linear layer called `hf_name` (with `{i}` for the layer index) gets an adapter.

    Stacked layers share one set of modules, so the adapter must target every layer or none.
    """
    if lora is None:
        return False
    names = [hf_name.format(i=i) for i in range(stack)] if stack else [hf_name]
    hits = [lora.matches(n) for n in names]
    if any(hits) and not all(hits):
        chosen = [n for n, h in zip(names, hits) if h]
        raise ValueError(f"LoRA target_modules {lora.target_modules!r} select only some layers ({chosen[:3]}...) "
                         f"of a stacked tower; adapters must cover all layers of {hf_name!r} or none")
    return all(hits)


class Linear(nnx.Module):
    """`y = x W + b` with an optional low-rank adapter `+ scale · dropout(x) A B`.

    `kernel` is (in, out) (the transpose of PyTorch's Linear weight); `lora_a` is (in, r), `lora_b` (r, out).
    `hf_name` is the module's name in the released checkpoint (with `{i}` for the layer index); adapters
    attach where `lora.matches(hf_name)`.
    """

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 hf_name: str, rngs: nnx.Rngs, use_bias: bool = True, stack: int | None = None,
                 lora: LoRAConfig | None = None, dtype: str = "float32", param_dtype: str = "float32",
                 init_std: float | None = None):
        self.hf_name = hf_name
        self.dtype = dtype
        pdt = dtype_of(param_dtype)
        shape, kaxes = _stacked(stack, (in_features, out_features), axes)
        # Fresh weights: LeCun normal (std 1/sqrt(fan_in)), which keeps activations O(1) at any width; the
        # released 0.02 is about that for 1024-wide layers but starves narrow ones. Imports overwrite it.
        std = in_features ** -0.5 if init_std is None else init_std
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), shape, pdt), axes=kaxes)
        if use_bias:
            bshape, baxes = _stacked(stack, (out_features,), axes[1:])
            self.bias = nnx.Param(jnp.zeros(bshape, pdt), axes=baxes)
        else:
            self.bias = None
        if lora_targeted(lora, hf_name, stack):
            assert lora is not None
            ashape, aaxes = _stacked(stack, (in_features, lora.rank), (axes[0], "lora_rank"))
            bshape, baxes = _stacked(stack, (lora.rank, out_features), ("lora_rank", axes[1]))
            bound = in_features ** -0.5  # peft's kaiming_uniform(a=sqrt(5)) on A; B starts at zero
            self.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), ashape, pdt, -bound, bound), axes=aaxes)
            self.lora_b = nnx.LoRAParam(jnp.zeros(bshape, pdt), axes=baxes)
            self.lora_scale = float(lora.scale)
            self.lora_dropout = float(lora.dropout)
        else:
            self.lora_a = None
            self.lora_b = None
            self.lora_scale = 0.0
            self.lora_dropout = 0.0

    def __call__(self, x: Array, dropout_key: Array | None = None, *, float32_output: bool = False) -> Array:
        """`(..., in)` → `(..., out)` in the compute dtype (float32 with `float32_output`)."""
        dt = dtype_of(self.dtype)
        if self.bias is None and self.lora_a is None and not float32_output:
            return matmul(x, self.kernel[...], dt)
        y = matmul_f32(x, self.kernel[...], dt)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        if self.lora_a is not None:
            h = dropout(x, self.lora_dropout, dropout_key)
            h = matmul(h, self.lora_a[...], dt)
            y = y + self.lora_scale * matmul_f32(h, self.lora_b[...], dt)
        return y if float32_output else y.astype(dt)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 and cast back (the released `LayerNormFp32`)."""

    def __init__(self, features: int, *, eps: float, stack: int | None = None, param_dtype: str = "float32",
                 axis_name: str = "norm"):
        self.eps = float(eps)
        pdt = dtype_of(param_dtype)
        shape, axes = _stacked(stack, (features,), (axis_name,))
        self.scale = nnx.Param(jnp.ones(shape, pdt), axes=axes)
        self.bias = nnx.Param(jnp.zeros(shape, pdt), axes=axes)

    def __call__(self, x: Array) -> Array:
        norm = functools.partial(_layer_norm, eps=self.eps)
        args = (x, self.scale[...], self.bias[...])
        return recomputed(norm, *args) if _is_half(x.dtype) else norm(*args)


def _layer_norm(x: Array, scale: Array, bias: Array, *, eps: float) -> Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """LLaMA's RMSNorm: normalise in float32, cast to the compute dtype, then scale."""

    def __init__(self, features: int, *, eps: float, stack: int | None = None, dtype: str = "float32",
                 param_dtype: str = "float32"):
        self.eps = float(eps)
        self.dtype = dtype
        shape, axes = _stacked(stack, (features,), ("norm",))
        self.scale = nnx.Param(jnp.ones(shape, dtype_of(param_dtype)), axes=axes)

    def __call__(self, x: Array) -> Array:
        norm = functools.partial(_rms_norm, eps=self.eps, dtype=self.dtype)
        return recomputed(norm, x, self.scale[...]) if _is_half(x.dtype) else norm(x, self.scale[...])


def _rms_norm(x: Array, scale: Array, *, eps: float, dtype: str) -> Array:
    dt = dtype_of(dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return scale.astype(dt) * y.astype(dt)
