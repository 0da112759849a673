"""What the one training loop needs from an engine: forward, backward, step, ranks, checkpoints.

``build_runtime`` wraps a model and optimizer for ``engine.name`` = local | ddp | deepspeed | fsdp2
and gives the core the matching mask adapter. The loop is the same for all four.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Callable

import torch
from torch import nn

from rigl_ds import checkpoint as ckpt

logger = logging.getLogger(__name__)


class EngineError(ValueError):
    """An engine that cannot be set up as configured; the message names the setting."""


class LocalRuntime:
    """One process; also the base of DDP (same optimizer, scaler and checkpoint files)."""

    name = "local"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.module, self.forward_model, self.optimizer = model, model, optimizer
        self.device, self.scaler = device, scaler
        self.rank, self.world = 0, 1

    # ------------------------------------------------------------------ sparsifier side
    def sparse_engine(self):
        from .local import LocalEngine

        return LocalEngine(self.module, self.optimizer)

    # ------------------------------------------------------------------ the step
    def no_sync(self, last: bool):
        return contextlib.nullcontext()

    def micro_step(self) -> None:
        """After the backward of a micro-batch that is not the last of the step."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's value of ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def start_step(self) -> None:
        """Before the first forward of a step."""

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics): before evaluation, so that all
        ranks evaluate the model that rank 0 checkpoints."""

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        scaled = loss / accum
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def before_sparsifier(self) -> None:
        """Unscale (AMP) the gradients before the sparsifier reads them."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def clip_grads(self, max_norm: float | None) -> None:
        """``train.clip_grad_norm``, after the sparsifier masked the gradients: the norm is that of
        the update the optimizer applies (inactive entries are zero and count for nothing), on every
        engine. FSDP2's DTensor gradients give the norm over all shards."""
        if max_norm:
            nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def _nonfinite(self, local=lambda g: g) -> torch.Tensor:
        """A 0-d bool tensor: is any of this rank's gradients (``local`` of each) not finite? One
        foreach-norm, no host sync."""
        grads = [local(p.grad) for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        return ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()

    def grads_finite(self) -> bool:
        """Are all gradients finite? (After all-reduce they are the same on every rank.)"""
        return not bool(self._nonfinite())

    def step(self, apply: bool) -> None:
        if apply:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def eval_batches(self, batches, input_shape: tuple[int, ...]):
        """The validation batches this rank evaluates (FSDP2: padded so every rank runs as many forwards)."""
        return batches

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t``, stacked in rank order (a new leading dimension)."""
        return t[None]

    def stop_group(self):
        """The process group on which ranks agree to stop on a signal (CPU tensors: gloo)."""
        return None

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ checkpoints
    def list_checkpoints(self, ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
        return ckpt.list_checkpoints(ckpt_dir)

    def save(self, state: dict[str, Any], ckpt_dir: pathlib.Path, step: int, keep_last: int) -> pathlib.Path:
        """Rank 0 writes one file (atomic) holding the model and optimizer too."""
        path = ckpt.checkpoint_path(ckpt_dir, step)
        if self.rank == 0:
            full = dict(state, model=self.module.state_dict(), optimizer=self.optimizer.state_dict(),
                        scaler=self.scaler.state_dict() if self.scaler else None)
            ckpt.save_atomic(full, path)
            ckpt.rotate(ckpt_dir, keep_last, path)
        self.barrier()
        return path

    def load(self, path: pathlib.Path) -> dict[str, Any]:
        state = ckpt.load(path)
        try:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model/optimizer (another model?): "
                                       f"{str(e).splitlines()[0]}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return state


class DistributedRuntime(LocalRuntime):
    """Collectives shared by the multi-process runtimes (the process group already exists)."""

    def sync_buffers(self) -> None:
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in self.module.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for bufs in by_dtype.values():       # one broadcast per dtype (ResNet-50: 2, not 159)
            flat = _flatten_dense_tensors([b.data for b in bufs])
            self.dist.broadcast(flat, src=0)
            for b, v in zip(bufs, _unflatten_dense_tensors(flat, [b.data for b in bufs])):
                b.data.copy_(v)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self.dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(out, t)
        return torch.stack(out)

    def stop_group(self):
        if self.dist.get_backend() == "gloo":
            return None                      # the default group already takes CPU tensors
        return self.dist.new_group(backend="gloo")

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        self.dist.barrier()


class DDPRuntime(DistributedRuntime):
    """torchrun / SLURM: ``DistributedDataParallel``, NCCL on GPUs, gloo on CPU."""

    name = "ddp"

    def __init__(self, model: nn.Module, optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer],
                 device: torch.device, scaler, *, packed_allreduce: bool, mask_sync: str) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.dist = dist
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        super().__init__(model, optimizer_fn(model), device, scaler)
        self.ddp, self.forward_model = ddp, ddp
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.packed_allreduce, self.mask_sync = packed_allreduce, mask_sync

    def sparse_engine(self):
        from .ddp import DDPEngine

        return DDPEngine(self.ddp, self.optimizer, mask_sync=self.mask_sync, packed_allreduce=self.packed_allreduce)

    def no_sync(self, last: bool):
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def close(self) -> None:
        self.dist.barrier()
        self.dist.destroy_process_group()


class DeepSpeedRuntime(DistributedRuntime):
    """The ``deepspeed`` launcher: ``deepspeed.initialize`` with our torch optimizer, ZeRO 0–3."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, *,
                 mask_sync: str) -> None:
        import deepspeed
        import torch.distributed as dist

        self.dist = dist
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        super().__init__(engine.module, optimizer, engine.device, None)
        self.ds, self.forward_model = engine, engine
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.mask_sync = mask_sync
        self._adapter = None
        # DeepSpeed holds reduced gradients in its own (partitioned) buffers: every local gradient
        # is checked as it is produced, before the reduction, and the flags are combined at the step
        self._nonfinite = torch.zeros((), dtype=torch.float32, device=engine.device)
        for p in self.module.parameters():
            if p.requires_grad:
                p.register_hook(self._check_grad)

    def _check_grad(self, grad: torch.Tensor) -> torch.Tensor:
        self._nonfinite.logical_or_(~torch.isfinite(grad).all())
        return grad

    def grads_finite(self) -> bool:
        flag = self._nonfinite.clone()
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        self._nonfinite.zero_()
        return not bool(flag)

    def sparse_engine(self):
        from .deepspeed import DeepSpeedEngineAdapter

        self._adapter = DeepSpeedEngineAdapter(self.ds, self.optimizer, mask_sync=self.mask_sync)
        return self._adapter

    def start_step(self) -> None:
        # as DDP's broadcast_buffers: every rank starts the step from rank 0's BatchNorm statistics
        # (the ones checkpointed), so a resumed run continues exactly
        self.sync_buffers()

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        self.ds.backward(loss)               # DeepSpeed divides by gradient_accumulation_steps itself

    def micro_step(self) -> None:
        self.ds.step()                       # not a boundary: no optimizer update

    def before_sparsifier(self) -> None:
        pass                                 # DeepSpeed unscales inside engine.step()

    def clip_grads(self, max_norm: float | None) -> None:
        pass     # DeepSpeed's "gradient_clipping" (set from train.clip_grad_norm), inside engine.step(),
        # over the gradients the sparsifier already masked: the same rule as the other engines

    def step(self, apply: bool) -> None:
        if self._adapter is not None:
            self._adapter.step(apply)
        else:
            self.ds.step()

    def zero_grad(self) -> None:
        pass                                 # engine.step() zeroes the gradients

    # DeepSpeed checkpoints are folders written by every rank; a "complete" marker makes them valid.
    def list_checkpoints(self, ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
        return ckpt.list_folders(ckpt_dir)

    def save(self, state: dict[str, Any], ckpt_dir: pathlib.Path, step: int, keep_last: int) -> pathlib.Path:
        tag = f"step_{step:08d}"
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"rigl_ds": state})
        self.barrier()
        if self.rank == 0:
            ckpt.write_manifest(ckpt_dir / tag)
            ckpt.rotate_folders(ckpt_dir, keep_last, ckpt_dir / tag)
        self.barrier()
        return ckpt_dir / tag

    def load(self, path: pathlib.Path) -> dict[str, Any]:
        if not path.is_dir():
            raise ckpt.CheckpointError(f"checkpoint {path} does not exist (DeepSpeed checkpoints are folders)")
        ckpt.verify_folder(path)
        ckpt.check_deepspeed_folder(path)
        try:
            _, client = self.ds.load_checkpoint(str(path.parent), tag=path.name)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model/optimizer (another model or "
                                       f"ZeRO layout?): {str(e).splitlines()[0]}") from None
        if not client or "rigl_ds" not in client:
            raise ckpt.CheckpointError(f"checkpoint {path} holds no rigl_ds state")
        return client["rigl_ds"]


class FSDP2Runtime(DistributedRuntime):
    """torchrun / SLURM: ``fully_shard`` (FSDP2) over a 1-D mesh of all ranks; masks sharded like weights.

    Checkpoints are torch.distributed.checkpoint (DCP) folders: model, optimizer, masks and the
    accumulated grow scores as sharded tensors (any world size can load them), plus rank 0's
    ``rigl_ds.pt`` (loop, sparsifier and RNG state) and a ``complete`` manifest written last.
    """

    name = "fsdp2"

    def __init__(self, model: nn.Module, optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer],
                 device: torch.device, *, units: list[str], selection: str) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        self.dist = dist
        self.mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        # bf16 runs under the loop's torch.autocast, as with DDP: parameters, their all-gathers and the
        # gradient reductions stay fp32 (a bf16 MixedPrecisionPolicy casts BatchNorm's affine
        # parameters too, which BatchNorm's fp32 running statistics refuse)
        wrapped = 0
        for m in list(model.modules())[1:]:
            if type(m).__name__ in units:
                fully_shard(m, mesh=self.mesh)
                wrapped += 1
        fully_shard(model, mesh=self.mesh)
        super().__init__(model, optimizer_fn(model), device, None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.selection = selection
        self._adapter = None
        logger.info("fsdp2: %d units (%s) + root over %d ranks", wrapped, ", ".join(units) or "-", self.world)

    def sparse_engine(self):
        from .fsdp2 import FSDP2Engine

        self._adapter = FSDP2Engine(self.module, self.optimizer, selection=self.selection)
        return self._adapter

    def no_sync(self, last: bool):
        @contextlib.contextmanager
        def sync(on: bool):
            self.module.set_requires_gradient_sync(on)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)
        return sync(last)

    def start_step(self) -> None:
        self.sync_buffers()              # every rank starts from rank 0's BatchNorm statistics (checkpointed)

    def grads_finite(self) -> bool:
        from .fsdp2 import local

        bad = self._nonfinite(local).float()          # this rank's gradient shards, then over all ranks
        self.dist.all_reduce(bad, op=self.dist.ReduceOp.MAX)
        return not bool(bad)

    def eval_batches(self, batches, input_shape: tuple[int, ...]):
        """Forwards are collectives under FSDP2: a rank out of batches runs empty ones until all are."""
        it = iter(batches)
        while True:
            batch = next(it, None)
            more = torch.tensor(float(batch is not None), device=self.device)
            self.dist.all_reduce(more, op=self.dist.ReduceOp.MAX)
            if not bool(more):
                self.reshard()
                return
            yield batch if batch is not None else (torch.zeros((0, *input_shape)), torch.zeros(0, dtype=torch.long))

    def list_checkpoints(self, ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
        return ckpt.list_folders(ckpt_dir)         # DCP folders with a "complete" manifest, like DeepSpeed's

    def reshard(self) -> None:
        """Free the unsharded parameters a forward without backward (evaluation, FLOPs count) left
        behind (FSDP2 keeps the root's after forward): parameters are DTensor shards again."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def _sharded(self, state: dict[str, Any]) -> dict[str, Any]:
        """The tensors DCP saves and loads (resharded to this world size): model, optimizer, masks, scores."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        from .fsdp2 import placed_like

        self.reshard()
        params = dict(self.module.named_parameters())

        def like_param(name: str, t: torch.Tensor):
            return placed_like(params[name], t)

        out = {"model": get_model_state_dict(self.module), "optimizer": get_optimizer_state_dict(self.module, self.optimizer)}
        sp = state.get("sparsifier")
        if sp is not None:
            out["masks"] = {n: like_param(n, m) for n, m in sp["masks"].items()}
            if sp.get("score") is not None:
                out["score"] = {n: like_param(n, s) for n, s in sp["score"].items()}
        return out

    def save(self, state: dict[str, Any], ckpt_dir: pathlib.Path, step: int, keep_last: int) -> pathlib.Path:
        """Every rank writes its shards into ``.step_N.tmp``; rank 0 adds ``rigl_ds.pt`` and the
        manifest, then renames the folder into place (a checkpoint of the same step, e.g. the one
        this run resumed from, is replaced only then)."""
        import torch.distributed.checkpoint as dcp

        tag = ckpt_dir / f"step_{step:08d}"
        tmp = ckpt_dir / f".{tag.name}.tmp"
        if self.rank == 0 and tmp.exists():          # left by a killed save
            shutil.rmtree(tmp)
        self.barrier()
        sp = state.get("sparsifier")
        # buffers (BatchNorm statistics) are replicated tensors, of which DCP keeps one rank's copy:
        # make every copy rank 0's, as every step starts from them
        self.sync_buffers()
        dcp.save(self._sharded(state), checkpoint_id=str(tmp))
        if self.rank == 0:
            rest = dict(state, model="dcp", sparsifier=None if sp is None else dict(sp, masks=None, score=None))
            ckpt.save_atomic(rest, tmp / "rigl_ds.pt")
        self.barrier()
        if self.rank == 0:
            ckpt.write_manifest(tmp)
            ckpt.verify_folder(tmp)
            old = ckpt_dir / f".{tag.name}.old"
            if tag.exists():
                tag.rename(old)
            tmp.rename(tag)
            shutil.rmtree(old, ignore_errors=True)
            ckpt.rotate_folders(ckpt_dir, keep_last, tag)
        self.barrier()
        return tag

    def load(self, path: pathlib.Path) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if not path.is_dir():
            raise ckpt.CheckpointError(f"checkpoint {path} does not exist (FSDP2 checkpoints are DCP folders)")
        ckpt.verify_folder(path)
        state = ckpt.load(path / "rigl_ds.pt")
        sp = state.get("sparsifier")
        template = dict(state)
        if sp is not None:        # templates of this rank's shards, filled in place by dcp.load
            adapter = self._adapter
            if adapter is None:
                raise ckpt.CheckpointError("an FSDP2 checkpoint with masks needs the sparsifier built first")
            sp = dict(sp)
            sp["masks"] = {n: torch.zeros_like(m) for n, m in adapter.masks.items()}
            if sp.get("score_count"):
                sp["score"] = {n: torch.zeros(m.shape, dtype=torch.float32, device=m.device)
                               for n, m in adapter.masks.items()}
            template["sparsifier"] = sp
        sharded = self._sharded(template)
        try:
            ckpt.load_dcp(sharded, path)
            set_model_state_dict(self.module, sharded["model"])
            set_optimizer_state_dict(self.module, self.optimizer, sharded["optimizer"])
        except ckpt.CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model/optimizer (another model?): "
                                       f"{str(e).splitlines()[0]}") from None
        return template


def deepspeed_config(path: str, *, micro_batch: int, grad_accumulation: int, world: int, dtype: str,
                     clip_grad_norm: float | None = None) -> dict:
    """Load a DeepSpeed JSON and fill in (or check) its batch sizes, precision and gradient clipping
    from the YAML (the YAML decides; a JSON value that differs is refused, 0 or "auto" defer)."""
    p = pathlib.Path(path)
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise EngineError(f"engine.deepspeed_config: {p} not found") from None
    except json.JSONDecodeError as e:
        raise EngineError(f"engine.deepspeed_config: {p} is not valid JSON: {e}") from None
    want = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accumulation,
            "train_batch_size": micro_batch * grad_accumulation * world}
    problems = [f"{p}: {k}={cfg[k]} but the YAML gives {v} (data.batch_size={micro_batch}, "
                f"train.grad_accumulation={grad_accumulation}, world size {world})"
                for k, v in want.items() if k in cfg and cfg[k] not in (v, "auto")]
    clip = float(clip_grad_norm or 0.0)
    given = cfg.get("gradient_clipping", 0.0)
    if given not in (0, 0.0, "auto", None, clip):
        problems.append(f"{p}: gradient_clipping={given} but train.clip_grad_norm={clip_grad_norm} (set it "
                        "in the YAML, which fills the JSON, and leave the JSON's at 0.0)")
    want["gradient_clipping"] = clip
    for key, on in (("bf16", dtype == "bf16"), ("fp16", dtype == "fp16")):
        enabled = bool(cfg.get(key, {}).get("enabled", False))
        if key in cfg and enabled != on:
            problems.append(f"{p}: {key}.enabled={enabled} but precision.dtype={dtype!r}")
        cfg.setdefault(key, {})["enabled"] = on
    if problems:
        raise EngineError("DeepSpeed config disagrees with the experiment:\n  " + "\n  ".join(problems))
    cfg.update(want)
    cfg.setdefault("steps_per_print", 10**9)
    if cfg.get("zero_optimization", {}).get("stage", 0) > 0:
        cfg.setdefault("zero_allow_untested_optimizer", True)
    return cfg


def init_distributed(engine: str) -> None:
    """Initialise torch.distributed from the launcher's environment (NCCL on GPUs, gloo on CPU)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise EngineError(f"engine.name={engine!r} needs a launcher (torchrun or deepspeed) that sets RANK and "
                          "WORLD_SIZE; see launch/")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if engine == "deepspeed":
        from rigl_ds.engines.deepspeed import init_deepspeed_comm

        # DeepSpeed adopts the process group made above (on CPU its own default is much slower here)
        init_deepspeed_comm(backend)


def build_runtime(cfg, model: nn.Module, optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer],
                  device: torch.device) -> LocalRuntime:
    """The runtime for ``cfg.engine.name``; the model is already on ``device``."""
    name = cfg.engine.name
    scaler = torch.amp.GradScaler(device.type) if cfg.precision.dtype == "fp16" and name != "deepspeed" else None
    if name == "local":
        return LocalRuntime(model, optimizer_fn(model), device, scaler)
    if name == "ddp":
        return DDPRuntime(model, optimizer_fn, device, scaler, packed_allreduce=cfg.engine.packed_allreduce,
                          mask_sync=cfg.engine.mask_sync)
    if name == "fsdp2":
        return FSDP2Runtime(model, optimizer_fn, device, units=cfg.engine.fsdp2_units,
                            selection=cfg.engine.fsdp2_selection)
    import torch.distributed as dist

    ds_cfg = deepspeed_config(cfg.engine.deepspeed_config, micro_batch=cfg.data.batch_size,
                              grad_accumulation=cfg.train.grad_accumulation, world=dist.get_world_size(),
                              dtype=cfg.precision.dtype, clip_grad_norm=cfg.train.clip_grad_norm)
    return DeepSpeedRuntime(model, optimizer_fn(model), ds_cfg, mask_sync=cfg.engine.mask_sync)

