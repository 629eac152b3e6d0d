"""f_L as BLOOM (the `mplug-owl-bloomz-7b-multilingual` layout), with HF's names and numerics.

- `embed` is `word_embeddings` then `word_embeddings_layernorm`: mPLUG-Owl normalises the text embeddings
  before the images are spliced in, so image vectors never pass through it; new tokens during generation
  come through `embed` too.
- Each block is pre-LN with residuals from the un-normalised stream; `query_key_value` is one fused
  projection whose outputs are ordered `[head, (q, k, v), head_dim]`; the MLP is 4 × hidden wide with
  BLOOM's tanh GELU. All LayerNorms carry weights and biases.
- No position embeddings: ALiBi adds `slope_h · pos_k` to every score of key k, with `pos_k` the number of
  real keys before it (`cumsum(key mask) - 1`, 0 on padding), counted over the whole key range, cache
  included. By softmax's shift invariance this is the relative `-slope_h · (i - j)`, so left padding, right
  padding and cache slots all give the same numbers.
- The head is tied to `word_embeddings` (float32 logits `ln_f(x) @ E^T`) unless the config unties it.

The layers take the same masks and KV cache as LLaMA's (`owl_jax.modeling.decoder`); the `positions`
they are given are not read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from owl_jax import ops
from owl_jax.config import LoRAConfig, Numerics, TextConfig
from owl_jax.modeling.activations import activation
from owl_jax.modeling.decoder import KVCache, head_logits, run_decoder, write_cache
from owl_jax.modeling.linear import Linear
from owl_jax.modeling.norms import LayerNorm
from owl_jax.sharding import constrain

Array = jax.Array

HF_PREFIX = "language_model.transformer."
HF_LAYER = HF_PREFIX + "h.{i}."
# The released code's module names: peft matches adapters against them, and the converter's key table
# (`owl_jax.checkpoint.keys.bloom`) maps every parameter through them.
HF_MODULES = {
    "word_embeddings": HF_PREFIX + "word_embeddings",
    "word_embeddings_layernorm": HF_PREFIX + "word_embeddings_layernorm",
    "layers/input_layernorm": HF_LAYER + "input_layernorm",
    "layers/query_key_value": HF_LAYER + "self_attention.query_key_value",
    "layers/dense": HF_LAYER + "self_attention.dense",
    "layers/post_attention_layernorm": HF_LAYER + "post_attention_layernorm",
    "layers/dense_h_to_4h": HF_LAYER + "mlp.dense_h_to_4h",
    "layers/dense_4h_to_h": HF_LAYER + "mlp.dense_4h_to_h",
    "ln_f": HF_PREFIX + "ln_f",
    "lm_head": "language_model.lm_head",
}


def alibi_slopes(num_heads: int) -> np.ndarray:
    """`(n,)` float32 ALiBi slopes: with p = 2^floor(log2 n), `2^(-8i/p)` for i = 1..p, then (n > p)
    `2^(-4(2j-1)/p)` for j = 1..n-p; as HF computes them (a float32 base raised to integer powers)."""
    p = 2 ** math.floor(math.log2(num_heads))
    base = np.float32(2.0 ** (-(2.0 ** -(math.log2(p) - 3))))
    slopes = np.power(base, np.arange(1, p + 1, dtype=np.float32))
    if p < num_heads:
        extra_base = np.float32(2.0 ** (-(2.0 ** -(math.log2(2 * p) - 3))))
        extra = np.power(extra_base, np.arange(1, 1 + 2 * (num_heads - p), 2, dtype=np.float32))
        slopes = np.concatenate([slopes, extra])
    return slopes.astype(np.float32)


def key_positions(mask: Array | None, batch: int, length: int) -> Array:
    """ALiBi's `(B, K)` key positions: real keys numbered from 0 in order, padding keys 0.

    Args:
      mask: `(B, L, K)` boolean attention mask (a key is real where some query may see it: with causal
        masks every real key before a visible one is visible too), or None for causal attention over
        `length` keys, all real.
    """
    if mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    real = jnp.any(mask, axis=1)
    return jnp.where(real, jnp.cumsum(real, axis=-1, dtype=jnp.int32) - 1, 0)


def alibi_bias(mask: Array | None, batch: int, length: int, num_heads: int, dtype: str) -> Array:
    """`(B, H, K)` float32 ALiBi bias `slope_h · pos_k`, rounded to the compute `dtype` as HF rounds it."""
    slopes = jnp.asarray(alibi_slopes(num_heads))
    pos = key_positions(mask, batch, length).astype(jnp.float32)
    bias = slopes[None, :, None] * pos[:, None, :]
    return constrain(bias.astype(dtype).astype(jnp.float32), ("batch", "act_heads", None))


class BloomLayer(nnx.Module):
    """One BLOOM block; built with `stack=L` it holds all L layers."""

    def __init__(
        self,
        cfg: TextConfig,
        *,
        stack: int,
        lora: LoRAConfig | None,
        dtype: str,
        param_dtype: str,
        numerics: Numerics,
        rngs: nnx.Rngs,
    ):
        d, f = cfg.hidden_size, cfg.intermediate_size
        linear = dict(stack=stack, lora=lora, dtype=dtype, param_dtype=param_dtype, numerics=numerics, rngs=rngs)
        norm = dict(eps=cfg.layer_norm_eps, stack=stack, param_dtype=param_dtype, numerics=numerics)
        self.numerics = numerics
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.act = cfg.hidden_act
        self.input_layernorm = LayerNorm(d, **norm)
        # outputs ordered [head, (q, k, v), head_dim]: a shard of whole heads per tensor-parallel device
        self.query_key_value = Linear(
            d, 3 * d, axes=("embed", "heads"), hf_name=HF_MODULES["layers/query_key_value"], **linear
        )
        self.dense = Linear(d, d, axes=("heads", "embed"), hf_name=HF_MODULES["layers/dense"], **linear)
        self.post_attention_layernorm = LayerNorm(d, **norm)
        self.dense_h_to_4h = Linear(d, f, axes=("embed", "mlp"), hf_name=HF_MODULES["layers/dense_h_to_4h"], **linear)
        self.dense_4h_to_h = Linear(f, d, axes=("mlp", "embed"), hf_name=HF_MODULES["layers/dense_4h_to_h"], **linear)

    def __call__(
        self,
        x: Array,
        bias: Array,
        mask: Array | None,
        cache: tuple[Array, Array] | None,
        cache_index: Array | int,
        key: Array | None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """`(B, L, D)` → `(B, L, D)` and the layer's updated `(B, H, S, Dh)` keys and values (with a cache).

        `bias` `(B, H, K)` the ALiBi bias of every key, `mask` `(B, L, K)` or None (causal), `cache` this
        layer's keys and values with this call's written at `cache_index`."""
        keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
        b, length, d = x.shape
        h = self.input_layernorm(x)
        qkv = self.query_key_value(h, keys[0]).reshape(b, length, self.num_heads, 3, self.head_dim)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # (B, L, H, Dh) each
        q = constrain(q, ("batch", "length", "act_heads", None))
        new_cache = None
        if cache is not None:
            k, v = new_cache = write_cache(cache, k, v, cache_index)  # (B, H, S, Dh) each
        ctx = ops.attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            scale=self.head_dim**-0.5,
            mask=mask,
            is_causal=mask is None,
            numerics=self.numerics,
            heads_major_kv=cache is not None,
            bias=bias,
        )
        x = x + self.dense(ctx.reshape(b, length, d), keys[1])
        h = self.dense_h_to_4h(self.post_attention_layernorm(x), keys[2])
        h = self.dense_4h_to_h(activation(self.act, h, numerics=self.numerics), keys[3])
        return constrain(x + h, ("batch", "length", "act_embed")), new_cache


class BloomModel(nnx.Module):
    """`language_model.*`: embeddings → their LayerNorm → BLOOM blocks → `ln_f` → tied head."""

    def __init__(
        self,
        cfg: TextConfig,
        *,
        lora: LoRAConfig | None = None,
        dtype: str = "float32",
        param_dtype: str = "float32",
        scan_layers: bool = True,
        remat_policy: str = "none",
        numerics: Numerics = Numerics(),
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.numerics = numerics
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        pdt = jnp.dtype(param_dtype)
        norm = dict(eps=cfg.layer_norm_eps, param_dtype=param_dtype, numerics=numerics)
        # Fresh models only (imports overwrite it); the embedding LayerNorm brings text to unit scale anyway.
        self.word_embeddings = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt), axes=("vocab", "embed")
        )
        self.word_embeddings_layernorm = LayerNorm(cfg.hidden_size, **norm)
        self.layers = BloomLayer(
            cfg, stack=cfg.num_layers, lora=lora, dtype=dtype, param_dtype=param_dtype, numerics=numerics, rngs=rngs
        )
        self.ln_f = LayerNorm(cfg.hidden_size, **norm)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                axes=("embed", "vocab"),
                hf_name=HF_MODULES["lm_head"],
                use_bias=False,
                lora=lora,
                dtype=dtype,
                param_dtype=param_dtype,
                numerics=numerics,
                rngs=rngs,
            )

    def embed(self, token_ids: Array) -> Array:
        """`(B, L)` valid token ids → `(B, L, D)` layer-normed embeddings in the compute dtype."""
        rows = ops.take_rows(self.word_embeddings[...], token_ids, numerics=self.numerics).astype(self.dtype)
        return self.word_embeddings_layernorm(rows)

    def __call__(
        self,
        embeds: Array,
        positions: Array,
        mask: Array | None,
        *,
        cache: KVCache | None = None,
        cache_index: Array | int = 0,
        dropout_key: Array | None = None,
        layer_states: Sequence[Any] | None = None,
        fused: Sequence[dict[str, Array]] | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Decoder stack, with `LlamaModel`'s arguments.

        Args:
          embeds: `(B, L, D)` input embeddings (text from `embed`, images spliced in), used as given.
          positions: `(B, L)`, not read (ALiBi's key positions come from `mask`).
          mask: `(B, L, K)` boolean; K = L without a cache, K = S (the cache length) with one. None (no
            cache only): causal attention over L keys, all real.
          cache, cache_index, layer_states: as for `LlamaModel`.
          fused: must be None (BLOOM's projections are fused already).

        Returns:
          `ln_f` of the last hidden states `(B, L, D)` and the updated cache (None without one).
        """
        del positions
        if fused is not None:
            raise ValueError("BLOOM has no projections to fuse: its query_key_value is one matmul already")
        b, length = embeds.shape[:2]
        bias = alibi_bias(mask, b, length if mask is None else mask.shape[-1], self.cfg.num_heads, self.dtype)
        x = constrain(embeds.astype(self.dtype), ("batch", "length", "act_embed"))

        def layer_fn(layer, h, layer_cache, key, _fused):
            return layer(h, bias, mask, layer_cache, cache_index, key)

        x, cache = run_decoder(
            self.layers,
            x,
            layer_fn,
            num_layers=self.cfg.num_layers,
            cache=cache,
            mask=mask,
            dropout_key=dropout_key,
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            layer_states=layer_states,
        )
        return self.ln_f(x), cache

    def logits(self, hidden: Array) -> Array:
        """`(B, L, D)` → float32 logits `(B, L, V)`."""
        return head_logits(hidden, self.lm_head, self.word_embeddings[...], dtype=self.dtype, numerics=self.numerics)
