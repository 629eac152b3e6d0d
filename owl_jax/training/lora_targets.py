"""Which linear layers a stage's LoRA adapters go on, per text model, checked against the model being trained.

A stage's `lora.targets` names the modules whatever the text model: one regular expression matched against
each whole HF module name, or a tuple of name suffixes (peft's `target_modules`). Its default, "auto", takes
them from `lora.targets_by_model` by the model's `text.model_type` (`schema.LORA_TARGETS`: LLaMA's
`q_proj|v_proj`, BLOOM's fused `query_key_value`, both inside `language_model`).

`stage_loras` resolves the adapters of every stage of a run and refuses, in one line naming the field and the
pattern, a pattern that matches no linear layer of the model, or only some layers of a stacked tower.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from owl_jax.config import ConfigError, LoRAConfig, OwlConfig
from owl_jax.training.schema import BY_TEXT_MODEL, LORA_TARGETS
from owl_jax.training.validation import run_stages

Targets = str | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LinearModule:
    """One linear layer by its HF module name (a stacked tower has one per layer)."""

    path: tuple[str, ...]  # the Flax module, e.g. ("language_model", "layers", "q_proj")
    hf_name: str  # e.g. "language_model.model.layers.3.self_attn.q_proj"
    fan_in: int
    fan_out: int


def linear_modules(cfg: OwlConfig) -> list[LinearModule]:
    """Every linear layer of `Owl(cfg)` without adapters, one entry per layer of a stacked tower (nothing is
    allocated). A kernel `(L, in, out)` gives L entries, `(in, out)` one."""
    from owl_jax.modeling import Owl
    from owl_jax.modeling.linear import Linear

    model = nnx.eval_shape(lambda: Owl(cfg.replace(lora=None, quant=None), rngs=nnx.Rngs(0)))
    modules = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            shape = tuple(node.kernel.shape)
            names = [node.hf_name.format(i=i) for i in range(shape[0])] if len(shape) == 3 else [node.hf_name]
            modules += [LinearModule(tuple(str(p) for p in path), n, shape[-2], shape[-1]) for n in names]
    return modules


def stage_targets(stage: Any, name: str, model_type: str) -> tuple[str, Targets]:
    """The config field that names stage `name`'s LoRA targets on a `model_type` text model, and its value."""
    lora = stage.lora
    if lora.targets != BY_TEXT_MODEL:
        return f"stages.{name}.lora.targets", _targets(lora.targets)
    field = f"stages.{name}.lora.targets_by_model.{model_type}"
    by_model = lora.get("targets_by_model") or {}
    if model_type in by_model:
        return field, _targets(by_model[model_type])
    if model_type in LORA_TARGETS:
        return field, LORA_TARGETS[model_type]
    raise ConfigError(f"stages.{name}.lora.targets='auto' names no targets for text model {model_type!r}; set {field}")


def stage_lora(stage: Any, name: str, cfg: OwlConfig, modules: list[LinearModule] | None = None) -> LoRAConfig | None:
    """The adapters of stage `name` on `cfg`'s model (None at rank 0).

    Raises `ConfigError` (one line naming the field and the pattern) when the targets match no linear layer
    of the model, or only some layers of a stacked tower (every layer shares one set of modules).
    """
    if not stage.lora.rank:
        return None
    field, targets = stage_targets(stage, name, cfg.text.model_type)
    lora = LoRAConfig(rank=stage.lora.rank, alpha=stage.lora.alpha, dropout=stage.lora.dropout, target_modules=targets)
    modules = linear_modules(cfg) if modules is None else modules
    hits: dict[tuple[str, ...], list[bool]] = {}
    for module in modules:
        hits.setdefault(module.path, []).append(lora.matches(module.hf_name))
    if not any(any(h) for h in hits.values()):
        text = sorted({m.hf_name.rsplit(".", 1)[-1] for m in modules if m.path[0] == "language_model"})
        raise ConfigError(
            f"{field}={targets!r} matches no linear layer of this {cfg.text.model_type} model "
            f"(its language model's: {', '.join(text)})"
        )
    for path, h in hits.items():
        if any(h) and not all(h):
            chosen = [m.hf_name for m in modules if m.path == path and lora.matches(m.hf_name)]
            raise ConfigError(
                f"{field}={targets!r} matches only some layers of {'/'.join(path)} ({', '.join(chosen[:3])}); "
                "adapters must cover every layer of a stacked tower or none"
            )
    return lora


def stage_loras(config: Any, cfg: OwlConfig) -> dict[str, LoRAConfig | None]:
    """`{stage: adapters}` for every stage of `config.run` on `cfg`'s model (see `stage_lora`)."""
    names = run_stages(config)
    modules = linear_modules(cfg) if any(config.stages[n].lora.rank for n in names) else []
    return {name: stage_lora(config.stages[name], name, cfg, modules) for name in names}


def _targets(value: Any) -> Targets:
    return value if isinstance(value, str) else tuple(value)
