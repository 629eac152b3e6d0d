"""The released mPLUG-Owl 7B layout (`MAGAer13/mplug-owl-llama-7b{,-pt,-ft}`): 7,123,068,928 parameters.

ViT-L/14 at 224 px (257 tokens × 1024), a 6-layer abstractor with 64 queries and SwiGLU hidden 2816,
LLaMA-7B (32 layers × 4096, 32 heads, vocab 32000).
"""

from owl_jax.config import AbstractorConfig, OwlConfig, TextConfig, VisionConfig


def get_config() -> OwlConfig:
    return OwlConfig(
        vision=VisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_layers=24,
            num_heads=16,
            image_size=224,
            patch_size=14,
            layer_norm_eps=1e-6,
            hidden_act="quick_gelu",
        ),
        abstractor=AbstractorConfig(
            hidden_size=1024,
            intermediate_size=2816,
            num_layers=6,
            num_heads=16,
            encoder_hidden_size=1024,
            layer_norm_eps=1e-6,
            attention_dropout=0.1,
        ),
        text=TextConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=2048,
        ),
        num_query_tokens=64,
    ).validate()
