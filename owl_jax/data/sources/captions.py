"""Readers for image-caption pairs (stage 1): caption files, webdataset tar shards and TFDS datasets.

Every caption becomes one "caption" example with a single turn `("", caption)`. Where an image has several
captions (COCO-style lists), each caption becomes its own example carrying the same image.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence

from owl_jax.data.sources.common import (
    ImageProblem,
    Outcome,
    Skip,
    SourceError,
    build,
    check_image_bytes,
    clean_turns,
    guarded,
    iter_jsonl,
    load_images,
    require_file,
    text_list,
    turn_problem,
)

IMAGE_KEYS = ("image", "filepath", "file_name")
CAPTION_KEYS = ("caption", "text")
# Member extensions taken as the image of a webdataset sample, in order of preference.
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def _caption_examples(captions: list[str], image: bytes, *, id: str, source: str, item: str) -> Iterator[Outcome]:
    for j, caption in enumerate(captions):
        turns = clean_turns([("", caption)])
        example_id = id if len(captions) == 1 else f"{id}#{j}"
        yield turn_problem(turns, item) or build(turns, [image], "caption", id=example_id, source=source, item=item)


def _first_key(row: dict, keys: Sequence[str]) -> str | None:
    return next((k for k in keys if row.get(k) not in (None, "")), None)


def captions(path: str, image_root: str | None = None) -> Iterator[Outcome]:
    """Caption examples from a JSONL or CSV/TSV file of image-caption pairs.

    JSONL lines are `{"image": "a.jpg", "caption": "..."}` (`file_name`/`filepath` and `text` are accepted
    too; the caption may be a list of strings). CSV/TSV files (by extension) need a header with an image
    column (`image`, `filepath` or `file_name`) and a caption column (`caption` or `text`). Image names are
    relative to `image_root` (default: the caption file's folder).
    """
    name = os.path.basename(path)
    if path.lower().endswith((".csv", ".tsv")):
        rows = _csv_rows(path)
    else:
        rows = ((item, f"{name}:{lineno}", obj) for item, lineno, obj in iter_jsonl(path))
    for item, example_id, row in rows:
        if isinstance(row, Skip):
            yield row
            continue
        yield from guarded(item, lambda: _caption_row(row, item, example_id, path, image_root))


def _csv_rows(path: str) -> Iterator[tuple[str, str, dict]]:
    require_file(path)
    name = os.path.basename(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
        columns = reader.fieldnames or []
        if not any(k in columns for k in IMAGE_KEYS) or not any(k in columns for k in CAPTION_KEYS):
            raise SourceError(
                f"{path}: the header needs an image column (one of {', '.join(IMAGE_KEYS)}) and a "
                f"caption column (one of {', '.join(CAPTION_KEYS)}); it has {columns}"
            )
        # Line numbers count the header as line 1, so they match what an editor shows.
        for lineno, row in enumerate(reader, start=2):
            yield f"{path}:{lineno}", f"{name}:{lineno}", row


def _caption_row(row: object, item: str, example_id: str, path: str, image_root: str | None) -> Iterator[Outcome]:
    if not isinstance(row, dict):
        yield Skip("malformed_item", item, "expected an object")
        return
    image_key, caption_key = _first_key(row, IMAGE_KEYS), _first_key(row, CAPTION_KEYS)
    if image_key is None:
        yield Skip("missing_image", item, f"no image name (looked for {', '.join(IMAGE_KEYS)})")
        return
    texts = text_list(row[caption_key]) if caption_key else None
    if not texts:
        yield Skip("missing_caption", item, f"no caption text (looked for {', '.join(CAPTION_KEYS)})")
        return
    loaded = load_images([row[image_key]], item, image_root=image_root, input_path=path)
    if isinstance(loaded, Skip):
        yield loaded
        return
    yield from _caption_examples(texts, loaded[0], id=example_id, source="captions", item=item)


def _tar_paths(paths: Sequence[str]) -> list[str]:
    """Input paths with folders expanded to the `.tar` files inside them, in name order."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            tars = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar"))
            if not tars:
                raise SourceError(f"folder {path} holds no .tar shards")
            found.extend(tars)
        else:
            require_file(path)
            found.append(path)
    return found


def webdataset(paths: Sequence[str] | str) -> Iterator[Outcome]:
    """Caption examples from webdataset tar shards as img2dataset writes them.

    Members sharing a key (the name up to its first dot, e.g. `000000001.jpg`, `000000001.txt`,
    `000000001.json`) form one sample: the image, and the caption from the `.txt` member or else the
    `caption`/`text` field of the `.json` member. Shards are streamed, never unpacked. A shard that ends
    early (an interrupted download) keeps the samples read so far and counts one "truncated_archive" skip
    (the samples it lost cannot be counted).
    """
    for tar_path in _tar_paths([paths] if isinstance(paths, str) else paths):
        name = os.path.basename(tar_path)
        try:
            for key, members in _tar_samples(tar_path):
                item = f"{tar_path}:{key}"
                yield from guarded(item, lambda: _wds_sample(members, item, f"{name}:{key}"))
        except (tarfile.TarError, EOFError, OSError) as e:
            yield Skip("truncated_archive", tar_path, f"{tar_path}: stopped reading ({type(e).__name__}: {e})")
            continue
        if not _tar_has_end_marker(tar_path):
            yield Skip(
                "truncated_archive",
                tar_path,
                f"{tar_path}: no end-of-archive marker; the file was cut short "
                f"and samples after its last complete header were lost",
            )


def _tar_has_end_marker(tar_path: str) -> bool:
    """Whether an uncompressed tar ends in the two zero blocks every writer puts there.

    `tarfile` silently treats a header cut short as the end of the archive, so without this check an
    interrupted download would lose its remaining samples unnoticed. Compressed shards need no check:
    their decompressor raises on a truncated stream.
    """
    with open(tar_path, "rb") as f:
        if f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
            return True
        size = f.seek(0, os.SEEK_END)
        if size < 1024 or size % 512:
            return False
        f.seek(size - 1024)
        return not f.read(1024).strip(b"\0")


def _tar_samples(tar_path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """`(key, {extension: bytes})` per sample, grouping consecutive members with the same key."""
    key, members = None, {}
    # "r|*": stream the archive front to back, which is how webdataset shards are meant to be read.
    with tarfile.open(tar_path, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, base = os.path.split(member.name)
            if "." not in base or base.startswith("."):
                continue
            stem, ext = base.split(".", 1)
            member_key = os.path.join(folder, stem)
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            members[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield key, members


def _wds_sample(members: dict[str, bytes], item: str, example_id: str) -> Iterator[Outcome]:
    ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
    if ext is None:
        yield Skip("missing_image", item, f"no image member (has {sorted(members)})")
        return
    texts = None
    if "txt" in members:
        texts = [members["txt"].decode("utf-8")]
    elif "json" in members:
        meta = json.loads(members["json"].decode("utf-8"))
        key = _first_key(meta, CAPTION_KEYS) if isinstance(meta, dict) else None
        texts = text_list(meta[key]) if key else None
    if not texts:
        yield Skip("missing_caption", item, "no .txt member and no caption in the .json member")
        return
    try:
        check_image_bytes(members[ext], f"{item}.{ext}")
    except ImageProblem as p:
        yield Skip(p.reason, item, p.detail)
        return
    yield from _caption_examples(texts, members[ext], id=example_id, source="webdataset", item=item)


def _lookup(tree: object, key: str) -> object:
    """`tree["a"]["b"]` for the key "a/b" (nested TFDS features and records)."""
    for part in key.split("/"):
        if hasattr(tree, "feature") and not hasattr(tree, "keys"):  # a tfds Sequence of a FeaturesDict
            tree = tree.feature
        tree = tree[part]
    return tree


def _png(array: object, item: str) -> bytes:
    """Encode a decoded image array as PNG (lossless, so no quality is lost re-encoding)."""
    import numpy as np
    from PIL import Image

    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3, 4)):
        raise ImageProblem(
            "corrupt_image",
            f"{item}: cannot encode an array of shape {array.shape} and dtype {array.dtype} as an image",
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def tfds_captions(
    name: str, split: str = "train", data_dir: str | None = None, image_key: str = "image", caption_key: str = "caption"
) -> Iterator[Outcome]:
    """Caption examples from a TFDS dataset already prepared in ArrayRecord format.

    Read through `tfds.data_source` (random access over ArrayRecord, no TensorFlow) with downloading turned
    off, so this never touches the network. Keys may be nested ("captions/text"). An `Image` feature is
    read undecoded, keeping its original encoding; any other image value (a uint8 array) is encoded as PNG.
    """
    import tensorflow_datasets as tfds

    def open_source(**kwargs):
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False, **kwargs)

    try:
        source = open_source()
        features = source.dataset_info.features
    except Exception as e:  # tfds raises assorted types for a dataset that is absent or not prepared
        first_line = str(e).strip().split("\n", 1)[0]  # tfds appends a list of every dataset it knows
        raise SourceError(
            f"cannot open TFDS dataset {name!r} split {split!r} in {data_dir or 'the default data_dir'}"
            f" ({type(e).__name__}: {first_line}); it must already be prepared in ArrayRecord format"
        ) from None
    try:
        image_feature = _lookup(features, image_key)
        _lookup(features, caption_key)
    except (KeyError, TypeError) as e:
        raise SourceError(f"TFDS dataset {name!r} has no feature {e}; its features are {features}") from None
    if isinstance(image_feature, tfds.features.Image):
        decoders: dict = tfds.decode.SkipDecoding()
        for part in reversed(image_key.split("/")):
            decoders = {part: decoders}
        source = open_source(decoders=decoders)
    for index in range(len(source)):
        item = f"tfds:{name}/{split}[{index}]"
        yield from guarded(item, lambda: _tfds_record(source, index, image_key, caption_key, item, name))


def _tfds_record(source, index: int, image_key: str, caption_key: str, item: str, name: str) -> Iterator[Outcome]:
    import numpy as np

    record = source[index]
    image, caption = _lookup(record, image_key), _lookup(record, caption_key)
    texts = text_list(caption.tolist() if isinstance(caption, np.ndarray) else caption)
    if not texts:
        yield Skip("missing_caption", item, f"{caption_key!r} holds no text")
        return
    try:
        data = image if isinstance(image, bytes) else _png(image, item)
        check_image_bytes(data, item)
    except ImageProblem as p:
        yield Skip(p.reason, item, p.detail)
        return
    yield from _caption_examples(texts, data, id=f"{name}/{index}", source=f"tfds:{name}", item=item)
