"""f_L: LLaMA with HF's names and numerics (RoPE rotate_half, float32 RMSNorm and softmax, untied head).

The attention path takes explicit positions, a boolean mask and an optional preallocated KV cache, so
the same layers serve training (no cache), prefill and one-token decode steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax import ops
from owl_jax.config import LoRAConfig, Numerics, TextConfig
from owl_jax.modeling.activations import swiglu
from owl_jax.modeling.decoder import KVCache, head_logits, run_decoder, write_cache
from owl_jax.modeling.linear import Linear
from owl_jax.modeling.norms import RMSNorm
from owl_jax.sharding import constrain

Array = jax.Array

HF_LAYER = "language_model.model.layers.{i}."
# The released code's module names: peft matches adapters against them, and the converter's key table
# (`owl_jax.checkpoint.keys.llama`) maps every parameter through them.
HF_MODULES = {
    "embed_tokens": "language_model.model.embed_tokens",
    "layers/input_layernorm": HF_LAYER + "input_layernorm",
    "layers/q_proj": HF_LAYER + "self_attn.q_proj",
    "layers/k_proj": HF_LAYER + "self_attn.k_proj",
    "layers/v_proj": HF_LAYER + "self_attn.v_proj",
    "layers/o_proj": HF_LAYER + "self_attn.o_proj",
    "layers/post_attention_layernorm": HF_LAYER + "post_attention_layernorm",
    "layers/gate_proj": HF_LAYER + "mlp.gate_proj",
    "layers/up_proj": HF_LAYER + "mlp.up_proj",
    "layers/down_proj": HF_LAYER + "mlp.down_proj",
    "norm": "language_model.model.norm",
    "lm_head": "language_model.lm_head",
}


def rope_inverse_frequencies(head_dim: int, theta: float) -> Array:
    """`1 / theta^(2i/d)` for i < d/2, in float32 (HF LLaMA's `inv_freq`)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def apply_rope(x: Array, positions: Array, theta: float, *, numerics: Numerics) -> Array:
    """Rotary embedding in HF's rotate_half layout (the first half of each head pairs with the second),
    computed in float32 and rounded once to `x`'s dtype (HF rounds the half-precision cos/sin and each
    product).

    Args:
      x: `(B, L, H, Dh)`.
      positions: `(B, L)` integer positions.
    """
    inv_freq = rope_inverse_frequencies(x.shape[-1], theta)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, L, Dh/2)
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # (B, L, 1, Dh)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = x.shape[-1] // 2

    def rotate(x: Array) -> Array:
        return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin

    return ops.in_float32(rotate, x, numerics=numerics)


class LlamaLayer(nnx.Module):
    """One decoder layer; built with `stack=L` it holds all L layers."""

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
        d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        linear = dict(
            stack=stack, lora=lora, dtype=dtype, param_dtype=param_dtype, numerics=numerics, rngs=rngs, use_bias=False
        )
        norm = dict(eps=cfg.rms_norm_eps, stack=stack, dtype=dtype, param_dtype=param_dtype, numerics=numerics)
        self.dtype, self.numerics = dtype, numerics
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.rope_theta = float(cfg.rope_theta)
        self.input_layernorm = RMSNorm(d, **norm)
        self.q_proj = Linear(
            d, cfg.num_heads * hd, axes=("embed", "heads"), hf_name=HF_MODULES["layers/q_proj"], **linear
        )
        self.k_proj = Linear(
            d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), hf_name=HF_MODULES["layers/k_proj"], **linear
        )
        self.v_proj = Linear(
            d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"), hf_name=HF_MODULES["layers/v_proj"], **linear
        )
        self.o_proj = Linear(
            cfg.num_heads * hd, d, axes=("heads", "embed"), hf_name=HF_MODULES["layers/o_proj"], **linear
        )
        self.post_attention_layernorm = RMSNorm(d, **norm)
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), hf_name=HF_MODULES["layers/gate_proj"], **linear)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), hf_name=HF_MODULES["layers/up_proj"], **linear)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), hf_name=HF_MODULES["layers/down_proj"], **linear)

    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Array,
        cache: tuple[Array, Array] | None,
        cache_index: Array | int,
        key: Array | None,
        fused: dict[str, Array] | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """`(B, L, D)` → `(B, L, D)` and the layer's updated `(B, Hkv, S, Dh)` keys and values (with a cache).

        `positions` `(B, L)`, `mask` `(B, L, K)` or None (causal), `cache` this layer's keys and values with
        this call's written at `cache_index`. `fused` (inference, from `fuse_projections`) holds the q/k/v
        and gate/up kernels concatenated, so each group is one matmul."""
        keys = [None] * 7 if key is None else list(jax.random.split(key, 7))
        b, length, _ = x.shape
        mm = dict(dtype=self.dtype, numerics=self.numerics)
        h = self.input_layernorm(x)
        if fused is not None:
            qkv = ops.matmul(h, fused["qkv"], **mm)
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = qkv[..., :nq], qkv[..., nq : nq + nkv], qkv[..., nq + nkv :]
        else:
            q, k, v = self.q_proj(h, keys[0]), self.k_proj(h, keys[1]), self.v_proj(h, keys[2])
        q = q.reshape(b, length, self.num_heads, self.head_dim)
        k = k.reshape(b, length, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, length, self.num_kv_heads, self.head_dim)
        q = constrain(
            apply_rope(q, positions, self.rope_theta, numerics=self.numerics), ("batch", "length", "act_heads", None)
        )
        k = apply_rope(k, positions, self.rope_theta, numerics=self.numerics)
        new_cache = None
        if cache is not None:
            k, v = new_cache = write_cache(cache, k, v, cache_index)  # (B, Hkv, S, Dh) each
        ctx = ops.attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            scale=self.head_dim**-0.5,
            mask=mask,
            is_causal=mask is None,
            numerics=self.numerics,
            heads_major_kv=cache is not None,
        )
        x = x + self.o_proj(ctx.reshape(b, length, self.num_heads * self.head_dim), keys[3])
        h = self.post_attention_layernorm(x)
        if fused is not None:
            gate, up = jnp.split(ops.matmul(h, fused["gate_up"], **mm), 2, axis=-1)
        else:
            gate, up = self.gate_proj(h, keys[4]), self.up_proj(h, keys[5])
        h = self.down_proj(swiglu(gate, up, numerics=self.numerics), keys[6])
        return constrain(x + h, ("batch", "length", "act_embed")), new_cache


FUSED_PROJECTIONS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def can_fuse_projections(layers: nnx.Module) -> bool:
    """Whether `layers` are LLaMA layers whose q/k/v and gate/up projections are plain float kernels (no
    adapters, no biases, not quantized) and so can be concatenated (other text towers have nothing to fuse)."""
    return isinstance(layers, LlamaLayer) and all(
        type(getattr(layers, name)) is Linear
        and getattr(layers, name).lora_a is None
        and getattr(layers, name).bias is None
        for group in FUSED_PROJECTIONS.values()
        for name in group
    )


def fuse_projections(layer_state: Any) -> tuple[Any, dict[str, Array]]:
    """One layer's state (`nnx.State` of a `LlamaLayer` slice) → the state without its q/k/v and gate/up
    kernels (left as 0-size arrays) and those kernels concatenated along their outputs, for
    `LlamaLayer(..., fused=...)`: a decode step then runs two matmuls where it ran five."""
    fused = {
        name: jnp.concatenate([layer_state[p]["kernel"][...] for p in parts], axis=-1)
        for name, parts in FUSED_PROJECTIONS.items()
    }
    state = jax.tree.map(lambda a: a, layer_state)  # a new State; the original is left as it was
    for parts in FUSED_PROJECTIONS.values():
        for p in parts:
            kernel = state[p]["kernel"]
            state[p]["kernel"] = kernel.replace(jnp.zeros((0,), kernel[...].dtype))
    return state, fused


class LlamaModel(nnx.Module):
    """`language_model.*`: embeddings → decoder layers → final norm → `lm_head`."""

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
        # Fresh models only (imports overwrite it): unit-variance embeddings, the scale visual_fc's LeCun
        # init gives image tokens, so text and image positions start on an equal footing in the residual.
        self.embed_tokens = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt), axes=("vocab", "embed")
        )
        self.layers = LlamaLayer(
            cfg, stack=cfg.num_layers, lora=lora, dtype=dtype, param_dtype=param_dtype, numerics=numerics, rngs=rngs
        )
        self.norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, numerics=numerics
        )
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
        """`(B, L)` valid token ids → `(B, L, D)` embeddings in the compute dtype."""
        return ops.take_rows(self.embed_tokens[...], token_ids, numerics=self.numerics).astype(self.dtype)

    def __call__(
        self,
        embeds: Array,
        positions: Array,
        mask: Array,
        *,
        cache: KVCache | None = None,
        cache_index: Array | int = 0,
        dropout_key: Array | None = None,
        layer_states: Sequence[Any] | None = None,
        fused: Sequence[dict[str, Array]] | None = None,
    ) -> tuple[Array, KVCache | None]:
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
        x = constrain(embeds.astype(self.dtype), ("batch", "length", "act_embed"))

        def layer_fn(layer, h, layer_cache, key, layer_fused):
            return layer(h, positions, mask, layer_cache, cache_index, key, fused=layer_fused)

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
            fused=fused,
        )
        return self.norm(x), cache

    def logits(self, hidden: Array) -> Array:
        """`(B, L, D)` → float32 logits `(B, L, V)`."""
        return head_logits(hidden, self.lm_head, self.embed_tokens[...], dtype=self.dtype, numerics=self.numerics)
