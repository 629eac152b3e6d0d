"""Resuming from damaged checkpoints, in this process: which step `restore_latest` picks, and what it restores.

A small stage checkpoint folder (steps 4 and 6 of a tiny model, each step's state distinct) is saved once
per module; each case damages a copy of it. The sweep damages each kind of file of the newest step (array
data, OCDBT manifests and B-tree files, Orbax metadata, the JSON items, commit markers) by truncating,
flipping bytes, zeroing, emptying or deleting it, and checks against an oracle: when Orbax's own reading of
the damaged step differs from what was saved (or fails), or the damage removed what marks it committed,
resuming must fall back to step 4; otherwise it must keep step 6. Either way the restored state, data
iterator state and config equal what was saved at the chosen step, bit for bit.
"""

import collections
import json
import os
import random
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import hostile
from helpers import OPTIM, one_device_mesh, tiny_config
from owl_jax.training import digest as digest_lib
from owl_jax.training.checkpoints import ITEMS, NoIntactCheckpoint, StageCheckpoints, _quiet
from owl_jax.training.trainer import Trainer

STEPS = (4, 6)
NEWEST = STEPS[-1]


def data_state(step: int) -> dict:
    return {"next_index": 8 * step, "epoch": 0}


def config(step: int) -> dict:
    return {"seed": 0, "saved_at": step, "stages": ["stage1"]}


@pytest.fixture(scope="module")
def trainer():
    return Trainer(tiny_config(), stage="stage1", mesh=one_device_mesh(), optim=OPTIM, total_steps=10)


@pytest.fixture(scope="module")
def saved(trainer, tmp_path_factory):
    """`(folder, {step: host leaves of the state saved at step}, the newest step's digest item)`: the pristine
    checkpoints."""
    folder = tmp_path_factory.mktemp("pristine") / "checkpoints"
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), trainer.abstract_state().params)
    ckpt = StageCheckpoints(str(folder), every=2, keep=5)
    leaves = {}
    for step in STEPS:
        state = trainer.init_state(jax.tree.map(lambda x, s=step: x + s, params), seed=step).checkpointed()
        state = state.replace(step=jax.device_put(np.int32(step), state.step.sharding))
        assert ckpt.save(step, state, data_state(step), config(step))
        leaves[step] = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(state))]
    ckpt.wait()
    ckpt.close()
    manager = ocp.CheckpointManager(folder, item_names=ITEMS)
    digest = manager.restore(NEWEST, args=ocp.args.Composite(digest=ocp.args.JsonRestore())).digest
    manager.close()
    return folder, leaves, digest


def copy_of(saved, tmp_path) -> Path:
    """A copy of the pristine folder under a fresh path (TensorStore caches reads by path)."""
    folder = tmp_path / "stage" / "checkpoints"
    shutil.copytree(saved[0], folder)
    return folder


def assert_restored(result, step, saved) -> None:
    assert result.step == step
    got = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(result.state))]
    want = saved[1][step]
    assert len(got) == len(want) and all(g.dtype == w.dtype and np.array_equal(g, w) for g, w in zip(got, want))
    assert result.data == data_state(step) and result.config == config(step)


# -- damage ---------------------------------------------------------------------------------------


def truncate(p: Path, rng) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flip(p: Path, rng) -> None:
    """Invert 16 bytes in the middle of the file."""
    data = bytearray(p.read_bytes())
    start = max(0, len(data) // 2 - 8)
    for i in range(start, min(len(data), start + 16)):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


def flip_bit(p: Path, rng) -> None:
    """Flip one bit at a random place."""
    data = bytearray(p.read_bytes())
    if data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    p.write_bytes(bytes(data))


def zero(p: Path, rng) -> None:
    p.write_bytes(bytes(p.stat().st_size))


def empty(p: Path, rng) -> None:
    p.write_bytes(b"")


def delete(p: Path, rng) -> None:
    p.unlink()


DAMAGES = {f.__name__: f for f in (truncate, flip, zero, empty, delete, flip_bit)}


def file_kind(rel: str) -> str:
    """`rel` with its content hash replaced: the files of one kind share a name."""
    return re.sub(r"[0-9a-f]{32}", "<hash>", rel)


def step_files(folder: Path, step: int) -> dict[str, str]:
    """`{kind: a file of that kind}` of step `step` (the largest of each kind: for array data, the one with the
    most values)."""
    root = folder / str(step)
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
    kinds = {}
    for p in files:
        kinds.setdefault(file_kind(str(p.relative_to(root))), str(p.relative_to(root)))
    return kinds


# The default sweep: each kind of file once, with the damage that says most about it.
SHORT_SWEEP = [
    ("state/ocdbt.process_0/d/<hash>", "flip"),  # array values: restores silently unless checksummed
    ("state/ocdbt.process_0/d/<hash>", "truncate"),
    ("state/d/<hash>", "zero"),  # the OCDBT B-tree Orbax reads
    ("state/manifest.ocdbt", "delete"),
    ("state/_METADATA", "delete"),
    ("_CHECKPOINT_METADATA", "empty"),
    ("commit_success.txt", "delete"),
    ("data/metadata", "truncate"),
    ("digest/metadata", "zero"),
    ("state/_sharding", "delete"),  # not needed to restore: step 6 stays usable
]


def long_sweep(folder: Path) -> list[tuple[str, str]]:
    kinds = step_files(folder, NEWEST)
    return [(k, d) for k in sorted(kinds) for d in DAMAGES for _ in range(3 if d == "flip_bit" else 1)]


def must_fall_back(folder: Path, saved, abstract) -> bool:
    """The oracle: does Orbax's own reading of the newest step fail or differ from what was saved, or is its
    commit record (marker, step metadata with a commit time) gone?"""
    step_dir = folder / str(NEWEST)
    if not (step_dir / "commit_success.txt").is_file():
        return True
    try:
        meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_bytes().decode())
        assert meta["commit_timestamp_nsecs"] and set(meta["item_handlers"]) == set(ITEMS)
    except Exception:
        return True
    return not orbax_reads_back(folder, saved, abstract)


def orbax_reads_back(folder: Path, saved, abstract) -> bool:
    """Whether a plain Orbax restore of the newest step gives back every item as saved."""
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), **{i: ocp.args.JsonRestore() for i in ITEMS if i != "state"}
    )
    got = orbax_restore(folder, args)
    if got is None:
        return False
    leaves = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(got.state))]
    same_state = all(np.array_equal(a, b) for a, b in zip(leaves, saved[1][NEWEST], strict=True))
    return same_state and (got.data, got.config, got.digest) == (data_state(NEWEST), config(NEWEST), saved[2])


def orbax_restore(folder: Path, args):
    """Orbax's plain restore of the newest step (its tracebacks on stderr silenced), or None when it fails."""
    with _quiet():
        manager = ocp.CheckpointManager(folder, item_names=ITEMS)
        try:
            return manager.restore(NEWEST, args=args)
        except Exception:
            return None
        finally:
            manager.close()


def state_only(abstract):
    return ocp.args.Composite(state=ocp.args.StandardRestore(abstract))


@pytest.fixture(scope="module")
def abstract(trainer):
    return trainer.abstract_state()


def check_resume(folder: Path, saved, abstract, capsys, fall_back: bool, what: str) -> str:
    """Resume from `folder`, check the step taken and what was restored and reported; returns stderr."""
    capsys.readouterr()
    result = StageCheckpoints(str(folder), every=2, keep=5).restore_latest(abstract)
    err = capsys.readouterr().err
    if not fall_back:
        assert_restored(result, NEWEST, saved)
        assert result.damaged == [] and err == "", what
        return err
    assert_restored(result, STEPS[0], saved)
    assert [s for s, _ in result.damaged] == [NEWEST], what
    moved = folder.parent / "checkpoints.damaged" / str(NEWEST)
    assert moved.is_dir() and not (folder / str(NEWEST)).exists(), what  # moved aside, not deleted
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"checkpoint step {NEWEST} at {re.escape(str(folder / str(NEWEST)))} is damaged \(.+\); moved it to "
        rf"{re.escape(str(moved))}; resuming from step {STEPS[0]}",
        lines[0],
    ), (what, err)
    return err


@pytest.mark.hostile
def test_damaged_newest_checkpoint_falls_back_to_an_intact_one(saved, abstract, tmp_path, capsys):
    cases = long_sweep(Path(saved[0])) if hostile.long_mode() else SHORT_SWEEP
    kinds = step_files(Path(saved[0]), NEWEST)
    seed = random.randrange(2**32) if hostile.long_mode() else 0  # where flip_bit flips
    rng = random.Random(seed)
    fell_back, kept = 0, collections.Counter()
    for i, (kind, damage) in enumerate(cases):
        folder = copy_of(saved, tmp_path / str(i))
        DAMAGES[damage](folder / str(NEWEST) / kinds[kind], rng)
        fall_back = must_fall_back(folder, saved, abstract)
        fell_back += fall_back
        kept[f"{damage} {kind}"] += not fall_back
        err = check_resume(folder, saved, abstract, capsys, fall_back, f"{damage} {kind}")
        if (kind, damage) == SHORT_SWEEP[0]:  # Orbax restores the flipped values without an error
            assert orbax_restore(folder.parent / "checkpoints.damaged", state_only(abstract))
            assert "differs from its checksum" in err
        shutil.rmtree(tmp_path / str(i))
    print(
        f"\n{len(cases)} damaged checkpoints (seed {seed}): {fell_back} fell back to step {STEPS[0]}, "
        f"{len(cases) - fell_back} kept step {NEWEST} (harmless: {', '.join(sorted(k for k, n in kept.items() if n))})"
    )
    assert fell_back >= len(cases) // 2  # the sweep mostly damages what matters


def test_no_intact_checkpoint_is_one_line_and_exit_status_2(saved, abstract, tmp_path, capsys):
    folder = copy_of(saved, tmp_path)
    (folder / "6" / "state" / "_METADATA").unlink()
    (folder / "4" / "commit_success.txt").unlink()
    capsys.readouterr()
    with pytest.raises(NoIntactCheckpoint) as raised:
        StageCheckpoints(str(folder), every=2, keep=5).restore_latest(abstract)
    assert capsys.readouterr().err == ""  # the message is the exception's (`owl-train` prints it, exit 2)
    err = [str(raised.value)]
    assert err[0].startswith(f"no intact checkpoint to resume from in {folder} (step 6: item state/ unreadable: ")
    assert "; step 4: not committed: no commit_success.txt)" in err[0] and "move that folder away" in err[0]
    assert sorted(os.listdir(folder)) == ["4", "6"]  # nothing moved or deleted
    assert not (folder.parent / "checkpoints.damaged").exists()


def test_temporary_folder_of_an_unfinished_save_is_never_restored(saved, abstract, tmp_path, capsys):
    folder = copy_of(saved, tmp_path)
    shutil.copytree(folder / "6", folder / "8.orbax-checkpoint-tmp-1234")  # a save killed before its commit
    (folder / "8.orbax-checkpoint-tmp-1234" / "commit_success.txt").unlink()
    check_resume(folder, saved, abstract, capsys, False, "temporary folder")


def test_saves_continue_after_falling_back(saved, abstract, tmp_path, capsys):
    """The damaged step is moved aside, so the run saves that step again (Orbax saves no step at or below its
    latest); damaged again, it is kept beside the first."""
    folder = copy_of(saved, tmp_path)
    (folder / "6" / "state" / "_METADATA").unlink()
    ckpt = StageCheckpoints(str(folder), every=2, keep=5)
    result = ckpt.restore_latest(abstract)
    assert result.step == 4 and ckpt.latest_step() == 4
    state = result.state.replace(step=jax.device_put(np.int32(6), result.state.step.sharding))
    assert ckpt.save(6, state, data_state(6), config(6))
    assert not ckpt.save(6, state, data_state(6), config(6), force=True)  # a stop request at a saved step
    ckpt.wait()
    ckpt.close()
    again = StageCheckpoints(str(folder), every=2, keep=5).restore_latest(abstract)
    assert again.step == 6 and again.damaged == [] and again.data == data_state(6)
    for got, want in zip(jax.tree.leaves(again.state), jax.tree.leaves(state), strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    (folder / "6" / "data" / "metadata").write_text("{")
    capsys.readouterr()
    assert StageCheckpoints(str(folder), every=2, keep=5).restore_latest(abstract).step == 4
    damaged = folder.parent / "checkpoints.damaged"
    assert (damaged / "6" / "state").is_dir() and (damaged / "6.1" / "data" / "metadata").read_text() == "{"
    assert f"moved it to {damaged / '6.1'};" in capsys.readouterr().err


def test_checksums_change_with_any_bit_and_not_with_the_sharding():
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.standard_normal((8, 6)).astype(np.float32),
        "bf16": rng.standard_normal((3, 4)).astype(jnp.bfloat16),
        "i32": np.int32(7),
        "bool": np.array([True, False, True]),
        "key": np.array([0, 42], np.uint32),
    }
    sums = digest_lib.state_sums(jax.device_put(tree, jax.devices()[0]))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    sharded = dict(tree, f32=jax.device_put(tree["f32"], NamedSharding(mesh, PartitionSpec("a", "b"))))
    assert digest_lib.state_sums(sharded) == sums
    for _ in range(20):
        name = rng.choice(["f32", "bf16", "i32", "key"])
        value = np.array(tree[name]).reshape(-1)
        bits = value.view(np.uint8).copy()
        bits[rng.integers(bits.size)] ^= np.uint8(1 << rng.integers(8))
        changed = dict(tree, **{name: bits.view(value.dtype).reshape(np.shape(tree[name]))})
        got = digest_lib.state_sums(changed)
        assert got[f"['{name}']"][1:] != sums[f"['{name}']"][1:] and all(
            got[k] == sums[k] for k in sums if k != f"['{name}']"
        )
    swapped = dict(tree, f32=tree["f32"][::-1].copy())  # the same values in another order
    assert digest_lib.state_sums(swapped)["['f32']"][1] == sums["['f32']"][1]
    assert digest_lib.state_sums(swapped)["['f32']"][2] != sums["['f32']"][2]
