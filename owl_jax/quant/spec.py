"""What to quantize and how: `QuantSpec`.

Weight-only quantization of linear layers. Every selected kernel `(..., K, N)` (K inputs, N outputs, a
leading `layers` axis for stacked towers) is stored as integers plus float scales:

- `int8`: one int8 per weight and one scale per output channel (`qscale` `(..., 1, N)`): about half the
  bytes of bfloat16;
- `int4`: two weights per byte (packed along K) and one scale per `group_size` consecutive inputs of each
  output channel (`qscale` `(..., K / group, N)`): about a quarter of bfloat16.

Scales are symmetric absmax scales (qwix's `absmax` calibration: the largest magnitude of a channel or
group maps to the end of the integer range). By default only the language model's linear layers are
quantized; its embeddings, norms and output head stay float (`lm_head` opts the head in), the abstractor
always stays float, and `include_vision` quantizes the ViT's linear layers too.

The spec travels in `OwlConfig.quant` (it changes the model's parameters, as `lora` does) and in a converted
folder's `owl_jax.json` under `"quantization"`. This module imports nothing heavy, so `owl_jax.config` and
the checkpoint code can use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

MODES = ("int8", "int4")
SCALE_DTYPES = ("float32", "bfloat16", "float16")
# The leaves of a quantized linear layer (`owl_jax.quant.linear.QuantLinear`): they never train and are
# never cast to another dtype with the float parameters.
QVALUE, QSCALE = "qvalue", "qscale"
QUANT_LEAVES = (QVALUE, QSCALE)
# Towers whose linear layers may be quantized (the abstractor never is).
TEXT_TOWER, VISION_TOWER = "language_model", "vision_model"


class QuantSpecError(ValueError):
    """A quantization spec that cannot be used; the message names the field."""


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Which linear layers are quantized, and to what.

    Attributes:
      mode: "int8" (per-channel scales) or "int4" (per-group scales, two weights per byte).
      group_size: int4 only: inputs per scale. A layer whose input width K it does not divide uses the
        largest divisor of K below it (e.g. 96 for K = 96 with the default 128).
      include_vision: also quantize the ViT's linear layers.
      lm_head: also quantize the language model's output head (kept float by default: it is small beside
        the layers and the logits are sensitive to it).
      scale_dtype: dtype of the stored scales.
    """

    mode: str = "int8"
    group_size: int = 128
    include_vision: bool = False
    lm_head: bool = False
    scale_dtype: str = "float32"

    def validate(self) -> QuantSpec:
        if self.mode not in MODES:
            raise QuantSpecError(f"quantization mode {self.mode!r} is not one of {MODES}")
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise QuantSpecError(f"quantization group_size must be an even integer >= 2, got {self.group_size!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise QuantSpecError(f"quantization scale_dtype {self.scale_dtype!r} is not one of {SCALE_DTYPES}")
        return self

    @property
    def bits(self) -> int:
        return 8 if self.mode == "int8" else 4

    def selects(self, module_path: tuple[str, ...]) -> bool:
        """Whether the linear layer at `module_path` (e.g. `("language_model", "layers", "q_proj")`) is quantized."""
        tower = module_path[0] if module_path else ""
        if tower == TEXT_TOWER:
            return self.lm_head or module_path[-1] != "lm_head"
        return tower == VISION_TOWER and self.include_vision

    def group_for(self, fan_in: int) -> int:
        """Inputs per scale for a kernel with `fan_in` inputs: `fan_in` for int8 (one scale per channel),
        the largest even divisor of `fan_in` up to `group_size` for int4."""
        if self.mode == "int8":
            return fan_in
        if fan_in % 2:
            raise QuantSpecError(f"int4 packs two inputs per byte; a kernel with {fan_in} inputs cannot be packed")
        return max(g for g in range(2, min(self.group_size, fan_in) + 1, 2) if fan_in % g == 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "quantization") -> QuantSpec:
        if not isinstance(d, dict):
            raise QuantSpecError(f"{where} must be an object, got {d!r:.60}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise QuantSpecError(f"{where} has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**d).validate()


def parse_quantize(value: Any) -> QuantSpec | None:
    """A `QuantSpec` from what a user passes: None or "" (no quantization), "int8", "int4", a dict of
    `QuantSpec` fields, or a `QuantSpec`."""
    if value is None or value == "" or value == "none":
        return None
    if isinstance(value, QuantSpec):
        return value.validate()
    if isinstance(value, str):
        if value not in MODES:
            raise QuantSpecError(f"quantize={value!r} is not one of {MODES}")
        return QuantSpec(mode=value).validate()
    if isinstance(value, dict):
        return QuantSpec.from_dict(value)
    raise QuantSpecError(f"quantize must be None, one of {MODES}, a dict or a QuantSpec, got {type(value).__name__}")


def add_quantize_argument(parser) -> None:
    """`--quantize int8|int4` on an argparse parser: the value for `from_pretrained(quantize=...)`."""
    parser.add_argument(
        "--quantize",
        choices=list(MODES),
        default=None,
        help="hold the language model's linear weights as int8 or int4 (docs/quantization.md)",
    )
