"""A tiny mPLUG-Owl for tests and CPU runs: the layout of the reference fixture (9 LLM tokens per image)."""

from owl_jax.config import AbstractorConfig, OwlConfig, TextConfig, VisionConfig


def get_config() -> OwlConfig:
    return OwlConfig(
        vision=VisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            image_size=224,
            patch_size=14,
            layer_norm_eps=1e-6,
        ),
        abstractor=AbstractorConfig(
            hidden_size=64,
            intermediate_size=176,
            num_layers=2,
            num_heads=4,
            encoder_hidden_size=64,
            layer_norm_eps=1e-6,
        ),
        text=TextConfig(
            vocab_size=1024,
            hidden_size=96,
            intermediate_size=256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=4,
            rms_norm_eps=1e-6,
            pad_token_id=2,
        ),
        num_query_tokens=8,
    ).validate()
