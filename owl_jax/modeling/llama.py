"""f_L: LLaMA with HF's names and numerics (RoPE rotate_half, float32 RMSNorm and softmax, untied head).

The attention path takes explicit positions, a boolean mask and an optional preallocated KV cache, so
the same layers serve training (no cache), prefill and one-token decode steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax.config import LoRAConfig, TextConfig
from owl_jax.modeling._attention import apply_rope, dot_product_attention
from owl_jax.modeling._layers import Linear, RMSNorm, dtype_of, matmul, matmul_f32, swiglu, take_rows
from owl_jax.modeling._stack import apply_layers
from owl_jax.modeling.hf_names import hf_module
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
    def zeros(cls, cfg: TextConfig, batch: int, length: int, dtype: str = "float32", *,
              per_layer: bool = False) -> "KVCache":
        if per_layer:
            shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
            return cls(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                       tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))


class LlamaLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, stack: int, lora: LoRAConfig | None, dtype: str, param_dtype: str,
                 rngs: nnx.Rngs, attention_impl: str = "xla"):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.attention_impl = attention_impl
        common = dict(stack=stack, lora=lora, dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=False)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.rope_theta = float(cfg.rope_theta)
        self.input_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, stack=stack, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(d, cfg.num_heads * hd, axes=("embed", "heads"), hf_name=hf_module("language_model/layers/q_proj"),
                             **common)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"),
                             hf_name=hf_module("language_model/layers/k_proj"), **common)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"),
                             hf_name=hf_module("language_model/layers/v_proj"), **common)
        self.o_proj = Linear(cfg.num_heads * hd, d, axes=("heads", "embed"), hf_name=hf_module("language_model/layers/o_proj"),
                             **common)
        self.post_attention_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, stack=stack, dtype=dtype,
                                                param_dtype=param_dtype)
        self.gate_proj = Linear(d, cfg.intermediate_size, axes=("embed", "mlp"), hf_name=hf_module("language_model/layers/gate_proj"),
                                **common)
        self.up_proj = Linear(d, cfg.intermediate_size, axes=("embed", "mlp"), hf_name=hf_module("language_model/layers/up_proj"),
                              **common)
        self.down_proj = Linear(cfg.intermediate_size, d, axes=("mlp", "embed"), hf_name=hf_module("language_model/layers/down_proj"),
                                **common)

    def __call__(self, x: Array, positions: Array, mask: Array, cache: tuple[Array, Array] | None,
                 cache_index: Array | int, key: Array | None,
                 fused: dict[str, Array] | None = None) -> tuple[Array, tuple[Array, Array] | None]:
        """One decoder layer; `fused` (inference, from `fuse_projections`) holds the q/k/v and gate/up
        kernels concatenated, so each group is one matmul."""
        keys = [None] * 7 if key is None else list(jax.random.split(key, 7))
        b, length, _ = x.shape
        h = self.input_layernorm(x)
        if fused is not None:
            qkv = matmul(h, fused["qkv"], dtype_of(self.q_proj.dtype))
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
        else:
            q, k, v = self.q_proj(h, keys[0]), self.k_proj(h, keys[1]), self.v_proj(h, keys[2])
        q = q.reshape(b, length, self.num_heads, self.head_dim)
        k = k.reshape(b, length, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, length, self.num_kv_heads, self.head_dim)
        q = constrain(apply_rope(q, positions, self.rope_theta), ("batch", "length", "act_heads", None))
        k = apply_rope(k, positions, self.rope_theta)
        new_cache = None
        if cache is not None:
            ck, cv = cache  # (B, Hkv, S, Dh)
            start = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(ck, k.transpose(0, 2, 1, 3).astype(ck.dtype), start)
            v = jax.lax.dynamic_update_slice(cv, v.transpose(0, 2, 1, 3).astype(cv.dtype), start)
            new_cache = (k, v)
        ctx = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=self.head_dim ** -0.5, mask=mask,
                                    is_causal=mask is None, implementation=self.attention_impl,
                                    heads_major_kv=cache is not None)
        x = x + self.o_proj(ctx.reshape(b, length, self.num_heads * self.head_dim), keys[3])
        h = self.post_attention_layernorm(x)
        if fused is not None:
            gate, up = jnp.split(matmul(h, fused["gate_up"], dtype_of(self.gate_proj.dtype)), 2, axis=-1)
        else:
            gate, up = self.gate_proj(h, keys[4]), self.up_proj(h, keys[5])
        h = self.down_proj(swiglu(gate, up), keys[6])
        return constrain(x + h, ("batch", "length", "act_embed")), new_cache


FUSED_PROJECTIONS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def can_fuse_projections(layers: "LlamaLayer") -> bool:
    """Whether the layer's q/k/v and gate/up projections are plain (no adapters, no biases) and so can be
    concatenated."""
    return all(getattr(layers, name).lora_a is None and getattr(layers, name).bias is None
               for group in FUSED_PROJECTIONS.values() for name in group)


def fuse_projections(layer_state: Any) -> tuple[Any, dict[str, Array]]:
    """One layer's state (`nnx.State` of a `LlamaLayer` slice) → the state without its q/k/v and gate/up
    kernels (left as 0-size arrays) and those kernels concatenated along their outputs, for
    `LlamaLayer(..., fused=...)`: a decode step then runs two matmuls where it ran five."""
    fused = {name: jnp.concatenate([layer_state[p]["kernel"][...] for p in parts], axis=-1)
             for name, parts in FUSED_PROJECTIONS.items()}
    state = jax.tree.map(lambda a: a, layer_state)  # a new State; the original is left as it was
    for parts in FUSED_PROJECTIONS.values():
        for p in parts:
            kernel = state[p]["kernel"]
            state[p]["kernel"] = kernel.replace(jnp.zeros((0,), kernel[...].dtype))
    return state, fused


class LlamaModel(nnx.Module):
    """`language_model.*`: embeddings → decoder layers → final norm → `lm_head`."""

    def __init__(self, cfg: TextConfig, *, lora: LoRAConfig | None = None, dtype: str = "float32",
                 param_dtype: str = "float32", scan_layers: bool = True, remat_policy: str = "none",
                 attention_impl: str = "xla", rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        pdt = dtype_of(param_dtype)
        # Fresh models only (imports overwrite it): unit-variance embeddings, the scale visual_fc's LeCun
        # init gives image tokens, so text and image positions start on an equal footing in the residual.
        self.embed_tokens = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt),
                                      axes=("vocab", "embed"))
        self.layers = LlamaLayer(cfg, stack=cfg.num_layers, lora=lora, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                 attention_impl=attention_impl)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"),
                                  hf_name=hf_module("language_model/lm_head"), use_bias=False, lora=lora, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)

    def embed(self, token_ids: Array) -> Array:
        """`(B, L)` valid token ids → `(B, L, D)` embeddings in the compute dtype."""
        table = self.embed_tokens[...]
        return take_rows(table, token_ids).astype(dtype_of(self.dtype))

    def __call__(self, embeds: Array, positions: Array, mask: Array, *, cache: KVCache | None = None,
                 cache_index: Array | int = 0, dropout_key: Array | None = None,
                 layer_states: Sequence[Any] | None = None,
                 fused: Sequence[dict[str, Array]] | None = None) -> tuple[Array, KVCache | None]:
        """Decoder stack.

        Args:
          embeds: `(B, L, D)` input embeddings (text with images spliced in).
          positions: `(B, L)` RoPE positions.
          mask: `(B, L, K)` boolean; K = L without a cache, K = S (the cache length) with one. None (no
            cache only): causal attention over all L positions, which is exact for every real token of
            right-padded rows and lets fused kernels skip the mask.
          cache: optional `KVCache` (stacked or per layer); this call's keys/values are written at
            `cache_index`, and the cache comes back in the same layout.
          layer_states: optional per-layer parameter states used instead of the stacked ones (see
            `owl_jax.modeling._stack.apply_layers`; inference only).
          fused: optional per-layer concatenated projection kernels (`fuse_projections`), with
            `layer_states` and a per-layer cache only.

        Returns:
          Final-normed hidden states `(B, L, D)` and the updated cache (None without one).
        """
        if mask is None and cache is not None:
            raise ValueError("a KV cache needs an explicit (B, L, S) mask")
        n = self.cfg.num_layers
        keys = None if dropout_key is None else jax.random.split(dropout_key, n)
        x = constrain(embeds.astype(dtype_of(self.dtype)), ("batch", "length", "act_embed"))

        def body(layer, h, xs):
            layer_cache, k, layer_fused = xs
            return layer(h, positions, mask, layer_cache, cache_index, k, fused=layer_fused)

        if fused is not None and (layer_states is None or cache is None or not cache.per_layer):
            raise ValueError("fused projections need per-layer weights (layer_states) and a per-layer KV cache")
        if cache is not None and cache.per_layer:
            if layer_states is None and self.scan_layers:
                raise ValueError("a per-layer KV cache needs per-layer weights (layer_states) or unscanned layers")
            xs = [((cache.k[i], cache.v[i]), None if keys is None else keys[i], None if fused is None else fused[i])
                  for i in range(n)]
            x, new = apply_layers(self.layers, x, body, num_layers=n, scan=False, xs=xs, xs_per_layer=True,
                                  layer_states=layer_states)
            return self.norm(x), KVCache(tuple(c[0] for c in new), tuple(c[1] for c in new))
        xs = (None if cache is None else (cache.k, cache.v), keys, None)
        x, new = apply_layers(self.layers, x, body, num_layers=n, scan=self.scan_layers,
                              remat_policy=self.remat_policy, xs=xs, layer_states=layer_states)
        return self.norm(x), (None if new is None else KVCache(*new))

    def logits(self, hidden: Array) -> Array:
        """`(B, L, D)` → float32 logits `(B, L, V)`."""
        if self.lm_head is not None:
            out = self.lm_head(hidden, float32_output=True)
        else:
            dt = dtype_of(self.dtype)
            out = matmul_f32(hidden, self.embed_tokens[...].T, dt)
        return constrain(out, ("batch", "length", "act_vocab"))
