"""Ordinary-step time of RigL vs dense on the built-in GPT under DeepSpeed ZeRO-3 or FSDP2.

Two gloo ranks on this machine, one thread each. In each process two copies of the GPT with the
same initial weights and the same batches: dense and RigL (ERK), each wrapped by the engine
(``deepspeed.initialize`` with a ZeRO-3 JSON, or ``fully_shard`` per Block and the root), AdamW.
They are stepped in alternation (A/B, then B/A, ...) so both see the same load on this shared
machine. The figure is the median ordinary step of each and their ratio; mask-update steps (every
``--delta``) are timed apart and give a whole-run estimate at ``--period``. ``--repeats`` runs the
whole comparison that many times in fresh processes and prints the median of the ratios.

``--profile`` adds a torch.profiler trace of ``--profile-steps`` ordinary steps of each model on
rank 0 (one trace per step, alternating as above) and prints the operators whose self CPU time
differs most between RigL and dense.

    python benchmarks/transformer_step.py --engine zero3 [--repeats 3] [--profile]
    python benchmarks/transformer_step.py --engine fsdp2 [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from _common import end_rank, spawn_ranks

VARIANTS = ("dense", "rigl")


def _zero3_config(args) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 5_000_000, "stage3_prefetch_bucket_size": 5_000_000,
                              "stage3_param_persistence_threshold": 10_000},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if args.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import logging

    import torch.distributed as dist
    import torch.nn.functional as F

    from rigl_ds import RigL
    from rigl_ds.models.gpt import GPT, Block

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("rigl_ds").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if args.engine == "zero3":
        from rigl_ds.engines.deepspeed import DeepSpeedEngineAdapter, init_deepspeed_comm

        init_deepspeed_comm("gloo")
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from rigl_ds.engines.fsdp2 import FSDP2Engine

        mesh = init_device_mesh("cpu", (world,))
    runs = {}
    for v in VARIANTS:
        torch.manual_seed(0)
        model = GPT(vocab=256, context=args.seq_len, n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True if args.fused else None)
        if args.engine == "zero3":
            import deepspeed

            ds, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_zero3_config(args))
            engine = DeepSpeedEngineAdapter(ds, opt) if v == "rigl" else None
            fwd, module = ds, ds.module
        else:
            for m in model.modules():
                if isinstance(m, Block):
                    fully_shard(m, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if args.dtype == "bf16":
                raise SystemExit("--dtype bf16 is for zero3 here (FSDP2 mixed precision is not set up by this script)")
            engine = FSDP2Engine(model, opt) if v == "rigl" else None
            ds, fwd, module = None, model, model
        sp = None
        if v == "rigl":
            sp = RigL(module, opt, total_steps=10 * args.steps, sparsity=args.sparsity, distribution="erk",
                      delta=args.delta, engine=engine)
        runs[v] = {"fwd": fwd, "ds": ds, "opt": opt, "sp": sp, "engine": engine, "times": [], "update": [], "prof": []}

    def one_step(r, x, y) -> None:
        logits = r["fwd"](x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if r["ds"] is not None:
            r["ds"].backward(loss)
            if r["engine"] is not None:
                r["engine"].step(apply=r["sp"].step())
            else:
                r["ds"].step()
        else:
            r["opt"].zero_grad(set_to_none=True)
            loss.backward()
            if r["sp"] is None or r["sp"].step():
                r["opt"].step()

    g = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=g) for _ in range(8)]
    for t in range(args.steps):
        b = batches[t % len(batches)]
        x, y = b[:, :-1], b[:, 1:]
        for v in (VARIANTS if t % 2 == 0 else VARIANTS[::-1]):
            r = runs[v]
            update = r["sp"] is not None and r["sp"].is_update_step()
            dist.barrier()
            t0 = time.perf_counter()
            one_step(r, x, y)
            dt = time.perf_counter() - t0
            if update:
                r["update"].append(dt)
            elif t >= args.warmup:
                r["times"].append(dt)
    out = {v: statistics.median(r["times"]) for v, r in runs.items()}
    out["update"] = statistics.mean(runs["rigl"]["update"]) if runs["rigl"]["update"] else None
    out["density"] = runs["rigl"]["sp"].measure().mask_density
    out["params"] = sum(p.numel() for p in GPT(256, args.seq_len, args.n_layer, args.n_head, args.d_model).parameters())
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        # ordinary steps only, one trace per step, the order alternating as above
        self_us: dict[str, dict[str, list]] = {v: {} for v in VARIANTS}
        t = 0
        while sum(len(r["prof"]) for r in runs.values()) < 2 * args.profile_steps:
            b = batches[t % len(batches)]
            for v in (VARIANTS if t % 2 == 0 else VARIANTS[::-1]):
                r = runs[v]
                update = r["sp"] is not None and r["sp"].is_update_step()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    dist.barrier()
                    one_step(r, b[:, :-1], b[:, 1:])
                if not update and len(r["prof"]) < args.profile_steps:
                    r["prof"].append(1)
                    for e in prof.key_averages():
                        acc = self_us[v].setdefault(e.key, [0.0, 0])
                        acc[0] += e.self_cpu_time_total
                        acc[1] += e.count
            t += 1
        keys = set(self_us["dense"]) | set(self_us["rigl"])
        diff = sorted(((self_us["rigl"].get(k, (0, 0))[0] - self_us["dense"].get(k, (0, 0))[0], k) for k in keys),
                      reverse=True)
        out["profile"] = [(k, d / args.profile_steps, tuple(self_us["dense"].get(k, (0, 0))),
                           tuple(self_us["rigl"].get(k, (0, 0)))) for d, k in diff[:args.profile_top]]
        out["profile_total"] = {v: sum(s for s, _ in self_us[v].values()) / args.profile_steps for v in VARIANTS}
        out["profile_calls"] = {v: sum(c for _, c in self_us[v].values()) / args.profile_steps for v in VARIANTS}
    end_rank(rank, out, queue)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="zero3", choices=["zero3", "fsdp2"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--delta", type=int, default=10, help="RigL's update period here; update steps are timed apart")
    ap.add_argument("--period", type=int, default=100, help="delta T for the whole-run extrapolation")
    ap.add_argument("--warmup", type=int, default=4, help="steps not timed")
    ap.add_argument("--repeats", type=int, default=1, help="fresh 2-rank runs; the median ratio is reported")
    ap.add_argument("--fused", action="store_true",
                    help="AdamW(fused=True): torch's fused kernel (on a CPU 10x faster than the default single-tensor "
                         "loop, and without its slow sqrt of the zero second moments under the masks)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--profile-top", type=int, default=15)
    args = ap.parse_args()
    ratios, wholes = [], []
    for i in range(args.repeats):
        res = spawn_ranks(worker, 2, args, results=1)[0]
        ratio = res["rigl"] / res["dense"]
        ratios.append(ratio)
        line = (f"run {i + 1}: {args.engine} {args.dtype}, GPT {args.n_layer}x{args.d_model} ({res['params'] / 1e6:.2f}M "
                f"parameters), {args.batch}x{args.seq_len} tokens per rank, 2 gloo ranks: ordinary step dense "
                f"{res['dense'] * 1e3:.1f} ms, RigL {res['rigl'] * 1e3:.1f} ms (density {res['density']:.4f}): "
                f"{ratio:.3f} x dense")
        if res["update"] is not None:
            whole = ((args.period - 1) * res["rigl"] + res["update"]) / (args.period * res["dense"])
            wholes.append(whole)
            line += f"; mask-update step {res['update'] * 1e3:.1f} ms; whole run at delta T={args.period}: {whole:.3f} x dense"
        print(line, flush=True)
        if "profile" in res:
            tot, calls = res["profile_total"], res["profile_calls"]
            print(f"  profile (rank 0, {args.profile_steps} ordinary steps each): self CPU per step dense "
                  f"{tot['dense'] / 1e3:.1f} ms ({calls['dense']:.0f} operator calls), RigL {tot['rigl'] / 1e3:.1f} ms "
                  f"({calls['rigl']:.0f} calls); largest differences (RigL - dense, per step):")
            for k, d, (sd, cd), (sr, cr) in res["profile"]:
                print(f"    {d / 1e3:+8.2f} ms  {k[:60]:60s} dense {sd / 1e3:8.1f} ms ({cd} calls)  "
                      f"RigL {sr / 1e3:8.1f} ms ({cr} calls)")
    print(f"median RigL / dense ordinary step over {len(ratios)} run(s): {statistics.median(ratios):.3f} "
          f"({', '.join(f'{r:.3f}' for r in ratios)})")
    if wholes:
        print(f"median whole run at delta T={args.period}: {statistics.median(wholes):.3f} "
              f"({', '.join(f'{w:.3f}' for w in wholes)})")

if __name__ == "__main__":
    main()
