"""Checking a training config before any work: every field known, present and of its type, every value in range.

`validate(config)` raises `ConfigError` naming the first bad field (`stages.stage1.optim.lr=nan must be a
finite number >= 0`, `unknown config field stages.stage1.optim.lrr; did you mean stages.stage1.optim.lr?`);
`check_batch_sizes` checks the batch sizes against the mesh, and `lora_targets.stage_loras` each stage's LoRA
targets against the model (a pattern that matches none of its linear layers). `owl_jax.training.run.run`
calls them all first, and `owl-train` prints what they raise in one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any

from ml_collections import ConfigDict

from owl_jax.config import (
    ATTENTION_IMPLS,
    DTYPES,
    MATMUL_ROUTES,
    REMAT_POLICIES,
    SWITCHES,
    TEXT_MODEL_TYPES,
    ConfigError,
    Numerics,
)
from owl_jax.data.conversation import TOKENIZATIONS
from owl_jax.training.schema import (
    BY_TEXT_MODEL,
    MODEL_INITS,
    PREPARE_FROZEN,
    QUANTIZE,
    QUANTIZED_STAGES,
    STAGE_KINDS,
    base_config,
    optim_config,
    stage_config,
)

# Fields a config may leave out (their readers have defaults), by path with "*" for a stage's name.
OPTIONAL = frozenset(
    {
        "model.attention_impl",
        "model.numerics",
        "model.quantize",
        "aot",
        *(f"aot.{k}" for k in ("topology", "model", "per_chip_batch", "search", "save", "json")),
        "data.tokenization",
        "data.generate_answers",
        "stages.*.loss_chunk",
        "stages.*.prepare_frozen",
        "stages.*.start_from",
        "stages.*.optim.end_lr",
        "stages.*.optim.clip_norm",
        "stages.*.lora.targets_by_model",
        *(f"stages.*.lora.targets_by_model.{t}" for t in TEXT_MODEL_TYPES),
    }
)
FREE_FORM = frozenset({"model.arch"})  # the model's own config.json layout, checked when the model is built
MAY_BE_NONE = frozenset({"stages.*.optim.clip_norm"})


def run_stages(config: ConfigDict) -> list[str]:
    """The stage names listed in `config.run`, in order."""
    return [s.strip() for s in str(config.run).split(",") if s.strip()]


def validate(config: ConfigDict) -> ConfigDict:
    """Raise `ConfigError` naming the first field of `config` that is unknown, missing, of the wrong type or
    out of range (messages like `stages.stage1.optim.lr=nan must be a finite number >= 0`); return `config`.

    Needs no devices: batch sizes against the mesh are `check_batch_sizes`'s.
    """
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"a training config must be a ConfigDict, not {type(config).__name__}")
    _check_fields(config, _template(config), "")
    _check_run(config)
    _check_values(config)
    for name in config.stages:
        _check_stage(config, name)
    return config


def check_batch_sizes(config: ConfigDict, *, data_parallel: int, processes: int = 1) -> None:
    """Raise `ConfigError` unless every stage in `config.run` splits its batch evenly into `grad_accum`
    micro-batches, each over the `data_parallel` devices (mesh data × fsdp) and the `processes`."""
    unit = math.lcm(data_parallel, processes)
    for name in run_stages(config):
        stage = config.stages[name]
        if stage.batch_size % (stage.grad_accum * unit) == 0:
            continue
        what = f"the {data_parallel} data-parallel devices (mesh data×fsdp)"
        if unit != data_parallel:
            what = f"the {processes} processes and {what}, i.e. {unit},"
        if stage.grad_accum > 1:
            what = f"grad_accum={stage.grad_accum} × {what} = {stage.grad_accum * unit}"
        raise ConfigError(f"stages.{name}.batch_size={stage.batch_size} must be divisible by {what}".rstrip(","))


def unknown_field_message(config: ConfigDict, path: str) -> str | None:
    """Why dotted `path` (e.g. a `--config.<path>` override) names no field of `config`, with the nearest
    valid name; None when it does name one."""
    node, parent = config, ""
    for key in path.split("."):
        here = f"{parent}.{key}" if parent else key
        if not isinstance(node, ConfigDict):
            return f"config field {parent} is a value, not a group of fields: no field {here}"
        if key not in node:
            return _unknown(here, key, list(node.keys()), parent)
        node, parent = node[key], here
    return None


def _unknown(path: str, key: str, valid: list[str], parent: str) -> str:
    scored = [(difflib.SequenceMatcher(None, key, v).ratio(), -i, v) for i, v in enumerate(valid)]
    score, _, nearest = max(scored, default=(0.0, 0, ""))
    if score >= 0.6:
        return f"unknown config field {path}; did you mean {parent + '.' if parent else ''}{nearest}?"
    return f"unknown config field {path}; {parent or 'the config'} has {', '.join(valid) or 'no fields'}"


# -- names and types -----------------------------------------------------------------------------------
def _template(config: ConfigDict) -> ConfigDict:
    """The schema's every field with a value of its type, shaped like `config` (its stages)."""
    template = base_config()
    template.model.numerics = ConfigDict(dataclasses.asdict(Numerics()))
    stages = config.get("stages")
    for name in stages.keys() if isinstance(stages, ConfigDict) else ():
        template.stages[name] = stage_config("stage1", steps=0, batch_size=1, sources=[["data"]], optim=optim_config())
    return template


def _generic(path: str) -> str:
    parts = path.split(".")
    return ".".join("*" if i == 1 and parts[0] == "stages" else p for i, p in enumerate(parts))


def _check_fields(node: ConfigDict, template: ConfigDict, path: str) -> None:
    for key in node.keys():
        here = f"{path}.{key}" if path else key
        if key not in template:
            raise ConfigError(_unknown(here, key, list(template.keys()), path))
        _check_type(here, node[key], template[key])
    for key in template.keys():
        here = f"{path}.{key}" if path else key
        if key not in node and _generic(here) not in OPTIONAL:
            raise ConfigError(f"config field {here} is missing")


def _check_type(path: str, value: Any, expected: Any) -> None:
    if isinstance(expected, ConfigDict):
        if not isinstance(value, ConfigDict):
            raise ConfigError(f"{path}={value!r} must be a group of fields (a ConfigDict)")
        if path not in FREE_FORM:
            _check_fields(value, expected, path)
        return
    if value is None and _generic(path) in MAY_BE_NONE:
        return
    if isinstance(expected, bool):
        ok, kind = isinstance(value, bool), "True or False"
    elif isinstance(expected, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(expected, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(expected, str):
        ok = isinstance(value, str) or (_is_lora_targets(path) and isinstance(value, (tuple, list)))
        kind = "a string"
    else:
        ok, kind = isinstance(value, (tuple, list)), "a tuple"
    if not ok:
        raise ConfigError(f"{path}={value!r} must be {kind}")


def _is_lora_targets(path: str) -> bool:
    """Whether `path` names LoRA targets: a regular expression or a tuple of module names."""
    parts = path.split(".")
    return parts[-2:] == ["lora", "targets"] or parts[-3:-1] == ["lora", "targets_by_model"]


# -- values --------------------------------------------------------------------------------------------
def _get(config: ConfigDict, path: str) -> Any:
    node = config
    for key in path.split("."):
        node = node[key]
    return node


def _count(config: ConfigDict, path: str, minimum: int = 0) -> None:
    value = _get(config, path)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{path}={value!r} must be an integer >= {minimum}")


def _real(config: ConfigDict, path: str, *, positive: bool = False) -> None:
    value = _get(config, path)
    if not (isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if positive else value >= 0)):
        raise ConfigError(f"{path}={value!r} must be a finite number {'>' if positive else '>='} 0")


def _fraction(config: ConfigDict, path: str, *, below_one: bool = False) -> None:
    value = _get(config, path)
    if not (isinstance(value, (int, float)) and 0 <= value and (value < 1 if below_one else value <= 1)):
        raise ConfigError(f"{path}={value!r} must be within [0, 1{')' if below_one else ']'}")


def _choice(config: ConfigDict, path: str, choices: tuple[str, ...]) -> None:
    value = _get(config, path)
    if value not in choices:
        raise ConfigError(f"{path}={value!r} must be one of {', '.join(repr(c) for c in choices)}")


def _check_run(config: ConfigDict) -> None:
    names = run_stages(config)
    if not names:
        raise ConfigError(
            f"run={config.run!r} names no stage; list stages of config.stages ({', '.join(config.stages)})"
        )
    for i, name in enumerate(names):
        if name not in config.stages:
            raise ConfigError(f"run={config.run!r}: stage {name!r} is not in stages ({', '.join(config.stages)})")
        start = config.stages[name].get("start_from", "")
        if start and start not in names[:i]:
            raise ConfigError(
                f"stages.{name}.start_from={start!r} must name a stage run before it (run={config.run!r})"
            )


def _check_values(config: ConfigDict) -> None:
    if not config.workdir:
        raise ConfigError("workdir is empty")
    _count(config, "seed")
    axes = ("data", "fsdp", "tensor")
    for axis in axes:
        value = config.mesh[axis]
        if isinstance(value, bool) or not isinstance(value, int) or not (value >= 1 or value == -1):
            raise ConfigError(f"mesh.{axis}={value!r} must be an integer >= 1, or -1 (the devices left)")
    if [config.mesh[a] for a in axes].count(-1) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    model = config.model
    _choice(config, "model.init", MODEL_INITS)
    needs = {
        "checkpoint": ("checkpoint", "a converted or HF checkpoint folder"),
        "towers": ("clip", "an HF CLIP folder"),
    }
    if model.init in needs and not model[needs[model.init][0]]:
        field, what = needs[model.init]
        raise ConfigError(
            f"model.{field} is empty: model.init={model.init!r} needs {what} (--config.model.{field}=DIR)"
        )
    if model.init == "towers" and not model.llama:
        raise ConfigError(
            "model.llama is empty: model.init='towers' needs an HF LLaMA folder (--config.model.llama=DIR)"
        )
    _count(config, "model.num_query_tokens", 1)
    _choice(config, "model.dtype", DTYPES)
    _choice(config, "model.param_dtype", DTYPES)
    _choice(config, "model.remat_policy", REMAT_POLICIES)
    if "attention_impl" in model:
        _choice(config, "model.attention_impl", ATTENTION_IMPLS)
    if "quantize" in model:
        _choice(config, "model.quantize", QUANTIZE)
        for name in run_stages(config) if model.quantize else ():
            if name in config.stages and config.stages[name].kind not in QUANTIZED_STAGES:
                raise ConfigError(
                    f"stages.{name}.kind={config.stages[name].kind!r} trains the language model's weights, "
                    f"which model.quantize={model.quantize!r} holds as frozen integers; quantized runs take "
                    f"{' or '.join(QUANTIZED_STAGES)} stages"
                )
    if "numerics" in model:
        routes = {"attention": ATTENTION_IMPLS, "matmul": MATMUL_ROUTES, "half_as_bits": SWITCHES}
        for name, choices in {**routes, "hoist_invariants": SWITCHES}.items():
            if name in model.numerics:
                _choice(config, f"model.numerics.{name}", choices)
    _count(config, "data.seq_len", 2)
    _count(config, "data.max_images", 0)
    _fraction(config, "data.max_skip_fraction")
    if "tokenization" in config.data:
        _choice(config, "data.tokenization", TOKENIZATIONS)
    _strings(config, "data.eval", allow_empty=True)
    for path in ("seed", "n_captions", "n_multimodal", "n_text", "n_eval_per_type"):
        _count(config, f"synthetic.{path}")
    _count(config, "synthetic.image_size", 1)
    _count(config, "checkpoint.every", 1)
    _count(config, "checkpoint.keep", 1)
    _count(config, "log.every", 1)
    _real(config, "peak_flops")
    if "aot" in config:
        _check_aot(config)


def _check_aot(config: ConfigDict) -> None:
    if config.aot.get("topology"):
        from owl_jax.aot.targets import TargetError, parse_target

        try:
            parse_target(config.aot.topology)
        except TargetError as e:
            raise ConfigError(f"aot.topology: {e}") from None
    if "per_chip_batch" in config.aot:
        _count(config, "aot.per_chip_batch", 0)


def _strings(config: ConfigDict, path: str, *, allow_empty: bool = False) -> None:
    value = _get(config, path)
    if not (allow_empty or value) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f"{path}={value!r} must be a tuple of {'' if allow_empty else 'one or more '}non-empty strings"
        )


def _check_stage(config: ConfigDict, name: str) -> None:
    p, stage = f"stages.{name}", config.stages[name]
    _choice(config, f"{p}.kind", STAGE_KINDS)
    _count(config, f"{p}.steps", 0)
    _count(config, f"{p}.batch_size", 1)
    _count(config, f"{p}.grad_accum", 1)
    if stage.batch_size % stage.grad_accum:
        raise ConfigError(f"{p}.batch_size={stage.batch_size} must be divisible by {p}.grad_accum={stage.grad_accum}")
    _count(config, f"{p}.eval_every", 0)
    _count(config, f"{p}.data.max_images", 0)
    if "loss_chunk" in stage:
        _count(config, f"{p}.loss_chunk", 0)
    if "prepare_frozen" in stage:
        _choice(config, f"{p}.prepare_frozen", PREPARE_FROZEN)
    _choice(config, f"{p}.frozen_dtype", ("",) + DTYPES)
    sources = stage.data.sources
    if not sources or not all(
        isinstance(g, (tuple, list)) and g and all(isinstance(s, str) and s for s in g) for g in sources
    ):
        raise ConfigError(
            f"{p}.data.sources={sources!r} must be one or more groups of dataset prefixes, e.g. (('captions',),)"
        )
    _count(config, f"{p}.lora.rank", 0)
    _real(config, f"{p}.lora.alpha", positive=True)
    _fraction(config, f"{p}.lora.dropout", below_one=True)
    _lora_targets(f"{p}.lora.targets", stage.lora.targets)
    for model_type, targets in (stage.lora.get("targets_by_model") or {}).items():
        _lora_targets(f"{p}.lora.targets_by_model.{model_type}", targets, allow_auto=False)
    if stage.kind == "stage2" and stage.lora.rank == 0:
        raise ConfigError(f"{p}.lora.rank=0: a stage2 stage trains LoRA adapters only; give them a rank >= 1")
    q = f"{p}.optim"
    for field in ("lr", "end_lr", "weight_decay"):
        if field in stage.optim:
            _real(config, f"{q}.{field}")
    _count(config, f"{q}.warmup_steps", 0)
    _fraction(config, f"{q}.b1", below_one=True)
    _fraction(config, f"{q}.b2", below_one=True)
    _real(config, f"{q}.eps", positive=True)
    if stage.optim.get("clip_norm") is not None:
        _real(config, f"{q}.clip_norm")


def _lora_targets(path: str, targets: Any, *, allow_auto: bool = True) -> None:
    """LoRA targets: a regular expression that compiles or a tuple of module names (or, where `allow_auto`,
    "auto": by the text model). Whether they match a layer of the model is `lora_targets.stage_loras`'s."""
    if not targets or not (isinstance(targets, str) or all(isinstance(t, str) and t for t in targets)):
        raise ConfigError(f"{path}={targets!r} must be a regular expression or a tuple of module names")
    if not isinstance(targets, str) or (allow_auto and targets == BY_TEXT_MODEL):
        return
    try:
        re.compile(targets)
    except re.error as e:
        raise ConfigError(f"{path}={targets!r} is not a regular expression ({e})") from None
