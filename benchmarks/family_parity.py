"""Max |Δ| of owl_jax against a released-code reference fixture, in float32, from each checkpoint folder.

    python -m benchmarks.family_parity tests/fixtures/mplug_owl_bloomz_tiny tests/fixtures/mplug_owl_video_tiny
    python -m benchmarks.family_parity --dtype bfloat16 tests/fixtures/mplug_owl_bloomz_tiny ...

Prints, per fixture and folder (`checkpoint`, `checkpoint-sharded`): the ViT features, the abstractor output
and the logits at real positions, and for the video layout the videos' ViT features and abstractor output.
The tests hold these to their tolerances; this prints the numbers docs quote. `--dtype bfloat16` loads and
computes in bf16 (the reference stays the released float32 run) and adds the mean logit difference.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

import owl_jax


def max_diff(ours, reference) -> float:
    ours = np.asarray(ours)
    return float(np.abs(ours.reshape(reference.shape) - reference).max())


def report(fixture: pathlib.Path, folder: str, dtype: str = "float32") -> str:
    ref = dict(np.load(fixture / "reference.npz"))
    model, _ = owl_jax.from_pretrained(fixture / folder, dtype=dtype, show_progress=False)
    videos = {"video_pixel_values": ref["video_pixel_values"]} if "video_pixel_values" in ref else {}
    logits = np.asarray(model(ref["pixel_values"], ref["input_ids"], ref["attention_mask"], **videos))
    real = ref["attention_mask"].astype(bool)
    parts = [
        f"vision {max_diff(model.vision_features(ref['pixel_values']), ref['vision_last_hidden_state']):.2e}",
        f"abstractor {max_diff(model.encode_images(ref['pixel_values']), ref['abstractor_output']):.2e}",
        f"logits {float(np.abs(logits - ref['logits'])[real].max()):.2e}",
    ]
    if dtype != "float32":
        parts.append(f"mean logits {float(np.abs(logits - ref['logits'])[real].mean()):.2e}")
    if videos:
        pixels = ref["video_pixel_values"]
        frames = max_diff(model.vision_features(pixels), ref["video_vision_last_hidden_state"])
        parts.append(f"video vision {frames:.2e}")
        parts.append(f"video abstractor {max_diff(model.encode_videos(pixels), ref['video_abstractor_output']):.2e}")
    return f"{fixture.name} {folder}: " + ", ".join(parts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.family_parity", description=__doc__.split("\n")[0])
    parser.add_argument("fixtures", nargs="+", help="fixture folders (with checkpoint/ and reference.npz)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    for fixture in map(pathlib.Path, args.fixtures):
        for folder in ("checkpoint", "checkpoint-sharded"):
            print(report(fixture, folder, args.dtype), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
