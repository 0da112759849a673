"""``rigl-ds plan``: per-layer density, FLOPs and schedule of an experiment, without training."""
from __future__ import annotations

from typing import Any


from rigl_ds.config import ConfigError, ExperimentConfig
from rigl_ds.core import (DENSE, forward_flops, get_method, plan_layers, select_layers, timeline_flops_ratio,
                          training_flops_ratio)
from rigl_ds.train import build_experiment


def make_plan(cfg: ExperimentConfig, world: int | None = None) -> dict[str, Any]:
    """The plan as a JSON-ready dict for ``world`` ranks (default: 1, or gap_parallel's smallest world,
    one rank per copy); the model is built on the meta device (no memory, no data)."""
    if world is None:
        world = cfg.sparsity.gap_partitions if cfg.sparsity.method == "gap_parallel" else 1
    exp = build_experiment(cfg, with_data=False, meta=True, world=world)
    cfg = exp.cfg
    sp = cfg.sparsity
    try:
        layers = select_layers(exp.model, sp.include, sp.exclude)
        method = None if sp.method == DENSE else get_method(sp.method)
        core = sp.to_core(cfg.train.seed, method=None if method else "static")   # dense: the YAML's delta, t_end
        sched = (method or get_method("static")).make_schedule(core, exp.total_steps)
        planned = plan_layers(layers, core) if method else {}
    except ValueError as e:
        raise ConfigError([f"{cfg.where('sparsity')}: sparsity: {e}"]) from None
    rows = []
    for l in layers:
        nnz = planned[l.name].nnz if method else l.numel
        group = planned[l.name].group if method else l.numel
        rows.append({"name": l.name, "shape": list(l.shape), "numel": l.numel, "density": nnz / l.numel, "nnz": nnz,
                     "group": group})
    total = sum(r["numel"] for r in rows)
    exact = {r["name"]: r["density"] for r in rows}
    f = forward_flops(exp.model, exp.info.sample("meta"), exact)
    dynamic = method is not None and method.updates
    timeline = []                       # (step, global density, sparse forward FLOPs) where the counts change
    final = {r["name"]: r["nnz"] for r in rows}
    numel = {r["name"]: r["numel"] for r in rows}
    phases = []
    if method is not None:
        try:                            # a method's counts may refuse this model (gap: more partitions than layers)
            for step in [0] + [u + 1 for u in (sched.update_steps() if dynamic else [])]:
                counts = method.counts_at(sched, final, numel, step,
                                          {r["name"]: r["numel"] // r["group"] for r in rows})
                if not timeline or counts != timeline[-1][1]:
                    timeline.append((step, counts))
            phases = method.timeline(sched, numel) if hasattr(method, "timeline") else []
        except ValueError as e:
            raise ConfigError([f"{cfg.where('sparsity')}: sparsity: {e}"]) from None
    points = [(s, sum(c.values()) / total, f.at({n: c[n] / numel[n] for n in c})) for s, c in timeline]
    if method is None:
        train_ratio = 1.0
    elif len(points) <= 1:
        train_ratio = training_flops_ratio(f.sparse, f.dense, total_steps=exp.total_steps, delta=sched.delta,
                                           t_end=sched.t_end, dense_grad=method.needs_dense_grad)
    else:
        train_ratio = timeline_flops_ratio([(s, fs) for s, _, fs in points], f.dense, exp.total_steps)
    return {
        "model": cfg.model.name,
        "method": sp.method,
        "distribution": sp.distribution,
        "structure": sp.structure,
        "sparsity": sp.sparsity,
        "global_density": sum(r["nnz"] for r in rows) / total,
        "layers": rows,
        "flops": {
            "dense_forward": f.dense,
            "sparse_forward": f.sparse,
            "inference_ratio": f.inference_ratio,
            # products no weight holds (attention scores and their weighted sum): dense, in both counts
            "attention_forward": sum(d for n, (d, _) in f.per_layer.items() if n.endswith(".attention")),
            "train_ratio": train_ratio,
        },
        "schedule": {
            "total_steps": exp.total_steps,
            "steps_per_epoch": exp.steps_per_epoch,
            "epochs": cfg.train.epochs,
            "delta": sched.delta,
            "t_end": sched.t_end,
            "num_mask_updates": sched.num_updates if dynamic else 0,
            # gap_cyclic: which partition of layers is dense from which step; gap_parallel: its rounds
            "dense_phases": phases,
            # where the planned density changes (gmp): the first step at each density
            "density_timeline": [{"step": s, "global_density": d} for s, d, _ in points] if len(points) > 1 else [],
            "global_batch": cfg.data.batch_size * cfg.train.grad_accumulation * world,
            "world_size": world,
            "grad_accumulation": cfg.train.grad_accumulation,
        },
        "data": {"name": cfg.data.name, "train_size": exp.info.train_size, "num_classes": exp.info.num_classes,
                 "input_shape": list(exp.info.input_shape), "note": exp.info.note},
    }


def format_plan(plan: dict[str, Any]) -> str:
    """A human-readable table of the plan."""
    lines = [f"model {plan['model']}  method {plan['method']}  distribution {plan['distribution']}  "
             f"structure {plan['structure']}  target sparsity {plan['sparsity']}",
             f"{'layer':<44} {'shape':<20} {'numel':>10} {'nnz':>10} {'density':>8} {'active/group':>14}"]
    for r in plan["layers"]:
        per_group = f"{r['nnz'] * r['group'] // r['numel']}/{r['group']}" if r["group"] < r["numel"] else "whole layer"
        lines.append(f"{r['name']:<44} {str(tuple(r['shape'])):<20} {r['numel']:>10} {r['nnz']:>10} "
                     f"{r['density']:>8.4f} {per_group:>14}")
    f, s = plan["flops"], plan["schedule"]
    lines += [
        f"global density {plan['global_density']:.6f}",
        f"forward FLOPs/example: dense {f['dense_forward']:.4g}, sparse {f['sparse_forward']:.4g} "
        f"(inference {f['inference_ratio']:.3f}x, training {f['train_ratio']:.3f}x of dense)"
        + (f"; of these, attention scores and their weighted sum (no weight, dense): {f['attention_forward']:.4g}"
           if f["attention_forward"] else ""),
        f"schedule: {s['total_steps']} steps ({s['steps_per_epoch']}/epoch x {s['epochs']} epochs, "
        f"global batch {s['global_batch']} = {s['world_size']} ranks x {s['grad_accumulation']} micro-batches "
        f"x {s['global_batch'] // (s['world_size'] * s['grad_accumulation'])}), delta {s['delta']}, t_end {s['t_end']}, "
        f"{s['num_mask_updates']} mask updates",
    ]
    if s["density_timeline"]:
        steps = s["density_timeline"]
        shown = steps if len(steps) <= 8 else steps[:4] + steps[-4:]
        lines.append("density over time (from step: density): " + ", ".join(
            f"{p['step']}: {p['global_density']:.4f}" for p in shown) + (" ..." if len(steps) > 8 else ""))
    phases = s["dense_phases"]
    first = [p for p in phases if p["round"] in (1, None)]
    if len(first) < len(phases):            # later rounds repeat the first one's partitions
        rounds = max(p["round"] for p in phases if p["round"] is not None)
        first.insert(-1, {"repeat": f"  rounds 2-{rounds} repeat this cycle from step {phases[len(first) - 1]['from_step']}"})
    for p in first:
        if "repeat" in p:
            lines.append(p["repeat"])
        elif "copies" in p:                 # gap_parallel: every partition dense at once, one per copy
            lines.append(f"  from step {p['from_step']} (round {p['round']}): {len(p['copies'])} copies train apart, "
                         f"copy i with partition i dense; they merge (partition i from copy i) and are pruned per "
                         f"layer by |w| at the round's last step")
            for i, names in enumerate(p["copies"]):
                shown = ", ".join(names) if len(names) <= 4 else ", ".join(names[:2] + ["..."] + names[-2:])
                lines.append(f"    copy {i}: partition {i} ({len(names)} layers: {shown})")
        elif p["dense_partition"] is None:
            lines.append(f"  from step {p['from_step']}: every layer at its target (fixed masks: fine-tuning)")
        else:
            names = p["layers"]
            shown = ", ".join(names) if len(names) <= 4 else ", ".join(names[:2] + ["..."] + names[-2:])
            lines.append(f"  from step {p['from_step']} (round {p['round']}): partition {p['dense_partition']} dense "
                         f"({len(names)} layers: {shown})")
    if plan["data"]["note"]:
        lines.append(f"note: {plan['data']['note']}")
    return "\n".join(lines)
