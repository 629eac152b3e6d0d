"""Image decoding within a memory budget (`owl_jax.data.images`): exact where the image is small, shrunk
while decoding where it is large, refused from its header where it would not fit, and never anything but
an RGB image or an ImageError, whatever the bytes (a property-based campaign over every format Pillow
writes, mutated)."""

import io
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st
from PIL import Image

import hostile
from helpers import png_claiming, solid_png
from owl_jax.data import images, sources
from owl_jax.data.images import DecodeLimiter, ImageBudget, ImageError, check_image, decode_image
from owl_jax.serve.errors import ApiError
from owl_jax.serve.images import load_image_url

pytestmark = pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning")
Image.init()
RNG = np.random.default_rng(0)
BASE = Image.fromarray(RNG.integers(0, 255, (23, 37, 3), dtype=np.uint8))


def _writable_formats() -> dict[str, bytes]:
    """Every format Pillow can both write and read here, as one small encoded image each."""
    encoded = {}
    for fmt in sorted(set(Image.SAVE) & set(Image.OPEN)):
        for mode in ("RGB", "RGBA", "L", "P", "1"):
            buffer = io.BytesIO()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # Pillow's IM format is deprecated
                    BASE.convert(mode).save(buffer, fmt)
                    Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
            except Exception:  # this mode (or the format's codec) is not available for this format
                continue
            encoded[fmt] = buffer.getvalue()
            break
    return encoded


ENCODED = _writable_formats()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_the_common_formats_are_covered():
    assert {"PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"} <= set(ENCODED)


@pytest.mark.parametrize("fmt", sorted(ENCODED))
def test_images_within_the_working_size_decode_exactly(fmt):
    data = ENCODED[fmt]
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(decode_image(data, name=fmt)), expected)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_larger_images_are_box_reduced_without_a_full_size_rgb_copy(mode):
    pixels = RNG.integers(0, 255, (130, 301, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels).convert(mode), "PNG")
    budget = ImageBudget(working_side=64)
    got = decode_image(data, budget)
    assert got.mode == "RGB" and got.size == (61, 26)  # one factor, ceil(301 / 64) = 5, on both axes
    np.testing.assert_array_equal(np.asarray(got), np.asarray(Image.open(io.BytesIO(data)).convert("RGB").reduce(5)))


def test_large_jpegs_decode_at_a_reduced_scale():
    data = encode(BASE.resize((1000, 700)), "JPEG")
    plan = check_image(data, ImageBudget(working_side=300))
    assert (plan.draft, plan.reduce) == (4, 1) and plan.working_size == (250, 175)
    got = decode_image(data, ImageBudget(working_side=300))
    assert got.size == (250, 175) and got.mode == "RGB"
    assert np.abs(np.asarray(got, np.int16) - np.asarray(BASE.resize((250, 175)), np.int16)).mean() < 12


@pytest.mark.parametrize(
    "size, words",
    [((30000, 30000), "max_image_pixels=89478485"), ((80_000_000, 1), "MiB to decode"), ((1, 80_000_000), "MiB")],
)
def test_huge_headers_are_refused_before_decoding(size, words):
    data = png_claiming(*size)
    start = time.perf_counter()
    for check in (check_image, decode_image):
        with pytest.raises(ImageError, match=words) as info:
            check(data, name="huge.png")
        assert info.value.reason == "too_large" and "huge.png" in str(info.value)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ApiError) as info:  # the server answers 413, not 500
        load_image_url("data:image/png;base64," + __import__("base64").b64encode(data).decode(), **SERVER)
    assert info.value.status == 413


SERVER = dict(allow_local_files=True, max_pixels=ImageBudget().max_pixels)


def test_unreadable_sources_name_the_image(tmp_path):
    cases = {
        "missing": str(tmp_path / "nowhere.png"),
        "unreadable": str(tmp_path),
    }
    for reason, path in cases.items():
        with pytest.raises(ImageError, match="nowhere.png" if reason == "missing" else "folder") as info:
            decode_image(path)
        assert info.value.reason == reason
    for data in (b"", b"not an image", ENCODED["PNG"][: len(ENCODED["PNG"]) // 2]):
        with pytest.raises(ImageError) as info:
            decode_image(data, name="part.png")
        assert info.value.reason == "corrupt" and "part.png" in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_error_of(lambda: decode_image(str(fifo)))), daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert outcome and outcome[0].reason == "unreadable" and "not a regular file" in str(outcome[0])
    with pytest.raises(ApiError) as info:
        load_image_url(f"file://{fifo}", **SERVER)
    assert info.value.status == 400


def _error_of(call):
    try:
        call()
    except ImageError as e:
        return e
    raise AssertionError("no ImageError")


def test_the_limiter_makes_large_decodes_wait_for_each_other():
    limiter = DecodeLimiter(100)
    first_in, second_in, release = threading.Event(), threading.Event(), threading.Event()

    def hold(entered, nbytes):
        with limiter.reserve(nbytes):
            entered.set()
            release.wait(5)

    threads = [threading.Thread(target=hold, args=(first_in, 60)), threading.Thread(target=hold, args=(second_in, 60))]
    threads[0].start()
    assert first_in.wait(5)
    threads[1].start()
    assert not second_in.wait(0.2)  # 60 + 60 > 100: the second waits
    with limiter.reserve(40):  # a small decode still fits beside the first
        pass
    release.set()
    assert second_in.wait(5)
    for t in threads:
        t.join(5)
    assert limiter._free == 100


MEMORY_SCRIPT = """
import resource, sys, threading
sys.path.insert(0, {tests!r})
from helpers import solid_png
from owl_jax.data.images import decode_image
data = solid_png(9400, 9400)  # 280 kB on disk, 9400x9400 RGB
idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = []
threads = [threading.Thread(target=lambda: out.append(decode_image(data).size)) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(out, (peak - idle) // 1024)
"""


def test_three_concurrent_9400_pixel_pngs_stay_within_the_decode_budget():
    script = textwrap.dedent(MEMORY_SCRIPT).format(tests=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    sizes, above_idle_mib = result.stdout.rsplit(" ", 1)
    assert sizes == str([(3134, 3134)] * 3)
    # Each decode holds about 390 MiB at its peak; the budget (512 MiB) lets only one run at a time.
    assert int(above_idle_mib) < ImageBudget().decode_bytes >> 20, result.stdout


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["flip", "truncate", "insert", "big"]), st.floats(0, 1), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        at = int(where * max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[at] ^= value or 1
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes([value]) * 4
        elif kind == "big" and len(out) >= 4:  # a size field grown huge, wherever it may be
            out[at : at + 4] = b"\x7f\xff\xff\xff"
    return bytes(out)


@pytest.mark.hostile
@hostile.examples(short=60, long=3000)
@hypothesis.given(fmt=st.sampled_from(sorted(ENCODED)), mutations=MUTATIONS)
def test_mutated_images_decode_or_fail_cleanly(fmt, mutations):
    data = mutate(ENCODED[fmt], mutations)
    budget = ImageBudget(working_side=32)
    try:
        plan = check_image(data, budget)
    except ImageError as e:
        assert e.reason in ("corrupt", "too_large")
        plan = None
    try:
        image = decode_image(data, budget)
    except ImageError as e:
        # An image the check accepted never fails for its size later (what `prepare` relies on).
        assert e.reason == "corrupt" or plan is None, e
        return
    assert image.mode == "RGB" and max(image.size) <= 32


def test_prepare_refuses_what_training_could_not_decode():
    with pytest.raises(sources.ImageProblem) as info:
        sources.check_image_bytes(solid_png(80_000_000, 1), "wide.png")
    assert info.value.reason == "image_too_large" and "wide.png" in info.value.detail


def test_the_budget_names_a_bad_limit():
    with pytest.raises(ValueError, match="working_side"):
        ImageBudget(working_side=0)
    assert images.shared_limiter(1234) is images.shared_limiter(1234)
