"""Training rows see each layout's images as its processor does at inference: the image layout squashes them,
the video layout resizes the shortest edge and crops the centre."""

import io

import numpy as np
import pytest
from PIL import Image

from helpers import BLOOMZ
from owl_jax.data.pipeline import ExampleTransform, PipelineSpec
from owl_jax.data.processor import OwlProcessor
from owl_jax.data.records import Example


def wide_png() -> bytes:
    """A 60×30 image whose left and right thirds differ from its middle: a crop and a squash see it apart."""
    pixels = np.zeros((30, 60, 3), np.uint8)
    pixels[:, :20] = (250, 0, 0)
    pixels[:, 20:40] = np.arange(20, dtype=np.uint8)[None, :, None] * 12
    pixels[:, 40:] = (0, 0, 250)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("layout, resize", [("image", "squash"), ("video", "shortest_edge_crop")])
def test_rows_get_the_pixels_of_their_layouts_processor(layout, resize):
    spec = PipelineSpec(seq_len=64, max_images=1, image_size=28, image_tokens=3, resize=resize)
    image = wide_png()
    row = ExampleTransform(spec, str(BLOOMZ))(Example(turns=[("Which colour?", "red")], images=[image]).to_bytes())
    processor = OwlProcessor(BLOOMZ, image_size=28, image_tokens=3, layout=layout)
    expected = processor.preprocess_images([Image.open(io.BytesIO(image))])[0]
    assert row["skipped"] == 0 and row["image_mask"][0] == 1
    np.testing.assert_array_equal(row["pixel_values"][0], expected)
