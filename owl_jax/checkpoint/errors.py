"""The errors of reading and writing checkpoints; each message names the file, key or shape at fault."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked: the message names the file or key and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that holds objects other than tensors (it could run code when loaded)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not match the model the config describes."""


class CheckpointWriteError(OSError):
    """The output could not be written (disk full, file too large, read-only filesystem, no permission): a fault
    of the environment, not of the input. The message names the output path and the OS's reason; nothing
    half-written is left behind."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_
