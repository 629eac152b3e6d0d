"""Source readers: each turns one input format into `Example`s, or `Skip`s for the items it cannot use.

    for outcome in sources.llava_json("llava_instruct_150k.json", image_root="coco/train2014"):
        ...  # an Example, or a Skip(reason, item, detail)

Images are kept as their original file bytes but checked here (PIL `verify()` plus a pixel-count limit),
so training never meets a file that cannot be opened. `owl_jax.data.prepare` drives these readers.
"""

from owl_jax.data.sources.captions import captions, tfds_captions, webdataset
from owl_jax.data.sources.common import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    ImageProblem,
    Outcome,
    Skip,
    SourceError,
    check_image_bytes,
    read_image_file,
)
from owl_jax.data.sources.conversations import (
    ROLES,
    TemplateError,
    alpaca_json,
    llava_json,
    mplug_jsonl,
    pair_messages,
    parse_mplug_text,
    sharegpt_json,
)

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "ROLES",
    "ImageProblem",
    "Outcome",
    "Skip",
    "SourceError",
    "TemplateError",
    "alpaca_json",
    "captions",
    "check_image_bytes",
    "llava_json",
    "mplug_jsonl",
    "pair_messages",
    "parse_mplug_text",
    "read_image_file",
    "sharegpt_json",
    "tfds_captions",
    "webdataset",
]
