"""Whole training runs in subprocesses: crash and resume, damaged checkpoints, preemption, two processes
through jax.distributed.

Runs start `train.py`, or `faulty_train.py` (the same run with faults injected: a kill at a step, at a delay,
inside a save, or a stop request at a step).
"""

import collections
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hostile

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
def reference_run(data_dir, cache, tmp_path_factory) -> Path:
    """The workdir of an uninterrupted run (its checkpoints are those of steps 16 to 24)."""
    workdir = tmp_path_factory.mktemp("reference")
    subprocess.run(
        train_cmd(workdir, f"--config.data.dir={data_dir}"), check=True, env=env(**cache), capture_output=True
    )
    return workdir


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, float]:
    result = losses(reference_run)
    assert sorted(result) == list(range(1, STEPS + 1))
    return result


def messages(stderr: str) -> list[str]:
    """stderr's lines without the progress bar's."""
    lines = stderr.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("stage1:")]


def temporary_folders(workdir) -> list[str]:
    folder = Path(workdir) / "stage1" / "checkpoints"
    return [p.name for p in folder.iterdir() if ".orbax-checkpoint-tmp" in p.name] if folder.exists() else []


def next_fault(kills: int, done: int, rng: random.Random) -> list[str]:
    """The fault of the next run, which resumes from step `done`: by default a kill right after step 4's save has
    started, then one inside a later save just before its commit; under --hostile-long random kills of three
    kinds (at a step end, after a random delay, before a save's commit). None when the run is nearly done."""
    saves = [s for s in range(done + 1, STEPS + 1) if s % 2 == 0]  # checkpoint.every is 2
    if done >= STEPS - 2:  # too little left to kill at random: let this run finish
        return []
    if not hostile.long_mode():
        return ["--kill_at_step=4"] if kills == 0 else [f"--kill_before_commit={rng.choice(saves)}"]
    kind = rng.choice(["step", "delay", "commit"])
    if kind == "commit":
        return [f"--kill_before_commit={rng.choice(saves)}"]
    step = [f"--kill_at_step={rng.randint(done + 1, STEPS - 1)}"]
    return step if kind == "step" else [*step, f"--kill_delay_ms={rng.uniform(1, 400):.0f}"]


@pytest.mark.hostile
def test_kill_9_at_random_points_resumes_to_identical_losses(data_dir, reference, cache, tmp_path):
    """SIGKILL runs at random points (after a step, while an asynchronous save is in flight, inside a save before
    its commit) and resume them until they finish: no resume finds a damaged checkpoint, and the losses of every
    step equal those of an uninterrupted run exactly. Two kills by default, 50 under --hostile-long."""
    target = hostile.sized(2, 50)
    seed = random.randrange(2**32) if hostile.long_mode() else 0
    rng = random.Random(seed)
    tally = collections.Counter()
    started = time.time()
    workdir = tmp_path / "run0"
    while True:
        done = max(checkpoint_steps(workdir), default=0)
        fault = next_fault(tally["kills"], done, rng) if tally["kills"] < target else []
        run = subprocess.run(
            train_cmd(workdir, f"--config.data.dir={data_dir}", *fault, script=FAULTY),
            env=env(**cache),
            capture_output=True,
            text=True,
        )
        tally["runs"] += 1
        if done and ("is damaged" in run.stderr or "no intact checkpoint" in run.stderr):
            tally["unusable resumes"] += 1
        if run.returncode == -signal.SIGKILL:
            tally["kills"] += 1
            tally["kills that left an unfinished save"] += bool(temporary_folders(workdir))
            if fault == ["--kill_at_step=4"]:
                # the save of step 4 was started asynchronously just before the kill: step 2 is complete, 4 may
                # be (Orbax also keeps the run's first step)
                steps = checkpoint_steps(workdir)
                assert 2 in steps and set(steps) <= {1, 2, 4}
            continue
        assert run.returncode == 0 and "Traceback" not in run.stderr, (fault, run.stderr[-3000:])
        assert losses(workdir) == reference, fault  # every step's loss equals the uninterrupted run's exactly
        tally["finished runs"] += 1
        if tally["kills"] >= target:
            break
        workdir = tmp_path / f"run{tally['finished runs']}"  # a run finished before its kill: start another
    print(f"\nkill -9 campaign (seed {seed}): {dict(tally)}, identical losses: yes, {time.time() - started:.0f} s")
    assert tally["unusable resumes"] == 0


def test_resume_passes_over_a_damaged_checkpoint(data_dir, reference_run, reference, cache, tmp_path):
    """Bytes flipped in an array file of the newest checkpoint (Orbax would restore different values without an
    error): the run names it in one line, moves it aside and resumes from the one before, with the same losses."""
    shutil.copytree(reference_run / "stage1", tmp_path / "stage1", ignore=shutil.ignore_patterns("model"))
    folder = tmp_path / "stage1" / "checkpoints"
    arrays = max((folder / str(STEPS) / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(arrays.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 16])
    arrays.write_bytes(bytes(data))
    run = subprocess.run(
        train_cmd(tmp_path, f"--config.data.dir={data_dir}"), env=env(**cache), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    damaged = Path(f"{folder}.damaged") / str(STEPS)
    [line] = messages(run.stderr)
    assert line.startswith(f"checkpoint step {STEPS} at {folder / str(STEPS)} is damaged (array ")
    assert line.endswith(f"differs from its checksum); moved it to {damaged}; resuming from step {STEPS - 2}")
    assert damaged.is_dir() and checkpoint_steps(tmp_path)[-1] == STEPS  # kept aside; step 24 saved anew
    assert losses(tmp_path) == reference


def test_no_intact_checkpoint_stops_in_one_line_with_status_2(data_dir, reference_run, cache, tmp_path):
    shutil.copytree(reference_run / "stage1" / "checkpoints", tmp_path / "stage1" / "checkpoints")
    folder = tmp_path / "stage1" / "checkpoints"
    for step in checkpoint_steps(tmp_path):
        (folder / str(step) / "state" / "_METADATA").unlink()
    run = subprocess.run(
        train_cmd(tmp_path, f"--config.data.dir={data_dir}"), env=env(**cache), capture_output=True, text=True
    )
    assert run.returncode == 2, run.stderr[-3000:]
    [line] = messages(run.stderr)
    assert line.startswith(f"error: no intact checkpoint to resume from in {folder} (step {STEPS}: item state/ ")
    assert line.endswith("move that folder away (or put an intact copy of a checkpoint back) and run again")
    assert checkpoint_steps(tmp_path) == list(range(STEPS - 8, STEPS + 1, 2))  # nothing moved or deleted


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
    continue to step 6 (where a second stop ends the run; later steps add time, not coverage); the losses
    equal the single-process run's."""
    multi = tmp_path / "multi"
    stops = (3, 6)
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
