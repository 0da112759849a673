"""One readable training loop: forward, backward, sparsifier, step, log, checkpoint.

The loop never touches mask tensors: it calls ``sparsifier.step()`` and reads its reports.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import pathlib
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rigl_ds import checkpoint as ckpt
from rigl_ds import faults
from rigl_ds.config import ConfigError, ExperimentConfig, for_world, schedule_problems, to_yaml
from rigl_ds.core import DENSE, Sparsifier, build_sparsifier, forward_flops
from rigl_ds.data import Data, DataInfo, build_data, describe_data
from rigl_ds.engines import get_backend
from rigl_ds.models import build_model
from rigl_ds.stop import StopRequested, StopSignal

logger = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


# ------------------------------------------------------------------------------------ helpers

def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def build_optimizer(cfg: ExperimentConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay, fused=o.fused)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=o.fused)


def lr_factor(cfg: ExperimentConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base LR at ``step``: linear warm-up, then cosine / constant / step decay."""
    s = cfg.lr_schedule
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if s.name == "constant":
        return 1.0
    if s.name == "step":
        epoch = step / steps_per_epoch
        return s.step_gamma ** sum(1 for e in s.step_epochs if epoch >= e)
    floor = s.min_lr / cfg.optimizer.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def flat(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A language model's (B, T, vocab) logits and (B, T) targets as (B*T, vocab) and (B*T,): every
    token is one prediction; image logits (B, classes) unchanged."""
    if logits.dim() > 2:
        return logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    return logits, target


def accuracy(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of correct top-k predictions for each k (as tensors: no host sync)."""
    logits, target = flat(logits, target)
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(target[:, None])
    return [hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, autocast, channels_last: bool,
             reduce=lambda t: t) -> dict[str, float]:
    """Top-1/top-5 accuracy and loss over ``batches`` (``reduce`` sums the counts over ranks)."""
    was = model.training
    model.eval()
    n = 0
    c1 = torch.zeros((), device=device)
    c5 = torch.zeros((), device=device)
    loss = torch.zeros((), device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            out = model(x)
        loss += F.cross_entropy(*flat(out.float(), y), reduction="sum")
        a1, a5 = accuracy(out, y)
        c1 += a1
        c5 += a5
        n += y.numel()
    model.train(was)
    totals = reduce(torch.stack([c1, c5, loss, torch.tensor(float(n), device=device)]).double())
    c1, c5, loss, n = totals.tolist()
    n = max(int(n), 1)
    return {"top1": c1 / n, "top5": c5 / n, "loss": loss / n, "perplexity": math.exp(min(loss / n, 700.0)), "count": n}


def resolve_run_dir(cfg: ExperimentConfig) -> pathlib.Path:
    """``logging.run_dir``, or for ``resume=auto`` the newest ``runs/<name>-*``, or a new timestamped one."""
    if cfg.logging.run_dir:
        return pathlib.Path(cfg.logging.run_dir)
    root = pathlib.Path("runs")
    if cfg.resume == "auto" and root.is_dir():
        runs = sorted(p for p in root.glob(f"{cfg.name}-*") if ckpt.list_checkpoints(p / "checkpoints"))
        if runs:
            return runs[-1]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return root / f"{cfg.name}-{stamp}"


# ------------------------------------------------------------------------------------ the run

@dataclass
class Experiment:
    """Data, model and schedule built from a config (used by ``train``, ``plan`` and ``eval``)."""

    cfg: ExperimentConfig
    info: DataInfo
    model: nn.Module
    steps_per_epoch: int
    total_steps: int
    data: Data | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def schedule_lengths(cfg: ExperimentConfig, info: DataInfo, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for this config."""
    micro = (info.train_size // world) // cfg.data.batch_size
    spe = micro // cfg.train.grad_accumulation
    if spe < 1:
        raise RunError(
            f"an epoch has {micro} micro-batches of data.batch_size={cfg.data.batch_size} per rank, fewer than "
            f"train.grad_accumulation={cfg.train.grad_accumulation}: lower one of them")
    return spe, max(1, int(round(cfg.train.epochs * spe)))


def build_experiment(cfg: ExperimentConfig, *, with_data: bool = True, device: torch.device | None = None,
                     meta: bool = False, rank: int = 0, world: int = 1) -> Experiment:
    """Build data and model (on the meta device with ``meta``) and the schedule; no files written."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    cfg = for_world(cfg, world)
    device = device or (torch.device("meta") if meta else pick_device())
    data = build_data(cfg.data, seed=cfg.train.seed, rank=rank, world=world, device=device) if with_data else None
    info = data.info if data is not None else describe_data(cfg.data)
    spe, total = schedule_lengths(cfg, info, world)
    problems = schedule_problems(cfg, total)
    if problems:
        raise ConfigError(problems)
    with device if meta else nullcontext():
        try:
            model = build_model(cfg.model, info.num_classes, info.input_shape)
        except (ValueError, TypeError, ImportError, RuntimeError) as e:
            raise ConfigError([f"{cfg.where('model')}: model.name={cfg.model.name!r}, model.kwargs="
                               f"{cfg.model.kwargs}: cannot build the model: {type(e).__name__}: {e}"]) from None
    if not meta:
        model = model.to(device)
        # some backends flatten parameters (DeepSpeed through byte views, FSDP2 into shards) and need
        # contiguous (NCHW) weights; channels-last inputs alone still select channels-last convolutions
        if cfg.model.channels_last and get_backend(cfg.engine.name).keeps_channels_last:
            model = model.to(memory_format=torch.channels_last)
    return Experiment(cfg=cfg, info=info, model=model, steps_per_epoch=spe, total_steps=total, data=data,
                      device=device)


SMALL_STEP_FLOPS = 2e9     # forward FLOPs of one micro-batch below which one CPU thread is best


def choose_threads(setting: str | int, forward_flops: float, device: torch.device) -> tuple[int, str]:
    """torch's intra-op CPU threads for this process, and why (``train.threads``).

    ``auto``: ``OMP_NUM_THREADS`` when set (launchers set 1); on a GPU torch's default (the CPU only
    feeds it); on CPU one thread when a micro-batch's forward is small (below
    :data:`SMALL_STEP_FLOPS`: more threads mostly wait on each other, and on a loaded machine their
    spin-waits made the quickstart 100x slower), else this process's share of the CPUs it may run
    on. The choice depends on the config and the machine only, never on the load of the moment, so a
    resumed run computes with the same threads."""
    if setting != "auto":
        return int(setting), "train.threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "train.threads=auto: OMP_NUM_THREADS"
    if device.type != "cpu":
        return torch.get_num_threads(), f"train.threads=auto: torch's default on {device.type}"
    if forward_flops < SMALL_STEP_FLOPS:
        return 1, (f"train.threads=auto: {forward_flops / 1e9:.2g} GFLOPs forward per micro-batch, below "
                   f"{SMALL_STEP_FLOPS / 1e9:.0f}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // local), f"train.threads=auto: {cpus} CPUs / {local} local processes"


class Trainer:
    """Runs an :class:`Experiment`: the loop, logging, evaluation and checkpoints."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        backend = get_backend(cfg.engine.name)
        self.cfg = cfg
        if cfg.precision.dtype == "fp16" and not torch.cuda.is_available():
            raise RunError("precision.dtype='fp16' needs a CUDA GPU; use 'fp32' (or 'bf16') on CPU")
        rank, world = 0, 1
        if backend.distributed:
            backend.init_process_group()
            import torch.distributed as dist

            rank, world = dist.get_rank(), dist.get_world_size()
        self.cfg = cfg = for_world(cfg, world)
        self.exp = build_experiment(cfg, rank=rank, world=world)
        self.data, self.device = self.exp.data, self.exp.device
        self.rt = backend.create(cfg, self.exp.model, lambda m: build_optimizer(cfg, m), self.device)
        self.model, self.optimizer = self.rt.module, self.rt.optimizer
        self.is_main = self.rt.rank == 0
        self.sparsifier: Sparsifier | None = None
        if cfg.sparsity.method != DENSE:
            try:
                self.sparsifier = build_sparsifier(self.model, self.optimizer, cfg.sparsity.to_core(cfg.train.seed),
                                                   total_steps=self.exp.total_steps, engine=self.rt.sparse_engine())
            except ValueError as e:
                raise ConfigError([f"{cfg.where('sparsity')}: sparsity: {e}"]) from None
        spe, total = self.exp.steps_per_epoch, self.exp.total_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s, total, spe))
        use_amp = cfg.precision.dtype in ("bf16", "fp16")
        amp_dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float16
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if use_amp else nullcontext
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.mix_gen = torch.Generator().manual_seed(cfg.train.seed + 7)   # mixup permutations
        self.mix_rng = np.random.default_rng(cfg.train.seed + 7)             # mixup lambdas
        self.step = 0
        self.flops = self._flops()
        threads, why = choose_threads(cfg.train.threads, self.flops["dense"] * cfg.data.batch_size, self.device)
        torch.set_num_threads(threads)
        if rank == 0:
            logger.info("torch CPU threads per process: %d (%s)", threads, why)
        self.cum_flops = {"sparse": 0.0, "dense": 0.0}
        self.nonfinite_steps = 0      # optimizer steps skipped for inf/NaN gradients
        self._buffers = list(self.model.buffers())
        self._buffer_backup = [b.detach().clone() for b in self._buffers]
        # running sums of the current logging window (saved, so a resumed run logs the same values)
        self.window: dict[str, Any] = {"loss_sum": 0.0, "correct1": 0.0, "correct5": 0.0, "n": 0}
        # wall time of the run over all its sessions (saved in checkpoints; not part of the training state)
        self.elapsed = {"seconds": 0.0, "train_step_seconds": 0.0}
        self.run_dir = pathlib.Path(self.rt.broadcast_object(str(resolve_run_dir(cfg))))

    # -------------------------------------------------------------- setup
    def _flops(self) -> dict[str, float]:
        """Counted on the model rebuilt on the meta device (no memory, no compute), not on the engine's
        copy: DeepSpeed's bf16/fp16 engines, ZeRO-3 and FSDP2 hold it in forms a plain forward refuses."""
        dens = self.sparsifier.layer_densities() if self.sparsifier else {}
        try:
            with torch.device("meta"):
                model = build_model(self.cfg.model, self.exp.info.num_classes, self.exp.info.input_shape)
            f = forward_flops(model, self.exp.info.sample("meta"), dens)
        except Exception as e:  # a user model whose builder or forward needs real tensors: count on the CPU
            logger.debug("FLOPs on the meta device failed (%s); counting on a CPU copy", e)
            with torch.random.fork_rng(devices=[]):          # the copy's init draws nothing from the run's RNG
                model = build_model(self.cfg.model, self.exp.info.num_classes, self.exp.info.input_shape)
                f = forward_flops(model, self.exp.info.sample(), dens)
        self._forward_flops = f
        return {"dense": f.dense, "sparse": f.sparse}

    def _prepare_run_dir(self) -> None:
        found = self.rt.list_checkpoints(self.run_dir / "checkpoints")
        if self.cfg.resume is None and found:
            raise RunError(f"run directory {self.run_dir} already holds checkpoints ({found[-1].name}); "
                           "pass resume=auto to continue it, or set logging.run_dir to a new folder")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        self.rt.barrier()

    def _resume(self) -> None:
        if self.cfg.resume is None:
            return
        if self.cfg.resume == "auto":
            found = self.rt.list_checkpoints(self.run_dir / "checkpoints")
            if not found:
                logger.info("resume=auto: no checkpoint in %s, starting from step 0", self.run_dir)
                return
            candidates = list(reversed(found))
        else:
            candidates = [pathlib.Path(self.cfg.resume)]
        for i, path in enumerate(candidates):
            try:
                state = self.rt.load(path)
                break
            except ckpt.CheckpointError as e:
                if i == len(candidates) - 1:
                    if len(candidates) > 1:
                        raise ckpt.CheckpointError(f"{e}\nno usable checkpoint in {path.parent} (all "
                                                   f"{len(candidates)} refused); move them away to start anew") from None
                    raise
                logger.warning("%s; trying an older one", e)
        try:
            self.load_state(state)
        except (ValueError, KeyError) as e:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this experiment: {e}") from None
        logger.info("resumed from %s at step %d", path, self.step)

    # -------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        spe = self.exp.steps_per_epoch
        return {
            "step": self.step,
            # the data position (a resume derives it from "step"): the same at every world size
            "data": {"epoch": self.step // spe,
                     "examples": (self.step % spe) * self.cfg.data.batch_size * self.cfg.train.grad_accumulation * self.rt.world},
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "sparsifier": self.sparsifier.state_dict() if self.sparsifier else None,
            "rng": ckpt.rng_state(),
            "mix_gen": self.mix_gen.get_state(),
            "mix_rng": self.mix_rng.bit_generator.state,
            "cum_flops": dict(self.cum_flops),
            "nonfinite_steps": self.nonfinite_steps,
            "log_window": self._window_rows(),
            "config": self.cfg.model_dump(mode="json"),
            "time": dict(self.elapsed),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state` saved (the runtime has restored model and optimizer)."""
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.sparsifier is not None:
            if state.get("sparsifier") is None:
                raise RunError("the checkpoint was saved without a sparsifier (a dense run)")
            # the optimizer state was saved together with these masks, so it is zero under them
            self.sparsifier.load_state_dict(state["sparsifier"], reset_optimizer_state=self.rt.reset_state_on_load)
            self.flops["sparse"] = self._forward_flops.at(self.sparsifier.layer_densities())
        ckpt.set_rng_state(state["rng"])
        self.mix_gen.set_state(state["mix_gen"])
        self.mix_rng.bit_generator.state = state["mix_rng"]
        self.cum_flops = dict(state["cum_flops"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.window = self._window_from_rows(state["log_window"])
        self.step = int(state["step"])
        self.elapsed = dict(state.get("time") or self.elapsed)

    _WINDOW = ("loss_sum", "correct1", "correct5", "n")

    def _window_rows(self) -> torch.Tensor:
        """Every rank's running sums of the current logging window, one row per rank (a collective):
        a run stopped mid-window resumes each rank's own sums, so the next logged values are exact."""
        mine = torch.tensor([float(self.window[k]) for k in self._WINDOW], dtype=torch.float64, device=self.device)
        return self.rt.all_gather(mine).cpu()

    def _window_from_rows(self, rows: torch.Tensor | dict) -> dict[str, Any]:
        rank, world = self.rt.rank, self.rt.world
        if isinstance(rows, dict):     # checkpoints written before per-rank windows: rank 0's sums, one row
            rows = torch.tensor([[float(rows.get(k, 0.0)) for k in self._WINDOW]], dtype=torch.float64)
        if rows.shape[0] == world:
            row = rows[rank]
        else:                   # another world size: the window's totals go to rank 0
            row = rows.sum(0) if rank == 0 else torch.zeros_like(rows[0])
        f32 = [torch.tensor(float(v), dtype=torch.float32, device=self.device) for v in row[:3].tolist()]
        return dict(zip(self._WINDOW, [*f32, torch.tensor(int(row[3]))]))

    def save(self, writer=None) -> pathlib.Path:
        """Checkpoint this step (TensorBoard events up to it are flushed first). A failed write (full
        disk, ...) stops the run with the error; the earlier checkpoints are untouched."""
        if writer is not None:
            writer.flush()
        ckpt_dir = self.run_dir / "checkpoints"
        try:
            return self.rt.save(self.state(), ckpt_dir, self.step, self.cfg.checkpoint.keep_last)
        except OSError as e:
            kept = [p.name for p in self.rt.list_checkpoints(ckpt_dir)]
            raise RunError(f"step {self.step}: writing the checkpoint to {ckpt_dir} failed ({e}); nothing was "
                           f"replaced: checkpoints kept: {', '.join(kept) or 'none'}") from None

    # -------------------------------------------------------------- one step
    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.cfg.train.mixup
        if alpha > 0:
            lam = float(self.mix_rng.beta(alpha, alpha))
            perm = torch.randperm(x.shape[0], generator=self.mix_gen).to(x.device)
            x = lam * x + (1 - lam) * x[perm]
            with self.autocast():
                out = self.rt.forward_model(x)
            loss = lam * self.criterion(out.float(), y) + (1 - lam) * self.criterion(out.float(), y[perm])
            return loss, out
        with self.autocast():
            out = self.rt.forward_model(x)
        return self.criterion(*flat(out.float(), y)), out

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Forward/backward over the micro-batches, sparsifier, optimizer step, LR step."""
        accum = len(micro_batches)
        rt = self.rt
        rt.start_step()
        rt.zero_grad()
        if self._buffers:      # BatchNorm statistics, restored if this step's gradients are not finite
            torch._foreach_copy_(self._buffer_backup, self._buffers)
        loss_sum = torch.zeros((), device=self.device)
        correct1 = torch.zeros((), device=self.device)
        correct5 = torch.zeros((), device=self.device)
        n = 0
        for i, (x, y) in enumerate(micro_batches):
            last = i == accum - 1
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.cfg.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with rt.no_sync(last):
                loss, out = self._loss(x, y)
                rt.backward(loss, accum)
            if not last:
                rt.micro_step()
            loss_sum += loss.detach() * y.numel()
            a1, a5 = accuracy(out.detach(), y)
            correct1 += a1
            correct5 += a5
            n += y.numel()
        rt.before_sparsifier()
        dense_step = self.sparsifier is not None and self.sparsifier.is_update_step() and \
            self.sparsifier.needs_dense_grad
        finite = rt.grads_finite()
        apply = self.sparsifier.step() if self.sparsifier is not None else True
        if apply and finite:
            rt.clip_grads(self.cfg.train.clip_grad_norm)     # the norm of what the optimizer applies
        if not finite:       # as GradScaler does: no optimizer step from inf/NaN gradients
            self.nonfinite_steps += 1
            logger.warning("step %d: non-finite gradients: optimizer step skipped, BatchNorm statistics "
                           "restored (%d such steps so far)", self.step, self.nonfinite_steps)
            if self._buffers:
                torch._foreach_copy_(self._buffers, self._buffer_backup)
            loss_sum.zero_(), correct1.zero_(), correct5.zero_()
            n_logged = 0
        else:
            n_logged = n
        rt.step(apply and finite)
        self.lr_scheduler.step()
        f, n_all = self.flops, n * rt.world
        self.cum_flops["dense"] += 3 * f["dense"] * n_all
        self.cum_flops["sparse"] += ((2 * f["sparse"] + f["dense"]) if dense_step else 3 * f["sparse"]) * n_all
        self.step += 1
        return {"loss_sum": loss_sum, "correct1": correct1, "correct5": correct5, "n": torch.tensor(n_logged)}

    # -------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        """Train to the end (or ``train.max_steps``), evaluate, checkpoint; returns the final metrics."""
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[logging.getLogger("rigl_ds")]):
            return self._run()

    def _run(self) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        cfg = self.cfg
        self._prepare_run_dir()
        self._resume()
        spe, total = self.exp.steps_per_epoch, self.exp.total_steps
        stop = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
        accum = cfg.train.grad_accumulation
        eval_every = max(1, int(round(cfg.train.eval_every_epochs * spe)))
        done = self._finished(stop)
        if done is not None:
            return done
        # events of steps after the checkpoint (a killed run's) are hidden; the checkpoint's own step
        # was logged before it was saved and is not logged again
        writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step + 1 if self.step else None) \
            if cfg.logging.tensorboard and self.is_main else None
        if self.step == 0:
            dens = self.densities()               # every rank: a collective under sharded engines
            if writer is not None:
                writer.add_text("config", "```\n" + to_yaml(cfg) + "\n```", 0)
                self._log_density(writer, 0, dens)
        bar = tqdm(total=stop, initial=self.step, disable=not (cfg.logging.progress and self.is_main), dynamic_ncols=True,
                   desc=cfg.name, unit="step")
        window = self.window
        window_t0 = time.perf_counter()
        t_start = time.perf_counter()
        stopped = 0
        with StopSignal(self.rt.stop_group(), distributed=self.rt.world > 1) as stop_signal:
            while self.step < stop and not stopped:
                epoch, in_epoch = divmod(self.step, spe)
                batches = self.data.train_batches(epoch, start_batch=in_epoch * accum)
                for _ in range(in_epoch, spe):
                    if self.step >= stop:
                        break
                    micro = [next(batches) for _ in range(accum)]
                    t0 = time.perf_counter()
                    stats = self.train_step(micro)
                    self.elapsed["train_step_seconds"] += time.perf_counter() - t0
                    faults.point("step")
                    for k in window:
                        window[k] = window[k] + stats[k]
                    self.window = window
                    bar.update(1)
                    if self.sparsifier is not None and self.sparsifier.last_update and \
                            self.sparsifier.last_update["step"] == self.step - 1:
                        # the counts may have changed (gmp): FLOPs from the next step on
                        self.flops["sparse"] = self._forward_flops.at(self.sparsifier.layer_densities())
                        self._log_update(writer, self.step)
                    if self.step % cfg.logging.log_every == 0 or self.step == total:
                        window, window_t0 = self._log_window(writer, bar, window, window_t0)
                        self.window = window
                    if self.step % eval_every == 0 and self.step != stop:
                        self._eval(writer)
                    stopped = stop_signal.after_step() if self.step != stop else 0
                    if stopped or (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0
                                   and self.step != stop):
                        self.elapsed["seconds"] += time.perf_counter() - t_start
                        t_start = time.perf_counter()
                        path = self.save(writer)
                    if stopped:
                        break
        bar.close()
        self.elapsed["seconds"] += time.perf_counter() - t_start
        if stopped:
            if writer is not None:
                writer.close()
            name = signal.Signals(stopped).name
            raise StopRequested(stopped, self.step, (
                f"stopped by {name} after step {self.step} of {stop}; checkpoint {path}. Resume with the same "
                f"command and: resume=auto logging.run_dir={self.run_dir}"))
        if cfg.checkpoint.at_end:
            self.save(writer)          # before the final evaluation, whose data loader draws random numbers
        final = self._eval(writer)
        if writer is not None:
            writer.close()
        result = {
            "run_dir": str(self.run_dir), "steps": self.step, "total_steps": total,
            "eval": final, **self.densities(),
            "train_flops_ratio": self.cum_flops["sparse"] / max(self.cum_flops["dense"], 1.0),
            # cumulative over every session of the run (a resumed run adds its own)
            "seconds": self.elapsed["seconds"], "train_step_seconds": self.elapsed["train_step_seconds"],
            "engine": self.rt.name, "world_size": self.rt.world,
        }
        if self.is_main:
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=2))
        self.rt.barrier()
        return result

    def _finished(self, stop: int) -> dict[str, Any] | None:
        """The stored result when ``resume`` found this run already finished (its result.json is of
        the step it resumed at): nothing is trained, evaluated or rewritten."""
        path = self.run_dir / "result.json"
        if self.cfg.resume is None or self.step < stop or not path.is_file():
            return None
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if result.get("steps") != self.step:
            return None
        logger.info("%s already finished at step %d; its result.json is kept as it is", self.run_dir, self.step)
        return result

    # -------------------------------------------------------------- reporting
    def densities(self) -> dict[str, float]:
        """Measured now from the live masks and weights (all ranks' shards): the fraction of active
        mask entries and of nonzero weights over the masked layers (a collective: every rank calls it)."""
        if self.sparsifier is None:
            return {"global_density": 1.0, "nonzero_density": 1.0}
        m = self.sparsifier.measure()
        self._measured = m
        return {"global_density": m.mask_density, "nonzero_density": m.nonzero_density}

    def _log_density(self, writer, step: int, dens: dict[str, float]) -> None:
        if writer is None:
            return
        writer.add_scalar("sparsity/global_density", dens["global_density"], step)
        writer.add_scalar("sparsity/nonzero_density", dens["nonzero_density"], step)
        if self.sparsifier is not None and self.cfg.logging.per_layer:
            for name, d in self._measured.layer_mask_density().items():
                writer.add_scalar(f"density/{name}", d, step)

    def _log_update(self, writer, step: int) -> None:
        dens = self.densities()
        if writer is None:
            return
        upd = self.sparsifier.last_update
        writer.add_scalar("rigl/drop_fraction", upd["drop_fraction"], step)
        writer.add_scalar("rigl/churn", upd["churn"], step)
        writer.add_scalar("sparsity/target_density", self.sparsifier.target_density, step)
        if "dense_partition" in upd:             # gap_cyclic: the partition dense from here (-1: fine-tuning)
            writer.add_scalar("gap/dense_partition", upd["dense_partition"], step)
        if "ablated_rows" in upd:                # neuron ablation (gamma_sal): output rows removed so far
            writer.add_scalar("rigl/ablated_rows", sum(upd["ablated_rows"].values()), step)
        if self.cfg.logging.per_layer:
            for name, c in upd["churn_per_layer"].items():
                writer.add_scalar(f"churn/{name}", c, step)
            for name, r in upd.get("ablated_rows", {}).items():
                writer.add_scalar(f"ablated_rows/{name}", r, step)
        self._log_density(writer, step, dens)

    def _log_window(self, writer, bar, window, t0):
        now = time.perf_counter()
        keys = ("loss_sum", "correct1", "correct5", "n")
        sums = self.rt.all_reduce_sum(torch.tensor([float(window[k]) for k in keys], dtype=torch.float64,
                                                   device=self.device)).tolist()
        n = int(sums[3])
        if n == 0:
            return window, t0
        loss, top1, top5 = sums[0] / n, sums[1] / n, sums[2] / n
        ips = n / max(now - t0, 1e-9)
        lr = self.optimizer.param_groups[0]["lr"]
        dens = self.densities()
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{top1:.3f}", img_s=f"{ips:.0f}", density=f"{dens['global_density']:.4f}")
        if writer is not None:
            s = self.step
            writer.add_scalar("train/loss", loss, s)
            writer.add_scalar("train/top1", top1, s)
            writer.add_scalar("train/top5", top5, s)
            writer.add_scalar("train/lr", lr, s)
            writer.add_scalar("train/img_per_s", ips, s)
            writer.add_scalar("train/nonfinite_steps", self.nonfinite_steps, s)
            writer.add_scalar("sparsity/global_density", dens["global_density"], s)
            writer.add_scalar("sparsity/nonzero_density", dens["nonzero_density"], s)
            writer.add_scalar("flops/train_ratio_cumulative",
                              self.cum_flops["sparse"] / max(self.cum_flops["dense"], 1.0), s)
        return {"loss_sum": 0.0, "correct1": 0.0, "correct5": 0.0, "n": 0}, now

    def _eval(self, writer) -> dict[str, float]:
        self.rt.sync_buffers()
        batches = self.rt.eval_batches(self.data.val_batches(), self.exp.info.input_shape, self.exp.info.input_dtype)
        res = evaluate(self.model, batches, self.device, self.autocast, self.cfg.model.channels_last,
                       reduce=self.rt.all_reduce_sum)
        if writer is not None:
            writer.add_scalar("eval/top1", res["top1"], self.step)
            writer.add_scalar("eval/top5", res["top5"], self.step)
            writer.add_scalar("eval/loss", res["loss"], self.step)
            if self.exp.info.input_dtype == torch.long:         # a language model: per-token perplexity
                writer.add_scalar("eval/perplexity", res["perplexity"], self.step)
        logger.info("step %d: eval top-1 %.4f, top-5 %.4f", self.step, res["top1"], res["top5"])
        return res


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Build and run an experiment; returns the final metrics (also written to result.json)."""
    trainer = Trainer(cfg)
    try:
        result = trainer.run()
    except StopRequested:
        trainer.rt.close()         # every rank stopped after the same step: the collectives line up
        raise
    trainer.rt.close()
    return result
