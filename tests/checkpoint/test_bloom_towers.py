"""Stage 1 from an HF `BloomForCausalLM`: `init_from_towers` starts the text tower with HF BLOOM's logits."""

import numpy as np
import pytest
import torch
import transformers

from owl_jax.checkpoint import abstract_model, assemble, init_from_towers

TOL = 1e-5
BLOOM = dict(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)


def _random(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights strong enough that the blocks matter next to the normed embeddings; norms and biases off 1/0."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.4)
    return model.eval()


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("bloom_towers")
    clip = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14
    )
    transformers.CLIPVisionModel(clip).save_pretrained(root / "clip")
    bloom = _random(transformers.BloomForCausalLM(transformers.BloomConfig(**BLOOM, attn_implementation="eager")), 1)
    bloom.save_pretrained(root / "bloom")  # transformers' layout: `transformer.` keys, the tied head left out
    # BigScience's own layout: the bare `BloomModel` keys, plus the tied head saved again
    (root / "bigscience").mkdir()
    bloom.config.save_pretrained(root / "bigscience")
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in bloom.state_dict().items()}
    torch.save(state, root / "bigscience" / "pytorch_model.bin")
    assert "lm_head.weight" in state and "h.0.self_attention.query_key_value.weight" in state
    return root, bloom


@pytest.mark.parametrize("layout", ["bloom", "bigscience"])
def test_imported_bloom_reproduces_hf_logits(layout, towers):
    root, bloom = towers
    cfg, leaves = init_from_towers(str(root / "clip"), str(root / layout), num_query_tokens=2, show_progress=False)
    assert (cfg.text.model_type, cfg.text.num_heads, cfg.text.tie_word_embeddings) == ("bloom", 4, True)
    model = assemble(*abstract_model(cfg), leaves)
    ids = np.random.default_rng(0).integers(3, 64, (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    with torch.no_grad():
        expected = bloom(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    logits = np.asarray(model(None, ids, mask))
    real = mask.astype(bool)
    assert np.abs(logits - expected)[real].max() < TOL
    assert np.abs(expected).max() > 1.0  # logits of a real size
