"""A whole training run: data (synthetic if asked), the model's starting point, each stage, the report."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from owl_jax.checkpoint import abstract_model, flatten, leaf_shapes, merge_lora_params, nest, save_converted
from owl_jax.checkpoint.converted import META_FILE
from owl_jax.checkpoint.errors import CheckpointError
from owl_jax.config import ConfigError, LoRAConfig, Numerics, OwlConfig
from owl_jax.paths import as_path, is_remote, upload_folder
from owl_jax.quant.leaves import is_quantized, quantize_leaves
from owl_jax.quant.spec import parse_quantize
from owl_jax.sharding import ShardingError, make_mesh
from owl_jax.training import distributed
from owl_jax.training.evaluation import format_table, majority_baseline
from owl_jax.training.hooks import TrainerHooks
from owl_jax.training.loop import STOP, run_stage
from owl_jax.training.lora_targets import stage_loras
from owl_jax.training.tokenizer_files import RunTokenizer, run_tokenizer
from owl_jax.training.trainer import Trainer
from owl_jax.training.validation import check_batch_sizes, run_stages, validate


def _prepare_frozen(stage: str, value: str) -> bool | None:
    choices = {"auto": None, "on": True, "off": False}
    if value not in choices:
        raise ConfigError(f"stages.{stage}.prepare_frozen must be one of {sorted(choices)}, got {value!r}")
    return choices[value]


def model_config(config: ConfigDict) -> OwlConfig:
    m = config.model
    numerics = Numerics(**{k: v for k, v in m.get("numerics", {}).items()})
    numerics = numerics.replace(attention=m.get("attention_impl", numerics.attention))
    runtime = dict(
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        scan_layers=m.scan_layers,
        remat_policy=m.remat_policy,
        numerics=numerics,
        quant=parse_quantize(m.get("quantize", "")),
    )
    if m.init == "random":
        return OwlConfig.from_hf_config(m.arch.to_dict(), **runtime)
    if m.init == "checkpoint":
        from owl_jax.quant.load import resolve_quantization

        try:  # a quantized folder is taken as stored, and must be asked for (model.quantize)
            quant = resolve_quantization(m.checkpoint, m.get("quantize", ""), merge_lora=True, stored_when_none=False)
        except CheckpointError as e:
            raise ConfigError(f"model.checkpoint: {e}") from None
        return OwlConfig.from_hf_config(m.checkpoint, **{**runtime, "quant": quant})
    if m.init == "towers":
        from owl_jax.checkpoint import config_from_towers

        return config_from_towers(m.clip, m.llama, num_query_tokens=m.num_query_tokens, **runtime)
    raise ValueError(f"model.init must be random, checkpoint or towers, not {m.init!r}")


def first_params(config: ConfigDict, cfg: OwlConfig) -> dict[tuple, Any]:
    """Host parameters of the run's starting point, `{path: array}` (no adapters), quantized as `cfg.quant`
    says (a random model is built quantized; loaded float kernels are quantized one at a time)."""
    flat = _float_first_params(config, cfg)
    if cfg.quant is None or is_quantized(flat):
        return flat
    return quantize_leaves(flat, cfg.replace(lora=None))


def _float_first_params(config: ConfigDict, cfg: OwlConfig) -> dict[tuple, Any]:
    m = config.model
    if m.init == "random":
        model = _random_model(cfg.replace(lora=None), config.seed)
        return {
            tuple(str(k) for k in p): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        }
    if m.init == "checkpoint":
        from owl_jax.checkpoint import load_checkpoint

        loaded = load_checkpoint(m.checkpoint, merge_lora=True, on_host=True, weights_dtype=cfg.param_dtype)
        return loaded.leaves
    from owl_jax.checkpoint import init_from_towers

    _, leaves = init_from_towers(
        m.clip, m.llama, num_query_tokens=m.num_query_tokens, dtype=cfg.param_dtype, seed=config.seed
    )
    return leaves


def _random_model(cfg: OwlConfig, seed: int):
    from owl_jax.modeling import Owl

    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return Owl(cfg, rngs=nnx.Rngs(seed))


def adapt_params(flat: dict[tuple, Any], cfg: OwlConfig, previous_lora: LoRAConfig | None, seed: int) -> dict:
    """Carry parameters into a stage: merge adapters the new stage does not keep, add fresh ones it needs."""
    flat = {p: np.asarray(jax.device_get(v)) for p, v in flat.items()}
    if previous_lora is not None and cfg.lora != previous_lora:
        if is_quantized(flat):
            raise ConfigError(
                "a stage over quantized weights (model.quantize) must keep the previous stage's LoRA config: "
                "adapters cannot be merged into quantized kernels"
            )
        flat = merge_lora_params(flat, previous_lora.scale)
    shapes = leaf_shapes(abstract_model(cfg)[1])
    missing = [p for p in shapes if p not in flat]
    if any(p[-1] not in ("lora_a", "lora_b") for p in missing):
        raise ValueError(f"parameters missing for {[('/'.join(p)) for p in missing][:5]}")
    rng = np.random.default_rng(seed)
    for path in missing:  # peft's initialisation: A uniform in ±1/sqrt(in), B zero (the model starts unchanged)
        shape, dtype = shapes[path]
        if path[-1] == "lora_a":
            bound = shape[-2] ** -0.5
            flat[path] = rng.uniform(-bound, bound, shape).astype(dtype)
        else:
            flat[path] = np.zeros(shape, dtype)
    return nest(flat)


SYNTHETIC_MARKER = "synthetic.done.json"
SYNTHETIC_DATASETS = ("captions", "instruct_multimodal", "instruct_text", "eval")


def prepare_synthetic(data_dir: str | os.PathLike, syn: ConfigDict) -> None:
    """Generate the synthetic data and prepare it like any other source (once; process 0 writes).

    A remote `data_dir` (`gs://...`) gets the same files, prepared in a local temporary folder and then
    copied there (in place of the synthetic datasets it held; other files stay), the marker that says they
    are complete last.
    """
    data_dir = as_path(data_dir)
    marker = data_dir / SYNTHETIC_MARKER
    wanted = json.loads(json.dumps(syn.to_dict()))  # as read back from the marker: tuples become lists
    if jax.process_index() == 0 and not (marker.exists() and json.loads(marker.read_text()) == wanted):
        if is_remote(data_dir):
            with tempfile.TemporaryDirectory(prefix="owl_synthetic_") as local:
                _prepare_synthetic_into(local, syn)
                with open(os.path.join(local, SYNTHETIC_MARKER), "w") as f:
                    json.dump(wanted, f)
                _remove_synthetic(data_dir)
                upload_folder(local, data_dir, last=[SYNTHETIC_MARKER])
        else:
            _prepare_synthetic_into(os.fspath(data_dir), syn)
            marker.write_text(json.dumps(wanted))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic data prepared")


def _remove_synthetic(data_dir: epath.Path) -> None:
    """Remove the marker, sources and datasets of earlier synthetic data from a remote `data_dir`."""
    from owl_jax.data.records import MANIFEST_SUFFIX, SHARD_SUFFIX

    (data_dir / SYNTHETIC_MARKER).unlink(missing_ok=True)
    for folder in ("synthetic", "vqav2"):
        if (data_dir / folder).exists():
            (data_dir / folder).rmtree()
    for name in SYNTHETIC_DATASETS:
        for path in [*data_dir.glob(f"{name}-?????-of-?????{SHARD_SUFFIX}"), data_dir / (name + MANIFEST_SUFFIX)]:
            path.unlink(missing_ok=True)


def _prepare_synthetic_into(folder: str, syn: ConfigDict) -> None:
    """The synthetic sources (`synthetic/`) and their prepared datasets, in the local `folder`, and the
    held-out questions in VQAv2's layout (`vqav2/`, for `python -m owl_jax.eval.bench --task vqav2`)."""
    import shutil

    from owl_jax.data.prepare import prepare
    from owl_jax.data.synthetic import generate
    from owl_jax.eval.bench.synthetic_vqav2 import export_vqav2

    generated = generate(
        os.path.join(folder, "synthetic"),
        seed=syn.seed,
        image_size=syn.image_size,
        n_captions=syn.n_captions,
        n_multimodal=syn.n_multimodal,
        n_text=syn.n_text,
        n_eval_per_type=syn.n_eval_per_type,
    )
    for fmt, source, name in [
        ("captions", generated.captions, "captions"),
        ("mplug_jsonl", generated.instruct_multimodal, "instruct_multimodal"),
        ("mplug_jsonl", generated.instruct_text, "instruct_text"),
        ("mplug_jsonl", generated.eval, "eval"),
    ]:
        prepare(fmt, [str(source)], os.path.join(folder, name), overwrite=True, progress=False)
    shutil.rmtree(os.path.join(folder, "vqav2"), ignore_errors=True)  # an export of earlier synthetic data
    export_vqav2(generated.eval, os.path.join(folder, "vqav2"))


def run(config: ConfigDict, hooks: TrainerHooks | None = None) -> dict[str, Any]:
    """Train every stage of `config.run` in order; returns the evaluations by stage.

    `hooks` run at fixed points of every stage's loop (`owl_jax.training.hooks`).
    Raises `ConfigError` for a mistake in `config` before any work (`owl_jax.training.validation`; LoRA
    targets that match no layer of the model, `lora_targets`; no usable tokenizer, `tokenizer_files`), and
    `NonFiniteLossError` when a stage's loss stops being finite (before that stage's model is written).
    """
    validate(config)
    distributed.maybe_initialize()
    try:
        mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    except ShardingError as e:
        raise ConfigError(f"mesh: {e}") from None
    check_batch_sizes(config, data_parallel=mesh.shape["data"] * mesh.shape["fsdp"], processes=jax.process_count())
    base_cfg = model_config(config)
    loras = stage_loras(config, base_cfg)
    tokenizer = run_tokenizer(config, base_cfg)
    STOP.install()
    workdir = as_path(config.workdir)  # local: absolute; gs://...: exactly as given (`owl_jax.paths`)
    data_dir = as_path(config.data.dir) if config.data.dir else workdir / "data"
    if config.synthetic.enabled:
        prepare_synthetic(data_dir, config.synthetic)
    eval_paths = [str(data_dir / p) for p in config.data.eval]
    stages = run_stages(config)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    evaluations: dict[str, Any] = {}
    params, previous_lora = None, None
    # Final parameters of the stages a later stage starts from (`start_from`), kept until the run ends.
    starts = {config.stages[n].get("start_from", "") for n in stages} - {""}
    finals: dict[str, tuple[Any, Any]] = {}
    held_out = None  # the eval sets' examples, read once when first needed
    for name in stages:
        stage = config.stages[name]
        if stage.get("start_from", ""):
            params, previous_lora = finals[stage.start_from]
        lora = loras[name]
        cfg = base_cfg.replace(lora=lora)
        trainer = Trainer(
            cfg,
            stage=stage.kind,
            mesh=mesh,
            optim=stage.optim,
            total_steps=stage.steps,
            grad_accum=stage.grad_accum,
            train_abstractor=stage.train_abstractor,
            frozen_dtype=stage.frozen_dtype,
            loss_chunk=stage.get("loss_chunk", 0),
            prepare_frozen=_prepare_frozen(name, stage.get("prepare_frozen", "auto")),
        )
        carried = params

        def init_params(carried=carried, cfg=cfg):
            flat = flatten(carried) if carried is not None else first_params(config, cfg)
            return adapt_params(flat, cfg, previous_lora if carried is not None else None, config.seed)

        result = run_stage(
            name,
            stage,
            trainer,
            workdir=workdir,
            data_dir=data_dir,
            tokenizer=tokenizer.path,
            special_ids=(tokenizer.bos_id, tokenizer.eos_id),
            init_params=init_params,
            data_cfg=config.data,
            checkpoint_cfg=config.checkpoint,
            log_cfg=config.log,
            config_dict=json.loads(json.dumps(config.to_dict(), default=str)),
            seed=config.seed,
            eval_paths=eval_paths,
            peak_flops_per_device=config.peak_flops,
            hooks=hooks,
        )
        params, previous_lora = result.params, lora
        if name in starts:
            finals[name] = (params, lora)
        evaluations[name] = result.evaluation
        _save_model(str(workdir / name / "model"), params, cfg, tokenizer)
        if result.evaluation and config.data.get("generate_answers", False) and jax.process_count() == 1:
            if held_out is None:
                held_out = _eval_examples(eval_paths)
            result.evaluation["generated"] = _generated(str(workdir / name / "model"), held_out, name)
        if result.evaluation and jax.process_index() == 0:
            generated = result.evaluation.get("generated")
            print(
                f"{name}: held-out answers {generated['overall']:.1%} generated, " if generated else f"{name}: ",
                f"{result.evaluation['overall']:.1%} teacher-forced; answer loss {result.evaluation['loss']:.3f}",
                sep="",
                file=sys.stderr,
            )
    if eval_paths and jax.process_index() == 0:
        _report(held_out if held_out is not None else _eval_examples(eval_paths), evaluations, workdir)
    return evaluations


def _save_model(folder: str, params: Any, cfg: OwlConfig, tokenizer: RunTokenizer) -> None:
    """The stage's final parameters as a converted folder (`from_pretrained` and `export` read it), with the
    run's tokenizer files under their own names (`RunTokenizer.files`).

    A local `folder` is written atomically (`save_converted`). A remote one (`gs://...`) is written in a local
    temporary folder and copied there file by file, its `owl_jax.json` last (an object store has no rename).
    """
    if jax.process_count() > 1:  # multi-host: the Orbax train checkpoint is the artifact
        return
    leaves = {p: np.asarray(jax.device_get(v)) for p, v in flatten(params).items()}
    with tempfile.TemporaryDirectory(prefix="owl_tokenizer_") as side:
        tokenizer.copy_into(side)  # written with the weights, inside the folder's atomic write
        if not is_remote(folder):
            save_converted(
                folder,
                leaves,
                hf_config=cfg.to_hf_config(),
                lora=cfg.lora,
                side_files_from=side,
                overwrite=True,
                quant=cfg.quant,
            )
            return
        with tempfile.TemporaryDirectory(prefix="owl_model_") as local:
            staged = os.path.join(local, "model")
            save_converted(
                staged, leaves, hf_config=cfg.to_hf_config(), lora=cfg.lora, side_files_from=side, quant=cfg.quant
            )
            upload_folder(staged, as_path(folder), last=[META_FILE], replace=True)


def _eval_examples(eval_paths: list[str]) -> list:
    from owl_jax.data.records import find_shards, read_examples

    return list(read_examples([f for p in eval_paths for f in find_shards(p)]))


def _generated(model_folder: str, examples: list, name: str) -> dict[str, Any]:
    """Greedy answers of the stage's saved model to every held-out question (`owl_jax.training.answers`)."""
    from tqdm.auto import tqdm

    from owl_jax.training.answers import answer_accuracy, generated_answers

    with tqdm(total=len(examples), desc=f"{name} answers", file=sys.stderr, dynamic_ncols=True) as bar:
        answers = generated_answers(model_folder, examples, on_batch=lambda n: bar.update(n - bar.n))
    return answer_accuracy(examples, answers)


def _report(examples: list, evaluations: dict[str, Any], workdir: epath.Path) -> None:
    done = {n: e for n, e in evaluations.items() if e}
    baseline = majority_baseline(examples)
    report: dict[str, Any] = {"baseline": baseline, "evaluations": evaluations}
    if all("generated" in e for e in done.values()):
        last = majority_baseline(examples, last_only=True)
        columns = {n: e["generated"]["accuracy"] for n, e in done.items()}
        final = list(done)[-1]
        columns[f"{final} (tf)"] = done[final]["accuracy"]
        print(
            "\nHeld-out answers per question type: generated greedily after each stage (VQAv2-normalised exact "
            f"match), and teacher-forced after {final} (tf: every answer token right given the true prefix):\n"
            + format_table(last, columns, with_bar=True)
        )
        report["baseline_last_answer"] = last
    else:
        table = format_table(baseline, {n: e["accuracy"] for n, e in done.items()})
        print("\nHeld-out teacher-forced answer accuracy (every answer token right) per question type:\n" + table)
    (workdir / "results.json").write_text(json.dumps(report, indent=2))
