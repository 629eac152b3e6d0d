"""Whole training runs in subprocesses: crash and resume, preemption, two processes through jax.distributed.

Runs start `train.py`, or `faulty_train.py` (the same run with hooks that crash it or request a stop at a step).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONFIG = HERE / "tiny_config.py"
FAULTY = HERE / "faulty_train.py"
STEPS = 24


def train_cmd(workdir, *overrides, script=REPO / "train.py"):
    return [
        sys.executable,
        str(script),
        f"--config={CONFIG}",
        f"--config.workdir={workdir}",
        "--config.run=stage1",
        "--config.data.eval=()",
        f"--config.stages.stage1.steps={STEPS}",
        *overrides,
    ]


def env(devices: int = 1, **extra) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra)


def losses(workdir, stage="stage1") -> dict[int, float]:
    """Train loss by step; a step logged twice (before a crash and after resuming) keeps its last value."""
    out = {}
    for line in (Path(workdir) / stage / "logs" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["split"] == "train":
            out[row["step"]] = row["loss"]
    return out


def checkpoint_steps(workdir, stage="stage1") -> list[int]:
    folder = Path(workdir) / stage / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    """JAX's persistent compilation cache, shared by every run of this module: most of them compile the same
    programs (the resumed runs those of the runs they resume), which is most of a tiny run's time."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, cache):
    """The tiny synthetic data, generated and prepared once for every run of this module."""
    root = tmp_path_factory.mktemp("tiny")
    subprocess.run(
        train_cmd(root / "prep", "--config.stages.stage1.steps=1", "--config.checkpoint.every=1000"),
        check=True,
        env=env(**cache),
        capture_output=True,
        cwd=root,
    )
    return root / "prep" / "data"


@pytest.fixture(scope="module")
def reference(data_dir, cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    subprocess.run(
        train_cmd(workdir, f"--config.data.dir={data_dir}"), check=True, env=env(**cache), capture_output=True
    )
    result = losses(workdir)
    assert sorted(result) == list(range(1, STEPS + 1))
    return result


def test_kill_9_mid_run_resumes_to_identical_losses(data_dir, reference, cache, tmp_path):
    args = train_cmd(tmp_path, f"--config.data.dir={data_dir}")
    crashed = subprocess.run(
        train_cmd(tmp_path, f"--config.data.dir={data_dir}", "--kill_at_step=4", script=FAULTY),
        env=env(**cache),
        capture_output=True,
    )
    assert crashed.returncode == -signal.SIGKILL
    # the save of step 4 was started asynchronously just before the kill: step 2 is complete, 4 may be
    # (Orbax also keeps the run's first step)
    steps = checkpoint_steps(tmp_path)
    assert 2 in steps and set(steps) <= {1, 2, 4}
    resumed = subprocess.run(args, env=env(**cache), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(tmp_path) == reference  # later losses equal the uninterrupted run's exactly


def test_sigterm_saves_before_exit(data_dir, reference, cache, tmp_path):
    args = train_cmd(tmp_path, f"--config.data.dir={data_dir}", "--config.checkpoint.every=1000")
    proc = subprocess.Popen(args, env=env(**cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "stage1" / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    logged = max(losses(tmp_path))
    assert logged < STEPS and checkpoint_steps(tmp_path)[-1] == logged  # saved exactly where it stopped
    resumed = subprocess.run(args, env=env(**cache), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(tmp_path) == reference


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(data_dir, reference, cache, tmp_path):
    """2 processes × 2 fake devices through jax.distributed: train, be preempted and save at step 3, restore,
    continue to step 12 (where a second stop ends the run; the later steps add time, not coverage); the
    losses equal the single-process run's."""
    multi = tmp_path / "multi"
    stops = (3, 12)
    for stop in stops:
        port = _free_port()
        # No periodic saves (every 2 steps in the tiny config): each costs both processes a synchronised
        # checkpoint, a third of this test's time; the preemption saves still happen.
        procs = [
            subprocess.Popen(
                train_cmd(
                    multi,
                    f"--config.data.dir={data_dir}",
                    "--config.checkpoint.every=1000",
                    f"--stop_at_step={stop}",
                    script=FAULTY,
                ),
                env=env(
                    devices=2,
                    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=str(i),
                    **cache,
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for i in range(2)
        ]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 128 + signal.SIGTERM, err.decode()[-3000:]
        assert checkpoint_steps(multi)[-1] == stop and max(losses(multi)) == stop
    got = losses(multi)
    assert sorted(got) == list(range(1, stops[-1] + 1))
    for step in got:
        want = reference[step]
        assert abs(got[step] - want) < 1e-5, (step, got[step], want)
