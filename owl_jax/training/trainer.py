"""The sharded train and eval steps for one stage.

The train state holds every parameter (trainable and frozen) as a nested dict, the optimizer state, the
step and a base PRNG key. Gradients are taken only with respect to the trainable leaves: frozen towers are
constants of the differentiated function, so no backward pass runs through a tower that nothing upstream
of it trains (the ViT in stage 2). Frozen leaves can be held in bfloat16 while trainable ones keep float32
master copies.

The loss is the sum of next-token cross-entropies over answer tokens (and the EOS after each answer),
divided by the number of such tokens in the whole global batch, all micro-batches of a gradient
accumulation included, so the result does not depend on sharding or accumulation; a batch without answer
tokens gives loss 0 and zero gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from owl_jax import ops
from owl_jax.checkpoint import abstract_model, assemble, flat_shardings, flatten, nest
from owl_jax.config import OwlConfig
from owl_jax.modeling.loss import chunked_next_token_loss_sums, next_token_loss_sums
from owl_jax.ops.bits import HalfBits
from owl_jax.ops.numerics import half_as_bits
from owl_jax.quant.spec import QUANT_LEAVES
from owl_jax.sharding import use_mesh
from owl_jax.training.optimizer import FROZEN, TRAIN, decay_mask, labels_for, learning_rate_schedule, make_optimizer

Batch = dict[str, jax.Array]
BATCH_AXES = ("data", "fsdp")
TOWERS = ("vision_model", "abstractor", "language_model")  # input to output


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict[str, Any]  # nested {tower: {module: {param: array}}}, trainable and frozen
    opt_state: Any
    rng: jax.Array  # uint32 key data of the base PRNG key
    # Frozen kernels made ready for the step once (`Trainer(prepare_frozen=...)`): {path: PreparedKernel}
    # nested like `params`, or None. Derived from `params`; checkpoints leave it out.
    prepared: Any = None

    def checkpointed(self) -> TrainState:
        """What a checkpoint keeps: everything but the derived `prepared`."""
        return self.replace(prepared=None)


def split_params(params: dict, labels: dict) -> tuple[dict, dict]:
    flat, flat_labels = flatten(params), flatten(labels)
    trainable = {p: v for p, v in flat.items() if flat_labels[p] == TRAIN}
    frozen = {p: v for p, v in flat.items() if flat_labels[p] == FROZEN}
    return nest(trainable), nest(frozen)


def merge_params(a: dict, b: dict) -> dict:
    return nest({**flatten(a), **flatten(b)})


def _keys(path: tuple) -> tuple[str, ...]:
    """A tree path as plain strings (dict keys, attribute names and sequence indices alike)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class Trainer:
    """Builds the optimizer, the state shardings and the jitted steps of one training stage.

    Args:
      model_cfg: the model (with `lora` set for a LoRA stage).
      stage: "stage1", "stage2", "stage2_full" or "text_pretrain" (see `optimizer.trainable`).
      mesh: the device mesh; batches are sharded over `data` × `fsdp`.
      optim: a mapping with lr, end_lr, warmup_steps, b1, b2, eps, weight_decay, clip_norm.
      total_steps: optimizer steps of the stage (for the schedule).
      grad_accum: micro-batches per step.
      frozen_dtype: dtype to hold frozen parameters in ("" keeps them as loaded); quantized integers and
        scales (`model_cfg.quant`) keep theirs.
      loss_chunk: positions per chunk of the cross-entropy (0: all logits at once); see
        `chunked_next_token_loss_sums`.
      right_padded: batches are right-padded (as the data pipeline makes them; `global_batch` checks it), so
        the LLM runs plain causal attention without a padding mask (same loss, and fused attention kernels
        apply). False accepts any padding and builds the full mask.
      prepare_frozen: hold each frozen linear kernel that gradients pass through also in the compute
        dtype with a transposed copy (`ops.PreparedKernel`, in `TrainState.prepared`), made once per state
        instead of in every step. None (the default) turns it on where it pays: bf16/fp16 compute on the
        CPU matmul route (`Numerics.matmul`), whose fast GEMMs need physically transposed operands. It
        costs one compute-dtype copy of those kernels and their transposes in memory.
      train_temporal: train the video layout's video-only parameters (`optimizer.VIDEO_ONLY`); off, as
        batches hold images, which never reach them.
    """

    def __init__(
        self,
        model_cfg: OwlConfig,
        *,
        stage: str,
        mesh: Mesh,
        optim: Any,
        total_steps: int,
        grad_accum: int = 1,
        train_abstractor: bool = True,
        frozen_dtype: str = "",
        max_consecutive_nonfinite: int = 5,
        loss_chunk: int = 0,
        right_padded: bool = True,
        prepare_frozen: bool | None = None,
        train_temporal: bool = False,
    ):
        if loss_chunk < 0:
            raise ValueError(f"loss_chunk must be >= 0, got {loss_chunk}")
        self.loss_chunk = int(loss_chunk)
        self.right_padded = bool(right_padded)
        self.model_cfg, self.stage, self.mesh, self.grad_accum = model_cfg, stage, mesh, grad_accum
        self.graphdef, self.abstract = abstract_model(model_cfg)
        shapes = {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(self.abstract)}
        flat_labels = labels_for(list(shapes), stage, train_abstractor=train_abstractor, train_temporal=train_temporal)
        self.labels = nest(flat_labels)
        self.frozen_dtype = frozen_dtype
        self.schedule = learning_rate_schedule(
            optim["lr"], warmup_steps=optim["warmup_steps"], total_steps=total_steps, end_lr=optim.get("end_lr", 0.0)
        )
        self.tx = make_optimizer(
            self.labels,
            nest(decay_mask(flat_labels)),
            schedule=self.schedule,
            b1=optim["b1"],
            b2=optim["b2"],
            eps=optim["eps"],
            weight_decay=optim["weight_decay"],
            clip_norm=optim.get("clip_norm"),
            max_consecutive_nonfinite=max_consecutive_nonfinite,
        )
        self.param_shardings = nest(flat_shardings(self.abstract, mesh))
        self.batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.compiler_options = ops.compiler_options(model_cfg.numerics)
        if prepare_frozen is None:
            prepare_frozen = ops.is_half(model_cfg.dtype) and ops.resolve(model_cfg.numerics).matmul == "cpu"
        # Gradients pass through a frozen tower when anything closer to the input trains.
        trained_towers = [TOWERS.index(p[0]) for p, label in flat_labels.items() if label == TRAIN and p[0] in TOWERS]
        first = min(trained_towers, default=len(TOWERS))
        self.prepared_paths = tuple(
            p
            for p, label in flat_labels.items()
            if prepare_frozen
            and label == FROZEN
            and p[-1] == "kernel"
            and p[0] in TOWERS
            and TOWERS.index(p[0]) >= first
        )
        self.num_trainable = sum(int(np.prod(shapes[p].shape)) for p, label in flat_labels.items() if label == TRAIN)
        self.num_frozen = sum(int(np.prod(shapes[p].shape)) for p, label in flat_labels.items() if label == FROZEN)
        self._train_step: Callable | None = None
        self._eval_step: Callable | None = None

    # -- state ---------------------------------------------------------------------------------
    def _cast_frozen(self, params: dict) -> dict:
        if not self.frozen_dtype:
            return params
        trainable, frozen = split_params(params, self.labels)
        cast = lambda p, x: x if p[-1] in QUANT_LEAVES else x.astype(self.frozen_dtype)  # integers stay
        frozen = nest({p: cast(p, x) for p, x in flatten(frozen).items()})
        return merge_params(trainable, frozen)

    def init_state(self, params: dict, seed: int) -> TrainState:
        """A sharded state from host or device parameters (nested dict covering every leaf)."""
        missing = set(flatten(self.param_shardings)) - set(flatten(params))
        if missing:
            raise ValueError(f"initial parameters lack {sorted('/'.join(p) for p in missing)[:8]}")
        params = jax.device_put(self._cast_frozen(params), self.param_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self._opt_shardings(params))(params)
        rng = jax.random.key_data(jax.random.key(seed))
        step = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
        return self.prepare(TrainState(step, params, opt_state, jax.device_put(rng, self.replicated)))

    def prepare(self, state: TrainState) -> TrainState:
        """`state` with `prepared` filled in (see `prepare_frozen`); a no-op when there is nothing to
        prepare. Call it on a state restored from a checkpoint (`train_step` does, if needed)."""
        if not self.prepared_paths or state.prepared is not None:
            return state
        flat, flat_sh = flatten(state.params), flatten(self.param_shardings)
        dtype = jnp.dtype(self.model_cfg.dtype)

        def transposed(sh: NamedSharding, ndim: int) -> NamedSharding:
            spec = tuple(sh.spec) + (None,) * (ndim - len(sh.spec))
            return NamedSharding(sh.mesh, PartitionSpec(*spec[:-2], spec[-1], spec[-2]))

        # Unrolled layers read each layer's prepared kernel as its own array (slicing a stack is a copy);
        # a scan reads stacks, held as bit patterns where that applies.
        numerics = self.model_cfg.numerics
        stacked = {p: "layers" in p for p in self.prepared_paths}
        per_layer = {p: stacked[p] and not self.model_cfg.scan_layers for p in self.prepared_paths}
        scanned = {p: stacked[p] and self.model_cfg.scan_layers for p in self.prepared_paths}
        as_bits = half_as_bits(numerics, dtype)

        def sharding(p: tuple) -> ops.PreparedKernel:
            sh, ndim = flat_sh[p], flat[p].ndim
            w, w_t = sh, transposed(sh, ndim)
            if not per_layer[p]:
                if scanned[p] and as_bits:
                    return ops.PreparedKernel(HalfBits(w, dtype.name), HalfBits(w_t, dtype.name))
                return ops.PreparedKernel(w, w_t)
            drop = lambda s: NamedSharding(s.mesh, PartitionSpec(*tuple(s.spec)[1:]))  # noqa: E731
            return ops.PreparedKernel((drop(w),) * flat[p].shape[0], (drop(w_t),) * flat[p].shape[0])

        fn = jax.jit(
            lambda ws: {
                p: ops.prepare_kernel(w, dtype, per_layer=per_layer[p], scanned=numerics if scanned[p] else None)
                for p, w in ws.items()
            },
            out_shardings={p: sharding(p) for p in self.prepared_paths},
        )
        with use_mesh(self.mesh):
            prepared = fn({p: flat[p] for p in self.prepared_paths})
        return state.replace(prepared=nest(prepared))

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, for restoring a checkpoint onto this mesh."""
        flat_labels, flat_sh = flatten(self.labels), flatten(self.param_shardings)

        def spec(path, var):
            value = var.get_value() if hasattr(var, "get_value") else var.value
            frozen = self.frozen_dtype and flat_labels[path] == FROZEN and path[-1] not in QUANT_LEAVES
            return jax.ShapeDtypeStruct(
                value.shape, jnp.dtype(self.frozen_dtype) if frozen else value.dtype, sharding=flat_sh[path]
            )

        params = nest(
            {
                p: spec(p, v)
                for p, v in ((tuple(str(k) for k in path), var) for path, var in nnx.to_flat_state(self.abstract))
            }
        )
        opt_state = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            jax.eval_shape(self.tx.init, params),
            self._opt_shardings(params),
        )
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.replicated)
        return TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated), params, opt_state, rng)

    def _opt_shardings(self, params: Any) -> Any:
        """Optimizer-state shardings: every moment is sharded like its parameter, and scalars (step counts,
        finiteness flags) are replicated over the mesh.

        A moment sits in the state under its parameter's path, behind the optimizer's own keys (e.g.
        `inner_states/train/.../mu/language_model/...`), so it takes the sharding of the parameter whose path
        ends its own. (Asking GSPMD instead, from a compiled `tx.init`, replicates moments made by
        `zeros_like`: a full copy of Adam's state on every chip.)"""
        by_path = {_keys(path): p for path, p in jax.tree_util.tree_flatten_with_path(params)[0]}

        def one(path: tuple, leaf: Any) -> NamedSharding:
            keys = _keys(path)
            for start in range(len(keys)):
                param = by_path.get(keys[start:])
                if param is not None and param.shape == leaf.shape:
                    return param.sharding
            return self.replicated

        return jax.tree_util.tree_map_with_path(one, jax.eval_shape(self.tx.init, params))

    # -- the model as a function of parameters -----------------------------------------------------
    def model(self, params: dict) -> nnx.Module:
        # Leaves keep their own dtype (frozen ones may be bf16): every layer casts weights to the compute
        # dtype where it uses them, so no full-precision copy of a frozen tower is made.
        return assemble(self.graphdef, self.abstract, flatten(params))

    def logits(
        self,
        params: dict,
        batch: Batch,
        dropout_key: jax.Array | None,
        *,
        model: nnx.Module | None = None,
        return_hidden: bool = False,
    ) -> jax.Array:
        b, m = batch["image_mask"].shape
        pixels = batch["pixel_values"].reshape(b * m, *batch["pixel_values"].shape[2:])
        model = model if model is not None else self.model(params)
        return model.forward(
            pixels,
            batch["input_ids"],
            batch["attention_mask"],
            images_per_row=m,
            dropout_key=dropout_key,
            return_hidden=return_hidden,
            right_padded=self.right_padded,
        )

    def loss_sums(self, params: dict, batch: Batch, dropout_key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        mask = batch["loss_mask"] * (batch["skipped"] == 0)[:, None]
        if self.loss_chunk and self.loss_chunk < batch["input_ids"].shape[1] - 1:
            model = self.model(params)
            hidden = self.logits(params, batch, dropout_key, model=model, return_hidden=True)
            return chunked_next_token_loss_sums(
                hidden, model.language_model.logits, batch["input_ids"], mask, chunk=self.loss_chunk
            )
        return next_token_loss_sums(self.logits(params, batch, dropout_key), batch["input_ids"], mask)

    # -- steps ------------------------------------------------------------------------------------
    def _micro_batches(self, batch: Batch) -> Batch:
        # (A·m, ...) → (A, m, ...) with micro-batch i = rows {j·A + i}: every device keeps rows of every
        # micro-batch, so the split moves no data between devices.
        a = self.grad_accum
        return {k: v.reshape(v.shape[0] // a, a, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}

    def _step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        trainable, frozen = split_params(state.params, self.labels)
        # The model reads prepared kernels in place of those frozen leaves (the plain ones then go unused).
        frozen_in = frozen if state.prepared is None else merge_params(frozen, state.prepared)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def micro(carry, inputs):
            grads_sum, total_sum, count_sum = carry
            index, mb = inputs
            loss_of = lambda tr: self.loss_sums(merge_params(tr, frozen_in), mb, jax.random.fold_in(key, index))
            (total, count), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
            grads_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grads_sum, grads)
            return (grads_sum, total_sum + total, count_sum + count), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        micro_batches = self._micro_batches(batch)
        (grads, total, count), _ = jax.lax.scan(micro, init, (jnp.arange(self.grad_accum), micro_batches))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        full_grads = merge_params(grads, jax.tree.map(lambda _: optax.MaskedNode(), frozen))
        updates, opt_state = self.tx.update(full_grads, state.opt_state, state.params)
        new_trainable = optax.apply_updates(trainable, split_params(updates, self.labels)[0])
        new_state = state.replace(step=state.step + 1, params=merge_params(new_trainable, frozen), opt_state=opt_state)
        metrics = {
            "loss": total / denom,
            "tokens": count,
            "grad_norm": optax.tree.norm(grads),
            "lr": self.schedule(state.step),
            "nonfinite_steps": opt_state.total_notfinite,
        }
        return new_state, metrics

    def jitted_step(self, state: TrainState, batch: Batch) -> Callable:
        """The jitted step `train_step` runs (explicit shardings from this state and batch, donated state);
        lower it inside `use_mesh(self.mesh)`."""
        if self._train_step is None:
            state_shardings = jax.tree.map(lambda x: x.sharding, state)
            batch_shardings = {k: self.batch_sharding for k in batch}
            self._train_step = jax.jit(
                self._step,
                in_shardings=(state_shardings, batch_shardings),
                out_shardings=(state_shardings, self.replicated),
                donate_argnums=0,
                compiler_options=self.compiler_options,
            )
        return self._train_step

    def train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on a global batch (rows sharded over data × fsdp); the state is donated."""
        state = self.prepare(state)
        step = self.jitted_step(state, batch)
        with use_mesh(self.mesh):
            return step(state, batch)

    def _eval(self, params: dict, batch: Batch) -> dict[str, jax.Array]:
        logits = self.logits(params, batch, None)
        targets = batch["input_ids"][:, 1:]
        mask = (batch["loss_mask"] * (batch["skipped"] == 0)[:, None]) > 0
        hit = (jnp.argmax(logits[:, :-1], axis=-1) == targets) | ~mask
        total, count = next_token_loss_sums(logits, batch["input_ids"], mask)
        return {
            "row_correct": jnp.all(hit, axis=1) & mask.any(axis=1),
            "row_tokens": mask.sum(axis=1),
            "loss_sum": total,
            "tokens": count,
        }

    def eval_step(self, params: dict, batch: Batch) -> dict[str, jax.Array]:
        """Teacher-forced answers of a batch: per-row exact match of every answer token, and loss sums."""
        if self._eval_step is None:
            param_shardings = jax.tree.map(lambda x: x.sharding, params)
            self._eval_step = jax.jit(
                self._eval,
                in_shardings=(param_shardings, {k: self.batch_sharding for k in batch}),
                compiler_options=self.compiler_options,
            )
        with use_mesh(self.mesh):
            return self._eval_step(params, batch)

    # -- host ↔ device ---------------------------------------------------------------------------
    def global_batch(self, local: dict[str, np.ndarray]) -> Batch:
        """This process's rows → one global array per field, sharded over data × fsdp."""
        if self.right_padded and "attention_mask" in local:
            rises = (np.diff(np.asarray(local["attention_mask"], np.int64), axis=1) > 0).any(axis=1)
            if rises.any():
                rows = np.nonzero(rises)[0]
                raise ValueError(
                    f"rows {rows[:8].tolist()} of attention_mask are not right-padded (a 0 before a 1); "
                    "build the Trainer with right_padded=False for other padding"
                )
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v)) for k, v in local.items()}
