"""What the decoder-only text towers (LLaMA, BLOOM) share: the KV cache and running the layer stack over it.

A text tower's layer takes this call's keys and values, writes them into its cache buffers with
`write_cache`, and returns the buffers; `run_decoder` threads the hidden states and the caches of all
layers through one `lax.scan` or an unrolled loop (stacked or per-layer caches, stacked or per-layer
weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax import ops
from owl_jax.config import Numerics, TextConfig
from owl_jax.modeling._stack import apply_layers
from owl_jax.sharding import constrain

Array = jax.Array


class KVCache(NamedTuple):
    """Keys and values of every layer, S the preallocated length: either stacked, `(layers, B, Hkv, S, Dh)`
    each, or one `(B, Hkv, S, Dh)` buffer per layer (tuples; `per_layer`), which an unrolled decode step
    updates in place instead of slicing and restacking the whole cache. Heads come before positions so
    that attention's batched matmuls read the cache without transposing it."""

    k: Array | tuple[Array, ...]
    v: Array | tuple[Array, ...]

    @classmethod
    def zeros(
        cls, cfg: TextConfig, batch: int, length: int, dtype: str = "float32", *, per_layer: bool = False
    ) -> KVCache:
        if per_layer:
            shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
            return cls(
                tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            )
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))


def write_cache(cache: tuple[Array, Array], k: Array, v: Array, index: Array | int) -> tuple[Array, Array]:
    """One layer's `(B, Hkv, S, Dh)` key and value buffers with this call's `(B, L, Hkv, Dh)` keys and values
    written at slot `index` (cast to the buffers' dtype)."""
    ck, cv = cache
    start = (0, 0, index, 0)
    k = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3).astype(ck.dtype), start)
    v = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3).astype(cv.dtype), start)
    return k, v


LayerFn = Callable[[nnx.Module, Array, Any, Any, Any], tuple[Array, Any]]


def run_decoder(
    layers: nnx.Module,
    x: Array,
    layer_fn: LayerFn,
    *,
    num_layers: int,
    cache: KVCache | None,
    mask: Array | None,
    dropout_key: Array | None,
    scan: bool,
    remat_policy: str,
    layer_states: Sequence[Any] | None = None,
    fused: Sequence[dict[str, Array]] | None = None,
) -> tuple[Array, KVCache | None]:
    """`(B, L, D)` through the stacked `layers`; `layer_fn(layer, x, layer_cache, dropout_key, fused)` runs one.

    Args:
      cache: optional `KVCache` (stacked or per layer), handed to each layer as its `(k, v)` buffers; it
        comes back in the same layout (None without one).
      mask: the layers' `(B, L, K)` mask (only checked here: a cache needs one).
      layer_states: per-layer parameter states used instead of the stacked ones (inference only).
      fused: per-layer concatenated projection kernels, with `layer_states` and a per-layer cache only.

    Returns:
      The last layer's hidden states `(B, L, D)` and the updated cache.
    """
    if mask is None and cache is not None:
        raise ValueError("a KV cache needs an explicit (B, L, S) mask")
    if fused is not None and (layer_states is None or cache is None or not cache.per_layer):
        raise ValueError("fused projections need per-layer weights (layer_states) and a per-layer KV cache")
    n = num_layers
    keys = None if dropout_key is None else jax.random.split(dropout_key, n)

    def body(layer, h, xs):
        layer_cache, k, layer_fused = xs
        return layer_fn(layer, h, layer_cache, k, layer_fused)

    if cache is not None and cache.per_layer:
        if layer_states is None and scan:
            raise ValueError("a per-layer KV cache needs per-layer weights (layer_states) or unscanned layers")
        xs = [
            ((cache.k[i], cache.v[i]), None if keys is None else keys[i], None if fused is None else fused[i])
            for i in range(n)
        ]
        x, new = apply_layers(
            layers, x, body, num_layers=n, scan=False, xs=xs, xs_per_layer=True, layer_states=layer_states
        )
        return x, KVCache(tuple(c[0] for c in new), tuple(c[1] for c in new))
    xs = (None if cache is None else (cache.k, cache.v), keys, None)
    x, new = apply_layers(
        layers, x, body, num_layers=n, scan=scan, remat_policy=remat_policy, xs=xs, layer_states=layer_states
    )
    return x, (None if new is None else KVCache(*new))


def head_logits(hidden: Array, lm_head: Any, embedding: Array, *, dtype: str, numerics: Numerics) -> Array:
    """`(B, L, D)` → float32 logits `(B, L, V)`: through `lm_head`, or the embedding `(V, D)` when tied (None)."""
    if lm_head is not None:
        out = lm_head(hidden, float32_output=True)
    else:
        out = ops.matmul(hidden, embedding.T, dtype=dtype, numerics=numerics, out_dtype=jnp.float32)
    return constrain(out, ("batch", "length", "act_vocab"))
