"""`python -m owl_jax.aot`: compile a training config's steps for a TPU target on this host, and report.

    python -m owl_jax.aot --config configs/stage2_instruct.py --model 7b --target v5p-256 \\
        [--mesh 1,128,1 | --mesh.data 1 --mesh.fsdp 128 --mesh.tensor 1] [--stage stage2] \\
        [--per-chip-batch 2] [--seq-len 512] [--remat full] [--search [--search-within 0.05] | --fit-batch 32]
        [--save PATH] [--json out.json]

Compiles every stage of the config's `run` (or `--stage`) for `--target` (`owl_jax.aot.targets`: v5p-256,
v5e-256, v4-128, 2xv5e-256, v5e:2x2, ...) and prints one markdown table per compile: memory per chip against
HBM, FLOPs per step, collectives, kernels. `--search` finds each stage's largest per-chip batch and the remat
policy that allows it (`owl_jax.aot.search`; `--search-within 0` bisects to the exact batch, the default stops
once a failure is within 5% above the largest fit). `--fit-batch N` instead finds the policy with the least
recomputation that fits N rows per chip (a recipe's batch). `--model` names the architecture (7b: the released
mPLUG-Owl LLaMA-7B; tiny; a file whose `get_config()` returns an OwlConfig); without it the config's own
(`model.init=random`). Defaults come from the config: its mesh, `data.seq_len`, `model.remat_policy`, and a
per-chip batch of the stage's `batch_size` over the data-parallel chips. `train.py --config X
--config.aot.topology=v5p-256` runs the same from a training command line (`config.aot`).

Serving plans compile the generator's prefill and decode steps instead (`owl_jax.aot.serving`):

    python -m owl_jax.aot --serve --model 7b --target v5e-8 --mesh 1,1,8 --batch 32 --context 2048 \\
        [--images 1] [--unstack-layers] [--json out.json]

A usage or config mistake ends with one line on stderr and status 2; a compiler failure other than running
out of HBM (which is reported: "does not fit") with one line and status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from owl_jax.aot import targets as targets_lib
from owl_jax.aot.train_plan import use_cpu_host

MODELS = {"7b": "configs.mplug_owl_llama_7b", "tiny": "configs.tiny"}


class UsageError(ValueError):
    """A command-line or config mistake: reported in one line, exit status 2."""


def model_for(config: Any, name: str):
    """The architecture `name` names (a preset, a .py file with `get_config()`), or the config's own."""
    import importlib
    import importlib.util

    from owl_jax.config import OwlConfig

    if not name:
        if config.model.init != "random":
            raise UsageError(
                f"model.init={config.model.init!r} reads weights; name an architecture ({', '.join(MODELS)} "
                "or a .py file) with --model (train.py: --config.aot.model)"
            )
        from owl_jax.training.run import model_config

        return model_config(config)
    if name in MODELS:
        cfg = importlib.import_module(MODELS[name]).get_config()
    elif name.endswith(".py"):
        spec = importlib.util.spec_from_file_location("owl_aot_model", name)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except FileNotFoundError:
            raise UsageError(f"model file {name} does not exist") from None
        cfg = module.get_config()
    else:
        raise UsageError(f"unknown model {name!r}; one of {', '.join(MODELS)} or a .py file")
    if not isinstance(cfg, OwlConfig):
        raise UsageError(f"model {name}: get_config() must return an OwlConfig, not {type(cfg).__name__}")
    return cfg


def run(
    config: Any,
    *,
    target: str,
    model: str = "",
    stages: list[str] | None = None,
    mesh: tuple[int, int, int] | None = None,
    per_chip_batch: int = 0,
    seq_len: int = 0,
    remat: str = "",
    search: bool = False,
    search_within: float = 0.05,
    fit_batch: int = 0,
    save: str = "",
    json_path: str = "",
    out=None,
    err=None,
) -> list:
    """Compile (or `search`) every stage for `target`; print the tables to `out`, progress to `err`; return
    the reports. Zero/empty arguments take the config's values."""
    from ml_collections import ConfigDict

    from owl_jax.aot import report as fmt
    from owl_jax.aot.search import REMAT_ORDER, best_remat
    from owl_jax.aot.train_plan import compile_train_step
    from owl_jax.config import REMAT_POLICIES
    from owl_jax.training.validation import run_stages, validate

    out, err = out or sys.stdout, err or sys.stderr
    cfg = model_for(config, model)
    if model:  # the architecture is named: the config's weights (checkpoint folders) are not needed
        config = ConfigDict(config.to_dict())
        config.model.update(init="random", arch=ConfigDict(cfg.to_hf_config()))
    validate(config)
    tgt = targets_lib.parse_target(target)
    names = stages or run_stages(config)
    for name in names:
        if name not in config.stages:
            raise UsageError(f"stage {name!r} is not in the config's stages ({', '.join(config.stages)})")
    remat = remat or config.model.remat_policy
    if remat not in REMAT_POLICIES:
        raise UsageError(f"remat {remat!r} is not one of {', '.join(REMAT_POLICIES)}")
    mesh = mesh or (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    seq_len = seq_len or config.data.seq_len
    if fit_batch < 0 or (fit_batch and search):
        raise UsageError("--fit-batch takes a positive batch, and not with --search")
    if search_within < 0:
        raise UsageError(f"--search-within must be >= 0, got {search_within}")
    if seq_len < 2 or per_chip_batch < 0:
        raise UsageError(f"sequence length {seq_len} must be >= 2 and per-chip batch {per_chip_batch} >= 0")
    began = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - began:6.0f} s] {line}", file=err, flush=True)

    reports = []
    for name in names:
        stage = config.stages[name]
        data_parallel = _data_parallel(mesh, tgt.num_chips)

        def compile_at(policy: str, batch: int, name=name, last: bool = False):
            return compile_train_step(
                config, name, cfg, tgt, mesh_shape=mesh, per_chip_batch=batch, seq_len=seq_len, remat=policy,
                save=_save_path(save, name, len(names)) if last else "", log=log,
            )  # fmt: skip

        default_batch = max(1, stage.batch_size // (data_parallel * stage.grad_accum))
        if fit_batch:
            tried = []
            for policy in REMAT_ORDER:  # least recomputation first: the first that fits is the fastest
                tried.append(compile_at(policy, fit_batch))
                if tried[-1].fits:
                    tried[-1].chosen = True
                    break
            print(
                f"\n### {name} on {tgt.name}: the least recomputation that fits {fit_batch} rows per chip\n", file=out
            )
            print(fmt.search_table({r.remat: r for r in tried}, tried[-1] if tried[-1].fits else None), file=out)
            if tried[-1].fits:
                print(f"\n### {name} on {tgt.name}, remat {tried[-1].remat}\n\n{fmt.table(tried[-1])}", file=out)
            reports += tried
        elif search:
            winner, best, attempts = best_remat(
                compile_at, policies=REMAT_ORDER, start=per_chip_batch or default_batch, within=search_within
            )
            print(f"\n### {name} on {tgt.name}: largest per-chip batch by remat policy\n", file=out)
            print(fmt.search_table(best, winner, attempts), file=out)
            chosen = [winner] if winner is not None else []
            if winner is not None and save:
                chosen = [compile_at(winner.remat, winner.per_chip_batch, last=True)]
            for r in chosen:
                print(f"\n### {name} on {tgt.name}, remat {r.remat}\n\n{fmt.table(r)}", file=out)
            if winner is not None:
                winner.chosen = True
            reports += attempts  # every compile the search made, the chosen one marked
        else:
            r = compile_at(remat, per_chip_batch or default_batch, last=True)
            print(f"\n### {name} on {tgt.name}\n\n{fmt.table(r)}", file=out)
            reports.append(r)
        out.flush()
    if json_path:
        from owl_jax.paths import as_path

        as_path(json_path).write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    return reports


def _data_parallel(mesh: tuple[int, int, int], chips: int) -> int:
    sizes = list(mesh)
    if -1 in sizes:
        known = 1
        for s in sizes:
            known *= s if s != -1 else 1
        sizes[sizes.index(-1)] = max(1, chips // known)
    return sizes[0] * sizes[1]


def _save_path(path: str, stage: str, stages: int) -> str:
    if not path or stages == 1:
        return path
    stem, dot, ext = path.rpartition(".")
    return f"{stem}-{stage}.{ext}" if dot and "/" not in ext else f"{path}-{stage}"


# -- the command line --------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m owl_jax.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="training config file (configs/*.py)")
    p.add_argument("--target", required=True, help="v5p-256, v5e-256, v4-128, v6e-64, 2xv5e-256, v5e:2x2, ...")
    p.add_argument("--model", default="", help="architecture: 7b, tiny or a .py file (default: the config's)")
    p.add_argument("--stage", action="append", help="stage to compile (repeatable; default: the config's run)")
    p.add_argument("--mesh", help="data,fsdp,tensor (one may be -1)")
    for axis in ("data", "fsdp", "tensor"):
        p.add_argument(f"--mesh.{axis}", dest=f"mesh_{axis}", type=int)
    p.add_argument("--per-chip-batch", type=int, default=0, help="rows per data-parallel chip")
    p.add_argument("--seq-len", type=int, default=0)
    p.add_argument("--remat", default="", help="none, dots_with_no_batch_dims, dots or full")
    p.add_argument("--search", action="store_true", help="largest per-chip batch and best remat per stage")
    p.add_argument(
        "--fit-batch", type=int, default=0,
        help="the remat policy with the least recomputation that fits this per-chip batch",
    )  # fmt: skip
    p.add_argument(
        "--search-within", type=float, default=0.05,
        help="stop once a failing batch is at most this fraction above the largest fit (0: exact)",
    )  # fmt: skip
    p.add_argument("--save", default="", help="write the compiled step here (serialize_executable)")
    p.add_argument("--json", default="", help="write the reports here")
    return p


def _mesh(args: argparse.Namespace, config: Any) -> tuple[int, int, int]:
    if args.mesh:
        try:
            sizes = [int(s) for s in args.mesh.split(",")]
        except ValueError:
            sizes = []
        if len(sizes) != 3:
            raise UsageError(f"--mesh {args.mesh!r} must be three integers data,fsdp,tensor")
    else:
        sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    for i, axis in enumerate(("data", "fsdp", "tensor")):
        value = getattr(args, f"mesh_{axis}", None)
        sizes[i] = sizes[i] if value is None else value
    if any(s < 1 and s != -1 for s in sizes) or sizes.count(-1) > 1:
        raise UsageError(f"mesh {sizes} must be sizes >= 1, at most one -1")
    return tuple(sizes)


def _load_config(path: str) -> Any:
    import importlib.util
    import os

    from ml_collections import ConfigDict

    if not os.path.isfile(path):
        raise UsageError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location("owl_aot_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if not isinstance(config, ConfigDict):
        raise UsageError(f"config file {path}: get_config() must return a ConfigDict, not {type(config).__name__}")
    return config


def _serve_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m owl_jax.aot --serve", description="compile the generator's steps for a target")
    p.add_argument("--serve", action="store_true")
    p.add_argument("--target", required=True, help="v5e-8, v6e-8, v5p-8, ...")
    p.add_argument("--model", default="7b", help="architecture: 7b, tiny or a .py file")
    p.add_argument("--mesh", default="1,1,-1", help="data,fsdp,tensor (default: tensor parallel over every chip)")
    p.add_argument("--batch", type=int, default=8, help="rows decoded together")
    p.add_argument("--context", type=int, default=2048, help="KV-cache length per row")
    p.add_argument("--images", type=int, default=1, help="images per row")
    p.add_argument("--unstack-layers", action="store_true", help="the generator's per-layer layout")
    p.add_argument("--json", default="", help="write the report here")
    return p


def serve(argv: list[str]) -> None:
    """The serving plan of `argv` (see the module doc), printed as one table."""
    import dataclasses

    from owl_jax.aot.serving import compile_serving, format_serving
    from owl_jax.sharding import make_mesh

    args = _serve_parser().parse_args(argv)
    if args.batch < 1 or args.context < 2 or args.images < 0:
        raise UsageError(f"--batch {args.batch} must be >= 1, --context {args.context} >= 2, --images >= 0")
    cfg = model_for(None, args.model).replace(dtype="bfloat16", param_dtype="bfloat16")
    tgt = targets_lib.parse_target(args.target)
    mesh = make_mesh(*_mesh(args, None), devices=tgt.devices())
    try:
        report = compile_serving(
            cfg,
            mesh,
            batch=args.batch,
            context=args.context,
            images_per_row=args.images,
            unstack_layers=args.unstack_layers,
        )
    except ValueError as e:  # shapes that leave no room (one line, status 2)
        raise UsageError(str(e)) from None
    chip = tgt.chip
    print(f"\n### serving on {tgt.name}, mesh {dict(mesh.shape)}, batch {args.batch}, context {args.context}\n")
    print(
        format_serving(
            report, hbm_bytes=chip.hbm_bytes, hbm_bytes_per_s=chip.hbm_bytes_per_s, peak_flops=chip.peak_bf16_flops
        )
    )
    if args.json:
        from owl_jax.paths import as_path

        as_path(args.json).write_text(json.dumps(dataclasses.asdict(report), indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    use_cpu_host()  # before JAX starts
    from owl_jax.aot.train_plan import CompileError
    from owl_jax.config import ConfigError
    from owl_jax.sharding import ShardingError

    argv = sys.argv[1:] if argv is None else argv
    try:
        if "--serve" in argv:
            serve(argv)
            return 0
        args = _parser().parse_args(argv)
        config = _load_config(args.config)
        run(
            config,
            target=args.target,
            model=args.model,
            stages=args.stage,
            mesh=_mesh(args, config),
            per_chip_batch=args.per_chip_batch,
            seq_len=args.seq_len,
            remat=args.remat,
            search=args.search,
            search_within=args.search_within,
            fit_batch=args.fit_batch,
            save=args.save,
            json_path=args.json,
        )
    except (UsageError, ConfigError, ShardingError, targets_lib.TargetError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except CompileError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0
