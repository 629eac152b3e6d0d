"""Shared test setup: 8 fake CPU devices for sharding tests, the reference fixture, cached models."""

import os

# Must happen before jax is imported anywhere: the sharding tests need several devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "mplug_owl_tiny"


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    return FIXTURE


@pytest.fixture(scope="session")
def reference() -> dict:
    with np.load(FIXTURE / "reference.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def loss_mask(reference) -> np.ndarray:
    return reference["non_padding_mask"] * reference["non_media_mask"] * reference["prompt_mask"]


@functools.lru_cache(maxsize=None)
def load_fixture_model(folder: str = "checkpoint", dtype: str = "float32", lora: str | None = None,
                       merge_lora: bool = False, scan_layers: bool = True, attention_impl: str = "auto"):
    import owl_jax

    model, _ = owl_jax.from_pretrained(FIXTURE / folder, dtype=dtype, lora=None if lora is None else FIXTURE / lora,
                                       merge_lora=merge_lora, scan_layers=scan_layers, attention_impl=attention_impl,
                                       show_progress=False)
    return model


@pytest.fixture()
def fixture_copy(tmp_path):
    """Copy a fixture sub-folder into tmp_path (so tests may damage it) and return the copy's path."""

    def copy(name: str) -> pathlib.Path:
        dst = tmp_path / name
        shutil.copytree(FIXTURE / name, dst)
        for p in dst.rglob("*"):
            p.chmod(0o644 if p.is_file() else 0o755)
        return dst

    return copy


def subjaxprs(eqn):
    """The jaxprs an equation calls (scan/cond/custom-VJP bodies and the like)."""
    for value in eqn.params.values():
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr
            elif hasattr(v, "eqns"):
                yield v
