"""A PyTorch mPLUG-Owl of the same shapes as an `OwlConfig`, for CPU timing comparisons (`cpu_compare.py`).

Built from stock parts where they exist: HF `CLIPVisionModel` for the ViT (its post-LayerNorm applied to
every token, as mPLUG-Owl's ViT does), HF `LlamaForCausalLM` for the LLM (with `peft` LoRA for stage 2),
and the visual abstractor written here with the shapes of `owl_jax/modeling/abstractor.py`. Weights are
random: the point is the same amount of work, not the same numbers. Parameter counts equal owl_jax's
(the ViT's separate q/k/v with biases hold exactly the weights of the fused `query_key_value`).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from owl_jax.config import OwlConfig

warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")


class AbstractorLayer(nn.Module):
    def __init__(self, d: int, enc: int, f: int, heads: int, ffn_eps: float, attn_dropout: float):
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.norm1, self.normk = nn.LayerNorm(d), nn.LayerNorm(enc)
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(enc, d), nn.Linear(enc, d)
        self.out_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.w1, self.w3, self.w2 = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d)
        self.ffn_ln = nn.LayerNorm(f, eps=ffn_eps)

    def forward(self, x: torch.Tensor, image: torch.Tensor, sdpa: bool) -> torch.Tensor:
        n, nq, d = x.shape
        hd = d // self.heads
        q = self.norm1(x)
        kv = torch.cat([q, self.normk(image)], dim=1)
        heads = lambda t: t.view(n, t.shape[1], self.heads, hd).transpose(1, 2)
        qh, kh, vh = heads(self.query(q)), heads(self.key(kv)), heads(self.value(kv))
        p = self.attn_dropout if self.training else 0.0
        if sdpa:
            ctx = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=p)
        else:
            probs = torch.softmax((qh @ kh.transpose(-1, -2)) * hd**-0.5, dim=-1, dtype=torch.float32).to(vh.dtype)
            ctx = F.dropout(probs, p) @ vh
        h = q + self.out_proj(ctx.transpose(1, 2).reshape(n, nq, d))
        m = self.norm2(h)
        return h + self.w2(self.ffn_ln(F.silu(self.w1(m)) * self.w3(m)))


class Abstractor(nn.Module):
    """Queries cross-attending to [queries; image tokens], SwiGLU with ffn_ln, visual_fc, vit_eos appended."""

    def __init__(self, cfg: OwlConfig, attn_dropout: float):
        super().__init__()
        a = cfg.abstractor
        self.query_tokens = nn.Parameter(0.02 * torch.randn(1, cfg.num_query_tokens, a.hidden_size))
        self.layers = nn.ModuleList(
            AbstractorLayer(
                a.hidden_size, a.encoder_hidden_size, a.intermediate_size, a.num_heads, a.layer_norm_eps, attn_dropout
            )
            for _ in range(a.num_layers)
        )
        self.visual_fc = nn.Linear(a.hidden_size, cfg.text.hidden_size)
        self.vit_eos = nn.Parameter(0.02 * torch.randn(1, 1, cfg.text.hidden_size))
        self.sdpa = True

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        n = image_features.shape[0]
        x = self.query_tokens.expand(n, -1, -1)
        for layer in self.layers:
            x = layer(x, image_features, self.sdpa)
        out = self.visual_fc(x)
        return torch.cat([out, self.vit_eos.expand(n, -1, -1).to(out.dtype)], dim=1)


class TorchOwl(nn.Module):
    """ViT (CLIP) → abstractor → LLaMA with the image embeddings written over the -1 placeholders."""

    def __init__(self, cfg: OwlConfig, *, attn_implementation: str, lora: bool, dropout: bool, seed: int = 0):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        v, t = cfg.vision, cfg.text
        vcfg = CLIPVisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            num_channels=v.num_channels,
            layer_norm_eps=v.layer_norm_eps,
            hidden_act=v.hidden_act,
            attention_dropout=0.0,
        )
        self.vision = CLIPVisionModel._from_config(vcfg, attn_implementation=attn_implementation)
        self.abstractor = Abstractor(cfg, cfg.abstractor.attention_dropout if dropout else 0.0)
        self.abstractor.sdpa = attn_implementation == "sdpa"
        tcfg = LlamaConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads,
            rms_norm_eps=t.rms_norm_eps,
            rope_theta=t.rope_theta,
            max_position_embeddings=t.max_position_embeddings,
            tie_word_embeddings=False,
            use_cache=False,
        )
        llm = LlamaForCausalLM._from_config(tcfg, attn_implementation=attn_implementation)
        if lora:
            from peft import LoraConfig, get_peft_model

            assert cfg.lora is not None
            llm = get_peft_model(
                llm,
                LoraConfig(
                    r=cfg.lora.rank,
                    lora_alpha=cfg.lora.alpha,
                    lora_dropout=cfg.lora.dropout if dropout else 0.0,
                    target_modules=["q_proj", "v_proj"],
                    bias="none",
                ),
            )
        self.llm = llm

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = getattr(self.vision, "vision_model", self.vision)  # transformers 4 wraps the transformer
        hidden = vm(pixel_values=pixel_values).last_hidden_state
        return vm.post_layernorm(hidden)  # mPLUG-Owl post-normalises every token, not only the class token

    def logits(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        vision_grad: bool = True,
    ) -> torch.Tensor:
        ctx = contextlib.nullcontext() if vision_grad else torch.no_grad()
        with ctx:
            features = self.vision_features(pixel_values)
        image_embeds = self.abstractor(features)
        is_image = input_ids < 0
        embeds = self.llm.get_input_embeddings()(input_ids.clamp(min=0))
        embeds = embeds.masked_scatter(is_image[..., None], image_embeds.to(embeds.dtype))
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked (answer) positions, in float32."""
    targets = input_ids[:, 1:]
    mask = (loss_mask > 0) & (targets >= 0)
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.clamp(min=0).reshape(-1), reduction="none"
    ).view_as(targets)
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def trainable_modules(model: TorchOwl, stage: str) -> None:
    """Set requires_grad as owl_jax's stages do (stage1: ViT + abstractor; stage2: LoRA + abstractor)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if stage == "stage1":
        for p in list(model.vision.parameters()) + list(model.abstractor.parameters()):
            p.requires_grad_(True)
    elif stage == "stage2":
        for name, p in model.llm.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
        for p in model.abstractor.parameters():
            p.requires_grad_(True)
    elif stage != "forward":
        raise ValueError(stage)


def param_counts(model: TorchOwl) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    b, m = batch["image_mask"].shape
    pixels = batch["pixel_values"].reshape(b * m, *batch["pixel_values"].shape[2:])
    return {
        "pixel_values": torch.from_numpy(np.ascontiguousarray(pixels)),
        "input_ids": torch.from_numpy(batch["input_ids"].astype(np.int64)),
        "attention_mask": torch.from_numpy(batch["attention_mask"].astype(np.int64)),
        "loss_mask": torch.from_numpy(batch["loss_mask"].astype(np.int64)),
    }


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def make_step(model: TorchOwl, stage: str, batch: dict[str, torch.Tensor], *, bf16: bool, optim: dict[str, Any]):
    """A zero-argument callable running one forward (inference) or one optimizer step, and a check.

    Train steps: forward + loss under autocast (bf16) or in float32, backward, global-norm clipping and
    AdamW (foreach) over the trainable parameters, as owl_jax's Trainer does. The check returns the last
    loss and verifies that exactly the trainable parameters received gradients.
    """
    trainable_modules(model, stage)
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    if stage == "forward":
        model.eval()

        def run():
            with torch.inference_mode(), autocast(bf16):
                return model.logits(*args)

        def check(out):
            assert out.shape == (*batch["input_ids"].shape, model.llm.config.vocab_size), out.shape
            assert bool(torch.isfinite(out.float()).all()), "non-finite logits"
            return None

        return run, check

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=optim["lr"],
        betas=(optim["b1"], optim["b2"]),
        eps=optim["eps"],
        weight_decay=optim["weight_decay"],
        foreach=True,
    )
    clip = optim.get("clip_norm")
    vision_grad = stage == "stage1"

    def run():
        opt.zero_grad(set_to_none=True)
        with autocast(bf16):
            logits = model.logits(*args, vision_grad=vision_grad)
            loss = next_token_loss(logits, batch["input_ids"], batch["loss_mask"])
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        opt.step()
        return loss.detach()

    def check(loss):
        assert bool(torch.isfinite(loss)), f"non-finite loss {loss}"
        frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not frozen_with_grad and not missing, (frozen_with_grad[:3], missing[:3])
        return float(loss)

    return run, check
