"""Training configs a user can get wrong: refused before any work, in one line that names the field.

`validation.validate` checks names, types and values; `run` calls it (and checks batch sizes against the mesh)
before it touches data, devices or the workdir; `owl-train` turns what it raises, and what ml_collections
raises for a bad `--config.<field>` override or a broken config file, into one line and exit status 2.
"""

import importlib.util
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_TRAINING_CONFIG, tiny_training_config
from owl_jax.config import ConfigError
from owl_jax.training import validation

REPO = Path(__file__).resolve().parents[2]
TINY = TINY_TRAINING_CONFIG


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"stages.stage1.optim.lr": math.nan}, "stages.stage1.optim.lr=nan must be a finite number >= 0"),
        ({"stages.stage1.optim.lr": -1.0}, "stages.stage1.optim.lr=-1.0 must be a finite number >= 0"),
        ({"stages.stage2.optim.lr": math.inf}, "stages.stage2.optim.lr=inf must be a finite number >= 0"),
        ({"stages.stage1.optim.end_lr": -1e-5}, "stages.stage1.optim.end_lr=-1e-05 must be a finite number >= 0"),
        ({"stages.stage1.optim.eps": 0.0}, "stages.stage1.optim.eps=0.0 must be a finite number > 0"),
        ({"stages.stage1.optim.b2": 1.0}, r"stages.stage1.optim.b2=1.0 must be within \[0, 1\)"),
        ({"stages.stage1.steps": -3}, "stages.stage1.steps=-3 must be an integer >= 0"),
        ({"stages.stage1.optim.warmup_steps": -1}, "stages.stage1.optim.warmup_steps=-1 must be an integer >= 0"),
        ({"stages.stage1.batch_size": 0}, "stages.stage1.batch_size=0 must be an integer >= 1"),
        ({"stages.stage1.grad_accum": 0}, "stages.stage1.grad_accum=0 must be an integer >= 1"),
        ({"stages.stage1.grad_accum": 3}, "stages.stage1.batch_size=8 must be divisible by stages.stage1.grad_accum=3"),
        ({"stages.stage1.eval_every": -1}, "stages.stage1.eval_every=-1 must be an integer >= 0"),
        ({"stages.stage2.lora.dropout": 1.0}, r"stages.stage2.lora.dropout=1.0 must be within \[0, 1\)"),
        ({"stages.stage2.lora.rank": 0}, "stages.stage2.lora.rank=0: a stage2 stage trains LoRA adapters"),
        ({"stages.stage1.kind": "stage3"}, "stages.stage1.kind='stage3' must be one of"),
        ({"checkpoint.every": 0}, "checkpoint.every=0 must be an integer >= 1"),
        ({"checkpoint.keep": 0}, "checkpoint.keep=0 must be an integer >= 1"),
        ({"log.every": 0}, "log.every=0 must be an integer >= 1"),
        ({"data.max_skip_fraction": 1.5}, r"data.max_skip_fraction=1.5 must be within \[0, 1\]"),
        ({"mesh.data": 0}, "mesh.data=0 must be an integer >= 1, or -1"),
        ({"mesh.data": -1, "mesh.fsdp": -1}, "at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1"),
        ({"run": "stage1,stage3"}, r"run='stage1,stage3': stage 'stage3' is not in stages \(stage1, stage2\)"),
        ({"model.init": "towers"}, "model.clip is empty"),
        ({"data.tokenization": "whole"}, "data.tokenization='whole' must be one of"),
        (
            {"stages.stage1.start_from": "stage2"},
            r"stages.stage1.start_from='stage2' must name a stage run before it \(run='stage1,stage2'\)",
        ),
    ],
)
def test_bad_values_are_refused_naming_the_field(changes, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        validation.validate(tiny_training_config(**changes))


def test_unknown_field_in_a_config_file_names_the_nearest_valid_one():
    config = tiny_training_config()
    config.stages.stage1.optim.lrr = 1e-4  # a typo in a config file adds a field silently
    message = "unknown config field stages.stage1.optim.lrr; did you mean stages.stage1.optim.lr?"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        validation.validate(config)


@pytest.mark.parametrize("name", ["default", "ablation", "stage1_pretrain", "stage2_instruct", "stage2_full_ft"])
def test_shipped_configs_are_valid(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.update(checkpoint="ckpt", clip="clip", llama="llama")  # given on the command line
    assert validation.validate(config) is config


def test_run_refuses_before_any_work(tmp_path):
    from owl_jax.training.run import run

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ConfigError, match=r"^stages.stage1.optim.lr=nan"):
        run(tiny_training_config(workdir=str(tmp_path / "w"), **{"stages.stage1.optim.lr": math.nan}))
    assert not (tmp_path / "w").exists() and signal.getsignal(signal.SIGTERM) is handler


def test_batch_size_must_split_over_the_data_parallel_devices(tmp_path, capsys):
    from owl_jax.cli.train import run_training

    changes = {"mesh.data": 2, "mesh.tensor": -1, "stages.stage1.batch_size": 3}  # 8 test devices: data 2 × tensor 4
    with pytest.raises(SystemExit) as raised:
        run_training(
            tiny_training_config(workdir=str(tmp_path / "w"), **changes)
        )  # what `owl-train` runs, in this process
    message = "stages.stage1.batch_size=3 must be divisible by the 2 data-parallel devices (mesh data×fsdp)"
    assert (raised.value.code, capsys.readouterr().err) == (2, f"error: {message}\n")
    assert not (tmp_path / "w").exists()
    config = tiny_training_config(**{"stages.stage2.grad_accum": 4})
    with pytest.raises(ConfigError, match=r"^stages.stage2.batch_size=8 must be divisible by grad_accum=4 × the 4 "):
        validation.check_batch_sizes(config, data_parallel=4)
    validation.check_batch_sizes(tiny_training_config(**{"stages.stage2.grad_accum": 2}), data_parallel=4)


def owl_train(*args, devices: int = 1, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "stages.stage1.optim.lrr=1e-4",
            "unknown config field stages.stage1.optim.lrr; did you mean stages.stage1.optim.lr?",
        ),
        ("stages.stage9.steps=4", "unknown config field stages.stage9; did you mean stages.stage1?"),
        ("stages.stage1.steps=abc", "config field stages.stage1.steps takes an int, not 'abc'"),
        ("stages.stage1.optim.lr=nan", "stages.stage1.optim.lr=nan must be a finite number >= 0"),
    ],
)
def test_cli_bad_override_is_one_line_and_exit_2(override, message, tmp_path):
    result = owl_train(f"--config={TINY}", f"--config.workdir={tmp_path / 'w'}", f"--config.{override}", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (2, f"error: {message}\n")
    assert not (tmp_path / "w").exists()


def test_cli_broken_config_file_names_its_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text(TINY.read_text().replace('c.model.init = "random"', 'c.model.inti = "random"\n    c.modle.x = 1'))
    result = owl_train(f"--config={broken}", cwd=tmp_path)
    line = next(i for i, s in enumerate(broken.read_text().splitlines(), 1) if "c.modle" in s)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {broken}, line {line}: AttributeError: ") and "model" in result.stderr
