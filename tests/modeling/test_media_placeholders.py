"""Images (-1 runs) and videos (-2 runs) in one batch: each run takes the next medium of its kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from owl_jax.modeling.owl import VIDEO_PLACEHOLDER, check_media_placeholders, merge_media_embeddings


def test_each_kind_is_consumed_in_prompt_order_across_the_batch():
    ids = jnp.array([[5, -2, -2, -1, -1, 7], [-1, -1, 9, -2, -2, 3], [-2, -2, 8, -2, -2, 4]])
    text = jnp.zeros((3, 6, 1))
    images = jnp.arange(1, 5, dtype=jnp.float32).reshape(2, 2, 1)  # image r holds 2r+1, 2r+2
    videos = 10 + jnp.arange(1, 9, dtype=jnp.float32).reshape(4, 2, 1)  # video r holds 11+2r, 12+2r
    out = merge_media_embeddings(text, ids, images)  # images only: the -2 runs are left alone
    out = jax.jit(lambda t, i, v: merge_media_embeddings(t, i, v, placeholder=VIDEO_PLACEHOLDER))(out, ids, videos)
    np.testing.assert_array_equal(
        out[..., 0],
        [[0, 11, 12, 1, 2, 0], [3, 4, 0, 13, 14, 0], [15, 16, 0, 17, 18, 0]],  # row 2 shows two videos
    )


def test_placeholder_checks_for_both_kinds():
    ids = np.array([[1, -1, -1, -1, 5, -2, -2, -2], [1, -2, -2, -2, -1, -1, -1, 2]])
    check_media_placeholders(ids, 3, num_images=2, num_videos=2)
    with pytest.raises(ValueError, match="2 video placeholder runs but video_pixel_values has 1 videos"):
        check_media_placeholders(ids, 3, num_images=2, num_videos=1)
    with pytest.raises(ValueError, match="2 image placeholder runs but pixel_values has 3 images"):
        check_media_placeholders(ids, 3, num_images=3, num_videos=2)
    adjacent = np.array([[1, -2, -2, -2, -2, -2, -2, 2]])
    with pytest.raises(ValueError, match=r"run of 6 video placeholders at position 1.*<\|video\|><\|video\|>"):
        check_media_placeholders(adjacent, 3, num_images=0, num_videos=2)
    with pytest.raises(ValueError, match="placeholder id -3 at position 2; only -1"):
        check_media_placeholders(np.array([[1, 2, -3, 4]]), 3, num_images=0)
