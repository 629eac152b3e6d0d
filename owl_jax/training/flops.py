"""FLOPs of a training step by the work really done, for throughput and MFU.

Matmul FLOPs per token are 2·N forward for N weights. Per tower and by what the stage trains:
- weights that train: 6·N (forward, gradient of the input, gradient of the weight);
- frozen weights that gradients flow through (the frozen LLM in stage 1, the LoRA base in stage 2): 4·N;
- frozen towers upstream of everything trainable (the ViT in stage 2): 2·N (forward only).
Attention scores and the weighted sum add 4·Lq·Lk·D per layer forward (half for causal attention), times 3
when gradients flow through them and 1 otherwise. Embedding lookups cost nothing.

In the abstractor, the query, output and MLP weights see the `Q` query tokens, while the key and value
weights see `Q + T` tokens (K/V = [queries; image features]).

The language model is LLaMA (q, k, v, o, SwiGLU gate/up/down, untied head) or BLOOM (fused `query_key_value`
3H wide, `dense`, the 4H MLP's two matmuls, head tied to the embedding: still a matmul). LoRA adapters count
where the stage's pattern puts them in the language model. In the video layout images skip the temporal
modules and temporal queries, so a training step on images costs what it costs in the image layout;
`forward_flops` also counts videos: per frame the ViT, and in every ViT layer the temporal module's two
projections on the patch tokens (its depthwise convolution over time is elementwise, not counted), then the
abstractor with `2Q` queries over the `T·N` frame tokens and `temporal_visual_fc` on the last `Q`.

`jaxpr_matmul_flops` counts the same thing from the traced program itself (every `dot_general`, inside
scans times their length), which is how the accounting is tested.
"""

from __future__ import annotations

from owl_jax.config import OwlConfig

# Dense bf16 peak per chip, FLOP/s, by `jax.Device.device_kind` substring.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
    for name, value in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return value
    return None


def tower_matmul_params(cfg: OwlConfig) -> dict[str, int]:
    """Weights used in matmuls per tower (embedding table excluded, LM head included).

    `patch` is the ViT's patch embedding (applied to the patches, not the class token; pixels never need a
    gradient, so it costs 2·N, or 4·N when it trains), `vision` the ViT's transformer layers.

    The abstractor is split: `abstractor` holds the weights applied to the query tokens (query, output,
    MLP, `visual_fc`), `abstractor_kv` the key/value weights applied to queries and image features alike.
    `llm` holds the language model's (LLaMA or BLOOM), `lora` the adapters the stage puts in it (r·(in + out)
    per adapted layer). The video layout adds `temporal` (each ViT layer's temporal projections, applied to
    patch tokens) and `temporal_fc` (`temporal_visual_fc`); both are 0 in the image layout.
    """
    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    patch = v.num_channels * v.patch_size**2 * v.hidden_size
    vision = v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    abstractor = (
        a.num_layers * (2 * a.hidden_size**2 + 3 * a.hidden_size * a.intermediate_size) + a.hidden_size * t.hidden_size
    )
    abstractor_kv = a.num_layers * 2 * a.encoder_hidden_size * a.hidden_size
    if t.model_type == "bloom":  # query_key_value (H, 3H), dense (H, H), dense_h_to_4h (H, 4H), dense_4h_to_h
        llm = t.num_layers * (4 * t.hidden_size**2 + 2 * t.hidden_size * t.intermediate_size)
    else:  # q, o (H, H); k, v (H, kv); gate, up (H, I); down (I, H)
        kv = t.num_kv_heads * t.head_dim
        llm = t.num_layers * (2 * t.hidden_size**2 + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size)
    llm += t.hidden_size * t.vocab_size  # the head, tied or not
    lora = 0
    if cfg.lora is not None:  # the adapter's own rule picks the layers
        from owl_jax.training.lora_targets import linear_modules

        lora = sum(
            cfg.lora.rank * (m.fan_in + m.fan_out)
            for m in linear_modules(cfg)
            if m.path[0] == "language_model" and cfg.lora.matches(m.hf_name)
        )
    return {
        "patch": patch,
        "vision": vision,
        "abstractor": abstractor,
        "abstractor_kv": abstractor_kv,
        "llm": llm,
        "lora": lora,
        "temporal": v.num_layers * v.hidden_size**2 if cfg.video else 0,  # down (D, D/2) + up (D/2, D)
        "temporal_fc": a.hidden_size * t.hidden_size if cfg.video else 0,
    }


def train_step_flops(
    cfg: OwlConfig,
    stage: str,
    *,
    rows: int,
    seq_len: int,
    images: int,
    train_abstractor: bool = True,
    causal_half: bool = True,
    remat: str = "none",
) -> float:
    """FLOPs of one optimizer step over `rows` sequences of `seq_len` tokens with `images` images in all
    (every image slot the step encodes, padding slots included: they are computed like the others). Images
    skip the video layout's temporal modules, so it counts none.

    `causal_half=False` counts causal attention in full (what a dense kernel that masks the upper triangle
    computes); the default halves it, the usual MFU convention. `remat` adds what the layers' remat policy
    recomputes in the backward pass (`recompute_flops`): the hardware's count rather than the model's.
    """
    n = tower_matmul_params(cfg)
    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    vision_trains = stage in ("stage1", "joint_pretrain")
    abstractor_trains = stage in ("stage1", "joint_pretrain") or (
        stage in ("stage2", "stage2_full") and train_abstractor
    )
    llm_trains = stage in ("stage2_full", "text_pretrain", "joint_pretrain")
    lora_trains = stage == "stage2" and cfg.lora is not None
    # Gradients reach a tower's input when something upstream of it trains; its weights' forward FLOPs are
    # then multiplied by 3 if they train, 2 if only the input gradient is needed, 1 if neither.
    grads_reach_abstractor = vision_trains
    grads_reach_llm = abstractor_trains or vision_trains
    m_vision = 3 if vision_trains else 1
    m_abs = 3 if abstractor_trains else (2 if grads_reach_abstractor else 1)
    m_llm = 3 if llm_trains else (2 if (grads_reach_llm or lora_trains) else 1)
    tokens_v = images * v.num_positions
    queries = images * cfg.num_query_tokens
    flops = 2 * n["patch"] * images * (v.num_positions - 1) * (2 if vision_trains else 1)
    flops += 2 * n["vision"] * tokens_v * m_vision
    flops += 2 * n["abstractor"] * queries * m_abs
    flops += 2 * n["abstractor_kv"] * (queries + tokens_v) * m_abs
    flops += 2 * n["llm"] * rows * seq_len * m_llm
    if lora_trains:
        flops += 2 * n["lora"] * rows * seq_len * 3
    a_vision = 3 if vision_trains else 1
    a_abs = 3 if (abstractor_trains or grads_reach_abstractor) else 1
    a_llm = 3 if (llm_trains or lora_trains or grads_reach_llm) else 1
    attention = {
        "vision": 4 * v.num_layers * images * v.num_positions**2 * v.hidden_size * a_vision,
        "abstractor": 4 * a.num_layers * queries * (cfg.num_query_tokens + v.num_positions) * a.hidden_size * a_abs,
        "llm": (0.5 if causal_half else 1.0) * 4 * t.num_layers * rows * seq_len**2 * t.num_heads * t.head_dim * a_llm,
    }
    if remat != "none":
        backward = {"vision": a_vision == 3, "abstractor": a_abs == 3, "llm": a_llm == 3}
        flops += recompute_flops(
            cfg, remat, backward, rows=rows, seq_len=seq_len, images=images, causal_half=causal_half
        )
    return float(flops + sum(attention.values()))


def recompute_flops(
    cfg: OwlConfig,
    remat: str,
    backward: dict[str, bool],
    *,
    rows: int,
    seq_len: int,
    images: int,
    causal_half: bool = True,
) -> float:
    """Forward FLOPs that remat policy `remat` runs again in the backward pass of the towers whose backward
    runs (`backward`: vision, abstractor, llm → bool).

    - `full` saves only each layer's input, so the backward pass recomputes the layer, except its last
      matmul (the MLP's output projection), whose output is needed by nothing but the next layer, and
      that input is saved. Attention is recomputed too; LoRA adapters with their layers.
    - `dots_with_no_batch_dims` saves every weight matmul and recomputes attention (its products have batch
      dimensions).
    - `dots` saves every matmul: nothing. Attention in a custom kernel is not a saveable dot: such a kernel
      runs its forward again under any policy, which this count, built from matmuls, leaves out.
    """
    if remat in ("none", "dots"):
        return 0.0
    if remat not in ("full", "dots_with_no_batch_dims"):
        raise ValueError(f"unknown remat policy {remat!r}; one of none, dots, dots_with_no_batch_dims, full")
    n = tower_matmul_params(cfg)
    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    tokens_v, queries = images * v.num_positions, images * cfg.num_query_tokens
    attention = {
        "vision": 4 * v.num_layers * images * v.num_positions**2 * v.hidden_size,
        "abstractor": 4 * a.num_layers * queries * (cfg.num_query_tokens + v.num_positions) * a.hidden_size,
        "llm": (0.5 if causal_half else 1.0) * 4 * t.num_layers * rows * seq_len**2 * t.num_heads * t.head_dim,
    }
    layers = {  # each stack's matmuls minus every layer's last one (and the weights outside the stack)
        "vision": (n["vision"] - v.num_layers * v.hidden_size * v.intermediate_size) * tokens_v,
        "abstractor": (
            n["abstractor"] - a.hidden_size * t.hidden_size - a.num_layers * a.hidden_size * a.intermediate_size
        )
        * queries
        + n["abstractor_kv"] * (queries + tokens_v),
        "llm": (
            n["llm"] - t.hidden_size * t.vocab_size - t.num_layers * t.hidden_size * t.intermediate_size + n["lora"]
        )
        * rows
        * seq_len,
    }
    total = 0.0
    for tower, runs in backward.items():
        if runs:
            total += attention[tower] + (2 * layers[tower] if remat == "full" else 0)
    return float(total)


def forward_flops(
    cfg: OwlConfig,
    *,
    rows: int,
    seq_len: int,
    images: int,
    causal_half: bool = True,
    videos: int = 0,
    frames: int = 1,
) -> float:
    """FLOPs of one forward pass (logits) over `rows` × `seq_len` tokens with `images` images and (video
    layout) `videos` videos of `frames` frames each."""
    n = tower_matmul_params(cfg)
    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    tokens_v, queries = images * v.num_positions, images * cfg.num_query_tokens
    flops = 2 * (
        n["patch"] * images * (v.num_positions - 1)
        + n["vision"] * tokens_v
        + n["abstractor"] * queries
        + n["abstractor_kv"] * (queries + tokens_v)
        + n["llm"] * rows * seq_len
    )
    flops += 4 * v.num_layers * images * v.num_positions**2 * v.hidden_size
    flops += 4 * a.num_layers * queries * (cfg.num_query_tokens + v.num_positions) * a.hidden_size
    flops += (0.5 if causal_half else 1.0) * 4 * t.num_layers * rows * seq_len**2 * t.num_heads * t.head_dim
    if videos:
        flops += _video_flops(cfg, n, videos, frames)
    return float(flops)


def _video_flops(cfg: OwlConfig, n: dict[str, int], videos: int, frames: int) -> float:
    """Forward FLOPs of encoding `videos` videos of `frames` frames (`frames` >= 2: the temporal path)."""
    v, a = cfg.vision, cfg.abstractor
    q = cfg.num_query_tokens
    frame_images = videos * frames
    tokens_v, patches = frame_images * v.num_positions, frame_images * (v.num_positions - 1)
    keys = 2 * q + frames * v.num_positions  # per video: both query sets, then every frame's tokens
    visual_fc = a.hidden_size * cfg.text.hidden_size
    flops = 2 * (n["patch"] * patches + n["vision"] * tokens_v + n["temporal"] * patches)
    flops += 2 * videos * ((n["abstractor"] - visual_fc) * 2 * q + (visual_fc + n["temporal_fc"]) * q)
    flops += 2 * n["abstractor_kv"] * videos * keys
    flops += 4 * v.num_layers * frame_images * v.num_positions**2 * v.hidden_size
    flops += 4 * a.num_layers * videos * 2 * q * keys * a.hidden_size
    return float(flops)


def jaxpr_matmul_flops(jaxpr) -> float:
    """2·M·N·K summed over every `dot_general` of a (closed) jaxpr, sub-jaxprs included: a scan body counts
    `length` times, a `cond` its costliest branch, a `while` body once (its trip count is not static)."""
    import numpy as np

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            # every lhs element meets every free rhs column once: 2 · |lhs| · prod(rhs free dims)
            free_rhs = [rhs[d] for d in range(len(rhs)) if d not in rc and d not in rb]
            total += 2.0 * np.prod(lhs, dtype=np.float64) * np.prod(free_rhs, dtype=np.float64)
            continue
        subs = [v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")]
        subs += [
            b
            for v in eqn.params.values()
            if isinstance(v, (tuple, list))
            for b in v
            if hasattr(b, "eqns") or hasattr(getattr(b, "jaxpr", None), "eqns")
        ]
        if not subs:
            continue
        counts = [jaxpr_matmul_flops(sub) for sub in subs]
        if name == "scan":
            total += eqn.params["length"] * sum(counts)
        elif name == "cond":
            total += max(counts)
        else:
            total += sum(counts)
    return total
