"""Shared test setup: 8 fake CPU devices for sharding tests, the reference fixture as pytest fixtures."""

import os

# Must happen before jax is imported anywhere: the sharding tests need several devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import FIXTURE  # noqa: E402


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
