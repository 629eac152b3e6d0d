"""Frame sampling and reading against the released video package's outputs (the video fixture)."""

import os
import sys

import av
import numpy as np
import pytest

from owl_jax.data.video import VideoError, decord_available, frame_indices, read_frames

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "mplug_owl_video_tiny")
VIDEOS = [os.path.join(FIXTURE, "videos", name) for name in ("a.mp4", "b.mp4", "a.mp4")]  # reference rows 0, 1, 2
needs_decord = pytest.mark.skipif(
    not decord_available(), reason="decord is not installed (pip install 'owl_jax[video]')"
)


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(os.path.join(FIXTURE, "reference.npz")))


def write_clip(path, frames, codec="mpeg4", rate=8):
    """Encode uint8 RGB frames (T, H, W, 3) with PyAV (T may be 0: a stream without frames)."""
    height, width = frames.shape[1:3]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        container.start_encoding()
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def flat_frames(colours, height=48, width=64):
    """One flat frame per RGB colour: (len(colours), height, width, 3) uint8."""
    frames = np.empty((len(colours), height, width, 3), np.uint8)
    frames[:] = np.asarray(colours, np.uint8).reshape(-1, 1, 1, 3)
    return frames


# ------------------------------------------------------------------------------------------- sampling
def test_frame_indices_match_released(reference):
    for total, indices in zip(reference["video_total_frames"], reference["video_frame_indices"]):
        np.testing.assert_array_equal(frame_indices(int(total), 4), indices)
    # Round half to even: seg = 9 / 4 = 2.25, start 1, round(6.75) = 7 → [1, 3, 5, 8].
    assert frame_indices(10, 4).tolist() == [1, 3, 5, 8]
    assert frame_indices(23, 4).dtype == np.int64


def test_frame_indices_short_videos_repeat_frames():
    # seg = 2 / 4 = 0.5, start 0, round(0.5) = 0 and round(1.5) = 2 → the first frame twice.
    assert frame_indices(3, 4).tolist() == [0, 0, 1, 2]
    assert frame_indices(1, 4).tolist() == [0, 0, 0, 0]
    for total in range(1, 80):
        for num_frames in (2, 4, 8, 16):
            idx = frame_indices(total, num_frames)
            assert idx.min() >= 0 and idx.max() <= total - 1 and (np.diff(idx) >= 0).all(), (total, num_frames)
    with pytest.raises(ValueError, match="total=0"):
        frame_indices(0, 4)


# -------------------------------------------------------------------------------------------- reading
@needs_decord
def test_decord_reads_released_frames(reference):
    for v, path in enumerate(VIDEOS[:2]):
        frames = read_frames(path, 4, backend="decord")
        assert frames.shape == (4, 224, 224, 3) and frames.dtype == np.uint8
        np.testing.assert_array_equal(frames, reference["video_frames"][v])


def test_pyav_reads_close_to_released_frames(reference):
    for v, path in enumerate(VIDEOS[:2]):
        frames = read_frames(path, 4, backend="pyav")
        assert frames.shape == (4, 224, 224, 3) and frames.dtype == np.uint8
        diff = np.abs(frames.astype(np.int16) - reference["video_frames"][v])
        assert diff.mean() <= 1.0, (path, diff.mean())  # 0.48 and 0.66 levels measured


def test_auto_uses_pyav_without_decord(monkeypatch, reference):
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now fails
    assert not decord_available()
    np.testing.assert_array_equal(read_frames(VIDEOS[0], 4), read_frames(VIDEOS[0], 4, backend="pyav"))
    with pytest.raises(VideoError, match="decord is not installed"):
        read_frames(VIDEOS[0], 4, backend="decord")


@pytest.mark.parametrize("backend", [pytest.param("decord", marks=needs_decord), "pyav"])
def test_short_video_repeats_frames(tmp_path, backend):
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    path = write_clip(tmp_path / "three.mp4", flat_frames(colours))
    frames = read_frames(path, 4, backend=backend)  # indices [0, 0, 1, 2]
    assert frames.shape == (4, 224, 224, 3)
    np.testing.assert_array_equal(frames[0], frames[1])
    means = frames.reshape(4, -1, 3).mean(axis=1)
    for got, want in zip(means, [colours[0], colours[0], colours[1], colours[2]]):
        assert np.abs(got - want).max() < 8, (got, want)
    single = read_frames(write_clip(tmp_path / "one.mp4", flat_frames(colours[:1])), 4, backend=backend)
    assert (single == single[0]).all()


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("backend", [pytest.param("decord", marks=needs_decord), "pyav"])
def test_bad_videos_rejected_in_one_line(tmp_path, backend):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 20)
    truncated = tmp_path / "truncated.mp4"
    with open(VIDEOS[0], "rb") as f:
        truncated.write_bytes(f.read()[:20_000])
    empty = write_clip(tmp_path / "empty.avi", flat_frames([]))
    cases = [
        (tmp_path / "missing.mp4", "missing", "no such file"),
        (tmp_path, "unreadable", "not a regular file"),
        (garbage, "unreadable", "not a readable video"),
        (truncated, "unreadable", "not a readable video"),
        (empty, "empty", "has no frames"),
    ]
    for path, reason, words in cases:
        with pytest.raises(VideoError, match=words) as info:
            read_frames(path, 4, backend=backend)
        assert info.value.reason == reason, (path, info.value)
        assert os.path.basename(path) in str(info.value) and "\n" not in str(info.value)


def test_num_frames_below_two_rejected():
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError, match=r"a\.mp4.*num_frames must be an integer of at least 2"):
            read_frames(VIDEOS[0], bad)
    with pytest.raises(ValueError, match="backend"):
        read_frames(VIDEOS[0], 4, backend="ffmpeg")


@pytest.mark.parametrize("backend", ["pyav", pytest.param("decord", marks=needs_decord)])
def test_frames_over_the_pixel_limit_are_refused_before_decoding(backend):
    with pytest.raises(VideoError, match=r"250×166 pixels, more than the limit of 40000") as caught:
        read_frames(VIDEOS[0], 4, backend=backend, max_frame_pixels=40_000)
    assert caught.value.reason == "too_large" and "a.mp4" in str(caught.value)
    assert read_frames(VIDEOS[0], 4, backend=backend, max_frame_pixels=250 * 166).shape == (4, 224, 224, 3)
