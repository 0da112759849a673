"""Run by tests/distributed/test_hf_trainer.py under torchrun (2 CPU ranks, gloo): the Hugging Face
Trainer with RigLCallback on a small random GPT-2; each rank saves its masks, a measured density and
its final weights to OUT/rank<r>.pt. Arguments: OUT [resume-checkpoint-folder] [--deepspeed] [--accum]:
with --deepspeed the Trainer's DeepSpeed setting (ZeRO-3, its AdamW), the callback attached to the
Trainer; with --accum 2 micro-batches of 2 per optimizer step instead of one of 4."""
import contextlib
import os
import sys

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from rigl_ds.integrations.hf import RigLCallback


class Tokens(Dataset):
    def __init__(self):
        self.t = torch.randint(0, 64, (96, 16), generator=torch.Generator().manual_seed(7))

    def __len__(self):
        return len(self.t)

    def __getitem__(self, i):
        return {"input_ids": self.t[i], "labels": self.t[i]}


class Snapshots(TrainerCallback):
    """The full weights after optimizer steps 3 and 4 (step 4 is the mask update at t=3: it must move
    nothing but the dropped weights, which it zeroes) and the masks after step 4."""

    def __init__(self, gathered, rigl):
        self.gathered, self.rigl, self.taken = gathered, rigl, {}

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step in (3, 4):
            with self.gathered(list(model.parameters())):
                self.taken[f"after{state.global_step}"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            if state.global_step == 4:
                self.taken["masks4"] = {n: m.clone() for n, m in self.rigl.sparsifier.masks.items()}
                self.taken["update4"] = dict(self.rigl.sparsifier.last_update)


def main() -> None:
    deepspeed, accum = "--deepspeed" in sys.argv, "--accum" in sys.argv
    argv = [a for a in sys.argv[1:] if a not in ("--deepspeed", "--accum")]
    out, resume = argv[0], (argv[1] if len(argv) > 1 else None)
    ds_config = None
    if deepspeed:
        from rigl_ds.engines.deepspeed import init_deepspeed_comm

        init_deepspeed_comm("gloo")        # without DeepSpeed's CPU shared-memory op (see its docstring)
        # no "optimizer" block: the Trainer's torch AdamW, which ZeRO-3 partitions. (DeepSpeed's own AdamW on
        # the CPU, cpu_adam, keeps beta^t as a running product that a fresh process recomputes with pow:
        # after a skipped step a resumed run differs from the straight one by an ulp, without rigl_ds.)
        ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                     "gradient_clipping": "auto", "zero_optimization": {"stage": 3}}
    torch.manual_seed(int(os.environ.get("RANK", "0")))        # different inits: DDP starts from rank 0's
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                                       eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    args = TrainingArguments(output_dir=out, max_steps=12, per_device_train_batch_size=2 if accum else 4,
                             gradient_accumulation_steps=2 if accum else 1, learning_rate=1e-2,
                             save_steps=6, save_strategy="steps", logging_strategy="no", report_to=[], use_cpu=True,
                             seed=3, data_seed=3, lr_scheduler_type="constant", dataloader_num_workers=0,
                             disable_tqdm=True, ddp_backend="gloo", deepspeed=ds_config)
    # each rank draws other initial masks (seed = rank): equal masks on both ranks come from the broadcast
    rigl = RigLCallback(sparsity=0.8, delta=3, distribution="uniform", seed=int(os.environ.get("RANK", "0")))
    gathered = lambda params: contextlib.nullcontext()     # noqa: E731
    if deepspeed:                                    # ZeRO-3: each rank holds a partition of every weight
        import deepspeed as ds

        gathered = ds.zero.GatheredParameters
    snaps = Snapshots(gathered, rigl)
    if deepspeed:
        trainer = Trainer(model=model, args=args, train_dataset=Tokens())
        rigl.attach(trainer)
        trainer.add_callback(snaps)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[rigl, snaps])
    trainer.train(resume_from_checkpoint=resume)
    sp = rigl.sparsifier
    rep = sp.measure()
    with gathered(list(trainer.model.parameters())):
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    torch.save({"masks": {n: m.clone() for n, m in sp.masks.items()}, "nnz": dict(sp.nnz),
                "density": rep.mask_density, "nonzero": rep.nonzero_density, "steps": sp.step_count,
                "world": trainer.args.world_size,
                "weights": weights, **snaps.taken},
               os.path.join(out, f"rank{os.environ.get('RANK', '0')}.pt"))


if __name__ == "__main__":
    main()
