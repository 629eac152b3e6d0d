"""Outputs the converter cannot write, or that earlier runs left broken: a full disk, a file too large, a
read-only folder, a run killed with -9, an --overwrite of a file or folder. Each failure is exit 1 with
one line naming the output and the OS's reason, and leaves no output, partial folder or previous output
other than as it was.

The disk is filled without root: `RLIMIT_FSIZE` (with SIGXFSZ ignored) makes every write past a size fail
with EFBIG, in this process, so the real writers fail, Orbax's and tensorstore's background threads
included; ENOSPC and EROFS are raised by patched writers.
"""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import FIXTURE
from owl_jax.checkpoint import CheckpointWriteError, converted, folders, tensor_writer
from owl_jax.cli.convert import main as convert_main

SOURCE = str(FIXTURE / "checkpoint")


def _run(capsys, *argv) -> tuple[int, str]:
    status = convert_main([*map(str, argv), "--quiet"])
    return status, capsys.readouterr().err


def _beside(path) -> list[str]:
    """Names of what sits beside `path` (itself included), hidden ones too."""
    return sorted(n for n in os.listdir(path.parent) if n.lstrip(".").startswith(path.name))


def _one_line_write_error(status: int, err: str, out, reason: str) -> None:
    assert status == 1, err
    assert err.startswith(f"error: cannot write {out}") and err.count("\n") == 1, err
    assert err.rstrip().endswith(reason) and "Traceback" not in err, err


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A converted folder of the fixture (the source of exports)."""
    out = tmp_path_factory.mktemp("imported") / "owl"
    assert convert_main(["import", SOURCE, str(out), "--quiet"]) == 0
    return out


@pytest.fixture
def file_size_limit():
    """`limit(nbytes)`: from then on in this test, writing a file past `nbytes` fails with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


# 1000 bytes: config.json fails; 300 kB: the parameters (Orbax's background writers) or a shard fail.
@pytest.mark.parametrize("limit", [1000, 300_000])
@pytest.mark.parametrize("command", ["import", "export", "export-bin"])
def test_file_too_large_is_one_line_and_leaves_nothing(tmp_path, capsys, imported, file_size_limit, command, limit):
    out = tmp_path / "out"
    argv = {
        "import": ["import", SOURCE, out],
        "export": ["export", imported, out],
        "export-bin": ["export", imported, out, "--format", "bin"],
    }[command]
    file_size_limit(limit)
    status, err = _run(capsys, *argv)
    file_size_limit(resource.RLIM_INFINITY)
    _one_line_write_error(status, err, out, os.strerror(errno.EFBIG))
    assert _beside(out) == []


def test_full_disk_in_orbax_writers_is_one_line(tmp_path, capsys, monkeypatch):
    # What Orbax raises when tensorstore's writes hit a full disk: named as the output's params folder.
    def full(path, leaves):
        raise ValueError(
            f'OUT_OF_RANGE: Error writing in OCDBT database at local file "{path}.orbax-checkpoint-tmp/d/1": '
            "Failed to write 1189380 bytes to file 14: No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(converted, "_save_pytree", full)
    out = tmp_path / "out"
    status, err = _run(capsys, "import", SOURCE, out)
    _one_line_write_error(status, err, out / "params", os.strerror(errno.ENOSPC))
    assert _beside(out) == []


def test_full_disk_in_a_shard_names_the_shard(tmp_path, capsys, imported, monkeypatch):
    def full(path, entries, arrays, metadata=None):
        with tensor_writer.open_output(path, "wb") as f:
            f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as f.write reports it: no file name

    monkeypatch.setattr(tensor_writer, "write_safetensors", full)
    out = tmp_path / "out"
    status, err = _run(capsys, "export", imported, out)
    _one_line_write_error(status, err, out / "model.safetensors", os.strerror(errno.ENOSPC))
    assert _beside(out) == []


def test_read_only_filesystem_is_one_line(tmp_path, capsys, monkeypatch):
    # Runs everywhere (root included): the partial folder cannot be created.
    real = os.makedirs

    def read_only(path, *args, **kwargs):
        if ".partial-" in os.path.basename(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(folders.os, "makedirs", read_only)
    out = tmp_path / "out"
    status, err = _run(capsys, "import", SOURCE, out)
    _one_line_write_error(status, err, out, os.strerror(errno.EROFS))
    assert _beside(out) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
@pytest.mark.parametrize("nested", [False, True])
def test_read_only_folder_is_one_line(tmp_path, capsys, nested):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    out = parent / "sub" / "out" if nested else parent / "out"
    try:
        status, err = _run(capsys, "import", SOURCE, out)
    finally:
        parent.chmod(0o755)
    _one_line_write_error(status, err, out, os.strerror(errno.EACCES))
    assert os.listdir(parent) == []


# A child that converts into OUT, and stops for good once the parameters are written.
STALLED_IMPORT = """
import sys, time
from owl_jax.checkpoint import converted
from owl_jax.cli.convert import main
save = converted._save_pytree
def save_then_stall(*args):
    save(*args)
    open(sys.argv[3], "w").close()
    time.sleep(600)
converted._save_pytree = save_then_stall
main(["import", sys.argv[1], sys.argv[2], "--quiet"])
"""


def test_partial_folder_of_a_killed_import_is_removed_by_the_next_run(tmp_path, capsys):
    out, ready = tmp_path / "out", tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", STALLED_IMPORT, SOURCE, str(out), str(ready)], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, "the import never reached its parameters"
            time.sleep(0.02)
    finally:
        child.kill()  # SIGKILL: nothing of the child's clean-up runs
        child.wait()
    (partial,) = _beside(out)
    assert partial.startswith(f".out.partial-{child.pid}-")

    # A live process's partial folder, and an older owl_jax's (no process recorded), are left alone.
    live = tmp_path / f".out.partial-{os.getppid()}-{folders._host()}-0123abcd"
    unowned = tmp_path / ".out.partial-89abcdef"
    live.mkdir(), unowned.mkdir()
    status, err = _run(capsys, "import", SOURCE, out)
    assert status == 0, err
    assert err.count("\n") == 1 and err.startswith("note: removed 1 unfinished output of killed runs: ")
    assert partial in err and unowned.name in err and "Traceback" not in err
    assert _beside(out) == sorted(["out", live.name, unowned.name])
    assert json.loads((out / converted.META_FILE).read_text())["format"] == converted.FORMAT


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_stale_leftovers_are_told_apart(tmp_path):
    out, host, dead = tmp_path / "out", folders._host(), _dead_pid()
    stale = tmp_path / f".out.partial-{dead}-{host}-00000000"
    elsewhere = tmp_path / f".out.partial-{dead}-otherhost-00000001"
    mine = tmp_path / f".out.partial-{os.getpid()}-{host}-00000002"
    other_output = tmp_path / f".other.partial-{dead}-{host}-00000003"
    for path in (stale, elsewhere, mine, other_output):
        path.mkdir()
    assert folders.clean_stale(str(out)) == [str(stale)]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (elsewhere, mine, other_output))


def test_previous_output_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path, capsys):
    out, dead = tmp_path / "out", _dead_pid()
    aside = tmp_path / f".out.old-{dead}-{folders._host()}-00000000"
    aside.mkdir()
    (aside / "kept").write_text("previous output")
    status, err = _run(capsys, "import", SOURCE, out)  # out "exists" again, so this is refused
    assert status == 2 and "already exists" in err and err.startswith("note: put back ")
    assert (out / "kept").read_text() == "previous output" and _beside(out) == ["out"]
    # Once the replacement had arrived, the previous output is simply removed.
    aside.mkdir()
    status, err = _run(capsys, "import", SOURCE, out, "--overwrite")
    assert status == 0 and "removed 1 unfinished output" in err
    assert _beside(out) == ["out"] and (out / converted.META_FILE).is_file()


@pytest.mark.parametrize("previous", ["file", "folder", "symlink"])
def test_overwrite_leaves_nothing_beside(tmp_path, capsys, previous):
    out = tmp_path / "out"
    if previous == "file":
        out.write_text("not a checkpoint")
    elif previous == "folder":
        out.mkdir()
        (out / "old.txt").write_text("old")
    else:
        (tmp_path / "target").mkdir()
        out.symlink_to(tmp_path / "target")
    status, err = _run(capsys, "import", SOURCE, out, "--overwrite")
    assert status == 0, err
    assert _beside(out) == ["out"] and out.is_dir() and not out.is_symlink()
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "owl_jax.json", "params"]


@pytest.mark.parametrize("previous", ["file", "folder"])
@pytest.mark.parametrize("failure", ["bad input", "full disk", "final rename"])
def test_failed_overwrite_keeps_the_previous_output(tmp_path, capsys, monkeypatch, file_size_limit, previous, failure):
    out = tmp_path / "out"
    if previous == "file":
        out.write_text("previous")
    else:
        out.mkdir()
        (out / "kept").write_text("previous")
    source = SOURCE
    if failure == "bad input":
        source = tmp_path / "hf"
        shutil.copytree(SOURCE, source)
        (source / "pytorch_model.bin").write_bytes(b"PK\x03\x04 cut short")
    elif failure == "full disk":
        file_size_limit(1000)
    else:
        rename = os.rename

        def fail_into_place(src, dst):
            if ".partial-" in str(src):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src, dst)
            return rename(src, dst)

        monkeypatch.setattr(folders.os, "rename", fail_into_place)
    status, err = _run(capsys, "import", source, out, "--overwrite")
    file_size_limit(resource.RLIM_INFINITY)
    assert status == (2 if failure == "bad input" else 1) and err.count("\n") == 1 and "Traceback" not in err, err
    assert _beside(out) == ["out"]
    assert (out if previous == "file" else out / "kept").read_text() == "previous"


def test_write_error_is_not_mistaken_for_a_bad_input(tmp_path):
    # An OSError naming a file outside the output was raised while reading: it is not a write failure.
    out, tmp = str(tmp_path / "out"), str(tmp_path / ".out.partial-1-h-00000000")
    assert folders.write_error(OSError(errno.EIO, "I/O error", "/elsewhere/pytorch_model.bin"), out, tmp) is None
    inside = folders.write_error(OSError(errno.ENOSPC, "x", os.path.join(tmp, "params", "d")), out, tmp)
    assert isinstance(inside, CheckpointWriteError) and str(inside).startswith(f"cannot write {out}/params/d: ")
