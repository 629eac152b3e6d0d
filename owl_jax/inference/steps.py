"""The generator's compiled model steps over the KV cache: pure functions of the split model state.

`Generator` jits them (`owl_jax.inference.generate`): the prefill of left-padded prompts, the extension of
one row by a chat turn, and the one-token decode step that greedy decoding and beam search both run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax.modeling.llama import KVCache
from owl_jax.modeling.owl import Owl
from owl_jax.sharding import constrain


def _cache_axes(cache: KVCache) -> KVCache:
    if cache.per_layer:
        axes = ("batch", "act_heads", None, None)
        return KVCache(tuple(constrain(a, axes) for a in cache.k), tuple(constrain(a, axes) for a in cache.v))
    axes = (None, "batch", "act_heads", None, None)
    return KVCache(constrain(cache.k, axes), constrain(cache.v, axes))


def _merge(graphdef, params) -> tuple[Owl, dict[str, Any]]:
    """`Generator.state` → the model and the LLM's per-layer keyword arguments (`layer_states` None: the
    model's stacked layers; `fused`: concatenated projection kernels or None)."""
    state, layer_states, fused = params
    return nnx.merge(graphdef, state), {"layer_states": layer_states, "fused": fused}


def _prefill(graphdef, params, input_ids, mask, image_embeds, cache_len: int, video_embeds=None):
    """Run left-padded prompts `(B, P)` into a fresh cache of `cache_len` slots; logits of the last slot."""
    model, llm_args = _merge(graphdef, params)
    b, p = input_ids.shape
    embeds = model.embed_inputs(input_ids, image_embeds, video_embeds=video_embeds)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    slots = jnp.arange(cache_len)
    key_valid = jnp.pad(mask > 0, ((0, 0), (0, cache_len - p)))
    attend = (slots[None, None, :] <= jnp.arange(p)[None, :, None]) & key_valid[:, None, :]
    cache = _cache_axes(
        KVCache.zeros(
            model.config.text, b, cache_len, model.config.dtype, per_layer=llm_args["layer_states"] is not None
        )
    )
    hidden, cache = model.language_model(embeds, positions, attend, cache=cache, cache_index=0, **llm_args)
    logits = model.language_model.logits(hidden[:, -1:])[:, 0]
    return logits, _cache_axes(cache), key_valid


def _extend(graphdef, params, cache, key_valid, input_ids, n_real, start, image_embeds):
    """Append one row's tokens `(1, n)` (the first `n_real` real) at cache slot `start`; logits of the last real one.

    Slots from `start + n_real` on become invalid, so a conversation can branch from any earlier point.
    """
    model, llm_args = _merge(graphdef, params)
    n = input_ids.shape[1]
    embeds = model.embed_inputs(input_ids, image_embeds)
    slots = jnp.arange(key_valid.shape[1])
    key_valid = key_valid & (slots < start)[None] | ((slots >= start) & (slots < start + n_real))[None]
    query_slots = start + jnp.arange(n)
    attend = (slots[None, None, :] <= query_slots[None, :, None]) & key_valid[:, None, :]
    hidden, cache = model.language_model(embeds, query_slots[None], attend, cache=cache, cache_index=start, **llm_args)
    last = jax.lax.dynamic_slice_in_dim(hidden, n_real - 1, 1, axis=1)
    return model.language_model.logits(last)[:, 0], _cache_axes(cache), key_valid


def _decode(graphdef, params, cache, tokens, positions, slot, key_valid):
    """One token per row at cache `slot` → logits `(B, V)` and the updated cache and key mask."""
    model, llm_args = _merge(graphdef, params)
    key_valid = key_valid.at[:, slot].set(True)
    embeds = model.language_model.embed(tokens[:, None])
    hidden, cache = model.language_model(
        embeds, positions[:, None], key_valid[:, None, :], cache=cache, cache_index=slot, **llm_args
    )
    return model.language_model.logits(hidden)[:, 0], _cache_axes(cache), key_valid
