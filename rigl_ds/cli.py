"""The ``rigl-ds`` console entry point: train, plan, eval, validate, export."""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import traceback
from typing import Sequence

from rigl_ds.logs import process_rank, setup_logging
from rigl_ds.stop import StopRequested

logger = logging.getLogger("rigl_ds.cli")

EXAMPLES = """examples:
  rigl-ds train configs/quickstart.yaml
  rigl-ds train configs/quickstart.yaml sparsity.sparsity=0.8 sparsity.method=set
  rigl-ds train configs/quickstart.yaml resume=auto
  rigl-ds plan configs/quickstart.yaml --json
  rigl-ds eval configs/quickstart.yaml --checkpoint runs/quickstart-*/checkpoints/step_00001320.pt
  rigl-ds validate configs/*.yaml
  rigl-ds export runs/quickstart-* --format condensed --out quickstart_condensed.safetensors
"""


def _user_errors():
    from rigl_ds.checkpoint import CheckpointError
    from rigl_ds.config import ConfigError
    from rigl_ds.data import DataError
    from rigl_ds.engines.dist_utils import MaskDivergenceError
    from rigl_ds.engines import EngineError
    from rigl_ds.export import ExportError
    from rigl_ds.train import RunError

    return (ConfigError, DataError, RunError, CheckpointError, EngineError, MaskDivergenceError, ExportError)


def _load(args):
    from rigl_ds.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from rigl_ds.train import train

    cfg = _load(args)
    try:
        result = train(cfg)
    except _user_errors() as e:
        if cfg.logging.run_dir:          # an explicit run directory gets the error log, nothing else
            run_dir = pathlib.Path(cfg.logging.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.log").write_text(f"{type(e).__name__}: {e}\n")
        raise
    if process_rank() == 0:
        ev = result["eval"]
        tb = pathlib.Path(result["run_dir"]) / "tb"
        print(f"\nfinished {result['steps']} steps in {result['seconds']:.1f} s")
        if cfg.data.name == "text":
            print(f"validation: loss {ev['loss']:.4f}, perplexity {ev['perplexity']:.3f} per byte, next-byte top-1 "
                  f"{ev['top1']:.4f}, top-5 {ev['top5']:.4f} on {ev['count']} bytes")
        else:
            print(f"test accuracy: top-1 {ev['top1']:.4f}, top-5 {ev['top5']:.4f} on {ev['count']} examples")
        print(f"achieved density: {result['global_density']:.6f} of the masked weights active "
              f"(sparsity {1 - result['global_density']:.6f}), {result['nonzero_density']:.6f} nonzero; "
              f"training FLOPs {result['train_flops_ratio']:.3f}x dense")
        print(f"run directory: {result['run_dir']} (config.yaml, result.json, checkpoints/)")
        print(f"TensorBoard logs: {tb}\n  view them with: tensorboard --logdir {tb}")
    return 0


def cmd_plan(args) -> int:
    from rigl_ds.plan import format_plan, make_plan

    if args.world_size is not None and args.world_size < 1:
        raise SystemExit(f"rigl-ds plan: --world-size={args.world_size}: must be >= 1")
    plan = make_plan(_load(args), world=args.world_size)
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 0


def cmd_eval(args) -> int:
    import contextlib

    import torch

    from rigl_ds import checkpoint as ckpt
    from rigl_ds.core import select_layers
    from rigl_ds.train import build_experiment, evaluate

    cfg = _load(args)
    exp = build_experiment(cfg)
    state = ckpt.load(pathlib.Path(args.checkpoint))
    try:
        exp.model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"checkpoint {args.checkpoint} does not fit model {cfg.model.name!r}: {e}") from None
    res = evaluate(exp.model, exp.data.val_batches(), exp.device, contextlib.nullcontext,
                   cfg.model.channels_last)
    params = dict(exp.model.named_parameters())
    masks = (state.get("sparsifier") or {}).get("masks")
    layers = []
    for l in select_layers(exp.model, cfg.sparsity.include, cfg.sparsity.exclude):
        nonzero = int(torch.count_nonzero(params[l.name]))
        nnz = int(masks[l.name].sum()) if masks and l.name in masks else nonzero
        layers.append({"name": l.name, "numel": l.numel, "nnz": nnz, "nonzero": nonzero, "density": nnz / l.numel})
    total = sum(r["numel"] for r in layers)
    out = {"checkpoint": args.checkpoint, "step": state["step"], "top1": res["top1"], "top5": res["top5"],
           "count": res["count"], "global_density": sum(r["nnz"] for r in layers) / total,
           "nonzero_density": sum(r["nonzero"] for r in layers) / total, "layers": layers}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.checkpoint} (step {out['step']}): top-1 {out['top1']:.4f}, top-5 {out['top5']:.4f} "
              f"on {out['count']} examples; global density {out['global_density']:.6f} "
              f"({out['nonzero_density']:.6f} nonzero)")
        for r in layers:
            print(f"  {r['name']:<44} {r['nnz']:>10}/{r['numel']:<10} {r['density']:.4f}")
    return 0


def cmd_validate(args) -> int:
    from rigl_ds.config import ConfigError, load_config

    from rigl_ds.plan import make_plan

    bad = 0
    for path in args.configs:
        try:
            make_plan(load_config(path, args.overrides))      # schema, then model, layers and run length
            print(f"ok: {path}")
        except ConfigError as e:
            bad += 1
            print(f"invalid: {path}", file=sys.stderr)
            for p in e.problems:
                print(f"  {p}", file=sys.stderr)
    return 1 if bad else 0


def cmd_export(args) -> int:
    import contextlib

    from rigl_ds.export import export

    with contextlib.redirect_stdout(sys.stderr):      # DeepSpeed's zero_to_fp32 prints: stdout is the summary's
        summary = export(args.source, args.format, args.out)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"exported {summary['checkpoint']} (step {summary['step']}) as {summary['format']} to {summary['out']}; "
              f"{len(summary['replaced'])} layers replaced"
              + (": " + ", ".join(f"{k} -> {v}" for k, v in summary["replaced"].items()) if summary["replaced"] else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rigl-ds", description="RigL sparse training.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an experiment")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. sparsity.sparsity=0.8")
    t.set_defaults(fn=cmd_train)

    pl = sub.add_parser("plan", help="per-layer density, FLOPs and schedule, without training")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", metavar="key=value")
    pl.add_argument("--json", action="store_true", help="print exactly one JSON object")
    pl.add_argument("--world-size", type=int, default=None,
                    help="ranks the run will use (sets the schedule with train.global_batch; default 1, or "
                         "sparsity.gap_partitions for gap_parallel)")
    pl.set_defaults(fn=cmd_plan)

    e = sub.add_parser("eval", help="top-1/top-5 and per-layer density of a checkpoint")
    e.add_argument("config")
    e.add_argument("overrides", nargs="*", metavar="key=value")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    v = sub.add_parser("validate", help="check one or many config files; non-zero exit on any error")
    v.add_argument("configs", nargs="+")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    v.set_defaults(fn=cmd_validate)

    from rigl_ds.export import FORMATS

    x = sub.add_parser("export", help="write a trained sparse model for inference (one safetensors file)")
    x.add_argument("source", help="a run folder (its newest checkpoint) or a checkpoint file in <run>/checkpoints")
    x.add_argument("--format", required=True, choices=FORMATS,
                   help="dense: the original state dict, masked weights 0; condensed: linear layers keep only "
                        "their active weights per row; csr: sparse linear layers; semi_structured: 2:4 on CUDA")
    x.add_argument("--out", required=True, help="the .safetensors file to write")
    x.add_argument("--json", action="store_true")
    x.set_defaults(fn=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.fn(args)
    except _user_errors() as e:
        print(f"rigl-ds {args.command}: error: {e}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 2
    except StopRequested as e:            # a signal: the step was finished and checkpointed
        if process_rank() == 0:
            print(f"rigl-ds {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted (a second Ctrl-C: no checkpoint of the last steps; resume=auto continues from the "
              "newest checkpoint)", file=sys.stderr)
        return 130


def exit_launched_rank(code: int) -> None:
    """End a rank started by a launcher (torchrun, deepspeed: ``python -m rigl_ds.cli``, WORLD_SIZE > 1)
    with ``code`` and no interpreter teardown: with gloo, a rank whose run had finished, written
    everything and destroyed its process group occasionally aborted in a C++ destructor at exit
    ("terminate called without an active exception", SIGABRT), failing the launcher. Output and log
    handlers are flushed first; files (checkpoints, result.json, TensorBoard) were closed by the run."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    import os

    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_launched_rank(code)
    sys.exit(code)
