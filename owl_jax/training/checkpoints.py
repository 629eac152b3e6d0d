"""Orbax checkpoints of a training stage: the train state, the data iterator state and the resolved config.

Saves are asynchronous (training continues while the previous save is written), happen every N steps,
on request (SIGTERM / preemption) and at the end; the last K are kept. Orbax writes each checkpoint under
a temporary name and commits it with a rename, so a run killed mid-save resumes from the last complete
one. Restoring goes onto the current mesh from an abstract target with shardings.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class StageCheckpoints:
    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(every, 1), enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: dict, *, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether a save started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """`(state, data iterator state, config)` of checkpoint `step`, the state on `abstract_state`'s shardings."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()
        )
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.data, restored.config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
