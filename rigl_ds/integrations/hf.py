"""RigL (any rigl_ds method) inside the Hugging Face ``Trainer``, as a ``TrainerCallback``::

    from rigl_ds.integrations.hf import RigLCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[RigLCallback(sparsity=0.9)])
    trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

The callback builds the sparsifier when training begins (on the Trainer's model and optimizer,
``total_steps`` = the Trainer's ``max_steps``), and before each optimizer step calls its ``step()``:
gradients are masked; on a mask-update step every gradient is set to None, so the optimizer step
changes nothing (torch optimizers skip a parameter without a gradient: no moment, weight decay or
step count moves), as rigl_ds skips that step elsewhere; the LR schedule runs on. Each checkpoint
folder gets ``rigl_ds_sparsifier.pt`` (masks, step, RNG; tensors and plain data), read back when
the Trainer resumes from ``output_dir/checkpoint-<step>`` (another folder: ``resume_from=``), so a
resumed run continues the same masks with the weights and optimizer state the Trainer loaded.

Under several processes (torchrun, ``accelerate launch``: DDP) masks are broadcast from rank 0 and
checked equal on every update. Gradients are masked as backward produces them, so the Trainer's
``max_grad_norm`` clips by the norm of the masked gradient, as ``rigl-ds train`` does (a difference:
with ``grad_accumulation_n`` > 1 the steps just before an update, whose dense gradients feed the
grow score, are clipped by the dense norm).

The Trainer's DeepSpeed setting (``TrainingArguments(deepspeed=...)``; tested with ZeRO-3) needs the Trainer
itself, whose DeepSpeed engine exists only once training begins::

    trainer = Trainer(model, args, train_dataset=ds)
    RigLCallback(sparsity=0.9).attach(trainer)

Accelerate runs that engine's ``step()`` inside ``accelerator.backward``, before the callback's
``on_pre_optimizer_step``; so the callback wraps that one engine's ``step`` (an instance attribute,
removed at ``on_train_end``): the sparsifier steps first, through the same DeepSpeed adapter as
``rigl-ds train`` (gradients masked by tensor hooks before ZeRO reduces them, dense gradients read
with ``safe_get_full_grad``, masks written to the fp32 masters and optimizer state), and a mask
update runs the engine's step with the optimizer update skipped. Not built yet: the Trainer's FSDP
setting, and fp16 without DeepSpeed (its GradScaler refuses a step without gradients); they are
refused at the start of training with that message. Use bf16 or fp32.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Any, Mapping

import torch
from transformers import TrainerCallback

from rigl_ds import checkpoint as ckpt
from rigl_ds.core import SparsityConfig, build_sparsifier
from rigl_ds.engines.local import GradientHooks, LocalEngine, unwrap_optimizer

logger = logging.getLogger(__name__)

#: the file each checkpoint folder gets
STATE_FILE = "rigl_ds_sparsifier.pt"


class _ProcessGroupEngine(LocalEngine):
    """LocalEngine for a model whose gradients a wrapper (DDP) already averaged over the default
    process group: masks are broadcast from rank 0 and checked equal there.

    Gradients are masked as backward produces them (a tensor hook on each masked weight, before
    DDP's all-reduce and the gradient accumulation), so the Trainer, which clips between backward
    and the callback, clips by the norm of the gradient the optimizer applies, as ``rigl-ds train``
    does. Steps whose dense gradient feeds a grow score let it through (a RigL update step then
    skips its optimizer step)."""

    def __init__(self, model, optimizer) -> None:
        super().__init__(model, optimizer)
        self._grad_hooks = GradientHooks()
        self._hook_masks: dict[str, torch.Tensor] = {}
        self._mask_moved = True         # a mask changed since the last mask_grads (init, load, update)

    def bind(self, layers, masks, dense_grad_wanted=lambda: True) -> None:
        super().bind(layers, masks, dense_grad_wanted)
        self._hook_masks = {l.name: masks[l.name] for l in layers}     # the sparsifier's own tensors
        self._grad_hooks.attach({l.name: self._param(l.name) for l in layers}, self._masked,
                                lambda: self.dense_grad_wanted())

    def remove_hooks(self) -> None:
        """Take the gradient hooks off the parameters (the engine masks no gradient after this)."""
        self._grad_hooks.remove()

    def _masked(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        mask = self._hook_masks[name]
        return self._mul.copy(grad, mask, self._float.get(name, mask, grad))

    def _mask_changed(self, name: str, mask: torch.Tensor) -> None:
        super()._mask_changed(name, mask)
        self._mask_moved = True

    def mask_grads(self) -> None:
        """The hooks masked this step's gradients already, unless one let a dense gradient through
        or a mask changed since (a method that updates masks on a step it applies: GMP)."""
        if self._grad_hooks.dense_passed or self._mask_moved:
            super().mask_grads()
        self._grad_hooks.dense_passed = self._mask_moved = False

    def _dist(self):
        import torch.distributed as dist

        return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None

    def sync_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        if self._dist() is not None:
            from rigl_ds.engines.dist_utils import broadcast_masks, check_masks_equal

            broadcast_masks(masks, src=0)
            check_masks_equal(masks)

    def check_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        if self._dist() is not None:
            from rigl_ds.engines.dist_utils import check_masks_equal

            check_masks_equal(masks)


class RigLCallback(TrainerCallback):
    """Sparse training in the Hugging Face Trainer. Keyword arguments are the knobs of
    :class:`rigl_ds.SparsityConfig` (``method``, ``sparsity``, ``distribution``, ``delta``,
    ``include``/``exclude``, ...); default method ``rigl``. After training begins,
    :attr:`sparsifier` is the sparsifier (masks, :meth:`measure`)."""

    def __init__(self, config: SparsityConfig | None = None, *, resume_from: str | None = None, **knobs: Any) -> None:
        base = config if config is not None else SparsityConfig(method=knobs.pop("method", "rigl"))
        import dataclasses

        self.config = dataclasses.replace(base, **knobs)
        if self.config.method == "gap_parallel":
            raise ValueError("RigLCallback: method='gap_parallel' is not supported under the Trainer (P-GaP splits "
                             "the world into copies of the model, each its own data-parallel group, which the "
                             "Trainer's DDP and DeepSpeed settings do not do); use rigl-ds train (engine.name ddp, "
                             "fsdp2 or deepspeed), or method='gap_cyclic'")
        #: the checkpoint folder the Trainer resumes from, where it is not ``output_dir/checkpoint-<step>``
        self.resume_from = resume_from
        self.sparsifier = None
        self._model = None
        self._trainer = None
        self._ds_engine = None          # the DeepSpeed engine whose step this callback wraps

    def attach(self, trainer) -> "RigLCallback":
        """Add this callback to ``trainer`` and keep the trainer, whose DeepSpeed engine (made when
        training begins) the Trainer's DeepSpeed setting needs; returns the callback. Under DDP
        ``callbacks=[RigLCallback(...)]`` is the same."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = trainer
        return self

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "fsdp", None):
            raise ValueError("RigLCallback: the Trainer's FSDP setting is not supported yet (use its DeepSpeed "
                             "setting, torchrun/accelerate DDP, or rigl-ds train with engine.name=fsdp2)")
        if getattr(args, "deepspeed", None):
            return self._begin_deepspeed(args, state, control)
        if getattr(args, "fp16", False):
            raise ValueError("RigLCallback: fp16 is not supported (its GradScaler refuses the skipped optimizer "
                             "step of a mask update); use bf16=True or fp32")
        if model is None or optimizer is None:
            raise ValueError("RigLCallback needs the Trainer's model and optimizer at on_train_begin")
        self._model = model
        saved = self._resume_file(args, state)     # the Trainer has loaded a checkpoint's weights and optimizer
        resuming = saved is not None
        if resuming:
            # building the sparsifier draws and applies the initial masks: keep what the Trainer loaded
            inner = unwrap_optimizer(optimizer)
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            moments = copy.deepcopy(inner.state_dict())
        self.sparsifier = build_sparsifier(model, optimizer, self.config, total_steps=int(state.max_steps),
                                           engine=_ProcessGroupEngine(model, optimizer))
        if resuming:
            model.load_state_dict(weights)
            inner.load_state_dict(moments)
            self.sparsifier.load_state_dict(saved, reset_optimizer_state=False)   # saved with these masks
        return control

    def _resume_file(self, args, state) -> dict | None:
        """The sparsifier state of the checkpoint the Trainer resumed from (None on a fresh start)."""
        if state.global_step == 0:
            return None
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise ckpt.CheckpointError(f"RigLCallback: resuming at step {state.global_step}, but {path} does not "
                                       "exist (written without RigLCallback? resuming from another folder: "
                                       "RigLCallback(resume_from=that folder))")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if int(saved.get("step", -1)) != state.global_step:
            raise ckpt.CheckpointError(f"RigLCallback: {path} is of step {saved.get('step')}, the Trainer resumes at "
                                       f"step {state.global_step} (a file of another run?)")
        logger.info("RigLCallback: masks of step %d read from %s", state.global_step, path)
        return saved

    def _begin_deepspeed(self, args, state, control):
        """The Trainer's DeepSpeed setting: Accelerate calls ``engine.step()`` inside
        ``accelerator.backward``, before ``on_pre_optimizer_step``; so the engine's ``step`` is
        wrapped (on this engine only): the sparsifier steps first, and a mask update runs the
        engine's step with the optimizer update skipped, as ``rigl-ds train`` does."""
        from deepspeed import DeepSpeedEngine

        from rigl_ds.engines.deepspeed import DeepSpeedEngineAdapter

        engine = getattr(self._trainer, "model_wrapped", None)
        if not isinstance(engine, DeepSpeedEngine):
            raise ValueError("RigLCallback under the Trainer's DeepSpeed setting needs the Trainer, whose DeepSpeed "
                             "engine exists only once training begins: RigLCallback(...).attach(trainer) instead "
                             f"of callbacks=[RigLCallback(...)] (found {type(engine).__name__})")
        if "step" in vars(engine):
            raise ValueError("RigLCallback: this DeepSpeed engine's step is wrapped already (two RigLCallbacks on one "
                             "Trainer? keep one)")
        saved = self._resume_file(args, state)
        adapter = DeepSpeedEngineAdapter(engine)
        with adapter.keeping_loaded_state() if saved is not None else contextlib.nullcontext():
            # on resume the engine has loaded its checkpoint: the initial masks must not touch it
            self.sparsifier = build_sparsifier(engine.module, adapter.base_optimizer, self.config,
                                               total_steps=int(state.max_steps), engine=adapter)
        if saved is not None:
            self.sparsifier.load_state_dict(saved, reset_optimizer_state=False)    # saved with these masks
        original = engine.step

        def step(*a, **kw):
            if not engine.is_gradient_accumulation_boundary():    # an Accelerate that steps every micro-batch
                return original(*a, **kw)
            adapter.step(self.sparsifier.step(), step_fn=lambda: original(*a, **kw))

        engine.step = step                  # an instance attribute: on_train_end removes it
        self._ds_engine = engine
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """Unwraps the DeepSpeed engine's step and takes the gradient hooks off (``sparsifier`` stays,
        for :meth:`~rigl_ds.core.sparsifier.Sparsifier.measure` and the masks)."""
        if self._ds_engine is not None:
            del self._ds_engine.step
            self._ds_engine = None
        if self.sparsifier is not None:
            self.sparsifier.engine.remove_hooks()
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._ds_engine is not None:     # DeepSpeed: the engine's step has run, through the wrapper
            return control
        if not self.sparsifier.step():      # a mask update: this optimizer step must change nothing
            for p in self._model.parameters():
                p.grad = None
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.sparsifier is None:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        sd = self.sparsifier.state_dict()
        if state.is_world_process_zero:
            os.makedirs(folder, exist_ok=True)
            torch.save(sd, os.path.join(folder, STATE_FILE))
        return control
