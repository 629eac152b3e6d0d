"""A run whose workdir and data are in an object store (`gs://bucket/...`) keeps those paths as written.

`gs://` is served here by a stand-in store: `etils.epath`'s own test hook routes every `gs://` file
operation to a local folder and records it (no credentials, nothing leaves the machine). Orbax is stopped at
the `CheckpointManager` it would be given, before it touches storage. Each test also works in a fresh current
folder and checks that no `gs:` folder appeared in it: what `os.path.abspath` / `os.makedirs` make of a URL.
"""

import json
import os
import sys
import types

import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import testing as epath_testing

from helpers import tiny_training_config
from owl_jax.checkpoint.converted import META_FILE, load_converted_leaves
from owl_jax.config import OwlConfig
from owl_jax.training import run as run_module
from owl_jax.training.checkpoints import StageCheckpoints
from owl_jax.training.metrics import MetricsWriter
from owl_jax.training.tokenizer_files import DEMO_TOKENIZER, RunTokenizer

pytestmark = pytest.mark.compile_quickly

PREFIX = "gs://"


class FakeStore:
    """`gs://bucket/key` → `root/bucket/key` on local disk, with every operation recorded."""

    def __init__(self, root):
        self.root = root
        self.ops: list[tuple[str, str]] = []  # (operation, gs:// path)

    def local(self, path) -> str:
        return os.path.join(self.root, os.fspath(path)[len(PREFIX) :])

    def hook(self, name):
        def call(original, path, *args, **kwargs):
            text = os.fspath(path)
            if not text.startswith(PREFIX):
                return original(path, *args, **kwargs)
            self.ops.append((name, text))
            if name == "open" and args[0].startswith(("w", "a")):
                os.makedirs(os.path.dirname(self.local(text)), exist_ok=True)  # no folders in an object store
            args = [self.local(a) if isinstance(a, str) and a.startswith(PREFIX) else a for a in args]
            result = original(self.local(text), *args, **kwargs)
            if name == "glob":  # matches come back as gs:// paths
                return [PREFIX + os.path.relpath(m, self.root) for m in result]
            return result

        return call

    def written(self) -> list[str]:
        """The gs:// paths opened for writing, in order."""
        return [p for op, p in self.ops if op == "open_w"]


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A stand-in `gs://` store; the test's current folder is a fresh empty one."""
    fake = FakeStore(str(tmp_path / "store"))
    os.makedirs(fake.root)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    names = ("exists", "isdir", "listdir", "glob", "makedirs", "mkdir", "remove", "rename", "replace", "rmtree")
    hooks = {n: fake.hook(n) for n in names}
    opened = fake.hook("open")

    def open_hook(original, path, mode):
        if os.fspath(path).startswith(PREFIX) and mode.startswith(("w", "a")):
            fake.ops.append(("open_w", os.fspath(path)))
        return opened(original, path, mode)

    with epath_testing.mock_epath(open=open_hook, **hooks):
        yield fake
    assert not os.path.exists(cwd / "gs:"), "a gs:// path was used as a local path"
    assert os.listdir(cwd) == []


class Reached(Exception):
    """Raised by the stand-in `CheckpointManager`: the run got as far as handing Orbax its folder."""


def test_run_hands_orbax_the_gs_workdir_untouched(store, monkeypatch):
    seen = []

    def manager(directory, *args, **kwargs):
        seen.append(directory)
        raise Reached

    monkeypatch.setattr(ocp, "CheckpointManager", manager)
    changes = {"synthetic.enabled": False, "data.dir": "gs://bucket/data", "log.tensorboard": False}
    config = tiny_training_config(workdir="gs://bucket/run", **changes)
    with pytest.raises(Reached):
        run_module.run(config)
    (directory,) = seen
    assert isinstance(directory, epath.Path) and str(directory) == "gs://bucket/run/stage1/checkpoints"
    assert store.written() == ["gs://bucket/run/config.json"]
    with open(store.local("gs://bucket/run/config.json")) as f:
        assert json.load(f)["workdir"] == "gs://bucket/run"


def test_stage_checkpoints_stay_in_the_store_and_move_damaged_ones_there(store, monkeypatch, capsys):
    class Manager:  # Orbax's, as far as moving damaged checkpoints aside needs it
        def __init__(self, directory, **_):
            self.directory = directory

        def reload(self):
            pass

    monkeypatch.setattr(ocp, "CheckpointManager", Manager)
    folder = "gs://bucket/run/stage2/checkpoints"
    ckpt = StageCheckpoints(folder, every=1, keep=1)
    assert str(ckpt.manager.directory) == folder
    assert str(ckpt.step_path(6)) == folder + "/6"
    assert str(ckpt.damaged_directory) == folder + ".damaged"
    assert ckpt._file_problem(6) == "not a folder"  # read through the store, where nothing is yet
    assert ("isdir", folder + "/6") in store.ops
    for name in (f"{folder}/6/state/array", f"{folder}/6/_CHECKPOINT_METADATA", f"{folder}.damaged/6/old"):
        os.makedirs(os.path.dirname(store.local(name)), exist_ok=True)
        with open(store.local(name), "w") as f:
            f.write(name)
    ckpt._move_aside([(6, "not committed")], resumed=4)
    moved = store.local(folder + ".damaged/6.1")  # 6 is taken by an earlier one
    assert not os.path.exists(store.local(folder + "/6"))
    with open(os.path.join(moved, "state", "array")) as f:
        assert f.read() == f"{folder}/6/state/array"
    assert os.path.isfile(os.path.join(moved, "_CHECKPOINT_METADATA"))
    assert f"checkpoint step 6 at {folder}/6 is damaged (not committed); moved it to {folder}.damaged/6.1" in (
        capsys.readouterr().err
    )


def test_metrics_go_to_the_store_and_resume_there(store, monkeypatch):
    logdirs = []

    class Events:
        def __init__(self, logdir):
            logdirs.append(logdir)

        def add_scalar(self, *args):
            pass

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=Events))
    logs = "gs://bucket/run/stage1/logs"
    writer = MetricsWriter(logs)
    writer.write(1, {"loss": 2.5})
    writer.write(2, {"loss": 2.0})
    writer.close()
    resumed = MetricsWriter(logs)  # a restarted run adds to what is there
    resumed.write(3, {"loss": 1.5})
    resumed.close()
    assert logdirs == [logs + "/tensorboard"] * 2  # tensorboardX writes gs:// itself
    with open(store.local(logs + "/metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert set(store.written()) == {logs + "/metrics.jsonl"}


def test_stage_model_is_written_to_the_store_meta_file_last(store, tmp_path):
    cfg = OwlConfig.from_hf_config(tiny_training_config().model.arch.to_dict())
    params = {"language_model": {"norm": {"scale": np.arange(4, dtype=np.float32)}}}
    tokenizer = RunTokenizer(DEMO_TOKENIZER, 1, 2, 1000)
    folder = "gs://bucket/run/stage1/model"
    run_module._save_model(folder, params, cfg, tokenizer)
    run_module._save_model(folder, params, cfg, tokenizer)  # a second export replaces the first
    written = store.written()
    assert written[-1] == f"{folder}/{META_FILE}" and written.count(written[-1]) == 2
    assert ("rmtree", folder) in store.ops
    # the folder the store holds reads back as the export does, with the same files beside the parameters
    local = tmp_path / "local_model"
    run_module._save_model(str(local), params, cfg, tokenizer)
    remote = store.local(folder)
    assert sorted(os.listdir(remote)) == sorted(os.listdir(local))
    for name in ("config.json", "tokenizer.model", META_FILE):
        with open(os.path.join(remote, name), "rb") as a, open(local / name, "rb") as b:
            assert a.read() == b.read()
    path = ("language_model", "norm", "scale")
    leaves = load_converted_leaves(remote, {path: ((4,), np.float32)}, on_host=True)
    np.testing.assert_array_equal(leaves[path], params["language_model"]["norm"]["scale"])


def test_synthetic_data_is_prepared_into_the_store_once(store):
    syn = tiny_training_config().synthetic
    syn.update(n_captions=4, n_multimodal=4, n_text=2, n_eval_per_type=1)
    stale, own = (store.local(f"gs://bucket/data/{n}") for n in ("captions-00002-of-00003.array_record", "own.json"))
    for path in (stale, own):  # a shard of older synthetic captions, and a file of the user's
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
    run_module.prepare_synthetic("gs://bucket/data", syn)
    assert os.path.exists(own) and not os.path.exists(stale)
    written = store.written()
    assert written[-1] == "gs://bucket/data/synthetic.done.json"  # the marker: the files before it are complete
    for name in ("captions", "instruct_multimodal", "instruct_text", "eval"):
        assert f"gs://bucket/data/{name}.manifest.json" in written
        assert any(p.startswith(f"gs://bucket/data/{name}-00000-of-") for p in written)
    run_module.prepare_synthetic("gs://bucket/data", syn)  # the marker matches: nothing is written again
    assert store.written() == written
