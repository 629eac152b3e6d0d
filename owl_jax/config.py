"""Typed model configuration: the three towers, LoRA, and how to run them (`Numerics`).

`OwlConfig.from_hf_config` and `OwlConfig.to_hf_config` read and write the released `MplugOwlConfig`
layout (`owl_jax.hf_config`).

Architecture fields describe the weights; `dtype`, `param_dtype`, `scan_layers`, `remat_policy` and
`numerics` describe how we run them and never change the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from owl_jax.quant.spec import QuantSpec

_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "silu")
DTYPES = ("float32", "bfloat16", "float16")  # compute and parameter dtypes
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
ATTENTION_IMPLS = ("auto", "xla", "jax", "cudnn", "splash")  # see owl_jax.ops.attention
MATMUL_ROUTES = ("auto", "xla", "cpu")  # see owl_jax.ops.matmul
SWITCHES = ("auto", "on", "off")


class ConfigError(ValueError):
    """A config that cannot describe a valid mPLUG-Owl model or training run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """f_V: the CLIP ViT-L/14 layout used by mPLUG-Owl (`vision_model.*`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "quick_gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens per image leaving the ViT: the patches plus the class token."""
        return self.num_patches + 1


@dataclasses.dataclass(frozen=True)
class AbstractorConfig:
    """f_K: the visual abstractor (`query_tokens`, `abstractor.*`)."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_layers: int = 6
    num_heads: int = 16
    encoder_hidden_size: int = 1024
    # Used by `ffn_ln` only: norm1, normk and norm2 use torch's default 1e-5 in the released code.
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# The language models f_L can be, and the activation each uses in its MLP.
TEXT_ACTIVATIONS = {"llama": "silu", "bloom": "bloom_gelu"}
TEXT_MODEL_TYPES = tuple(TEXT_ACTIVATIONS)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """f_L: LLaMA or BLOOM (`language_model.*`, HF names), chosen by `model_type`.

    LLaMA reads `num_kv_heads`, `rms_norm_eps`, `rope_theta`; BLOOM (ALiBi, LayerNorms, fused head-interleaved
    QKV, MLP width 4 × hidden) reads `layer_norm_eps` and needs `num_kv_heads == num_heads`,
    `intermediate_size == 4 * hidden_size` and `hidden_act == "bloom_gelu"` (tanh GELU with BLOOM's constants).
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-5  # BLOOM's LayerNorms

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def checks(self) -> list[tuple[bool, str]]:
        """`(ok, message)` for the fields `model_type` constrains; `OwlConfig.validate` raises the first failure."""
        if self.model_type not in TEXT_MODEL_TYPES:
            return [(False, f"text model_type {self.model_type!r} is not one of {TEXT_MODEL_TYPES}")]
        act = TEXT_ACTIVATIONS[self.model_type]
        name = {"llama": "LLaMA", "bloom": "BLOOM"}[self.model_type]
        checks = [(self.hidden_act == act, f"text hidden_act {self.hidden_act!r}: {name} uses {act}")]
        if self.model_type == "llama":
            even = self.head_dim % 2 == 0
            return checks + [(even, f"text head_dim {self.head_dim} must be even for rotary embeddings")]
        return checks + [
            (
                self.num_kv_heads == self.num_heads,
                f"text num_kv_heads {self.num_kv_heads} != num_heads {self.num_heads}: BLOOM has no grouped heads",
            ),
            (
                self.intermediate_size == 4 * self.hidden_size,
                f"text intermediate_size {self.intermediate_size} != 4 * hidden_size {self.hidden_size} (BLOOM's MLP)",
            ),
        ]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on linear layers chosen by name (peft semantics).

    `target_modules` is either one regular expression that must match the whole HF module name
    (e.g. `.*language_model.*\\.(q_proj|v_proj)`, the released recipe) or a list of name suffixes
    (`["q_proj", "v_proj"]`).
    """

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = r".*language_model.*\.(q_proj|v_proj)"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, module_name: str) -> bool:
        """Whether the HF module `module_name` carries an adapter (peft's rule)."""
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module_name) is not None
        return any(module_name == t or module_name.endswith("." + t) for t in self.target_modules)

    def to_peft_dict(self) -> dict[str, Any]:
        target = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {
            "peft_type": "LORA",
            "task_type": None,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": target,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoRAConfig:
        if d.get("peft_type", "LORA").upper() != "LORA":
            raise ConfigError(f"adapter config has peft_type={d.get('peft_type')!r}; only LORA adapters are supported")
        if d.get("fan_in_fan_out"):
            raise ConfigError("adapter config sets fan_in_fan_out=True, which LLaMA/mPLUG-Owl adapters never use")
        if d.get("bias", "none") != "none":
            raise ConfigError(f"adapter config has bias={d['bias']!r}; only bias='none' adapters are supported")
        target = d.get("target_modules")
        if target is None:
            raise ConfigError("adapter config has no target_modules")
        target = target if isinstance(target, str) else tuple(target)
        return cls(
            rank=int(d["r"]),
            alpha=float(d["lora_alpha"]),
            dropout=float(d.get("lora_dropout", 0.0)),
            target_modules=target,
        )


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How the arithmetic runs: the routes `owl_jax.ops` takes. Never part of the checkpoint, and every
    route computes the same function (float32 routes to rounding, half-precision ones within bf16 noise).

    "auto" picks by the platform the program is compiled for. The CPU routes exist because XLA's CPU
    compiler handles half precision unlike accelerators do (docs/design.md, "Numerics").

    attention: "xla" (the reference: float32 scores and softmax), "jax" (`jax.nn.dot_product_attention`),
      "cudnn" (GPU), "splash" (TPU; Pallas interpret mode elsewhere), "auto" (cuDNN or splash where they
      apply, else the reference).
    matmul: "xla" (half-precision products accumulate in float32 and are written in the compute dtype;
      their backward pass multiplies in the compute dtype) or "cpu" (float32 results cast afterwards,
      backward operands physically transposed, one-row products run as two rows). "auto": "cpu" on a CPU.
    half_as_bits: "on" moves bf16/fp16 arrays through gathers, and through scans as residuals and
      prepared kernels, as their uint16 bit patterns (XLA's CPU compiler moves them through float32
      copies of the whole array). "auto": on for a CPU.
    hoist_invariants: "off" compiles the model's programs without XLA's while-loop invariant code motion
      (`ops.compiler_options`). XLA's CPU compiler slices a bf16/fp16 stack of layer weights in float32,
      and that pass then hoists the float32 conversion of the whole stack out of the layer loop: a
      second copy of the weights at twice their size. "auto": off for a CPU.
    float32_elementwise: elementwise chains on half-precision inputs (SwiGLU, activations, rotary
      embeddings) compute in float32 and round once, recomputed in the backward pass.
    """

    attention: str = "auto"
    matmul: str = "auto"
    half_as_bits: str = "auto"
    hoist_invariants: str = "auto"
    float32_elementwise: bool = True

    def replace(self, **changes: Any) -> Numerics:
        return dataclasses.replace(self, **changes)

    def validate(self) -> Numerics:
        for name, choices in (
            ("attention", ATTENTION_IMPLS),
            ("matmul", MATMUL_ROUTES),
            ("half_as_bits", SWITCHES),
            ("hoist_invariants", SWITCHES),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(f"numerics.{name} {getattr(self, name)!r} is not one of {choices}")
        return self


@dataclasses.dataclass(frozen=True)
class OwlConfig:
    """The whole model: f_V → f_K → f_L, plus how to run it."""

    vision: VisionConfig = VisionConfig()
    abstractor: AbstractorConfig = AbstractorConfig()
    text: TextConfig = TextConfig()
    num_query_tokens: int = 64
    # The video layout (`mplug-owl-llama-7b-video`): a temporal module in every ViT layer, and temporal
    # queries with their own output projection in the abstractor. Images run the same way in both layouts.
    video: bool = False
    lora: LoRAConfig | None = None
    # Weight-only quantization of linear layers (`owl_jax.quant.QuantSpec`): like `lora`, it changes the
    # parameters the model holds (integers and scales in place of the selected kernels).
    quant: QuantSpec | None = None
    # How to run (not part of the checkpoint).
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    numerics: Numerics = Numerics()

    @property
    def image_tokens(self) -> int:
        """LLM tokens per image (and per video): the abstractor's queries plus `vit_eos`."""
        return self.num_query_tokens + 1

    def replace(self, **changes: Any) -> OwlConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> OwlConfig:
        """Raise `ConfigError` naming the first inconsistent field."""
        v, a, t = self.vision, self.abstractor, self.text
        checks = [
            (
                v.hidden_size % v.num_heads == 0,
                f"vision hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}",
            ),
            (
                v.image_size % v.patch_size == 0,
                f"vision image_size {v.image_size} is not divisible by patch_size {v.patch_size}",
            ),
            (
                a.hidden_size % a.num_heads == 0,
                f"abstractor hidden_size {a.hidden_size} is not divisible by num_heads {a.num_heads}",
            ),
            (
                a.encoder_hidden_size == v.hidden_size,
                f"abstractor encoder_hidden_size {a.encoder_hidden_size} != vision hidden_size {v.hidden_size}",
            ),
            (
                a.hidden_size == v.hidden_size,
                f"abstractor hidden_size {a.hidden_size} != vision hidden_size {v.hidden_size} "
                "(the abstractor's keys/values concatenate queries and image tokens)",
            ),
            (
                t.hidden_size % t.num_heads == 0,
                f"text hidden_size {t.hidden_size} is not divisible by num_heads {t.num_heads}",
            ),
            *t.checks(),
            (
                t.num_heads % t.num_kv_heads == 0,
                f"text num_heads {t.num_heads} is not a multiple of num_kv_heads {t.num_kv_heads}",
            ),
            (v.hidden_act in _ACTIVATIONS, f"vision hidden_act {v.hidden_act!r} is not one of {_ACTIVATIONS}"),
            (self.num_query_tokens > 0, f"num_query_tokens must be positive, got {self.num_query_tokens}"),
            (
                not self.video or v.hidden_size % 2 == 0,
                f"vision hidden_size {v.hidden_size} must be even in the video layout (temporal width D/2)",
            ),
            (self.dtype in DTYPES, f"dtype {self.dtype!r} is not one of {DTYPES}"),
            (self.param_dtype in DTYPES, f"param_dtype {self.param_dtype!r} is not one of {DTYPES}"),
            (self.remat_policy in REMAT_POLICIES, f"remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.numerics.validate()
        if self.quant is not None:
            try:
                self.quant.validate()
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return self

    # The released `MplugOwlConfig` layout (`owl_jax.hf_config`).
    @classmethod
    def from_hf_config(cls, source: str | os.PathLike | dict[str, Any], **runtime: Any) -> OwlConfig:
        """Read a released `config.json` (a path, a folder holding one, or the parsed dict).

        `runtime` sets the run-time fields (`dtype`, `param_dtype`, `scan_layers`, ...).
        """
        from owl_jax import hf_config

        return hf_config.owl_config_from_hf(source, **runtime)

    def to_hf_config(self) -> dict[str, Any]:
        """The `MplugOwlConfig` dict the released code reads (`config.json`)."""
        from owl_jax import hf_config

        return hf_config.owl_config_to_hf(self)
