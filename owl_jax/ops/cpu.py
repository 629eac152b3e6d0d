"""Products routed for XLA's CPU compiler (`Numerics.matmul == "cpu"`).

Three facts of that compiler shape this file:
- its fast half-precision GEMM takes only row-major, untransposed operands; a transpose folded into a
  dot runs several times slower, so backward passes multiply physically transposed copies;
- a half-precision product with a single row goes through a float32 copy of the whole weight, so one
  row is multiplied as two;
- for a float32 weight gradient it copies the wider operand to transpose it; `cpu_f32_matmul` picks the
  narrower one.
Frozen kernels that a training step multiplies every step can be made ready once (`PreparedKernel`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from owl_jax.config import Numerics
from owl_jax.ops import bits

Array = jax.Array


def row_major_transpose(a: Array) -> Array:
    """`a` with its last two axes swapped, as a real row-major copy (`(..., m, n)` → `(..., n, m)`).

    XLA folds a plain transpose into the dot that reads it; flattening the swapped axes behind an
    optimization barrier forces the copy, one pass over the operand. Leading axes (and their sharding)
    stay as they are."""
    t = jnp.swapaxes(a, -1, -2)
    return jax.lax.optimization_barrier(t.reshape(*t.shape[:-2], -1)).reshape(t.shape)


def one_row_as_two(x: Array, w: Array, out_dtype) -> Array:
    """`x @ w` for half-precision `x` `(R, K)`; a single row is padded to two (see the module docstring)."""
    if x.shape[0] == 1:
        return jnp.matmul(jnp.concatenate([x, jnp.zeros_like(x)]), w, preferred_element_type=out_dtype)[:1]
    return jnp.matmul(x, w, preferred_element_type=out_dtype)


def transposed_backward(g: Array, x: Array | None, w: Array | None, dtype) -> tuple[Array | None, Array | None]:
    """`(g Wᵀ, xᵀ g)` from physically transposed operands, accumulated in float32 and cast to `dtype`
    (None where the operand is None: that gradient is not needed)."""
    dx = None if w is None else jnp.matmul(g, row_major_transpose(w), preferred_element_type=jnp.float32)
    dw = None if x is None else jnp.matmul(row_major_transpose(x), g, preferred_element_type=jnp.float32)
    return (None if dx is None else dx.astype(dtype)), (None if dw is None else dw.astype(dtype))


@jax.custom_vjp
def cpu_f32_matmul(x: Array, w: Array) -> Array:
    """`x @ w` for float32 matrices `(R, K) @ (K, N)`, whose weight gradient transposes whichever of `x`
    (`xᵀ g`) or `g` and the result (`(gᵀ x)ᵀ`) has fewer elements. Left to itself XLA copies the wide
    operand for a LoRA factor's gradient (`g`, 1024 × 768, for `B`'s 8 × 768)."""
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def _cpu_f32_matmul_fwd(x, w):
    # Symbolic zeros say which operands are differentiated: each gradient needs only the other operand,
    # so a frozen kernel's product keeps no `x`.
    return cpu_f32_matmul(x.value, w.value), (x.value if w.perturbed else None, w.value if x.perturbed else None)


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
                jnp.matmul(row_major_transpose(g), x, preferred_element_type=jnp.float32)
            ).T
        else:
            dw = jnp.matmul(row_major_transpose(x), g, preferred_element_type=jnp.float32)
    return dx, dw


cpu_f32_matmul.defvjp(_cpu_f32_matmul_fwd, _cpu_f32_matmul_bwd, symbolic_zeros=True)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class PreparedKernel:
    """A frozen linear kernel made ready once per train state rather than in every step: `w` in the
    compute dtype and `w_t`, its transpose as a row-major copy, which the backward pass multiplies
    directly (a plain kernel is cast and transposed again in every step). A stacked kernel keeps its
    leading layer axis for scanned layers; for unrolled layers `w` and `w_t` are tuples of per-layer
    arrays, which `layer(i)` picks without the copy a slice of a stack makes. Inside a scan `w` and `w_t`
    may be `HalfBits`. Built by the trainer (`Trainer(prepare_frozen=...)`); `Linear` accepts it in place
    of its kernel.
    """

    w: Array | tuple[Array, ...]
    w_t: Array | tuple[Array, ...]

    def tree_flatten(self):
        return (self.w, self.w_t), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @property
    def per_layer(self) -> bool:
        return isinstance(self.w, tuple)

    def layer(self, i: int) -> PreparedKernel:
        """Layer `i` of a stacked kernel (a pick from per-layer tuples, a slice of arrays)."""
        return PreparedKernel(self.w[i], self.w_t[i])

    def __getitem__(self, index):  # `variable[...]` reads the whole value
        if index is not Ellipsis:
            raise TypeError("a PreparedKernel is read whole (`[...]`); use `layer(i)` for one layer")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.w), *self.w[0].shape) if self.per_layer else tuple(self.w.shape)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype((self.w[0] if self.per_layer else self.w).dtype)

    def plain(self) -> Array:
        """The kernel as an ordinary array."""
        w = bits.from_bits(self.w)
        return jnp.stack(w) if self.per_layer else w


def prepare_kernel(w: Array, dtype, *, per_layer: bool = False, scanned: Numerics | None = None) -> PreparedKernel:
    """`PreparedKernel` of `w` `(…, K, N)` in `dtype`; with `per_layer`, `w`'s leading axis split into
    layers. A stack for a scan over layers (`scanned`: the model's numerics) is held as bits where those
    numerics move half precision as bits: a scan stacks the slices it forwards to the backward pass."""
    w = w.astype(dtype)
    if per_layer:
        layers = tuple(w[i] for i in range(w.shape[0]))
        return PreparedKernel(layers, tuple(row_major_transpose(x) for x in layers))
    w_t = row_major_transpose(w)
    if scanned is not None:
        return PreparedKernel(bits.to_bits(w, scanned), bits.to_bits(w_t, scanned))
    return PreparedKernel(w, w_t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def prepared_matmul(x: Array, w, w_t, out_dtype: str) -> Array:
    """`x @ w` `(R, K) @ (K, N)` for a `PreparedKernel`'s arrays (possibly `HalfBits`); only `x` is
    differentiated."""
    return jnp.matmul(x, bits.from_bits(w), preferred_element_type=jnp.dtype(out_dtype))


def _prepared_matmul_fwd(x: Array, w, w_t, out_dtype: str):
    # Only `w_t` is kept, as it came in: when it is a bit pattern sliced from a scan's stack, the scan
    # forwards the stack to the backward pass instead of stacking a copy of it.
    return prepared_matmul(x, w, w_t, out_dtype), (w_t, jnp.zeros((0,), x.dtype))


def _prepared_matmul_bwd(out_dtype: str, res, g: Array):
    w_t, like = res
    dx = jnp.matmul(g.astype(like.dtype), bits.from_bits(w_t), preferred_element_type=jnp.float32)
    return dx.astype(like.dtype), None, None


prepared_matmul.defvjp(_prepared_matmul_fwd, _prepared_matmul_bwd)
