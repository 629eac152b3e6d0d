"""HF key ↔ Flax leaf, expanded for one config: what each checkpoint tensor becomes, and back.

`KeyTarget` is one HF tensor: the Flax leaf it fills (`path`, and `layer` for stacked leaves), the
transform between the two layouts and the HF shape the config implies. The targets for the released
mPLUG-Owl layout come from the name table in `owl_jax.modeling.hf_names`; the CLIP and LLaMA tower
layouts live in `owl_jax.checkpoint.towers`.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import numpy as np

from owl_jax.config import OwlConfig
from owl_jax.modeling.hf_names import COPY, LINEAR, PATCH, ROTARY_INV_FREQ, owl_param_names

RESHAPE, QKV_PART = "reshape", "qkv_part"

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class KeyTarget:
    """One HF tensor and the Flax leaf (slice) it maps to.

    transform: `copy`, `linear` (2-D transpose), `patch` (conv kernel ↔ patch matrix), `reshape` (same data,
    Flax shape; import only) or `qkv_part` (one of separate q/k/v written into a head-interleaved fused
    leaf; import only, `part` = 0/1/2 and `num_heads`).
    """

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
        if self.transform in (LINEAR, PATCH):
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
        if self.transform == PATCH:
            return hf.reshape(hf.shape[0], -1).T
        if self.transform == RESHAPE:
            return hf.reshape(piece_shape)
        if self.transform == QKV_PART:
            # q/k/v weight (D_out, D_in) → (D_in, H, Dh); bias (D_out,) → (H, Dh)
            out = hf.T if hf.ndim == 2 else hf
            return out.reshape(piece_shape)
        raise ValueError(f"unknown transform {self.transform!r}")

    def to_hf(self, piece: np.ndarray) -> np.ndarray:
        """Inverse of `to_flax` for the exportable transforms (copy, linear, patch)."""
        if self.transform == COPY:
            return piece
        if self.transform in (LINEAR, PATCH):
            out = np.empty(piece.shape[::-1], piece.dtype)
            transpose_into(out, piece)
            return out.reshape(self.hf_shape)
        raise ValueError(f"{self.hf_key}: transform {self.transform!r} cannot be exported")


_TILE = 256
_SAME_SIZE_INTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_PARALLEL_BYTES = 16 * 2 ** 20
_POOL: ThreadPoolExecutor | None = None


def _transpose_tiles(src: np.ndarray, dst: np.ndarray) -> None:
    rows, cols = src.shape
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            dst[j:j + _TILE, i:i + _TILE] = src[i:i + _TILE, j:j + _TILE].T


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
    for future in [_POOL.submit(_transpose_tiles, s[i:i + step], d[:, i:i + step]) for i in range(0, s.shape[0], step)]:
        future.result()


def hf_shape_of(transform: str, piece_shape: tuple[int, ...], cfg: OwlConfig) -> tuple[int, ...]:
    if transform == COPY:
        return tuple(piece_shape)
    if transform == LINEAR:
        return tuple(reversed(piece_shape))
    if transform == PATCH:
        v = cfg.vision
        return (piece_shape[1], v.num_channels, v.patch_size, v.patch_size)
    raise ValueError(transform)


def tower_layers(cfg: OwlConfig, path: Path) -> int:
    return {"vision_model": cfg.vision.num_layers, "abstractor": cfg.abstractor.num_layers,
            "language_model": cfg.text.num_layers}[path[0]]


def leaf_shapes(state: Any) -> dict[Path, tuple[tuple[int, ...], Any]]:
    """`{path: (shape, dtype)}` of every Variable in an (abstract) `nnx.State`."""
    from flax import nnx

    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        out[tuple(str(p) for p in path)] = (tuple(value.shape), value.dtype)
    return out


def lora_module_paths(shapes: Iterable[Path]) -> tuple[str, ...]:
    return tuple(sorted("/".join(p[:-1]) for p in shapes if p[-1] == "lora_a"))


def owl_targets(cfg: OwlConfig, shapes: dict[Path, tuple[tuple[int, ...], Any]], *,
                include_base: bool = True, include_lora: bool = True) -> list[KeyTarget]:
    """Every HF key of the released layout for this config, in checkpoint order (layer by layer)."""
    names = owl_param_names(tie_word_embeddings=cfg.text.tie_word_embeddings,
                            lora_paths=lora_module_paths(shapes) if include_lora else ())
    targets = []
    for name in names:
        is_lora = name.path[-1] in ("lora_a", "lora_b")
        if (is_lora and not include_lora) or (not is_lora and not include_base):
            continue
        if name.path not in shapes:
            raise KeyError(f"name table entry {'/'.join(name.path)} is not a parameter of this model")
        shape = shapes[name.path][0]
        if name.stacked:
            for i in range(tower_layers(cfg, name.path)):
                targets.append(KeyTarget(name.hf_key.format(i=i), name.path, i, name.transform,
                                         hf_shape_of(name.transform, shape[1:], cfg)))
        else:
            targets.append(KeyTarget(name.hf_key, name.path, None, name.transform,
                                     hf_shape_of(name.transform, shape, cfg)))
    order = {"vision_model": 0, "abstractor": 1, "language_model": 2}
    return sorted(targets, key=lambda t: (order[t.path[0]], t.layer if t.layer is not None else -1))


def is_rotary_buffer(key: str) -> bool:
    prefix, suffix = ROTARY_INV_FREQ.split("{i}")
    return key.startswith(prefix) and key.endswith(suffix)


def rotary_buffers(cfg: OwlConfig) -> Iterator[tuple[str, np.ndarray]]:
    """The `rotary_emb.inv_freq` buffers the released code expects, computed as it computes them."""
    dim, base = cfg.text.head_dim, cfg.text.rope_theta
    try:
        import torch

        inv = (1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))).numpy()
    except ImportError:
        inv = (1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
    for i in range(cfg.text.num_layers):
        yield ROTARY_INV_FREQ.format(i=i), inv.astype(np.float32)
