"""Compiling a stage's real train step for a TPU topology this host does not have, and reading what it needs.

`compile_train_step` builds the stage's `Trainer` on the target's (abstract) devices with the project's
mesh rules, optimizer masks, remat policy and dtypes, lowers `Trainer.jitted_step` on shape-only arguments
(`Trainer.abstract_state()` and a batch of `ShapeDtypeStruct`s: nothing is materialised) and compiles it with
the TPU compiler. The report says whether it fits the chip's HBM, with XLA's buffer figures, the step's FLOPs
by `owl_jax.training.flops.train_step_flops` beside those of the compiled program, its collectives and kernels.

Per-chip batch means rows per data-parallel shard (mesh data × fsdp): the chips of one tensor-parallel group
share their rows. The global batch is that × data × fsdp × the stage's `grad_accum`.

Compiled FLOPs are `analysis.matmul_flops` (every dot and convolution, loop bodies × trip count) × devices.
The splash kernel's FLOPs are invisible there, so the model count they are compared with leaves out what the
kernel computes (the LLM's causal attention, `train_step_flops` with full minus halved causal attention)
when the program calls it. The count adds what the remat policy recomputes (`recompute_flops`); a ratio
above 1 is recomputation it does not model, such as the chunked loss's head running again in the backward
pass, or the compiler's own: near the HBM limit XLA recomputes some of the step rather than hold its
results (`flops_xla_remat`, `analysis.rematerialized_flops`), reported apart.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from typing import Any

from owl_jax.aot import targets as targets_lib


@dataclasses.dataclass
class TrainCompile:
    """What one compile of a train step showed. Bytes and compiled FLOPs are per chip unless named global."""

    target: str
    topology: str
    chips: int
    num_slices: int
    stage: str
    kind: str
    mesh: dict[str, int]
    remat: str
    per_chip_batch: int
    global_batch: int
    seq_len: int
    images_per_row: int
    fits: bool
    hbm_bytes: int
    memory: dict[str, int] | None = None
    error: str = ""  # why it does not fit (or failed), in one line
    needed_bytes: int = 0  # what the compiler said it would need, when it ran out of HBM
    flops_model: float = 0.0  # train_step_flops, global, causal attention halved (the MFU convention)
    flops_recompute: float = 0.0  # what the remat policy adds (training.flops.recompute_flops), global
    flops_model_in_hlo: float = 0.0  # the part of flops_model + flops_recompute outside custom-call kernels
    flops_compiled: float = 0.0  # HLO matmul FLOPs, global
    flops_xla_remat: float = 0.0  # the part of flops_compiled XLA's own rematerialization adds, global
    hbm_traffic_bytes: float = 0.0  # per chip per step (`traffic.hbm_bytes`)
    hbm_bytes_per_s: float = 0.0  # the chip's HBM bandwidth
    kernel_calls: dict[str, int] = dataclasses.field(default_factory=dict)
    collectives: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    trainable_params: int = 0
    frozen_params: int = 0
    opt_state_elements: int = 0  # array elements of the optimizer state among the compiled step's arguments
    compile_seconds: float = 0.0
    peak_flops_per_chip: float = 0.0
    chosen: bool = False  # the search's pick for its stage

    @property
    def flops_ratio(self) -> float:
        return self.flops_compiled / self.flops_model_in_hlo if self.flops_model_in_hlo else float("nan")

    @property
    def flops_ratio_without_xla_remat(self) -> float:
        """`flops_ratio` leaving out what XLA's own rematerialization adds: the model count's accuracy."""
        done = self.flops_compiled - self.flops_xla_remat
        return done / self.flops_model_in_hlo if self.flops_model_in_hlo else float("nan")

    @property
    def min_step_seconds(self) -> float:
        """The step's time with every chip at its peak bf16 rate on the compiled FLOPs (a lower bound)."""
        return self.flops_compiled / (self.chips * self.peak_flops_per_chip) if self.peak_flops_per_chip else 0.0

    @property
    def min_step_seconds_hbm(self) -> float:
        """The step's time moving its HBM traffic at the chip's full bandwidth (a lower bound)."""
        return self.hbm_traffic_bytes / self.hbm_bytes_per_s if self.hbm_bytes_per_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            flops_ratio=self.flops_ratio,
            flops_ratio_without_xla_remat=self.flops_ratio_without_xla_remat,
            min_step_seconds=self.min_step_seconds,
            min_step_seconds_hbm=self.min_step_seconds_hbm,
        )
        d["collectives"] = {k: {"count": c, "bytes": b} for k, (c, b) in self.collectives.items()}
        return d


class CompileError(RuntimeError):
    """The TPU compiler refused the step for a reason other than its HBM."""


def tpu_numerics(numerics):
    """`numerics` with each "auto" route resolved for a TPU (explicit choices kept): this process's platform
    is not the target's. Training attention takes splash (`ops.resolve_for` leaves attention to each call)."""
    from owl_jax.ops.numerics import resolve_for

    resolved = resolve_for(numerics, "tpu")
    return resolved.replace(attention="splash") if resolved.attention == "auto" else resolved


def use_cpu_host() -> None:
    """Run JAX itself on this host's CPU (unless `JAX_PLATFORMS` says otherwise): the TPU runtime is only
    asked for topologies, never for devices it cannot find. Call before JAX starts its backends."""
    import os

    targets_lib.prepare_environment()
    if not os.environ.get("JAX_PLATFORMS"):
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:
            sys.modules["jax"].config.update("jax_platforms", "cpu")


def compile_train_step(
    config: Any,
    stage_name: str,
    model_cfg: Any,
    target: targets_lib.Target,
    *,
    mesh_shape: tuple[int, int, int],
    per_chip_batch: int,
    seq_len: int,
    remat: str,
    save: str = "",
    log=None,
) -> TrainCompile:
    """Compile stage `stage_name` of training config `config` with model `model_cfg` (its architecture; the
    run's dtypes come from `config.model`) for `target` on a `(data, fsdp, tensor)` mesh (one size may be -1).

    `save`: also write the compiled step (`jax.experimental.serialize_executable`) to this path (local or
    any `etils.epath` path, e.g. gs://). `log(line)` gets one line when the compile starts and one when it
    ends. A step that needs more HBM than the chip has is reported (`fits` False, the compiler's figures in
    `error`); `ConfigError`/`ShardingError` are raised for a stage, mesh or batch that cannot be built, and
    `CompileError` for any other refusal of the compiler.
    """
    import jax

    from owl_jax.aot import analysis, traffic
    from owl_jax.config import ConfigError
    from owl_jax.ops.numerics import compiling_for
    from owl_jax.sharding import make_mesh
    from owl_jax.training.flops import train_step_flops
    from owl_jax.training.lora_targets import stage_lora
    from owl_jax.training.run import _prepare_frozen
    from owl_jax.training.trainer import Trainer

    stage = config.stages[stage_name]
    m = config.model
    cfg = model_cfg.replace(
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        scan_layers=m.scan_layers,
        remat_policy=remat,
        numerics=tpu_numerics(model_cfg.numerics),
    )
    cfg = cfg.replace(lora=stage_lora(stage, stage_name, cfg))
    mesh = make_mesh(*mesh_shape, devices=target.devices())
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if per_chip_batch < 1:
        raise ConfigError(f"per-chip batch must be >= 1, got {per_chip_batch}")
    rows = per_chip_batch * shards * stage.grad_accum
    images = stage.data.max_images or config.data.max_images
    mesh_text = "x".join(str(mesh.shape[a]) for a in ("data", "fsdp", "tensor"))
    report = TrainCompile(
        target=target.name,
        topology=target.topology_name,
        chips=target.num_chips,
        num_slices=target.num_slices,
        stage=stage_name,
        kind=stage.kind,
        mesh=dict(mesh.shape),
        remat=remat,
        per_chip_batch=per_chip_batch,
        global_batch=rows,
        seq_len=seq_len,
        images_per_row=images,
        fits=False,
        hbm_bytes=target.chip.hbm_bytes,
        peak_flops_per_chip=target.chip.peak_bf16_flops,
        hbm_bytes_per_s=target.chip.hbm_bytes_per_s,
    )
    say = log or (lambda line: None)
    say(f"compiling {stage_name} ({stage.kind}) for {target.name}: mesh {mesh_text} (data x fsdp x tensor), "
        f"{per_chip_batch} rows/chip ({rows} global) x {seq_len} tokens, remat {remat}")  # fmt: skip
    start = time.perf_counter()
    with compiling_for("tpu"):
        trainer = Trainer(
            cfg,
            stage=stage.kind,
            mesh=mesh,
            optim=stage.optim,
            total_steps=max(stage.steps, 1),
            grad_accum=stage.grad_accum,
            train_abstractor=stage.train_abstractor,
            frozen_dtype=stage.frozen_dtype,
            loss_chunk=stage.get("loss_chunk", 0),
            prepare_frozen=_prepare_frozen(stage_name, stage.get("prepare_frozen", "auto")),
        )
        state = trainer.abstract_state()
        batch = abstract_batch(trainer, rows=rows, seq_len=seq_len, images=images)
        report.trainable_params, report.frozen_params = trainer.num_trainable, trainer.num_frozen
        report.opt_state_elements = sum(math.prod(x.shape) for x in jax.tree.leaves(state.opt_state))
        try:
            # The abstract mesh, not `use_mesh`: values made while tracing (the splash kernel's block
            # tables) must not be placed on the target's devices, which this process cannot run.
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                compiled = trainer.jitted_step(state, batch).lower(state, batch).compile()
        except Exception as e:
            if not hbm_message(str(e)):
                raise CompileError(f"{stage_name} for {target.name}: {_first_line(str(e))}") from e
            report.compile_seconds = time.perf_counter() - start
            report.error, report.needed_bytes = hbm_message(str(e)), needed_bytes(str(e))
            say(f"  does not fit ({report.compile_seconds:.0f} s): {report.error}")
            return report
    report.compile_seconds = time.perf_counter() - start
    compiled_state = compiled.args_info[0][0]  # the step's (state, batch) arguments, as compiled
    report.opt_state_elements = sum(math.prod(x.shape) for x in jax.tree.leaves(compiled_state.opt_state))
    module = analysis.HloModule.parse(compiled.as_text())
    report.memory = analysis.memory_summary(compiled)
    report.fits = True
    report.collectives = analysis.collective_summary(module)
    report.kernel_calls = analysis.kernel_calls(module)
    report.flops_compiled = analysis.matmul_flops(module) * target.num_chips
    report.flops_xla_remat = analysis.rematerialized_flops(module) * target.num_chips
    report.hbm_traffic_bytes = traffic.hbm_bytes(module)
    encoded = 0 if stage.data.drop_images else rows * images  # as the training loop counts them
    count = dict(rows=rows, seq_len=seq_len, images=encoded, train_abstractor=stage.train_abstractor)
    report.flops_model = train_step_flops(cfg, stage.kind, **count)
    hardware = train_step_flops(cfg, stage.kind, remat=remat, **count)  # with the policy's recomputation
    report.flops_recompute = hardware - report.flops_model
    in_kernels = 0.0
    if any(name.startswith("splash") for name in report.kernel_calls):  # the LLM's causal attention
        in_kernels = train_step_flops(cfg, stage.kind, causal_half=False, remat=remat, **count) - hardware
    report.flops_model_in_hlo = hardware - in_kernels
    if save:
        save_executable(compiled, save)
    peak = report.memory["peak_bytes"]
    say(f"  fits ({report.compile_seconds:.0f} s): peak {peak / 2**30:.2f} GiB of {report.hbm_bytes / 2**30:.0f} GiB")
    return report


def abstract_batch(trainer, *, rows: int, seq_len: int, images: int) -> dict:
    """A batch of `ShapeDtypeStruct`s as the data pipeline makes it (`owl_jax.data.pipeline`), sharded as
    `Trainer.global_batch` shards rows."""
    import jax
    import jax.numpy as jnp

    size = trainer.model_cfg.vision.image_size
    shapes = {
        "pixel_values": ((rows, images, 3, size, size), jnp.float32),
        "input_ids": ((rows, seq_len), jnp.int32),
        "attention_mask": ((rows, seq_len), jnp.int32),
        "loss_mask": ((rows, seq_len - 1), jnp.int32),
        "image_mask": ((rows, images), jnp.int32),
        "skipped": ((rows,), jnp.int32),
    }
    return {k: jax.ShapeDtypeStruct(s, d, sharding=trainer.batch_sharding) for k, (s, d) in shapes.items()}


def save_executable(compiled: Any, path: str) -> None:
    """Write `compiled` as `jax.experimental.serialize_executable` makes it, pickled with its argument and
    result trees (`load_executable` reads it back on a host of the target's kind)."""
    import pickle

    from jax.experimental.serialize_executable import serialize

    from owl_jax.paths import as_path

    payload = serialize(compiled)
    out = as_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(pickle.dumps(payload))


def load_executable(path: str, backend: Any = None) -> Any:
    """The compiled step `save_executable` wrote, ready to call (on devices of the target's kind)."""
    import pickle

    from jax.experimental.serialize_executable import deserialize_and_load

    from owl_jax.paths import as_path

    payload, in_tree, out_tree = pickle.loads(as_path(path).read_bytes())
    return deserialize_and_load(payload, in_tree, out_tree, backend=backend)


def hbm_message(error: str) -> str:
    """'needs X of Y HBM' from the TPU compiler's out-of-memory error, or "" for another error."""
    if "hbm" not in error.lower():
        return ""
    size = r"([\d.]+\s*[KMGT]?i?B?)"
    required = re.search(rf"required for ([\w ]+?) \({size}\) exceeds available HBM \({size}\)", error)
    if required:
        return f"needs {required.group(2)} of {required.group(3)} HBM for {required.group(1)}"
    used = re.search(rf"[Uu]sed {size} of {size} hbm", error)
    if used:
        return f"needs {used.group(1)} of {used.group(2)} HBM"
    return _first_line(error)


def needed_bytes(error: str) -> int:
    """The bytes an out-of-HBM error says the program needs (0 when it says none)."""
    found = re.search(r"required for [\w ]+? \(([\d.]+)\s*([KMGT]?)i?B?\)", error) or re.search(
        r"[Uu]sed ([\d.]+)\s*([KMGT]?)i?B? of", error
    )
    if not found:
        return 0
    return int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2) or " "))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else "compile failed"
