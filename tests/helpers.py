"""Helpers shared by the tests: the reference fixture, tiny models and batches, jaxpr walking, a tiny OwlEval."""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import shutil
import struct
import threading
import zlib

import jax
import numpy as np
from flax import nnx
from PIL import Image

from owl_jax.checkpoint import flatten
from owl_jax.config import AbstractorConfig, OwlConfig, TextConfig, VisionConfig
from owl_jax.modeling import Owl
from owl_jax.sharding import make_mesh
from owl_jax.training.trainer import Trainer

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "mplug_owl_tiny"
VIDEO_FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "mplug_owl_video_tiny"


@functools.cache
def load_fixture_model(
    folder: str = "checkpoint",
    dtype: str = "float32",
    lora: str | None = None,
    merge_lora: bool = False,
    scan_layers: bool = True,
    attention_impl: str = "auto",
):
    """The fixture model loaded once per argument set (tests must not modify it)."""
    import owl_jax

    model, _ = owl_jax.from_pretrained(
        FIXTURE / folder,
        dtype=dtype,
        lora=None if lora is None else FIXTURE / lora,
        merge_lora=merge_lora,
        scan_layers=scan_layers,
        attention_impl=attention_impl,
        show_progress=False,
    )
    return model


def all_eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs its equations call, depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in subjaxprs(eqn):
            yield from all_eqns(sub)


def subjaxprs(eqn):
    """The jaxprs an equation calls (scan/cond/custom-VJP bodies and the like)."""
    for value in eqn.params.values():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr
            elif hasattr(v, "eqns"):
                yield v


OPTIM = dict(lr=1e-2, warmup_steps=1, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01, clip_norm=1.0)


def tiny_config(**kw) -> OwlConfig:
    return OwlConfig(
        vision=VisionConfig(
            hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=32, patch_size=16
        ),
        abstractor=AbstractorConfig(
            hidden_size=16,
            intermediate_size=24,
            num_layers=2,
            num_heads=2,
            encoder_hidden_size=16,
            attention_dropout=0.0,
        ),
        text=TextConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=2, num_kv_heads=2),
        num_query_tokens=2,
        **kw,
    )


def tiny_params(cfg: OwlConfig, seed: int = 0) -> dict:
    model = Owl(cfg.replace(lora=None), rngs=nnx.Rngs(seed))
    return {
        tuple(str(k) for k in p): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def tiny_batch(rows: int = 4, length: int = 16, slots: int = 2, seed: int = 0, answers: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 64, size=(rows, length)).astype(np.int32)
    ids[:, 0] = 1
    ids[::2, 2:5] = -1  # rows 0, 2, ... show one image (3 = num_query_tokens + 1 placeholders)
    image_mask = np.zeros((rows, slots), np.int32)
    image_mask[::2, 0] = 1
    loss_mask = np.zeros((rows, length - 1), np.int32)
    if answers:
        loss_mask[:, 8:14] = 1
    return {
        "input_ids": ids,
        "attention_mask": np.ones((rows, length), np.int32),
        "loss_mask": loss_mask,
        "pixel_values": rng.normal(size=(rows, slots, 3, 32, 32)).astype(np.float32),
        "image_mask": image_mask,
        "skipped": np.zeros(rows, np.int32),
    }


def one_device_mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def run_steps(trainer: Trainer, params: dict, steps: int = 3, batch=lambda i: tiny_batch(seed=i)):
    state = trainer.init_state(params, seed=0)
    before = {p: np.array(v) for p, v in flatten(jax.device_get(state.params)).items()}
    losses = []
    for i in range(steps):
        state, metrics = trainer.train_step(state, trainer.global_batch(batch(i)))
        losses.append(float(metrics["loss"]))
    after = {p: np.asarray(v) for p, v in flatten(jax.device_get(state.params)).items()}
    return state, before, after, losses


def assert_same_steps(run, reference, atol: float) -> None:
    """Two `run_steps` results: the same losses and final parameters."""
    (_, _, params, losses), (_, _, ref_params, ref_losses) = run, reference
    np.testing.assert_allclose(losses, ref_losses, rtol=atol)
    for p in ref_params:
        np.testing.assert_allclose(params[p], ref_params[p], atol=atol, rtol=0, err_msg="/".join(p))


# (question_id, image, question, ability, category): one conversation of three turns on 2.png, one of two on
# 4.jpg, and two questions asked alone; abilities a-f all appear.
QUESTIONS = [
    (1, "1.png", "What is drawn here?", "a,b", ["single_turn"]),
    (2, "2.png", "Read the text in the picture.", "a,c", ["single_turn", "multi_turn"]),
    (3, "2.png", "Why is it funny?", "a,b,e,f", ["multi_turn"]),
    (4, "2.png", "Spell the second word.", "a,c,f", ["multi_turn"]),
    (5, "3.png", "Who painted this?", "a,d", ["single_turn"]),
    (6, "4.jpg", "Which city is this?", "a,b,d", ["single_turn", "multi_turn"]),
    (7, "4.jpg", "Why do you think so?", "a,b,e,f", ["multi_turn"]),
]


def make_owleval(folder, questions=QUESTIONS):
    """A tiny OwlEval folder: questions.jsonl and generated images in cases/."""
    rng = np.random.default_rng(0)
    (folder / "cases").mkdir(parents=True)
    for i, name in enumerate(sorted({q[1] for q in questions})):
        pixels = rng.integers(0, 256, (40 + 10 * i, 60 - 5 * i, 3), dtype=np.uint8)
        pixels[5:20, 5:30] = (255, 40 * i, 0)  # a solid block so the images differ in more than noise
        Image.fromarray(pixels).save(folder / "cases" / name)
    with open(folder / "questions.jsonl", "w") as f:
        for qid, image, question, ability, category in questions:
            f.write(
                json.dumps(
                    {"image": image, "question_id": qid, "question": question, "ability": ability, "category": category}
                )
                + "\n"
            )
    return folder


def _png(width: int, height: int, pixel_data: bytes) -> bytes:
    """A PNG file of a width×height 8-bit RGB image whose IDAT chunk holds `pixel_data` (zlib stream)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixel_data) + chunk(b"IEND", b"")


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a width×height RGB image, followed by almost no pixel data."""
    return _png(width, height, zlib.compress(b"\0" * 64))


def solid_png(width: int, height: int, color=(200, 30, 30)) -> bytes:
    """A width×height PNG of one colour, compressed row by row (tiny on disk, large once decoded)."""
    pack = zlib.compressobj(9)
    piece = bytes(color) * min(width, 1 << 18)  # rows are compressed in pieces: a row may be 80 million pixels

    def row():
        yield pack.compress(b"\0")
        for start in range(0, width, len(piece) // 3):
            yield pack.compress(piece[: 3 * min(len(piece) // 3, width - start)])

    return _png(width, height, b"".join(b"".join(row()) for _ in range(height)) + pack.flush())


TINY_TRAINING_CONFIG = pathlib.Path(__file__).parent / "training" / "tiny_config.py"


def tiny_training_config(**changes):
    """The tiny two-stage training config (tests/training/tiny_config.py) with `changes` ({"a.b.c": value})."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_config", TINY_TRAINING_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


# ------------------------------------------------------------------------------------------------
# The BLOOMZ reference fixture (`fixtures/mplug_owl_bloomz_tiny`): its arrays and models loaded once per process.
BLOOMZ = pathlib.Path(__file__).parent / "fixtures" / "mplug_owl_bloomz_tiny"


@functools.cache
def bloomz_reference() -> dict[str, np.ndarray]:
    """Every array of `reference.npz` (tests must not modify them)."""
    with np.load(BLOOMZ / "reference.npz") as data:
        return {k: data[k] for k in data.files}


def bloomz_loss_mask() -> np.ndarray:
    """`(3, 101)`: the three masks the released `forward` multiplies into its loss mask."""
    ref = bloomz_reference()
    return ref["non_padding_mask"] * ref["non_media_mask"] * ref["prompt_mask"]


def bloomz_real_positions() -> np.ndarray:
    """`(3, 102)` boolean: the positions of real (not padding) tokens."""
    return bloomz_reference()["attention_mask"].astype(bool)


def bloomz_images_of(rows) -> np.ndarray:
    """The fixture's images of the given prompt rows, in prompt order (row 0: a; row 1: a, b; row 2: none)."""
    per_row = {0: [0], 1: [1, 2], 2: []}
    return bloomz_reference()["pixel_values"][[i for r in rows for i in per_row[int(r)]]]


@functools.cache
def load_bloomz_model(folder: str = "checkpoint", lora: str | None = None, merge_lora: bool = False):
    """The fixture model in float32, loaded once per argument set (tests must not modify it)."""
    import owl_jax

    model, _ = owl_jax.from_pretrained(
        BLOOMZ / folder,
        lora=None if lora is None else BLOOMZ / lora,
        merge_lora=merge_lora,
        show_progress=False,
    )
    return model


# (question, images, max_new_tokens, stop strings): prompts of 9 to 127 tokens, with 0, 1 or 2 images
INTERLEAVED_QUESTIONS = [
    ("Hi", 0, 5, ()),
    ("What is drawn here? Tell me in detail please, with all the colours you see.", 0, 12, ()),
    ("<image>\nWhat?", 1, 9, ()),
    ("<image>\n<image>\nCompare them.", 2, 20, ("e",)),
    ("A much longer question " * 12, 0, 7, ()),
    ("<image>\nDescribe " + "the picture " * 20, 1, 16, ()),
    ("Count to ten.", 0, 11, ("e",)),
    ("<image>\nand then <image>\nok", 2, 14, ()),
]


def interleaved_requests():
    """The fixture model, its processor and `[(prompt ids (S,), pixel values, max_new_tokens, stop)]` of
    `INTERLEAVED_QUESTIONS`: requests of different lengths, images and stops to run side by side."""
    from PIL import Image

    from owl_jax.data.processor import OwlProcessor

    model = load_fixture_model("checkpoint")
    cfg = model.config
    processor = OwlProcessor(
        FIXTURE / "tokenizer.model", image_size=cfg.vision.image_size, image_tokens=cfg.image_tokens
    )
    images = [Image.open(FIXTURE / "images" / name) for name in ("a.png", "b.png")]
    requests = []
    for question, n_images, max_new, stop in INTERLEAVED_QUESTIONS:
        ids = np.asarray(processor.encode_prompt(f"Human: {question}\nAI: "), np.int32)
        requests.append((ids, processor.preprocess_images(images[:n_images]), max_new, stop))
    return model, processor, requests


def served_fixture(tmp_path_factory):
    """The tiny fixture as a user's folder (its checkpoint with `tokenizer.model`) loaded by
    `owl_jax.from_pretrained`: `(model, processor, folder)`."""
    import owl_jax

    folder = tmp_path_factory.mktemp("model") / "m"
    shutil.copytree(FIXTURE / "checkpoint", folder)
    shutil.copy(FIXTURE / "tokenizer.model", folder / "tokenizer.model")
    model, processor = owl_jax.from_pretrained(folder, show_progress=False)
    return model, processor, folder


@contextlib.contextmanager
def serving(server):
    """`server` (an `OwlServer`) serving on a thread while the block runs, then shut down and closed."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
