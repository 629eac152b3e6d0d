"""Training metrics: JSON lines and TensorBoard event files (written by process 0 only)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax


class MetricsWriter:
    def __init__(self, directory: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: JSONL is always written
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

    def write(self, step: int, values: Mapping[str, Any], *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, "split": prefix, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
