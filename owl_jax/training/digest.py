"""Checksums saved with every training checkpoint, so a restore can tell intact bytes from damaged ones.

Orbax and TensorStore check the structure of a checkpoint (JSON metadata, the OCDBT manifest and B-tree
nodes) but not the array values: a flipped byte in an array data file restores silently as a different
number, and training would continue from a state that no run ever had. So every save also records, per
leaf of the train state, its dtype and two sums of its bits taken on the devices (mod 2^32, so exact and
the same under any sharding or mesh), and a SHA-256 of the data iterator's state and of the config; a
restore recomputes them and refuses a checkpoint whose numbers differ.

The sums: the leaf viewed as unsigned 32-bit words w_i (narrower dtypes widened, 64-bit ones split),
`Σ w_i` and `Σ (2i+1)·w_i` with i the row-major position. Any change of a single word changes both, and
a swap of two words changes the second.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

VERSION = 1


def _words(x: jax.Array) -> jax.Array:
    """`x`'s bits as uint32 values (one per element; 64-bit elements give two)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size < 4:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}[size]
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: a trailing axis of two words


def _sums(x: jax.Array) -> jax.Array:
    """uint32[2]: `Σ w_i` and `Σ (2i+1)·w_i` over `x`'s words, mod 2^32."""
    w = _words(x)
    position = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):  # row-major position without reshaping (which could reshard)
        position = position + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= w.shape[axis]
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (2 * position + 1), dtype=jnp.uint32)])


def _replicated(leaves: list) -> NamedSharding | None:
    for leaf in leaves:
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return NamedSharding(leaf.sharding.mesh, PartitionSpec())
    return None


@functools.cache
def _all_sums(out_sharding: NamedSharding | None):
    return jax.jit(lambda xs: [_sums(x) for x in xs], out_shardings=out_sharding)


def state_sums(state: Any) -> dict[str, list]:
    """`{leaf path: [dtype, Σ w_i, Σ (2i+1)·w_i]}` of a pytree of (possibly sharded) arrays.

    Runs on the arrays' devices; on a multi-host mesh every process must call it (it is one program).
    """
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    paths = [jax.tree_util.keystr(p) for p, _ in leaves]
    arrays = [x for _, x in leaves]
    sums = jax.device_get(_all_sums(_replicated(arrays))(arrays))
    dtypes = [str(x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype) for x in arrays]
    return {p: [d, int(s[0]), int(s[1])] for p, d, s in zip(paths, dtypes, sums, strict=True)}


def json_sha256(value: Any) -> str:
    """SHA-256 of `value` as canonical JSON (sorted keys; tuples and lists alike)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def make_digest(state: Any, data_state: dict, config: dict) -> dict:
    """What a checkpoint records about its items, for `mismatch` to check after a restore."""
    return {
        "version": VERSION,
        "state": state_sums(state),
        "data": json_sha256(data_state),
        "config": json_sha256(config),
    }


def mismatch(digest: Any, state: Any, data_state: dict, config: dict) -> str | None:
    """Why restored items differ from what `digest` recorded at save time, or None when they match.

    A leaf whose dtype changed since (restored with a cast, e.g. another `frozen_dtype`) is not compared.
    """
    if not isinstance(digest, dict) or digest.get("version") != VERSION or not isinstance(digest.get("state"), dict):
        return "digest unreadable"
    if digest.get("data") != json_sha256(data_state):
        return "data iterator state differs from its checksum"
    if digest.get("config") != json_sha256(config):
        return "config differs from its checksum"
    saved = digest["state"]
    got = state_sums(state)
    if set(saved) != set(got):
        return "train state has other leaves than its checksums"
    for path, (dtype, *sums) in got.items():
        want = saved[path]
        if not (isinstance(want, list) and len(want) == 3):
            return f"checksum of {path} unreadable"
        if want[0] == dtype and list(want[1:]) != sums:
            return f"array {path} differs from its checksum"
    return None
