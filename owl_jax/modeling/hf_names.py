"""The one table of names: every Flax parameter of `Owl` ↔ its key in the released PyTorch checkpoint.

Used in both directions by the converter (`owl_jax.checkpoint`), and by the modules themselves to name
their linear layers for LoRA targeting (peft matches adapters against these HF module names).

Paths are `/`-joined attribute paths inside `Owl`; a `{i}` in an HF key marks a stacked layer (the Flax
leaf has a leading `layers` axis and HF key `i` is its slice `i`). Transforms:
- `copy`: same array;
- `linear`: PyTorch Linear `(out, in)` ↔ Flax kernel `(in, out)`; LoRA `A (r, in)`, `B (out, r)` likewise;
- `patch`: Conv2d `(D, C, p, p)` ↔ `(C·p·p, D)` (see `vision.patchify`).
"""

from __future__ import annotations

import dataclasses

COPY, LINEAR, PATCH = "copy", "linear", "patch"

VISION_LAYER = "vision_model.encoder.layers.{i}."
ABSTRACTOR_LAYER = "abstractor.encoder.layers.{i}.crossattention."
LLAMA_LAYER = "language_model.model.layers.{i}."

# (Flax module path, HF module name, has bias) for every linear layer.
_LINEARS: tuple[tuple[str, str, bool], ...] = (
    ("vision_model/layers/query_key_value", VISION_LAYER + "self_attn.query_key_value", True),
    ("vision_model/layers/dense", VISION_LAYER + "self_attn.dense", True),
    ("vision_model/layers/fc1", VISION_LAYER + "mlp.fc1", True),
    ("vision_model/layers/fc2", VISION_LAYER + "mlp.fc2", True),
    ("abstractor/layers/query", ABSTRACTOR_LAYER + "attention.query", True),
    ("abstractor/layers/key", ABSTRACTOR_LAYER + "attention.key", True),
    ("abstractor/layers/value", ABSTRACTOR_LAYER + "attention.value", True),
    ("abstractor/layers/out_proj", ABSTRACTOR_LAYER + "output.out_proj", True),
    ("abstractor/layers/w1", ABSTRACTOR_LAYER + "output.mlp.w1", True),
    ("abstractor/layers/w2", ABSTRACTOR_LAYER + "output.mlp.w2", True),
    ("abstractor/layers/w3", ABSTRACTOR_LAYER + "output.mlp.w3", True),
    ("abstractor/visual_fc", "abstractor.visual_fc", True),
    ("language_model/layers/q_proj", LLAMA_LAYER + "self_attn.q_proj", False),
    ("language_model/layers/k_proj", LLAMA_LAYER + "self_attn.k_proj", False),
    ("language_model/layers/v_proj", LLAMA_LAYER + "self_attn.v_proj", False),
    ("language_model/layers/o_proj", LLAMA_LAYER + "self_attn.o_proj", False),
    ("language_model/layers/gate_proj", LLAMA_LAYER + "mlp.gate_proj", False),
    ("language_model/layers/up_proj", LLAMA_LAYER + "mlp.up_proj", False),
    ("language_model/layers/down_proj", LLAMA_LAYER + "mlp.down_proj", False),
    ("language_model/lm_head", "language_model.lm_head", False),
)

# (Flax module path, HF module name, has bias) for every norm: Flax `scale` ↔ HF `weight`.
_NORMS: tuple[tuple[str, str, bool], ...] = (
    ("vision_model/pre_layernorm", "vision_model.embeddings.pre_layernorm", True),
    ("vision_model/layers/input_layernorm", VISION_LAYER + "input_layernorm", True),
    ("vision_model/layers/post_attention_layernorm", VISION_LAYER + "post_attention_layernorm", True),
    ("vision_model/post_layernorm", "vision_model.post_layernorm", True),
    ("abstractor/layers/norm1", ABSTRACTOR_LAYER + "norm1", True),
    ("abstractor/layers/normk", ABSTRACTOR_LAYER + "normk", True),
    ("abstractor/layers/norm2", ABSTRACTOR_LAYER + "output.norm2", True),
    ("abstractor/layers/ffn_ln", ABSTRACTOR_LAYER + "output.mlp.ffn_ln", True),
    ("language_model/layers/input_layernorm", LLAMA_LAYER + "input_layernorm", False),
    ("language_model/layers/post_attention_layernorm", LLAMA_LAYER + "post_attention_layernorm", False),
    ("language_model/norm", "language_model.model.norm", False),
)

# Parameters that are neither: (Flax path, HF key, transform).
_OTHERS: tuple[tuple[str, str, str], ...] = (
    ("vision_model/patch_embed", "vision_model.embeddings.patch_embed.weight", PATCH),
    ("vision_model/cls_token", "vision_model.embeddings.cls_token", COPY),
    ("vision_model/position_embedding", "vision_model.embeddings.position_embedding", COPY),
    ("abstractor/query_tokens", "query_tokens", COPY),
    ("abstractor/vit_eos", "abstractor.vit_eos", COPY),
    ("language_model/embed_tokens", "language_model.model.embed_tokens.weight", COPY),
)

# Buffers of the released checkpoint that carry no information: skipped on import, regenerated on export.
ROTARY_INV_FREQ = LLAMA_LAYER + "self_attn.rotary_emb.inv_freq"


@dataclasses.dataclass(frozen=True)
class ParamName:
    """One Flax leaf and its HF key (template with `{i}` when `stacked`)."""

    path: tuple[str, ...]
    hf_key: str
    transform: str

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_key


def hf_module(path: str) -> str:
    """The HF module name (with `{i}`) of the linear layer at Flax module `path`."""
    for p, hf, _ in _LINEARS:
        if p == path:
            return hf
    raise KeyError(f"no linear layer at {path!r} in the name table")


def owl_param_names(*, tie_word_embeddings: bool = False, lora_paths: tuple[str, ...] = ()) -> list[ParamName]:
    """Every parameter of `Owl` with its HF key.

    Args:
      tie_word_embeddings: the LLM reuses `embed_tokens` as its output layer (no `lm_head`).
      lora_paths: Flax module paths of linear layers that carry adapters; their `lora_a`/`lora_b` map to
        peft's `<module>.lora_A.weight` / `<module>.lora_B.weight` (without the `base_model.model.` prefix).
    """
    names: list[ParamName] = []
    for path, hf, bias in _LINEARS:
        if tie_word_embeddings and path == "language_model/lm_head":
            continue
        parts = tuple(path.split("/"))
        names.append(ParamName(parts + ("kernel",), hf + ".weight", LINEAR))
        if bias:
            names.append(ParamName(parts + ("bias",), hf + ".bias", COPY))
        if path in lora_paths:
            names.append(ParamName(parts + ("lora_a",), hf + ".lora_A.weight", LINEAR))
            names.append(ParamName(parts + ("lora_b",), hf + ".lora_B.weight", LINEAR))
    for path, hf, bias in _NORMS:
        parts = tuple(path.split("/"))
        names.append(ParamName(parts + ("scale",), hf + ".weight", COPY))
        if bias:
            names.append(ParamName(parts + ("bias",), hf + ".bias", COPY))
    for path, hf, transform in _OTHERS:
        names.append(ParamName(tuple(path.split("/")), hf, transform))
    return names


def linear_paths() -> tuple[str, ...]:
    """Flax module paths of all linear layers (the candidates for adapters)."""
    return tuple(p for p, _, _ in _LINEARS)
