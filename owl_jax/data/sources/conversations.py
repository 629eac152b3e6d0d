"""Readers for conversation formats: the released mPLUG-Owl JSONL, LLaVA-Instruct, Alpaca and ShareGPT.

All texts are stripped of surrounding whitespace; the template (`owl_jax.data.prompts`) adds its own
separators when a prompt is built from the turns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from owl_jax.data.prompts import AI, HUMAN, IMAGE_MARKER
from owl_jax.data.sources.common import (
    Outcome,
    Skip,
    build,
    clean_turns,
    guarded,
    iter_jsonl,
    load_images,
    load_json_list,
    turn_problem,
)

_HUMAN_SEP = "\n" + HUMAN
_AI_SEP = "\n" + AI.rstrip()  # "\nAI:"; the space after it may be missing or be a newline (code answers)

# Speaker names seen in ShareGPT/Vicuna/LLaVA dumps, mapped to the two template roles; None = ignored.
ROLES = {
    "human": "human",
    "user": "human",
    "gpt": "ai",
    "assistant": "ai",
    "chatgpt": "ai",
    "bing": "ai",
    "bard": "ai",
    "model": "ai",
    "system": None,
}


class TemplateError(ValueError):
    """A templated conversation string that cannot be split back into turns."""


def parse_mplug_text(text: str) -> tuple[int, list[tuple[str, str]]]:
    """Split a conversation in the released template back into `(number of images, turns)`.

    The layout is `SYSTEM\\nHuman: <image>\\n...Human: q\\nAI: a\\nHuman: q2\\nAI: a2`: the system sentence
    (any text before the first `\\nHuman: `; kept out of the turns), one `Human: <image>` line per image,
    then turns. Turns are split on `\\nHuman: `, and each turn on its first `\\nAI:` (or, failing that, its
    first `AI: `, as the original training code did), so answers may span several lines.

    Raises:
      TemplateError: no `Human: ` line, or a turn without an `AI:` answer marker.
    """
    text = text.replace("\r\n", "\n")
    if text.startswith(HUMAN):
        rest = text[len(HUMAN) :]
    else:
        start = text.find(_HUMAN_SEP)
        if start < 0:
            raise TemplateError(f"no {HUMAN.strip()!r} line in the conversation")
        rest = text[start + len(_HUMAN_SEP) :]
    segments = rest.split(_HUMAN_SEP)
    num_images = 0
    while segments and segments[0].strip() == IMAGE_MARKER:
        num_images += 1
        segments.pop(0)
    turns = []
    for i, segment in enumerate(segments):
        cut = segment.find(_AI_SEP)
        if cut >= 0:
            question, answer = segment[:cut], segment[cut + len(_AI_SEP) :]
        elif AI in segment:
            question, answer = segment.split(AI, 1)
        else:
            raise TemplateError(f"turn {i} ({segment[:40]!r}...) has no {AI.strip()!r} answer")
        turns.append((question, answer))
    return num_images, turns


def mplug_jsonl(path: str, image_root: str | None = None) -> Iterator[Outcome]:
    """Examples from the released mPLUG-Owl instruction JSONL.

    Each line is `{"image": ["a.jpg", ...], "text": "<templated conversation>", "task_type": "llava_sft"}`;
    text-only lines have no `image` key or an empty list. The number of `Human: <image>` lines must match the
    number of images. Image names are relative to `image_root` (default: the JSONL's folder).
    """
    name = os.path.basename(path)
    for item, lineno, obj in iter_jsonl(path):
        if isinstance(obj, Skip):
            yield obj
            continue
        yield from guarded(item, lambda: _mplug_item(obj, item, f"{name}:{lineno}", path, image_root))


def _mplug_item(obj: object, item: str, example_id: str, path: str, image_root: str | None) -> Iterator[Outcome]:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        yield Skip("malformed_item", item, "expected an object with a 'text' string")
        return
    images = obj.get("image") or []
    if isinstance(images, str):
        images = [images]
    try:
        num_markers, turns = parse_mplug_text(obj["text"])
    except TemplateError as e:
        yield Skip("bad_template", item, str(e))
        return
    if num_markers != len(images):
        yield Skip("image_count_mismatch", item, f"{num_markers} 'Human: <image>' lines but {len(images)} images")
        return
    # A `question_type` (held-out sets) names the group an evaluation reports; else the released task type.
    source = next((obj[k] for k in ("question_type", "task_type") if isinstance(obj.get(k), str)), "mplug_jsonl")
    yield _example(turns, images, item, path, image_root, id=example_id, source=source)


def _example(
    turns: list[tuple[str, str]], images: list, item: str, path: str, image_root: str | None, *, id: str, source: str
) -> Outcome:
    """Cleaned turns and loaded images → the example, or the Skip that says why not."""
    turns = clean_turns(turns)
    problem = turn_problem(turns, item)
    if problem:
        return problem
    loaded = load_images(images, item, image_root=image_root, input_path=path)
    if isinstance(loaded, Skip):
        return loaded
    return build(turns, loaded, "multimodal" if loaded else "text", id=id, source=source, item=item)


def pair_messages(messages: object, item: str) -> list[tuple[str, str]] | Skip:
    """Pair a `[{"from": ..., "value": ...}, ...]` message list into `(human, ai)` turns.

    "system" messages are ignored. Leading assistant messages (a greeting scraped before the first
    question; there is nothing to pair them with) and a trailing unanswered human message are dropped.
    Anything else that does not alternate human/ai is skipped as "non_alternating".
    """
    if not isinstance(messages, list):
        return Skip("malformed_item", item, "'conversations' is not a list")
    kept: list[tuple[str, str, int]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            return Skip("malformed_item", item, f"message {index} is not an object with a 'value' string")
        speaker = str(message.get("from", "")).lower()
        if speaker not in ROLES:
            return Skip("unknown_role", item, f"message {index} is from {message.get('from')!r}")
        if ROLES[speaker] is not None:
            kept.append((ROLES[speaker], message["value"], index))
    while kept and kept[0][0] == "ai":
        kept.pop(0)
    if kept and kept[-1][0] == "human":
        kept.pop()
    if not kept:
        return Skip("empty_conversation", item, "no human message followed by an answer")
    for position, (role, _, index) in enumerate(kept):
        expected = "human" if position % 2 == 0 else "ai"
        if role != expected:
            return Skip("non_alternating", item, f"message {index} is a second {role} message in a row")
    return [(kept[i][1], kept[i + 1][1]) for i in range(0, len(kept), 2)]


def _strip_image_marker(text: str) -> str:
    """Remove one `<image>` marker with the line break that set it apart (LLaVA writes `<image>\\nQ` or
    `Q\\n<image>`); the image gets its own `Human: <image>` line instead."""
    for variant in (IMAGE_MARKER + "\n", "\n" + IMAGE_MARKER, IMAGE_MARKER):
        if variant in text:
            return text.replace(variant, "", 1)
    return text


def llava_json(path: str, image_root: str | None = None) -> Iterator[Outcome]:
    """Examples from LLaVA-Instruct JSON: a list of `{"id", "image", "conversations": [...]}`.

    Items without an `image` are text examples. The `<image>` marker is removed from the human text; an
    item with an image but no marker is accepted (the image goes first either way), while markers without
    an image, or more than one marker, are skipped as "image_count_mismatch".
    """
    yield from _json_list_items(
        path, lambda obj, item, example_id: _llava_item(obj, item, example_id, path, image_root)
    )


def _llava_item(obj: object, item: str, fallback_id: str, path: str, image_root: str | None) -> Iterator[Outcome]:
    if not isinstance(obj, dict):
        yield Skip("malformed_item", item, "expected an object")
        return
    turns = pair_messages(obj.get("conversations"), item)
    if isinstance(turns, Skip):
        yield turns
        return
    images = [obj["image"]] if obj.get("image") else []
    markers = sum(q.count(IMAGE_MARKER) + a.count(IMAGE_MARKER) for q, a in turns)
    if markers > len(images) or (images and markers > 1):
        yield Skip("image_count_mismatch", item, f"{markers} {IMAGE_MARKER} markers for {len(images)} images")
        return
    if markers:
        # The marker normally opens the first question; strip it from whichever question holds it.
        at = next((i for i, (q, _) in enumerate(turns) if IMAGE_MARKER in q), None)
        if at is not None:
            turns = turns[:at] + [(_strip_image_marker(turns[at][0]), turns[at][1])] + turns[at + 1 :]
    example_id = str(obj["id"]) if obj.get("id") is not None else fallback_id
    yield _example(turns, images, item, path, image_root, id=example_id, source="llava")


def _json_list_items(path: str, handle) -> Iterator[Outcome]:
    """`handle(obj, item, example_id)` for every element of a JSON list file, errors turned into skips."""
    name = os.path.basename(path)
    for index, obj in enumerate(load_json_list(path)):
        item = f"{path}[{index}]"
        yield from guarded(item, lambda: handle(obj, item, f"{name}[{index}]"))


def alpaca_json(path: str) -> Iterator[Outcome]:
    """Text examples from Alpaca-style JSON: a list of `{"instruction", "input", "output"}`.

    One turn: the human side is the instruction, plus a line break and the input when there is one.
    """
    yield from _json_list_items(path, _alpaca_item)


def _alpaca_item(obj: object, item: str, example_id: str) -> Iterator[Outcome]:
    if not isinstance(obj, dict):
        yield Skip("malformed_item", item, "expected an object")
        return
    fields = {k: obj.get(k) or "" for k in ("instruction", "input", "output")}
    if not all(isinstance(v, str) for v in fields.values()):
        yield Skip("malformed_item", item, "'instruction', 'input' and 'output' must be strings")
        return
    human = "\n".join(part for part in (fields["instruction"].strip(), fields["input"].strip()) if part)
    turns = clean_turns([(human, fields["output"])])
    yield turn_problem(turns, item) or build(turns, [], "text", id=example_id, source="alpaca", item=item)


def sharegpt_json(path: str) -> Iterator[Outcome]:
    """Text examples from ShareGPT/Vicuna JSON: a list of `{"id", "conversations": [{"from", "value"}]}`.

    Speakers "human"/"user" and "gpt"/"assistant"/"chatgpt"/"bing"/"bard"/"model" are mapped to the two
    roles and "system" is ignored; see `pair_messages` for what is dropped and what is skipped.
    """
    yield from _json_list_items(path, _sharegpt_item)


def _sharegpt_item(obj: object, item: str, fallback_id: str) -> Iterator[Outcome]:
    if not isinstance(obj, dict):
        yield Skip("malformed_item", item, "expected an object")
        return
    turns = pair_messages(obj.get("conversations"), item)
    if isinstance(turns, Skip):
        yield turns
        return
    turns = clean_turns(turns)
    example_id = str(obj["id"]) if obj.get("id") is not None else fallback_id
    yield turn_problem(turns, item) or build(turns, [], "text", id=example_id, source="sharegpt", item=item)
