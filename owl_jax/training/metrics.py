"""Training metrics: JSON lines and TensorBoard event files (written by process 0 only).

The folder may be local or remote (`gs://...`, `owl_jax.paths`). A local `metrics.jsonl` is appended to;
an object store cannot append, so there the file is rewritten whole (earlier lines included) at each write.
TensorBoard event files go through tensorboardX, which writes `gs://` and `s3://` folders itself.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax

from owl_jax.paths import as_path, is_remote


class MetricsWriter:
    def __init__(self, directory: str | os.PathLike, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        directory = as_path(directory)
        self._path = directory / "metrics.jsonl"
        if is_remote(directory):
            self._jsonl = None
            self._lines = self._path.read_text(encoding="utf-8") if self._path.exists() else ""
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 (closed by `close`)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: JSONL is always written
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(directory / "tensorboard"))

    def write(self, step: int, values: Mapping[str, Any], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}
        line = json.dumps({"step": step, "split": prefix, "time": time.time(), **clean}) + "\n"
        if self._jsonl is None:
            self._lines += line
            self._path.write_text(self._lines, encoding="utf-8")
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            if self._jsonl is not None:
                self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
