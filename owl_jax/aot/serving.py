"""Serving plans: the generator's prefill and decode steps compiled ahead of time for a mesh of devices
this process need not have (e.g. a TPU topology, compiled on a CPU host with the TPU compiler).

What is compiled: the functions `Generator` jits (`owl_jax.inference.steps`), taken from a `Generator`
built on the abstract model, so static arguments, donation and compiler options are the generator's own:

- prefill: B left-padded prompts of P slots, `images_per_row` images each (their `(Q + 1, D)` embeddings
  are an input: the generator encodes images in a step of their own), into a fresh cache of S slots;
  returns the last slot's logits, the cache and the key mask;
- decode: one token per row at one cache slot, attending (masked) over all S slots and writing that
  slot; the cache is a donated argument, so the compiled step may update it in place.

Every input is abstract (`jax.ShapeDtypeStruct` with a `NamedSharding` by the model's logical axes):
parameters as `owl_jax.sharding` places them, prompts, tokens, key mask and images over the batch axes,
the cache over batch and heads (as `steps._cache_axes` constrains it). Nothing is materialised. With
`unstack_layers`, the generator's per-layer weights and per-layer cache are laid out as
`Generator(unstack_layers=True)` holds them (each layer's slice of the stack, sharded as the stack).

KV-cache memory per chip is counted twice: from shapes, `2 × layers × B × Hkv × S × Dh × itemsize` over
the chips that shard batch (data, fsdp) and heads (tensor), i.e. the shard shape of its sharding; and
from the compiled decode step, whose only donated argument is the cache: the bytes the compiled program
aliases between that argument and its outputs (`alias_bytes`). They agree up to the TPU's tile padding;
a decode step that could not update the cache in place would alias nothing.

A step's per-chip footprint is its compiled peak (arguments, outputs not aliased to arguments,
temporaries) plus the parameters it does not take (vision tower and abstractor, resident for the image
encoder). A decode step reads at least the LLM weights it multiplies (all but the embedding table, of
which it gathers one row per token; weights sharded over fsdp are gathered, so each chip multiplies
its tensor-parallel share) and the whole KV cache, so `(weights + cache) / HBM bandwidth` bounds its time.
FLOPs are counted from shapes (every weight product and both attention products, over all S slots) and
from the compiled program's dots (`analysis.matmul_flops`: loop bodies times their trip counts), which
leave out products XLA computes as multiply-and-reduce (a decode step's one-query attention).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from owl_jax.aot.analysis import collective_summary, matmul_flops, memory_summary
from owl_jax.checkpoint.leaves import abstract_model
from owl_jax.config import Numerics, OwlConfig
from owl_jax.inference.generate import Generator, round_up
from owl_jax.modeling._stack import unstack_layer_states
from owl_jax.modeling.decoder import KVCache
from owl_jax.modeling.llama import can_fuse_projections, fuse_projections
from owl_jax.ops.numerics import compiling_for, resolve_for
from owl_jax.sharding import named_sharding, state_shardings, use_mesh

PROMPT_BUCKET = 64  # the generator's default prompt bucket: the default prompt is a multiple of it


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One compiled step, per chip: `memory` as `analysis.memory_summary` (argument, output, temp, alias and
    peak bytes); `flops` of its matmuls and attention counted from shapes, `compiled_flops` those of the
    compiled program's dots (`analysis.matmul_flops`); `collectives` per run as
    `analysis.collective_summary` (`{kind: (executions, bytes)}`)."""

    name: str
    compile_seconds: float
    memory: dict[str, int]
    flops: float
    compiled_flops: float
    collectives: dict[str, tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class ServingReport:
    """A serving plan for one mesh and shape; every byte and FLOP count is per chip."""

    device_kind: str
    mesh: dict[str, int]
    batch: int
    prompt: int  # P: prefill slots per row, image tokens included
    context: int  # S: cache slots per row
    new_tokens: int  # decode steps after the prompt
    images_per_row: int
    cache_dtype: str
    unstack_layers: bool
    prefill: StepReport
    decode: StepReport
    kv_cache_bytes: int  # from shapes and shardings
    kv_cache_compiled_bytes: int  # the compiled decode step's donated (aliased) argument bytes
    param_bytes: int  # every parameter the generator holds
    llm_param_bytes: int  # the language model's (the steps' weight arguments)
    decode_weight_bytes: int  # LLM weights one chip multiplies per decode step

    @property
    def serving_peak_bytes(self) -> int:
        """The larger step's compiled peak plus the parameters neither step takes (vision tower, abstractor)."""
        others = self.param_bytes - self.llm_param_bytes
        return max(self.prefill.memory["peak_bytes"], self.decode.memory["peak_bytes"]) + others

    @property
    def decode_bytes_read(self) -> int:
        """The least HBM one decode step reads: the weights it multiplies and the whole KV cache."""
        return self.decode_weight_bytes + self.kv_cache_bytes

    def decode_seconds(self, hbm_bytes_per_s: float) -> float:
        """The HBM-bound time of one decode step (`decode_bytes_read / bandwidth`)."""
        return self.decode_bytes_read / hbm_bytes_per_s


def compile_serving(
    cfg: OwlConfig,
    mesh: Mesh,
    *,
    batch: int,
    context: int,
    new_tokens: int | None = None,
    images_per_row: int = 1,
    cache_dtype: str | None = None,
    unstack_layers: bool = False,
) -> ServingReport:
    """Compile the generator's prefill and decode steps for `mesh`; report their per-chip cost.

    Args:
      cfg: the model (`dtype`: compute and cache dtype; `param_dtype`: the weights').
      mesh: a `(data, fsdp, tensor)` mesh (`owl_jax.sharding.make_mesh`), e.g. over a TPU topology's devices.
      batch: rows B decoded together.
      context: cache slots S per row (prompt and generated tokens).
      new_tokens: decode steps after the prompt, which takes the other `context - new_tokens` slots.
        Default: a prompt of half the context plus the images' tokens, rounded up to 64 slots.
      images_per_row: images in each prompt (`cfg.image_tokens` slots each; 0: text only).
      cache_dtype: the KV cache's dtype; the generator keeps it in the compute dtype (None: `cfg.dtype`).
      unstack_layers: lay the weights and cache out as `Generator(unstack_layers=True)` does.

    Returns:
      A `ServingReport`.
    """
    image_slots = images_per_row * cfg.image_tokens
    if new_tokens is None:
        new_tokens = context - round_up(context // 2 + image_slots, PROMPT_BUCKET)
    prompt = context - new_tokens
    if batch < 1 or images_per_row < 0 or new_tokens < 1 or prompt <= image_slots:
        raise ValueError(
            f"batch={batch} context={context} new_tokens={new_tokens} images_per_row={images_per_row}: need "
            f"batch >= 1, new_tokens >= 1 and a prompt (context - new_tokens = {prompt}) longer than its "
            f"{image_slots} image slots"
        )
    if cache_dtype is not None and jnp.dtype(cache_dtype) != jnp.dtype(cfg.dtype):
        raise ValueError(f"cache_dtype {cache_dtype}: the generator's KV cache is in the compute dtype {cfg.dtype}")
    platform = mesh.devices.flat[0].platform
    cfg = cfg.replace(numerics=target_numerics(cfg, platform)).validate()
    graphdef, state = abstract_model(cfg)
    generator = Generator(nnx.merge(graphdef, state), mesh=mesh)  # only its jitted steps are used
    params, per_layer = _generator_params(generator, state, mesh, unstack_layers)

    def spec(shape, dtype, axes):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=named_sharding(mesh, axes, shape))

    t = cfg.text
    ids = spec((batch, prompt), jnp.int32, ("batch", None))
    media = (batch * images_per_row, cfg.image_tokens, t.hidden_size)
    images = spec(media, cfg.dtype, ("batch", None, None)) if images_per_row else None
    layer_cache = (batch, t.num_kv_heads, context, t.head_dim)
    if per_layer:
        one = spec(layer_cache, cfg.dtype, ("batch", "act_heads", None, None))
        cache = KVCache((one,) * t.num_layers, (one,) * t.num_layers)
    else:
        stacked = spec((t.num_layers, *layer_cache), cfg.dtype, (None, "batch", "act_heads", None, None))
        cache = KVCache(stacked, stacked)
    rows = spec((batch,), jnp.int32, ("batch",))
    slot = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    key_valid = spec((batch, context), jnp.bool_, ("batch", None))
    matmul, head = _matmul_params(state)
    attention = 4 * t.num_layers * t.num_heads * t.head_dim * context  # scores and values, per query
    chips = mesh.devices.size
    with use_mesh(mesh), compiling_for(platform):
        prefill = _compile(
            "prefill",
            batch * (prompt * (2 * matmul + attention) + 2 * head) / chips,
            generator.prefill,
            generator.graphdef,
            params,
            ids,
            ids,
            images,
            context,
            None,
        )
        decode = _compile(
            "decode",
            batch * (2 * matmul + 2 * head + attention) / chips,
            generator.decode,
            generator.graphdef,
            params,
            cache,
            rows,
            rows,
            slot,
            key_valid,
        )
    towers = [params[0][k] for k in params[0] if k != "language_model"]
    total = _nbytes(params)
    return ServingReport(
        device_kind=mesh.devices.flat[0].device_kind,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        batch=batch,
        prompt=prompt,
        context=context,
        new_tokens=new_tokens,
        images_per_row=images_per_row,
        cache_dtype=str(jnp.dtype(cfg.dtype)),
        unstack_layers=per_layer,
        prefill=prefill,
        decode=decode,
        kv_cache_bytes=_nbytes(cache),
        kv_cache_compiled_bytes=decode.memory["alias_bytes"],
        param_bytes=total,
        llm_param_bytes=total - _nbytes(towers),
        decode_weight_bytes=_nbytes((params[0]["language_model"], *params[1:]), mesh, gathered=True)
        - _nbytes(params[0]["language_model"]["embed_tokens"], mesh, gathered=True),
    )


def target_numerics(cfg: OwlConfig, platform: str) -> Numerics:
    """`cfg.numerics` with every "auto" resolved for `platform` rather than for this process
    (`ops.numerics.resolve_for`); the steps' attention over the cache is masked, for which "auto" is the
    reference everywhere."""
    resolved = resolve_for(cfg.numerics, platform)
    return resolved.replace(attention="xla") if resolved.attention == "auto" else resolved


def format_serving(
    report: ServingReport,
    *,
    hbm_bytes: float | None = None,
    hbm_bytes_per_s: float | None = None,
    peak_flops: float | None = None,
) -> str:
    """A markdown table of `report`; given a chip's HBM size, HBM bandwidth and peak FLOP/s, also whether
    the plan fits and the decode step's HBM-bound and FLOP-bound times."""
    d, p = report.decode, report.prefill
    mesh = " × ".join(f"{k} {v}" for k, v in report.mesh.items())
    layout = "per-layer weights and cache" if report.unstack_layers else "stacked layers"
    rows = [
        ("device, mesh", f"{report.device_kind}; {mesh}; {layout}"),
        (
            "shape",
            f"batch {report.batch}, prompt {report.prompt} slots (images per row: {report.images_per_row}), "
            f"context {report.context}, {report.new_tokens} new tokens",
        ),
        ("compile prefill / decode", f"{p.compile_seconds:.1f} s / {d.compile_seconds:.1f} s"),
        ("parameters per chip", _size(report.param_bytes)),
        (
            f"KV cache per chip ({report.cache_dtype}): shapes / compiled",
            f"{_size(report.kv_cache_bytes)} / {_size(report.kv_cache_compiled_bytes)}",
        ),
        ("prefill peak per chip (temp)", f"{_size(p.memory['peak_bytes'])} ({_size(p.memory['temp_bytes'])})"),
        ("decode peak per chip (temp)", f"{_size(d.memory['peak_bytes'])} ({_size(d.memory['temp_bytes'])})"),
        ("serving peak per chip", _size(report.serving_peak_bytes)),
        ("prefill GFLOP per chip: shapes / compiled", f"{p.flops / 1e9:,.5g} / {p.compiled_flops / 1e9:,.5g}"),
        ("decode GFLOP per chip: shapes / compiled", f"{d.flops / 1e9:,.5g} / {d.compiled_flops / 1e9:,.5g}"),
        ("decode HBM read per chip (weights + cache)", _size(report.decode_bytes_read)),
        ("prefill collectives", _collectives_text(p.collectives)),
        ("decode collectives", _collectives_text(d.collectives)),
    ]
    if hbm_bytes is not None:
        fits = "yes" if report.serving_peak_bytes <= hbm_bytes else "no"
        rows.append(("fits", f"{fits} ({_size(report.serving_peak_bytes)} of {_size(hbm_bytes)})"))
    if hbm_bytes_per_s is not None:
        step = report.decode_seconds(hbm_bytes_per_s)
        rows.append(("decode step, HBM-bound", f"{step * 1e3:.2f} ms ({report.batch / step:,.0f} tokens/s)"))
    if peak_flops is not None:
        rows.append(("decode step, FLOP-bound", f"{d.flops / peak_flops * 1e3:.3f} ms"))
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


# ---------------------------------------------------------------------------------------------------
def _compile(name: str, flops: float, jitted, *args) -> StepReport:
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    return StepReport(
        name, seconds, memory_summary(compiled), float(flops), matmul_flops(compiled), collective_summary(compiled)
    )


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _sharded(state: Any, mesh: Mesh) -> Any:
    """The abstract `state` with each leaf's `NamedSharding` by its logical axes."""

    def attach(var, sharding):
        value = var.get_value()
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding.get_value()))

    return jax.tree.map(attach, state, state_shardings(state, mesh), is_leaf=_is_var)


def _generator_params(generator: Generator, state: nnx.State, mesh: Mesh, unstack: bool) -> tuple[tuple, bool]:
    """The abstract, sharded `Generator.state` `(state, layer_states, fused)` and whether it is per layer.

    Unstacked, it is what `Generator(unstack_layers=True)` builds (the same `unstack_layer_states` and
    `fuse_projections`, traced abstractly), each per-layer leaf sharded as its stack without the layer axis.
    """
    if not unstack:
        return (_sharded(state, mesh), None, None), False
    model = generator.model
    layers, n = model.language_model.layers, model.config.text.num_layers
    fuse = can_fuse_projections(layers) and dict(mesh.shape).get("tensor", 1) == 1
    layer_graph, stacked = nnx.split(layers)
    pairs = jax.eval_shape(
        lambda st: unstack_layer_states(nnx.merge(layer_graph, st), n, transform=fuse_projections if fuse else None),
        stacked,
    )
    layer_states = [p[0] for p in pairs] if fuse else pairs
    fused = [p[1] for p in pairs] if fuse else None

    def drop_layer_axis(var):
        value, axes = var.get_value(), var.get_metadata().get("axes")
        axes = (None,) * value.ndim if axes is None or len(axes) != value.ndim + 1 else axes[1:]
        sharding = named_sharding(mesh, axes, value.shape)
        return var.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding))

    def fused_sharding(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=named_sharding(mesh, ("embed", None), x.shape))

    layer_states = [jax.tree.map(drop_layer_axis, st, is_leaf=_is_var) for st in layer_states]
    fused = None if fused is None else jax.tree.map(fused_sharding, fused)
    rest = _sharded(state, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    rest["language_model"]["layers"] = jax.tree.map(  # as the generator drops its stacked layers
        lambda a: jax.ShapeDtypeStruct((), a.dtype, sharding=replicated), rest["language_model"]["layers"]
    )
    return (rest, layer_states, fused), True


def _matmul_params(state: nnx.State) -> tuple[int, int]:
    """Weights each LLM token multiplies: `(in the layers, in the output head)` (the embedding when tied)."""
    llm = state["language_model"]
    layers = sum(math.prod(a.shape) for a in jax.tree.leaves(llm["layers"]) if a.ndim >= 3)  # kernels
    head = llm["lm_head"] if "lm_head" in llm else llm["embed_tokens"]
    return layers, sum(math.prod(a.shape) for a in jax.tree.leaves(head) if a.ndim >= 2)


def _nbytes(tree: Any, mesh: Mesh | None = None, *, gathered: bool = False) -> int:
    """Per-chip bytes of a tree of sharded abstract arrays; `gathered`: as if only the `tensor` axis sharded
    them (the copies a chip multiplies once arrays sharded over fsdp are gathered)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        if gathered:
            spec = x.sharding.spec
            split = [math.prod(mesh.shape[a] for a in _axes(spec[i]) if a == "tensor") for i in range(len(spec))]
            shape = tuple(d // split[i] if i < len(split) else d for i, d in enumerate(x.shape))
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _collectives_text(collectives: dict[str, tuple[int, int]]) -> str:
    if not collectives:
        return "none"
    return ", ".join(f"{kind} ×{n} ({_size(b)})" for kind, (n, b) in sorted(collectives.items()))
