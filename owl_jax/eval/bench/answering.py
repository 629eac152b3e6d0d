"""Answer a batch of benchmark items with a model: the released template, batched generation, data parallel.

Every item's question goes into the mPLUG-Owl template with its one image (`build_prompt(question,
num_images=1)`), and a batch of them is decoded together by one `Generator` (greedy unless the config asks
for beam search; EOS ends a row). On a mesh, the generator shards the batch over the mesh's `data` and `fsdp`
axes (the `batch` rule of `owl_jax.sharding`); a batch is padded to its full size with copies of its last
item, so every batch has the same shape (one compiled program) and divides evenly over the devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from owl_jax.data.prompts import build_prompt
from owl_jax.eval.bench.tasks import Item

if TYPE_CHECKING:
    import jax

    from owl_jax.inference.generate import GenerationConfig, Generator


def batch_rows(batch_size: int, mesh: jax.sharding.Mesh | None) -> int:
    """`batch_size` rounded up to a multiple of the devices the batch is split over (mesh `data` x `fsdp`)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    split = 1 if mesh is None else int(dict(mesh.shape).get("data", 1) * dict(mesh.shape).get("fsdp", 1))
    return -(-batch_size // split) * split


class BatchAnswerer:
    """Answers items `rows` at a time with one generator (its compiled steps are reused by every batch).

    Args:
      model, processor: from `owl_jax.from_pretrained`.
      config: decoding options; its EOS, BOS and padding ids should be the processor's.
      rows: the batch size every batch is padded to (`batch_rows`).
      mesh: the mesh the model was loaded on, or None for one device.
      generator: a `Generator` for `model` to reuse.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        config: GenerationConfig,
        rows: int,
        mesh: jax.sharding.Mesh | None = None,
        generator: Generator | None = None,
    ):
        from owl_jax.inference.generate import Generator

        self.processor, self.config, self.rows = processor, config.validate(), rows
        self.generator = generator or Generator(model, mesh=mesh)

    def __call__(self, items: Sequence[Item]) -> list[str]:
        """The answer text of each item (EOS dropped, surrounding whitespace stripped), in order."""
        if not 0 < len(items) <= self.rows:
            raise ValueError(f"a batch holds 1 to {self.rows} items, got {len(items)}")
        padded = list(items) + [items[-1]] * (self.rows - len(items))
        prompts = [build_prompt(item.question, num_images=1) for item in padded]
        images = [item.image if isinstance(item.image, str) else item.image() for item in padded]
        inputs = self.processor(prompts, images=images)
        out = self.generator.generate(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["pixel_values"],
            self.config,
            inputs.get("video_pixel_values"),
            decode=self.processor.decode,
        )
        return [text.strip() for text in out.texts[: len(items)]]
