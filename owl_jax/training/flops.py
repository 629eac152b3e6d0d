"""FLOPs of a training step by the work really done, for throughput and MFU.

Matmul FLOPs per token are 2·N forward for N weights. Per tower and by what the stage trains:
- weights that train: 6·N (forward, gradient of the input, gradient of the weight);
- frozen weights that gradients flow through (the frozen LLM in stage 1, the LoRA base in stage 2): 4·N;
- frozen towers upstream of everything trainable (the ViT in stage 2): 2·N (forward only).
Attention scores and the weighted sum add 4·Lq·Lk·D per layer forward (half for causal attention), times 3
when gradients flow through them and 1 otherwise. Embedding lookups cost nothing.

In the abstractor, the query, output and MLP weights see the `Q` query tokens, while the key and value
weights see `Q + T` tokens (K/V = [queries; image features]).

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
    """
    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    patch = v.num_channels * v.patch_size**2 * v.hidden_size
    vision = v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    abstractor = (
        a.num_layers * (2 * a.hidden_size**2 + 3 * a.hidden_size * a.intermediate_size) + a.hidden_size * t.hidden_size
    )
    abstractor_kv = a.num_layers * 2 * a.encoder_hidden_size * a.hidden_size
    kv = t.num_kv_heads * t.head_dim
    llm = t.num_layers * (2 * t.hidden_size**2 + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size)
    llm += t.hidden_size * t.vocab_size
    lora = 0
    if cfg.lora is not None:  # r·(in + out) per adapted LLaMA projection, chosen by the adapter's own rule
        shapes = {
            "self_attn.q_proj": (t.hidden_size, t.hidden_size),
            "self_attn.k_proj": (t.hidden_size, kv),
            "self_attn.v_proj": (t.hidden_size, kv),
            "self_attn.o_proj": (t.hidden_size, t.hidden_size),
            "mlp.gate_proj": (t.hidden_size, t.intermediate_size),
            "mlp.up_proj": (t.hidden_size, t.intermediate_size),
            "mlp.down_proj": (t.intermediate_size, t.hidden_size),
        }
        lora = sum(
            t.num_layers * cfg.lora.rank * (fan_in + fan_out)
            for name, (fan_in, fan_out) in shapes.items()
            if cfg.lora.matches(f"language_model.model.layers.0.{name}")
        )
    return {
        "patch": patch,
        "vision": vision,
        "abstractor": abstractor,
        "abstractor_kv": abstractor_kv,
        "llm": llm,
        "lora": lora,
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
) -> float:
    """FLOPs of one optimizer step over `rows` sequences of `seq_len` tokens with `images` images in all
    (every image slot the step encodes, padding slots included: they are computed like the others).

    `causal_half=False` counts causal attention in full (what a dense kernel that masks the upper triangle
    computes); the default halves it, the usual MFU convention.
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
    return float(flops + sum(attention.values()))


def forward_flops(cfg: OwlConfig, *, rows: int, seq_len: int, images: int, causal_half: bool = True) -> float:
    """FLOPs of one forward pass (logits) over `rows` × `seq_len` tokens with `images` images."""
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
