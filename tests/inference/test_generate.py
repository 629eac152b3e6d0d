"""Generation: the KV cache against full recomputation, batching, chunks, sampling, chat turns, compilation
count. The greedy match with the released model is in `test_released_greedy.py`."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import owl_jax
from helpers import FIXTURE, load_fixture_model
from owl_jax.inference.generate import GenerationConfig, Generator, round_up
from owl_jax.inference.sampling import banned_ngram_tokens
from owl_jax.inference.session import ChatSession
from owl_jax.sharding import make_mesh

pytestmark = pytest.mark.compile_quickly  # small programs; the released-greedy checks compile in full

GREEDY = GenerationConfig(max_new_tokens=12, min_new_tokens=12)  # the fixture's generate() call


@pytest.fixture(scope="module")
def generator():
    return Generator(load_fixture_model("checkpoint"))


# The decode layouts (stacked cache, per-layer buffers) split between the tests below, each once: the
# chunked decode loop, bf16 batches, chat turns and sharding do not depend on the layout in other ways.
@pytest.mark.parametrize("unstack_layers", [False])
def test_bf16_batched_generation_runs_and_matches_rows_alone(reference, unstack_layers):
    # A batch of several prompts in bf16 (XLA's CPU backend once refused the prefill's attention product)
    gen = Generator(load_fixture_model("checkpoint", dtype="bfloat16"), unstack_layers=unstack_layers)
    ids, mask, px = reference["input_ids"], reference["attention_mask"], reference["pixel_values"]
    n0, n1 = int(mask[0].sum()), int(mask[1].sum())
    both = gen.generate(ids[:2], mask[:2], px[:3], GREEDY).tokens
    alone = [
        gen.generate(ids[:1, :n0], None, px[:1], GREEDY).tokens[0],
        gen.generate(ids[1:2, :n1], None, px[1:3], GREEDY).tokens[0],
    ]
    assert [len(t) for t in both] == [GREEDY.max_new_tokens] * 2
    assert both == alone


def greedy_by_recomputation(model, ids, mask, px, steps):
    """Greedy tokens from the full forward pass over the whole sequence at every step (no cache)."""
    rows, images = [], {0: px[0:1], 1: px[1:3], 2: px[3:3]}
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        seq = np.zeros((1, n + steps), np.int32)
        seq[0, :n] = ids[row, :n]
        out = []
        for t in range(steps):
            attention = (np.arange(n + steps) < n + t)[None].astype(np.int32)
            logits = model(images[row] if len(images[row]) else None, seq, attention)
            token = int(np.argmax(np.asarray(logits)[0, n + t - 1]))
            out.append(token)
            seq[0, n + t] = token
        rows.append(out)
    return rows


def test_cache_equals_full_recomputation(generator, reference):
    ids, mask = reference["input_ids"], reference["attention_mask"]
    px = np.concatenate([reference["pixel_values"], reference["pixel_values"][:0]])
    config = GenerationConfig(max_new_tokens=8, min_new_tokens=8)
    cached = generator.generate(ids, mask, px, config).tokens  # 3 rows: 1, 2 and 0 images, 3 lengths
    assert cached == greedy_by_recomputation(generator.model, ids, mask, px, 8)


def test_no_recompilation_across_steps_and_lengths(reference):
    gen = Generator(load_fixture_model("checkpoint"), prompt_bucket=64, cache_bucket=128)
    ids, px = reference["input_ids"], reference["pixel_values"]
    config = GenerationConfig(max_new_tokens=10, min_new_tokens=10)
    sizes = lambda: np.array(
        [gen.prefill._cache_size(), gen.first_select._cache_size(), gen.decode_chunk_fn._cache_size()]
    )
    before = sizes()
    calls = []
    gen.generate(ids[:1, :50], None, px[:1], config, stream=lambda step, tokens, done: calls.append(step))
    assert calls == list(range(10))  # streamed every token
    after_first = sizes()
    assert (after_first - before <= 1).all()  # ten decode steps: at most one compilation of each piece
    gen.generate(ids[:1, :61], None, px[:1], config)  # another prompt length in the same bucket
    assert (sizes() == after_first).all()


@pytest.mark.parametrize("unstack_layers", [True])
def test_decode_chunks_change_no_token_and_no_cache_slot(reference, unstack_layers):
    """Decoding in on-device chunks of 1, 3 or 16 steps: the same sampled tokens and EOS stops (inside a
    chunk), and a cache that holds exactly the fed tokens: every generated one but the last."""
    model = load_fixture_model("checkpoint")
    config = GenerationConfig(max_new_tokens=9, eos_token_id=-7, do_sample=True, top_k=5, temperature=0.7, seed=5)
    batch = reference["input_ids"][:2], reference["attention_mask"][:2], reference["pixel_values"][:3]
    n0 = int(reference["attention_mask"][0].sum())
    alone = reference["input_ids"][:1, :n0], reference["attention_mask"][:1, :n0], reference["pixel_values"][:1]
    probe = Generator(model, decode_chunk=1).generate(*alone, config).tokens[0]  # no EOS: all 9 tokens
    k = next(i for i in range(4, 8) if probe[i] not in probe[:i])  # a token first sampled at step k
    stop = dataclasses.replace(config, eos_token_id=probe[k])  # mid-chunk for chunks of 3 and 16
    results = []
    for chunk in (1, 3, 16):
        gen = Generator(model, unstack_layers=unstack_layers, decode_chunk=chunk)
        both = gen.generate(*batch, stop)
        ids, mask, px = alone
        p = round_up(n0, gen.prompt_bucket)  # generate()'s steps, by hand, to see the cache they leave
        logits, cache, key_valid = gen.prefill(
            gen.graphdef,
            gen.state,
            *_left_padded(ids, mask, p),
            gen.encode_images(px),
            round_up(p + 9, gen.cache_bucket),
        )
        tokens, finished, cache, key_valid = gen.decode_loop(logits, cache, key_valid, np.array([n0]), p, stop)
        assert tokens == [probe[: k + 1]] and finished.tolist() == [True]
        assert int(np.asarray(key_valid).sum()) == n0 + k  # the prompt and steps 0..k-1 fed, not the EOS
        results.append((both.tokens, both.finished, [np.asarray(a) for a in jax.tree.leaves(cache)]))
    for other in results[1:]:
        assert other[:2] == results[0][:2]
        for a, b in zip(other[2], results[0][2]):
            np.testing.assert_array_equal(a, b)


def _left_padded(ids, mask, width):
    lengths = mask.sum(axis=1)
    left_ids, left_mask = np.zeros((len(ids), width), np.int32), np.zeros((len(ids), width), np.int32)
    for row, n in enumerate(lengths):
        left_ids[row, width - n :], left_mask[row, width - n :] = ids[row, :n], 1
    return jnp.asarray(left_ids), jnp.asarray(left_mask)


def test_decode_dispatches_once_per_chunk_and_streams_every_token(reference):
    ids, px = reference["input_ids"][:1, :61], reference["pixel_values"][:1]
    config = GenerationConfig(max_new_tokens=10, min_new_tokens=10)
    with pytest.raises(ValueError, match="decode_chunk"):
        Generator(load_fixture_model("checkpoint"), decode_chunk=0)

    def counted(**options):
        gen = Generator(load_fixture_model("checkpoint"), **options)
        calls, inner = [], gen.decode_chunk_fn
        gen.decode_chunk_fn = lambda *a: calls.append(int(a[6])) or inner(*a)
        return gen, calls

    gen, calls = counted(decode_chunk=16)
    expected = gen.generate(ids, None, px, config).tokens
    assert calls == [16, 16]  # steps 1-9 in one chunk, then a queued chunk that runs none
    gen, calls = counted(decode_chunk=16, stream_interval=0)  # a stream that wants every token at once
    streamed = []
    assert (
        gen.generate(ids, None, px, config, stream=lambda s, t, f: streamed.append((s, int(t[0])))).tokens == expected
    )
    assert calls == [1] * 10 and streamed == list(enumerate(expected[0]))
    gen, calls = counted(decode_chunk=4, stream_interval=60)  # a patient stream: chunks grow to the cap
    streamed = []
    assert gen.generate(ids, None, px, config, stream=lambda s, t, f: streamed.append(s)).tokens == expected
    assert calls[0] == 1 and set(calls[1:]) == {4} and streamed == list(range(10))


def test_stops_at_eos_and_pads_finished_rows(generator, reference):
    ids, mask, px = reference["input_ids"], reference["attention_mask"], reference["pixel_values"]
    first = reference["greedy_0"][1]
    out = generator.generate(ids[:2], mask[:2], px[:3], GenerationConfig(max_new_tokens=6, eos_token_id=int(first)))
    assert out.tokens[0] == [int(first)] and out.finished[0]
    assert len(out.tokens[1]) == 6 and not out.finished[1]


def test_sampling_options(generator, reference):
    ids, px = reference["input_ids"][:1, :61], reference["pixel_values"][:1]
    top1 = generator.generate(
        ids, None, px, GenerationConfig(max_new_tokens=12, min_new_tokens=12, do_sample=True, top_k=1, seed=3)
    ).tokens[0]
    assert top1 == reference["greedy_0"][1:].tolist()  # top-k 1 is greedy
    runs = {
        tuple(
            generator.generate(
                ids, None, px, GenerationConfig(max_new_tokens=8, do_sample=True, top_p=0.9, temperature=1.5, seed=s)
            ).tokens[0]
        )
        for s in range(4)
    }
    assert len(runs) > 1  # sampling varies with the seed
    no_repeat = generator.generate(
        ids, None, px, GenerationConfig(max_new_tokens=12, min_new_tokens=12, no_repeat_ngram_size=2)
    ).tokens[0]
    bigrams = list(zip([1] + no_repeat, no_repeat))
    assert len(bigrams) == len(set(bigrams))
    # the greedy output repeats the bigram (59, 627); the processor must have changed something
    assert no_repeat != reference["greedy_0"][1:].tolist()


def test_banned_ngrams():
    history = jnp.array([[1, 5, 6, 5, 0, 0]])
    banned = banned_ngram_tokens(history, jnp.array([4]), 2, 10)
    assert np.flatnonzero(np.asarray(banned[0])).tolist() == [6]  # "5 6" was seen and the last token is 5


@pytest.mark.parametrize("unstack_layers", [False])
def test_second_chat_turn_equals_reencoding(model_and_processor, unstack_layers):
    model, processor = model_and_processor
    gen = Generator(model, unstack_layers=unstack_layers)
    config = GenerationConfig(max_new_tokens=10, min_new_tokens=10)
    session = ChatSession(gen, processor, max_length=512, config=config)
    a, b = Image.open(FIXTURE / "images" / "a.png"), Image.open(FIXTURE / "images" / "b.png")
    streamed = []
    first = session.ask("What is drawn in the upper left corner of this picture?", [a], stream=streamed.append)
    assert "".join(streamed).strip() == first
    second = session.ask("And what about this one?", [b])
    prompt = session.prompt[: session.prompt.rindex("AI: ") + len("AI: ")]
    inputs = processor([prompt], images=[a, b])
    fresh = gen.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], config).tokens[0]
    assert second == processor.decode([t for t in fresh if t != 2]).strip()
    assert len(session.cached_ids) > len(inputs["input_ids"][0]) - 1  # the second turn reused the first's cache
    session.reset()
    assert session.ask("What is drawn in the upper left corner of this picture?", [a]) == first


def test_chat_turn_after_an_eos_stop_equals_reencoding(model_and_processor):
    """A first answer that stops at EOS well before max_new_tokens (the device has already queued the next
    step by then), then a second turn: it equals generating from the re-encoded conversation."""
    model, processor = model_and_processor
    gen = Generator(model)
    question, a, b = (
        "What is drawn here?",
        Image.open(FIXTURE / "images" / "a.png"),
        Image.open(FIXTURE / "images" / "b.png"),
    )
    probe = ChatSession(gen, processor, max_length=512, config=GenerationConfig(max_new_tokens=10, min_new_tokens=10))
    probe.ask(question, [a])
    inputs = processor([probe.prompt[: probe.prompt.rindex("AI: ") + len("AI: ")]], images=[a])
    plain = gen.generate(
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        GenerationConfig(max_new_tokens=10, min_new_tokens=10),
    ).tokens[0]
    k = next(i for i in range(2, 9) if plain[i] not in plain[:i])  # a token first produced at step k
    config = GenerationConfig(max_new_tokens=10, eos_token_id=plain[k])
    session = ChatSession(gen, processor, max_length=512, config=config)
    session.ask(question, [a])
    assert session.cached_ids[-k:] == plain[:k]  # stopped at the chosen EOS; all but it are cached
    second = session.ask("And what about this one?", [b])
    inputs = processor([session.prompt[: session.prompt.rindex("AI: ") + len("AI: ")]], images=[a, b])
    fresh = gen.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], config).tokens[0]
    assert second == processor.decode([t for t in fresh if t != config.eos_token_id]).strip()


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")
@pytest.mark.parametrize("unstack_layers", [True])
def test_sharded_generation_matches(reference, unstack_layers):
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    model, _ = owl_jax.from_pretrained(FIXTURE / "checkpoint", mesh=mesh, show_progress=False)
    out = Generator(model, mesh=mesh, unstack_layers=unstack_layers).generate(
        reference["input_ids"][:2], reference["attention_mask"][:2], reference["pixel_values"][:3], GREEDY
    )
    assert out.tokens == [reference["greedy_0"][1:].tolist(), reference["greedy_1"][1:].tolist()]


def _chat(folder, *args, stdin=None):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "owl_jax.cli.chat", "--checkpoint", str(folder), "--max-new-tokens", "6", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_chat_cli_one_shot_and_repl(model_and_processor, tmp_path):
    model, processor = model_and_processor
    folder = tmp_path / "m"
    shutil.copytree(FIXTURE / "checkpoint", folder)
    shutil.copy(FIXTURE / "tokenizer.model", folder / "tokenizer.model")
    image = str(FIXTURE / "images" / "a.png")
    question = "What is drawn in the upper left corner of this picture?"
    session = ChatSession(Generator(model), processor, config=GenerationConfig(max_new_tokens=6))
    expected = session.ask(question, [image])
    one_shot = _chat(folder, "--image", image, "--prompt", question)
    assert one_shot.returncode == 0, one_shot.stderr
    assert one_shot.stdout.strip() == expected
    repl = _chat(folder, stdin=f"/image {image}\n{question}\n/reset\n/image missing.png\n/bogus\n/quit\n")
    assert repl.returncode == 1, repl.stderr  # piped input with a refused line (the missing image) exits 1
    assert repl.stdout.strip() == expected
    assert "missing.png" in repl.stderr and "unknown command /bogus" in repl.stderr


def test_compiler_options_reach_the_compiled_steps(reference):
    gen = Generator(load_fixture_model("checkpoint"), compiler_options={"xla_cpu_enable_fast_math": False})
    out = gen.generate(
        reference["input_ids"][:1],
        reference["attention_mask"][:1],
        reference["pixel_values"][:1],
        dataclasses.replace(GREEDY, max_new_tokens=4, min_new_tokens=4),
    )
    assert out.tokens == [reference["greedy_0"][1:5].tolist()]
    with pytest.raises(Exception, match="no_such_option"):
        Generator(load_fixture_model("checkpoint"), compiler_options={"no_such_option": True}).generate(
            reference["input_ids"][:1],
            reference["attention_mask"][:1],
            reference["pixel_values"][:1],
            dataclasses.replace(GREEDY, max_new_tokens=2, min_new_tokens=2),
        )


def test_unstacked_generation_with_unmerged_adapters_matches_stacked(reference):
    """Layers with LoRA adapters keep separate projections (no fusion) and decode as the stacked model does."""
    model = load_fixture_model("checkpoint", lora="lora-adapter", merge_lora=False)
    assert model.language_model.layers.q_proj.lora_a is not None
    args = (reference["input_ids"][:2], reference["attention_mask"][:2], reference["pixel_values"][:3], GREEDY)
    unstacked = Generator(model, unstack_layers=True)
    assert unstacked.state[2] is None and unstacked.new_cache(1, 8).per_layer
    assert unstacked.generate(*args).tokens == Generator(model).generate(*args).tokens
