"""FLOPs of a training step by the work really done, for throughput and MFU.

Matmul FLOPs per token are 2·N forward for N weights. Per tower and by what the stage trains:
- weights that train: 6·N (forward, gradient of the input, gradient of the weight);
- frozen weights that gradients flow through (the frozen LLM in stage 1, the LoRA base in stage 2): 4·N;
- frozen towers upstream of everything trainable (the ViT in stage 2): 2·N (forward only).
Attention scores and the weighted sum add 4·Lq·Lk·D per layer forward (half for causal attention), times 3
when gradients flow through them and 1 otherwise. Embedding lookups cost nothing.
"""

from __future__ import annotations

from owl_jax.config import OwlConfig

# Dense bf16 peak per chip, FLOP/s, by `jax.Device.device_kind` substring.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def peak_flops(device_kind: str) -> float | None:
    for name, value in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return value
    return None


def tower_matmul_params(cfg: OwlConfig) -> dict[str, int]:
    """Weights used in matmuls per tower (embedding table excluded, LM head included)."""
    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    vision = v.num_channels * v.patch_size ** 2 * v.hidden_size + v.num_layers * (
        4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    abstractor = a.num_layers * (a.hidden_size ** 2 + 2 * a.encoder_hidden_size * a.hidden_size + a.hidden_size ** 2
                                 + 3 * a.hidden_size * a.intermediate_size) + a.hidden_size * t.hidden_size
    kv = t.num_kv_heads * t.head_dim
    llm = t.num_layers * (2 * t.hidden_size ** 2 + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size)
    llm += t.hidden_size * t.vocab_size
    lora = 0
    if cfg.lora is not None:  # adapters on q/v-like projections: r·(in + out) per adapted matrix
        lora = 2 * t.num_layers * cfg.lora.rank * (t.hidden_size + t.hidden_size)
    return {"vision": vision, "abstractor": abstractor, "llm": llm, "lora": lora}


def train_step_flops(cfg: OwlConfig, stage: str, *, rows: int, seq_len: int, images: int,
                     train_abstractor: bool = True) -> float:
    """FLOPs of one optimizer step over `rows` sequences of `seq_len` tokens with `images` images in all."""
    n = tower_matmul_params(cfg)
    v, a, t = cfg.vision, cfg.abstractor, cfg.text
    vision_trains = stage in ("stage1", "joint_pretrain")
    abstractor_trains = stage == "stage1" or (stage in ("stage2", "stage2_full") and train_abstractor)
    llm_trains = stage in ("stage2_full", "text_pretrain", "joint_pretrain")
    # multipliers of the forward FLOPs: 3 if the weights train, 2 if only gradients pass through, 1 if neither
    grads_reach_vision = vision_trains
    grads_reach_abstractor = abstractor_trains or vision_trains
    m_vision = 3 if vision_trains else 1
    m_abs = 3 if abstractor_trains else (2 if grads_reach_abstractor else 1)
    m_llm = 3 if llm_trains else 2
    tokens_v = images * v.num_positions
    queries = images * cfg.num_query_tokens
    flops = 2 * n["vision"] * tokens_v * m_vision
    flops += 2 * n["abstractor"] * queries * m_abs
    flops += 2 * n["llm"] * rows * seq_len * m_llm
    if stage == "stage2":
        flops += 2 * n["lora"] * rows * seq_len * 3
    attention = {
        "vision": 4 * v.num_layers * images * v.num_positions ** 2 * v.hidden_size * (3 if grads_reach_vision else 1),
        "abstractor": 4 * a.num_layers * queries * (cfg.num_query_tokens + v.num_positions) * a.hidden_size
        * (3 if grads_reach_abstractor else 1),
        "llm": 0.5 * 4 * t.num_layers * rows * seq_len ** 2 * t.hidden_size * 3,
    }
    return float(flops + sum(attention.values()))
