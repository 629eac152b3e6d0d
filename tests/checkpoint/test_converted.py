"""The converted folder: leaves written a few at a time, the format earlier folders have, atomic writes."""

import gc
import json
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest

from owl_jax.checkpoint import (
    PendingLeaf,
    abstract_model,
    converted,
    import_checkpoint,
    leaf_shapes,
    load_converted_leaves,
    nest,
    save_converted,
)
from owl_jax.config import OwlConfig

HF_CONFIG = {"note": "kept as given"}


def _leaves(seed=0):
    rng = np.random.RandomState(seed)
    return {
        ("a", "w"): rng.randn(4, 8).astype(np.float32),
        ("a", "b"): rng.randn(8).astype(ml_dtypes.bfloat16),
        ("c",): rng.randn(3, 2, 5).astype(np.float32),
    }


def _shapes(leaves):
    return {p: (v.shape, v.dtype) for p, v in leaves.items()}


def test_pending_leaves_are_read_in_turn(tmp_path, monkeypatch):
    monkeypatch.setattr(converted, "_WRITE_GROUP_BYTES", 0)  # every leaf its own group
    rng = np.random.RandomState(0)
    expected = {**_leaves(), **{("layer", str(i)): rng.randn(16, 4).astype(np.float32) for i in range(6)}}
    alive, produced = [], []

    def producer(path):
        def produce():
            gc.collect()
            # the leaf being written, and the one before while the store lets go of it: never more
            held = [p for p, ref in alive if ref() is not None]
            assert len(held) <= 2, f"earlier leaves still held: {held}"
            array = expected[path].copy()
            alive.append((path, weakref.ref(array)))
            produced.append(path)
            return array

        return produce

    pending = {p: PendingLeaf(v.shape, v.dtype, producer(p)) for p, v in expected.items()}
    save_converted(str(tmp_path / "out"), pending, hf_config=HF_CONFIG, lora=None)
    assert sorted(produced) == sorted(expected)
    restored = load_converted_leaves(str(tmp_path / "out"), _shapes(expected), on_host=True)
    for p, v in expected.items():
        assert restored[p].dtype == v.dtype and np.array_equal(restored[p], v), p
    meta = json.loads((tmp_path / "out" / "owl_jax.json").read_text())
    assert meta["param_dtypes"] == ["bfloat16", "float32"]


def test_folder_written_by_orbax_alone_loads_the_same(tmp_path):
    """Folders written before leaves were written in turn (Orbax's own handler, all at once) still load."""
    import orbax.checkpoint as ocp

    leaves = _leaves(1)
    save_converted(str(tmp_path / "new"), leaves, hf_config=HF_CONFIG, lora=None)
    save_converted(str(tmp_path / "old"), leaves, hf_config=HF_CONFIG, lora=None)
    params = tmp_path / "old" / converted.PARAMS_DIR
    handler = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
    registry = ocp.type_handlers.create_type_handler_registry((np.ndarray, handler))
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry)).save(
        str(params), args=ocp.args.PyTreeSave(nest(leaves)), force=True
    )
    assert (params / "_METADATA").read_text() == (tmp_path / "new" / converted.PARAMS_DIR / "_METADATA").read_text()
    for folder in ("old", "new"):
        on_device = load_converted_leaves(str(tmp_path / folder), _shapes(leaves))
        assert all(isinstance(v, jax.Array) for v in on_device.values())
        for p, v in leaves.items():
            assert np.array_equal(np.asarray(on_device[p]), v), (folder, p)


def test_a_failing_leaf_leaves_no_folder(tmp_path):
    def fail():
        raise OSError("disk went away")

    leaves = {**_leaves(), ("d",): PendingLeaf((2,), np.dtype(np.float32), fail)}
    with pytest.raises(OSError, match="disk went away"):
        save_converted(str(tmp_path / "out"), leaves, hf_config=HF_CONFIG, lora=None)
    assert list(tmp_path.iterdir()) == []


def test_restore_goes_largest_first_in_groups(monkeypatch):
    monkeypatch.setattr(converted, "_RESTORE_GROUP_BYTES", 100)
    target = {
        ("s",): jax.ShapeDtypeStruct((10,), np.float32),
        ("l",): jax.ShapeDtypeStruct((50,), np.float32),
        ("m",): jax.ShapeDtypeStruct((20,), np.float32),
        ("t",): jax.ShapeDtypeStruct((5,), np.float32),
    }
    assert converted._restore_groups(target) == [[("l",)], [("m",)], [("s",), ("t",)]]


def test_import_reads_released_leaves_lazily(fixture_dir, tmp_path, monkeypatch):
    """`import` hands the writer pending leaves (read when written), never the whole model at once."""
    seen = []
    save = converted.save_converted

    def spy(out_dir, leaves, **kwargs):
        seen.extend(type(v).__name__ for v in leaves.values())
        return save(out_dir, leaves, **kwargs)

    monkeypatch.setattr(converted, "save_converted", spy)
    import_checkpoint(str(fixture_dir / "checkpoint"), str(tmp_path / "conv"), show_progress=False)
    assert set(seen) == {"PendingLeaf"}
    cfg = OwlConfig.from_hf_config(str(fixture_dir / "checkpoint" / "config.json"))
    assert len(seen) == len(leaf_shapes(abstract_model(cfg)[1]))
