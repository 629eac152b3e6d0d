"""HF `LlamaForCausalLM` checkpoints → our LLaMA: the key table `init` uses to start the language model.

The released checkpoint nests a `LlamaForCausalLM` under `language_model.`, so this table is the released
LLaMA table (`keys.llama`) without that prefix: `model.layers.{i}.self_attn.q_proj.weight`, `lm_head.weight`...
"""

from __future__ import annotations

import dataclasses
import re

from owl_jax.checkpoint.keys import llama
from owl_jax.checkpoint.keys.targets import KeyRule, KeyTarget, expand
from owl_jax.checkpoint.leaves import Shapes
from owl_jax.config import TextConfig

PREFIX = "language_model."
# RoPE frequencies saved by older transformers: recomputed from rope_theta.
IGNORED = re.compile(r"(.*\.)?rotary_emb\.inv_freq")


def rules(*, tie_word_embeddings: bool = False) -> list[KeyRule]:
    """The table; `lm_head` is absent when the embeddings are tied."""
    out = []
    for rule in llama.rules(tie_word_embeddings=tie_word_embeddings):
        if not rule.hf_key.startswith(PREFIX):
            raise KeyError(f"released LLaMA key {rule.hf_key!r} does not start with {PREFIX!r}")
        out.append(dataclasses.replace(rule, hf_key=rule.hf_key[len(PREFIX) :]))
    return out


def targets(text: TextConfig, shapes: Shapes) -> list[KeyTarget]:
    """Every tensor of a `LlamaForCausalLM` checkpoint and the `Owl` leaf it fills (HF shapes: Linear `(out, in)`)."""
    return expand(rules(tie_word_embeddings=text.tie_word_embeddings), shapes, text.num_layers)
