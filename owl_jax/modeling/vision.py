"""f_V: mPLUG-Owl's ViT (CLIP ViT-L/14 layout with a head-interleaved fused QKV).

Differences from HF's CLIP that a port must keep: the pre-LayerNorm sits inside the embeddings, the
patch convolution has no bias, `query_key_value` orders its outputs `[head, (q, k, v), head_dim]`, and
the post-LayerNorm is applied to every token (the abstractor reads all of them).

Videos (the video layout, `temporal=True`): the frames of `(B, C, T, S, S)` are folded into the batch
(row b·T + t) for the embeddings and for every layer's attention, which never crosses frames; before it,
each layer adds its temporal module's output (`owl_jax.modeling.temporal`), which mixes the frames.
Images (T = 1) skip the temporal modules, so both layouts give the same image features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax import ops
from owl_jax.config import LoRAConfig, Numerics, VisionConfig
from owl_jax.modeling._stack import apply_layers
from owl_jax.modeling.activations import activation
from owl_jax.modeling.linear import Linear
from owl_jax.modeling.norms import LayerNorm
from owl_jax.modeling.temporal import HF_MODULES as TEMPORAL_HF_MODULES
from owl_jax.modeling.temporal import Temporal
from owl_jax.sharding import constrain

Array = jax.Array

HF_LAYER = "vision_model.encoder.layers.{i}."
# The released code's module names: peft matches adapters against them, and the converter's key table
# (`owl_jax.checkpoint.keys.vision`) maps every parameter through them.
HF_MODULES = {
    "patch_embed": "vision_model.embeddings.patch_embed",
    "cls_token": "vision_model.embeddings.cls_token",
    "position_embedding": "vision_model.embeddings.position_embedding",
    "pre_layernorm": "vision_model.embeddings.pre_layernorm",
    "layers/input_layernorm": HF_LAYER + "input_layernorm",
    "layers/query_key_value": HF_LAYER + "self_attn.query_key_value",
    "layers/dense": HF_LAYER + "self_attn.dense",
    "layers/post_attention_layernorm": HF_LAYER + "post_attention_layernorm",
    "layers/fc1": HF_LAYER + "mlp.fc1",
    "layers/fc2": HF_LAYER + "mlp.fc2",
    "post_layernorm": "vision_model.post_layernorm",
}
# The video layout's temporal module in every layer (`owl_jax.modeling.temporal`).
VIDEO_HF_MODULES = {f"layers/temporal/{name}": hf for name, hf in TEMPORAL_HF_MODULES.items()}


def patchify(pixel_values: Array, patch_size: int) -> Array:
    """`(N, C, H, W)` → `(N, (H/p)·(W/p), C·p·p)`, patches row-major, each flattened as (C, p, p).

    Multiplying by the conv weight reshaped to `(D, C·p·p)` equals a stride-p convolution.
    """
    n, c, h, w = pixel_values.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = pixel_values.reshape(n, c, h // p, p, w // p, p)
    x = x.transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def sincos_position_embedding(grid: int, dim: int) -> Array:
    """MAE's fixed 2-D sin-cos embedding for a `grid`x`grid` patch grid plus a zero row for the class token:
    `(1 + grid², dim)`, the first half of each row encoding the patch's row, the second half its column."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, not {dim}")
    omega = 1.0 / 10000 ** (jnp.arange(dim // 4, dtype=jnp.float32) / (dim // 4))
    coords = jnp.arange(grid, dtype=jnp.float32)
    rows, cols = jnp.meshgrid(coords, coords, indexing="ij")

    def encode(pos: Array) -> Array:
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)

    patches = jnp.concatenate([encode(rows), encode(cols)], axis=1)
    return jnp.concatenate([jnp.zeros((1, dim), jnp.float32), patches], axis=0)


class VisionLayer(nnx.Module):
    """One pre-LN transformer block; built with `stack=L` it holds all L layers."""

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        stack: int,
        lora: LoRAConfig | None,
        dtype: str,
        param_dtype: str,
        numerics: Numerics,
        rngs: nnx.Rngs,
        temporal: bool = False,
    ):
        d, f = cfg.hidden_size, cfg.intermediate_size
        linear = dict(stack=stack, lora=lora, dtype=dtype, param_dtype=param_dtype, numerics=numerics, rngs=rngs)
        norm = dict(eps=cfg.layer_norm_eps, stack=stack, param_dtype=param_dtype, numerics=numerics)
        self.num_heads = cfg.num_heads
        self.numerics = numerics
        self.act = cfg.hidden_act
        self.input_layernorm = LayerNorm(d, **norm)
        self.query_key_value = Linear(
            d, 3 * d, axes=("vision_embed", "qkv"), hf_name=HF_MODULES["layers/query_key_value"], **linear
        )
        self.dense = Linear(d, d, axes=("vision_heads", "vision_embed"), hf_name=HF_MODULES["layers/dense"], **linear)
        self.post_attention_layernorm = LayerNorm(d, **norm)
        self.fc1 = Linear(d, f, axes=("vision_embed", "vision_mlp"), hf_name=HF_MODULES["layers/fc1"], **linear)
        self.fc2 = Linear(f, d, axes=("vision_mlp", "vision_embed"), hf_name=HF_MODULES["layers/fc2"], **linear)
        self.temporal = Temporal(d, **linear) if temporal else None

    def __call__(self, x: Array, key: Array | None, frames: int = 1) -> Array:
        """`(N, T, D)` → `(N, T, D)`; `key` drives dropout (None: none).

        With `frames = F > 1` the N rows are N/F videos of F consecutive frames, which the temporal module
        mixes first (`x + temporal(x)`).
        """
        if frames > 1:
            if self.temporal is None:
                raise ValueError("this ViT has no temporal modules (the image layout); videos need the video layout")
            tkey, key = (None, None) if key is None else tuple(jax.random.split(key))
            videos = x.reshape(x.shape[0] // frames, frames, *x.shape[1:])
            x = x + self.temporal(videos, tkey).reshape(x.shape)
        keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
        n, t, d = x.shape
        h = self.input_layernorm(x)
        # the fused projection orders its outputs [head, (q, k, v), head_dim]
        qkv = self.query_key_value(h, keys[0]).reshape(n, t, self.num_heads, 3, d // self.num_heads)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # (N, T, H, Dh) each
        ctx = ops.attention(q, k, v, scale=(d // self.num_heads) ** -0.5, numerics=self.numerics)
        x = x + self.dense(ctx.reshape(n, t, d), keys[1])
        h = self.post_attention_layernorm(x)
        h = self.fc2(activation(self.act, self.fc1(h, keys[2]), numerics=self.numerics), keys[3])  # (N, T, F) inside
        return constrain(x + h, ("batch", "length", "act_embed"))


class VisionTower(nnx.Module):
    """`vision_model.*`: pixels `(N, C, H, W)` → features `(N, 1 + H·W/p², D_v)` after the post-LN; with
    `temporal` (the video layout) also videos `(N, C, T, H, W)` → `(N, T, 1 + H·W/p², D_v)`."""

    def __init__(
        self,
        cfg: VisionConfig,
        *,
        lora: LoRAConfig | None = None,
        dtype: str = "float32",
        param_dtype: str = "float32",
        scan_layers: bool = True,
        remat_policy: str = "none",
        numerics: Numerics = Numerics(),
        rngs: nnx.Rngs,
        temporal: bool = False,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.numerics = numerics
        self.scan_layers = scan_layers
        self.remat_policy = remat_policy
        d, pdt = cfg.hidden_size, jnp.dtype(param_dtype)
        patch_dim = cfg.num_channels * cfg.patch_size**2
        # Fresh towers only (imports overwrite these): patch and position embeddings start at comparable,
        # O(1) scales. With the usual 0.02 for positions, the pre-LayerNorm all but erases where a patch is,
        # and a ViT trained from scratch takes hundreds of steps to recover it.
        self.patch_embed = nnx.Param(
            patch_dim**-0.5 * jax.random.normal(rngs.params(), (patch_dim, d), pdt), axes=("patch", "vision_embed")
        )
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, d), pdt), axes=(None, None, "vision_embed"))
        # Positions start as fixed 2-D sin-cos values (MAE), so where a patch sits is readable, and smooth
        # across the grid, from the first step rather than only after training has shaped random codes.
        grid = cfg.image_size // cfg.patch_size
        self.position_embedding = nnx.Param(
            sincos_position_embedding(grid, d)[None].astype(pdt), axes=(None, "positions", "vision_embed")
        )
        self.pre_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype, numerics=numerics)
        self.layers = VisionLayer(
            cfg,
            stack=cfg.num_layers,
            lora=lora,
            dtype=dtype,
            param_dtype=param_dtype,
            numerics=numerics,
            rngs=rngs,
            temporal=temporal,
        )
        self.post_layernorm = LayerNorm(d, eps=cfg.layer_norm_eps, param_dtype=param_dtype, numerics=numerics)

    def __call__(self, pixel_values: Array, dropout_key: Array | None = None) -> Array:
        """Features after the post-LayerNorm: images `(N, C, H, W)` → `(N, 1 + H·W/p², D)`; videos
        `(N, C, T, H, W)` (T >= 2, video layout) → `(N, T, 1 + H·W/p², D)`."""
        cfg = self.cfg
        frames = self.frames_of(pixel_values.shape)
        video, n = pixel_values.ndim == 5, pixel_values.shape[0]
        if video:  # fold the frames into the batch: row b·T + t
            c, _, h, w = pixel_values.shape[1:]
            pixel_values = pixel_values.transpose(0, 2, 1, 3, 4).reshape(n * frames, c, h, w)
        x = self.embed(pixel_values)
        keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)
        x, _ = apply_layers(
            self.layers,
            x,
            lambda layer, h, k: (layer(h, k, frames), None),
            num_layers=cfg.num_layers,
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            xs=keys,
        )
        x = self.post_layernorm(x)
        return x.reshape(n, frames, *x.shape[1:]) if video else x

    def frames_of(self, shape: tuple[int, ...]) -> int:
        """Frames per input of an `(N, C, H, W)` (1) or `(N, C, T, H, W)` batch; a one-line `ValueError` for
        any other shape, for videos with T < 2, and for videos on a ViT without temporal modules."""
        cfg = self.cfg
        image = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if len(shape) == 4 and tuple(shape[1:]) == image:
            return 1
        if len(shape) == 5 and (shape[1], *shape[3:]) == image:
            if shape[2] < 2:
                raise ValueError(
                    f"video_pixel_values has shape {tuple(shape)}: a video needs at least 2 frames (the released "
                    f"model fails on 1); pass a single frame as an image (N, C, H, W)"
                )
            if self.layers.temporal is None:
                raise ValueError(
                    f"video_pixel_values has shape {tuple(shape)} but this model has the image layout (no temporal "
                    f"modules); load a video checkpoint"
                )
            return int(shape[2])
        raise ValueError(
            f"pixel_values has shape {tuple(shape)}; this model expects (N, {image[0]}, {image[1]}, {image[2]}) "
            f"images or (N, {image[0]}, T, {image[1]}, {image[2]}) videos (config image_size={cfg.image_size})"
        )

    def embed(self, pixel_values: Array) -> Array:
        """`(N, C, H, W)` → `(N, 1 + H·W/p², D)`: patch embeddings, class token, positions, pre-LayerNorm."""
        cfg, dt = self.cfg, jnp.dtype(self.dtype)
        patches = patchify(pixel_values.astype(dt), cfg.patch_size)  # (N, P, C·p·p)
        x = ops.matmul(patches, self.patch_embed[...], dtype=dt, numerics=self.numerics)  # (N, P, D)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(dt)
        return constrain(self.pre_layernorm(x), ("batch", "length", "act_embed"))
