"""Shared test setup: 8 fake CPU devices for sharding tests, the reference fixture as pytest fixtures, and
compile time kept down: one persistent compilation cache for the session, and XLA's optimizations off
where compiling dominates.

Many tests compile the same programs (the tiny model's steps, in this process and in the training runs'
subprocesses), so the session shares JAX's persistent compilation cache, in pytest's temporary folder for
this run (shared by xdist workers, removed with pytest's old runs). Its key covers the program and the
compile options, so a cached executable is the one that would have been compiled.

`--hostile-long` runs the fault campaign (tests marked `hostile`) at its long size; see tests/hostile.py.

The tests of training, data, checkpoints, serving and evaluation (and any module marked
`compile_quickly`) run tiny models whose programs take far longer to compile than to run, and each
compares results computed under one setting, so they compile with `jax_disable_most_optimizations`
(their subprocesses too). The tests of the numbers against the released fixture and of the compiled
programs themselves compile as users do.
"""

import os

# Must happen before jax is imported anywhere: the sharding tests need several devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import hostile  # noqa: E402
from helpers import FIXTURE  # noqa: E402

QUICK_COMPILE = ("training", "data", "checkpoint", "serve", "eval")  # test folders compiled without optimizations


# Modules whose training runs in subprocesses take minutes: collected first, so that under
# `-n 2 --dist loadfile` one worker runs them while the other works through the rest.
START_FIRST = ("training/test_runs.py", "training/test_trainer_sharding.py", "training/test_layout_runs.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.path.as_posix().endswith(START_FIRST))  # a stable sort


def pytest_addoption(parser):
    parser.addoption(
        "--hostile-long",
        action="store_true",
        help="run the long fault campaign (tests marked `hostile`; also OWL_JAX_HOSTILE_LONG=1)",
    )


def pytest_configure(config):
    if config.getoption("--hostile-long", default=False):
        os.environ[hostile.ENV] = "1"  # read by tests/hostile.py here, in xdist workers and in subprocesses


@pytest.fixture(autouse=True, scope="session")
def _share_compiled_programs(tmp_path_factory):
    """Every test, and every subprocess it starts, reads and writes one compilation cache."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # one folder above the workers' own
    cache = str(root / "xla_cache")
    settings = {"jax_compilation_cache_dir": cache, "jax_persistent_cache_min_compile_time_secs": 0}
    previous = {k: getattr(jax.config, k) for k in settings}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in settings.items():
            patch.setenv(key.upper(), str(value))
            jax.config.update(key, value)
        try:
            yield
        finally:
            for key, value in previous.items():
                jax.config.update(key, value)


@pytest.fixture(autouse=True, scope="module")
def _compile_quickly_where_compiling_dominates(request):
    """One setting per test module (its module-scoped fixtures compare against results computed under it)."""
    quick = request.node.get_closest_marker("compile_quickly") is not None
    if not quick and pathlib.Path(str(request.node.fspath)).parent.name not in QUICK_COMPILE:
        yield
        return
    previous = jax.config.read("jax_disable_most_optimizations")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
        jax.config.update("jax_disable_most_optimizations", True)
        try:
            yield
        finally:
            jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="session")
def fixture_dir():
    return FIXTURE


@pytest.fixture(scope="session")
def reference() -> dict:
    with np.load(FIXTURE / "reference.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def loss_mask(reference) -> np.ndarray:
    return reference["non_padding_mask"] * reference["non_media_mask"] * reference["prompt_mask"]


@pytest.fixture()
def fixture_copy(tmp_path):
    """Copy a fixture sub-folder into tmp_path (so tests may damage it) and return the copy's path."""

    def copy(name: str):
        dst = tmp_path / name
        shutil.copytree(FIXTURE / name, dst)
        for p in dst.rglob("*"):
            p.chmod(0o644 if p.is_file() else 0o755)
        return dst

    return copy
