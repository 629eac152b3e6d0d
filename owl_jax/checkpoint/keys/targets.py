"""Key tables and what they expand to: one HF tensor ↔ one Flax leaf (or a slice of one), and back.

A table is a list of `KeyRule`s: a Flax leaf path, an HF key (a `{i}` in it marks a stacked layer: the
Flax leaf has a leading `layers` axis and HF key `i` is its slice `i`) and the transform between the two
layouts:
- `copy`: the same array;
- `linear`: PyTorch Linear `(out, in)` ↔ Flax kernel `(in, out)`; LoRA `A (r, in)`, `B (out, r)` likewise;
- `patch`: Conv2d `(D, C, p, p)` ↔ `(C·p·p, D)` (see `modeling.vision.patchify`);
- `pointwise`: a 1×1×1 Conv3d `(out, in, 1, 1, 1)` ↔ a Flax kernel `(in, out)` (a per-token linear layer);
- `time_conv`: a depthwise Conv3d over time `(C, 1, K, 1, 1)` ↔ taps `(K, C)` (`modeling.temporal`);
- `reshape`: the same data without the Flax leaf's leading unit axes (import only);
- `qkv_part`: one of separate q/k/v tensors written into a head-interleaved fused leaf (import only).

The released model's tables are built from the module names its towers declare (`HF_MODULES` in
`owl_jax.modeling.vision`, `abstractor` and `llama`): `module_rules` adds to each module name the
`.weight`/`.bias` suffixes and transforms of its kind (`LINEAR_BIAS`, `NORM`, ...). `expand` turns a
table into `KeyTarget`s for one config: one per HF tensor, with the HF shape the config implies.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from owl_jax.checkpoint.leaves import Path, Shapes

COPY, LINEAR, PATCH, RESHAPE, QKV_PART = "copy", "linear", "patch", "reshape", "qkv_part"
POINTWISE, TIME_CONV = "pointwise", "time_conv"
# Transforms between an HF tensor, read as a matrix of its first axis by the rest, and a transposed Flax leaf.
_MATRIX = (LINEAR, PATCH, POINTWISE, TIME_CONV)

# Module kinds: each leaf of the module (by its Flax name; "" when the module path is itself the leaf)
# → (suffix of the HF key after the module name, transform).
LINEAR_BIAS = {"kernel": (".weight", LINEAR), "bias": (".bias", COPY)}
LINEAR_NO_BIAS = {"kernel": (".weight", LINEAR)}
NORM_BIAS = {"scale": (".weight", COPY), "bias": (".bias", COPY)}  # LayerNorm: Flax `scale` ↔ HF `weight`
NORM = {"scale": (".weight", COPY)}  # RMSNorm
TENSOR = {"": ("", COPY)}  # a bare nn.Parameter
EMBEDDING = {"": (".weight", COPY)}
PATCH_CONV = {"": (".weight", PATCH)}
POINTWISE_CONV_BIAS = {"kernel": (".weight", POINTWISE), "bias": (".bias", COPY)}  # a `Linear` in Flax
TIME_CONV_BIAS = {"taps": (".weight", TIME_CONV), "bias": (".bias", COPY)}
# peft's adapter keys of a linear layer (without peft's `base_model.model.` prefix); on a Conv3d, peft's
# A and B are Conv3d weights too: `(r, in, 1, 1, 1)` and `(out, r, 1, 1, 1)`.
LORA = {"lora_a": (".lora_A.weight", LINEAR), "lora_b": (".lora_B.weight", LINEAR)}
LORA_POINTWISE = {"lora_a": (".lora_A.weight", POINTWISE), "lora_b": (".lora_B.weight", POINTWISE)}
LINEAR_KINDS = (LINEAR_BIAS, LINEAR_NO_BIAS, POINTWISE_CONV_BIAS)


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One row of a key table: a Flax leaf and its HF key (a template with `{i}` when `stacked`)."""

    path: Path
    hf_key: str
    transform: str
    part: int = 0  # for `qkv_part`: 0, 1, 2 = q, k, v

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_key


def module_rules(
    tower: str,
    hf_modules: Mapping[str, str],
    kinds: Mapping[str, Mapping[str, tuple[str, str]]],
    *,
    lora_modules: Sequence[str] = (),
) -> list[KeyRule]:
    """The table of one tower from its module names and their kinds.

    Args:
      tower: the tower's attribute in `Owl` ("vision_model", ...), prefixed to every path.
      hf_modules: Flax module path inside the tower → HF module name (`{i}` for the layer index).
      kinds: the same module paths → their kind (`LINEAR_BIAS`, `NORM`, ...).
      lora_modules: full Flax module paths ("language_model/layers/q_proj") whose adapters to include.

    Returns:
      The rules in `hf_modules` order, each module's leaves in kind order (its adapters last).
    """
    if set(kinds) != set(hf_modules):
        raise KeyError(
            f"{tower}: modules without a kind {sorted(set(hf_modules) - set(kinds))}, kinds without a "
            f"module name {sorted(set(kinds) - set(hf_modules))}"
        )
    rules = []
    for module, hf in hf_modules.items():
        base = (tower,) + tuple(module.split("/"))
        leaves = dict(kinds[module])
        if "/".join(base) in lora_modules:
            if kinds[module] not in LINEAR_KINDS:
                raise KeyError(f"{'/'.join(base)} is not a linear layer; it cannot carry LoRA adapters")
            leaves.update(LORA_POINTWISE if kinds[module] is POINTWISE_CONV_BIAS else LORA)
        for leaf, (suffix, transform) in leaves.items():
            rules.append(KeyRule(base + ((leaf,) if leaf else ()), hf + suffix, transform))
    return rules


def linear_modules(
    tower: str, hf_modules: Mapping[str, str], kinds: Mapping[str, Mapping[str, tuple[str, str]]]
) -> dict[str, str]:
    """Full Flax module path → HF module name of every linear layer of one tower."""
    return {f"{tower}/{m}": hf_modules[m] for m in hf_modules if kinds[m] in LINEAR_KINDS}


@dataclasses.dataclass(frozen=True)
class KeyTarget:
    """One HF tensor and the Flax leaf (slice `layer` of a stacked leaf) it maps to, by `transform` (see the
    module docstring); `qkv_part` also needs `part` (0/1/2 = q/k/v) and the fused leaf's `num_heads`."""

    hf_key: str
    path: Path
    layer: int | None
    transform: str
    hf_shape: tuple[int, ...]
    part: int = 0
    num_heads: int = 0

    def view(self, leaf: np.ndarray) -> np.ndarray:
        """The part of `leaf` this key fills (a writable view)."""
        piece = leaf if self.layer is None else leaf[self.layer]
        if self.transform == QKV_PART:
            d3 = piece.shape[-1]
            heads = piece.reshape(*piece.shape[:-1], self.num_heads, 3, d3 // (3 * self.num_heads))
            # reshape copies a non-contiguous array, and writes into a copy would be lost
            assert np.shares_memory(heads, leaf), "fused q/k/v leaf must be contiguous"
            return heads[..., self.part, :]
        return piece

    def write(self, leaf: np.ndarray, hf: np.ndarray) -> None:
        """Convert the HF array to the Flax layout and store it in its part of `leaf` (casting dtype)."""
        view = self.view(leaf)
        if self.transform in _MATRIX:
            matrix = hf if self.transform == LINEAR else hf.reshape(hf.shape[0], -1)
            transpose_into(view, matrix.astype(view.dtype, copy=False))
        else:
            view[...] = self.to_flax(hf, view.shape).astype(view.dtype, copy=False)

    def to_flax(self, hf: np.ndarray, piece_shape: tuple[int, ...]) -> np.ndarray:
        """The HF array in the Flax layout of `view(leaf)`."""
        if self.transform == COPY:
            return hf
        if self.transform == LINEAR:
            return hf.T
        if self.transform in _MATRIX:
            return hf.reshape(hf.shape[0], -1).T
        if self.transform == RESHAPE:
            return hf.reshape(piece_shape)
        if self.transform == QKV_PART:
            # q/k/v weight (D_out, D_in) → (D_in, H, Dh); bias (D_out,) → (H, Dh)
            out = hf.T if hf.ndim == 2 else hf
            return out.reshape(piece_shape)
        raise ValueError(f"unknown transform {self.transform!r}")

    def to_hf(self, piece: np.ndarray) -> np.ndarray:
        """Inverse of `to_flax` for the exportable transforms (copy, linear, patch, pointwise, time_conv)."""
        if self.transform == COPY:
            return piece
        if self.transform in _MATRIX:
            out = np.empty(piece.shape[::-1], piece.dtype)
            transpose_into(out, piece)
            return out.reshape(self.hf_shape)
        raise ValueError(f"{self.hf_key}: transform {self.transform!r} cannot be exported")


_TILE = 256
_SAME_SIZE_INTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_PARALLEL_BYTES = 16 * 2**20
_POOL: ThreadPoolExecutor | None = None


def _transpose_tiles(src: np.ndarray, dst: np.ndarray) -> None:
    rows, cols = src.shape
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            dst[j : j + _TILE, i : i + _TILE] = src[i : i + _TILE, j : j + _TILE].T


def transpose_into(dst: np.ndarray, src: np.ndarray) -> None:
    """`dst[...] = src.T` for 2-D arrays, tile by tile, large matrices on all cores.

    A plain strided transpose of a large matrix runs at a few hundred MB/s (every read misses the cache);
    copying 256×256 tiles as same-size integers (so that bfloat16 takes numpy's fast path, which also
    releases the GIL) on a few threads is 3-6× faster.
    """
    global _POOL
    if src.shape[::-1] != dst.shape or src.ndim != 2:
        raise ValueError(f"cannot transpose {src.shape} into {dst.shape}")
    if src.dtype != dst.dtype:
        src = src.astype(dst.dtype)
    as_int = _SAME_SIZE_INTS[src.dtype.itemsize]
    s, d = src.view(as_int), dst.view(as_int)
    workers = min(os.cpu_count() or 1, 8)
    if s.nbytes < _PARALLEL_BYTES or workers == 1:
        _transpose_tiles(s, d)
        return
    if _POOL is None:
        _POOL = ThreadPoolExecutor(workers, thread_name_prefix="owl-transpose")
    step = -(-s.shape[0] // workers // _TILE) * _TILE
    for future in [
        _POOL.submit(_transpose_tiles, s[i : i + step], d[:, i : i + step]) for i in range(0, s.shape[0], step)
    ]:
        future.result()


def hf_shape_of(transform: str, piece: tuple[int, ...], *, patch: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    """The HF shape of a tensor whose Flax piece (one layer's slice of a stacked leaf) has shape `piece`.

    `patch` is `(channels, patch size)` of the ViT, for the `patch` transform.
    """
    if transform == COPY:
        return tuple(piece)
    if transform == LINEAR:
        return tuple(reversed(piece))
    if transform == PATCH:
        channels, size = patch
        return (piece[1], channels, size, size)
    if transform == POINTWISE:  # (in, out) → (out, in, 1, 1, 1)
        return (piece[1], piece[0], 1, 1, 1)
    if transform == TIME_CONV:  # taps (K, C) → (C, 1, K, 1, 1)
        return (piece[1], 1, piece[0], 1, 1)
    if transform == RESHAPE:  # stored without the Flax leaf's leading broadcast axes: (1, 1, D) → (D,)
        while len(piece) > 1 and piece[0] == 1:
            piece = piece[1:]
        return tuple(piece)
    if transform == QKV_PART:  # fused kernel (D_in, 3·D) / bias (3·D,) → one of q, k, v: (D, D_in) / (D,)
        return (piece[-1] // 3,) + tuple(piece[:-1])
    raise ValueError(f"unknown transform {transform!r}")


def expand(
    rules: Sequence[KeyRule],
    shapes: Shapes,
    num_layers: int | Callable[[Path], int],
    *,
    patch: tuple[int, int] = (0, 0),
    num_heads: int = 0,
) -> list[KeyTarget]:
    """One `KeyTarget` per HF tensor of `rules` for a model with leaves `shapes`.

    Args:
      shapes: `{path: (shape, dtype)}` of the model's leaves (`leaves.leaf_shapes`).
      num_layers: layers of each stacked rule (a number, or a function of the rule's path).
      patch: `(channels, patch size)` of the ViT (for `patch` rules).
      num_heads: heads of the fused q/k/v leaf (for `qkv_part` rules).

    Raises:
      KeyError: a rule names a leaf that is not a parameter of the model (the table fell behind it).
    """
    targets = []
    for rule in rules:
        if rule.path not in shapes:
            raise KeyError(f"key table entry {'/'.join(rule.path)} ({rule.hf_key}) is not a parameter of this model")
        shape = shapes[rule.path][0]
        piece = tuple(shape[1:]) if rule.stacked else tuple(shape)
        hf_shape = hf_shape_of(rule.transform, piece, patch=patch)
        heads = num_heads if rule.transform == QKV_PART else 0
        if rule.stacked:
            n = num_layers(rule.path) if callable(num_layers) else num_layers
            targets.extend(
                KeyTarget(rule.hf_key.format(i=i), rule.path, i, rule.transform, hf_shape, rule.part, heads)
                for i in range(n)
            )
        else:
            targets.append(KeyTarget(rule.hf_key, rule.path, None, rule.transform, hf_shape, rule.part, heads))
    return targets
