"""f_K: the visual abstractor: learnable queries cross-attend to the ViT tokens, then `visual_fc`.

Per layer (all Linear layers with bias, nothing masked):

    q   = norm1(x)                                   # eps 1e-5
    kv  = concat([q, normk(image)], axis=tokens)     # eps 1e-5; Q + T keys and values
    h   = q + out_proj(attention(query(q), key(kv), value(kv)))   # residual on the *normalised* query
    h   = h + w2(ffn_ln(silu(w1(norm2(h))) * w3(norm2(h))))        # norm2 eps 1e-5, ffn_ln eps from config

The output is `visual_fc` of the Q query states with `vit_eos` appended: `(N, Q + 1, D_llm)`.

Videos (the video layout): the learned queries and Q `temporal_query_tokens` (2Q rows) attend to the frame
tokens of all T frames, flattened frame-major to `(N, T·P, D_v)`; the output is
`visual_fc(first Q) + temporal_visual_fc(last Q)`, then `vit_eos`: Q + 1 rows, as for an image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from owl_jax import ops
from owl_jax.config import AbstractorConfig, LoRAConfig, Numerics
from owl_jax.modeling._stack import apply_layers
from owl_jax.modeling.activations import swiglu
from owl_jax.modeling.linear import Linear
from owl_jax.modeling.norms import LayerNorm
from owl_jax.sharding import constrain

Array = jax.Array
_TORCH_LAYER_NORM_EPS = 1e-5  # norm1, normk and norm2 are built without an eps in the released code

HF_LAYER = "abstractor.encoder.layers.{i}.crossattention."
# The released code's module names: peft matches adapters against them, and the converter's key table
# (`owl_jax.checkpoint.keys.abstractor`) maps every parameter through them.
HF_MODULES = {
    "query_tokens": "query_tokens",
    "layers/norm1": HF_LAYER + "norm1",
    "layers/normk": HF_LAYER + "normk",
    "layers/query": HF_LAYER + "attention.query",
    "layers/key": HF_LAYER + "attention.key",
    "layers/value": HF_LAYER + "attention.value",
    "layers/out_proj": HF_LAYER + "output.out_proj",
    "layers/norm2": HF_LAYER + "output.norm2",
    "layers/w1": HF_LAYER + "output.mlp.w1",
    "layers/w2": HF_LAYER + "output.mlp.w2",
    "layers/w3": HF_LAYER + "output.mlp.w3",
    "layers/ffn_ln": HF_LAYER + "output.mlp.ffn_ln",
    "visual_fc": "abstractor.visual_fc",
    "vit_eos": "abstractor.vit_eos",
}
# The video layout's additions.
VIDEO_HF_MODULES = {
    "temporal_query_tokens": "temporal_query_tokens",
    "temporal_visual_fc": "abstractor.temporal_visual_fc",
}


class AbstractorLayer(nnx.Module):
    def __init__(
        self,
        cfg: AbstractorConfig,
        *,
        stack: int,
        lora: LoRAConfig | None,
        dtype: str,
        param_dtype: str,
        numerics: Numerics,
        rngs: nnx.Rngs,
    ):
        d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.encoder_hidden_size
        linear = dict(stack=stack, lora=lora, dtype=dtype, param_dtype=param_dtype, numerics=numerics, rngs=rngs)
        norm = dict(stack=stack, param_dtype=param_dtype, numerics=numerics)
        self.numerics = numerics
        self.num_heads = cfg.num_heads
        self.dropout_rate = float(cfg.attention_dropout)
        self.norm1 = LayerNorm(d, eps=_TORCH_LAYER_NORM_EPS, **norm)
        self.normk = LayerNorm(e, eps=_TORCH_LAYER_NORM_EPS, **norm)
        self.query = Linear(d, d, axes=("vision_embed", "vision_heads"), hf_name=HF_MODULES["layers/query"], **linear)
        self.key = Linear(e, d, axes=("vision_embed", "vision_heads"), hf_name=HF_MODULES["layers/key"], **linear)
        self.value = Linear(e, d, axes=("vision_embed", "vision_heads"), hf_name=HF_MODULES["layers/value"], **linear)
        self.out_proj = Linear(
            d, d, axes=("vision_heads", "vision_embed"), hf_name=HF_MODULES["layers/out_proj"], **linear
        )
        self.norm2 = LayerNorm(d, eps=_TORCH_LAYER_NORM_EPS, **norm)
        self.w1 = Linear(d, f, axes=("vision_embed", "vision_mlp"), hf_name=HF_MODULES["layers/w1"], **linear)
        self.w2 = Linear(f, d, axes=("vision_mlp", "vision_embed"), hf_name=HF_MODULES["layers/w2"], **linear)
        self.w3 = Linear(d, f, axes=("vision_embed", "vision_mlp"), hf_name=HF_MODULES["layers/w3"], **linear)
        self.ffn_ln = LayerNorm(f, eps=cfg.layer_norm_eps, **norm)

    def __call__(self, x: Array, image: Array, key: Array | None) -> Array:
        """Queries `(N, Q, D)` and image features `(N, T, D_v)` → queries `(N, Q, D)`."""
        keys = [None] * 8 if key is None else list(jax.random.split(key, 8))
        n, nq, d = x.shape
        hd = d // self.num_heads
        q = self.norm1(x)
        kv = jnp.concatenate([q, self.normk(image)], axis=1)  # (N, Q + T, D)
        heads = lambda t: t.reshape(n, t.shape[1], self.num_heads, hd)  # noqa: E731
        ctx = ops.attention(
            heads(self.query(q, keys[0])),
            heads(self.key(kv, keys[1])),
            heads(self.value(kv, keys[2])),
            scale=hd**-0.5,
            dropout_rate=self.dropout_rate,
            dropout_key=keys[3],
            numerics=self.numerics,
        )  # (N, Q, H, Dh)
        h = q + self.out_proj(ctx.reshape(n, nq, d), keys[4])
        m = self.norm2(h)
        gated = swiglu(self.w1(m, keys[5]), self.w3(m, keys[6]), numerics=self.numerics)  # (N, Q, F)
        return h + self.w2(self.ffn_ln(gated), keys[7])


class Abstractor(nnx.Module):
    """`query_tokens` + `abstractor.*`: ViT features `(N, T, D_v)` → LLM tokens `(N, Q + 1, D_llm)`; with
    `temporal` (the video layout) also `temporal_query_tokens` and `abstractor.temporal_visual_fc`."""

    def __init__(
        self,
        cfg: AbstractorConfig,
        num_queries: int,
        llm_hidden: int,
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
        pdt = jnp.dtype(param_dtype)
        fc = dict(lora=lora, dtype=dtype, param_dtype=param_dtype, numerics=numerics, rngs=rngs)
        # The released code zero-initialises the queries; identical queries never become different
        # under training, so a fresh model draws them at random (imported checkpoints overwrite this).
        self.query_tokens = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (1, num_queries, cfg.hidden_size), pdt),
            axes=(None, "queries", "vision_embed"),
        )
        self.layers = AbstractorLayer(
            cfg, stack=cfg.num_layers, lora=lora, dtype=dtype, param_dtype=param_dtype, numerics=numerics, rngs=rngs
        )
        self.visual_fc = Linear(
            cfg.hidden_size, llm_hidden, axes=("vision_embed", "embed"), hf_name=HF_MODULES["visual_fc"], **fc
        )
        self.vit_eos = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (1, 1, llm_hidden), pdt), axes=(None, None, "embed")
        )
        if not temporal:
            self.temporal_query_tokens = self.temporal_visual_fc = None
        else:
            self.temporal_query_tokens = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (1, num_queries, cfg.hidden_size), pdt),
                axes=(None, "queries", "vision_embed"),
            )
            self.temporal_visual_fc = Linear(
                cfg.hidden_size,
                llm_hidden,
                axes=("vision_embed", "embed"),
                hf_name=VIDEO_HF_MODULES["temporal_visual_fc"],
                **fc,
            )

    def __call__(self, features: Array, dropout_key: Array | None = None) -> Array:
        """ViT features → LLM tokens `(N, Q + 1, D_llm)`: images `(N, P, D_v)`, or videos `(N, T, P, D_v)`
        (T >= 2 uses the temporal queries; T = 1 is an image)."""
        dt = jnp.dtype(self.dtype)
        if features.ndim == 4 and features.shape[1] == 1:
            features = features[:, 0]
        video = features.ndim == 4
        if video and self.temporal_query_tokens is None:
            raise ValueError(
                f"video features {tuple(features.shape)} need temporal queries; this abstractor has the image layout"
            )
        n, q = features.shape[0], self.query_tokens.shape[1]
        tokens = features.reshape(n, -1, features.shape[-1]).astype(dt)  # videos: frame-major (N, T·P, D_v)
        queries = [self.query_tokens[...]] + ([self.temporal_query_tokens[...]] if video else [])
        x = jnp.concatenate([jnp.broadcast_to(t.astype(dt), (n, *t.shape[1:])) for t in queries], axis=1)
        keys = None if dropout_key is None else jax.random.split(dropout_key, self.cfg.num_layers + 1)
        body = lambda layer, h, k: (constrain(layer(h, tokens, k), ("batch", "length", "act_embed")), None)
        x, _ = apply_layers(
            self.layers,
            x,
            body,
            num_layers=self.cfg.num_layers,
            scan=self.scan_layers,
            remat_policy=self.remat_policy,
            xs=None if keys is None else keys[1:],
        )
        out = self.visual_fc(x[:, :q], None if keys is None else keys[0])
        if video:
            out = out + self.temporal_visual_fc(x[:, q:], None if keys is None else jax.random.fold_in(keys[0], 1))
        eos = jnp.broadcast_to(self.vit_eos[...].astype(dt), (n, 1, out.shape[-1]))
        return jnp.concatenate([out, eos], axis=1)
