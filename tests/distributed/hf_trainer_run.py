"""Run by tests/distributed/test_hf_trainer.py under torchrun (2 CPU ranks, gloo): the Hugging Face
Trainer with RigLCallback on a small random GPT-2; each rank saves its masks, a measured density and
its final weights to OUT/rank<r>.pt. Arguments: OUT [resume-checkpoint-folder]."""
import os
import sys

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from rigl_ds.integrations.hf import RigLCallback


class Tokens(Dataset):
    def __init__(self):
        self.t = torch.randint(0, 64, (96, 16), generator=torch.Generator().manual_seed(7))

    def __len__(self):
        return len(self.t)

    def __getitem__(self, i):
        return {"input_ids": self.t[i], "labels": self.t[i]}


def main() -> None:
    out, resume = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    torch.manual_seed(int(os.environ.get("RANK", "0")))        # different inits: DDP starts from rank 0's
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                                       eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    args = TrainingArguments(output_dir=out, max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_steps=6, save_strategy="steps", logging_strategy="no", report_to=[], use_cpu=True,
                             seed=3, data_seed=3, lr_scheduler_type="constant", dataloader_num_workers=0,
                             disable_tqdm=True, ddp_backend="gloo")
    # each rank draws other initial masks (seed = rank): equal masks on both ranks come from the broadcast
    rigl = RigLCallback(sparsity=0.8, delta=3, distribution="uniform", seed=int(os.environ.get("RANK", "0")))
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[rigl])
    trainer.train(resume_from_checkpoint=resume)
    sp = rigl.sparsifier
    rep = sp.measure()
    torch.save({"masks": {n: m.clone() for n, m in sp.masks.items()}, "nnz": dict(sp.nnz),
                "density": rep.mask_density, "nonzero": rep.nonzero_density, "steps": sp.step_count,
                "world": trainer.args.world_size,
                "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()}},
               os.path.join(out, f"rank{os.environ.get('RANK', '0')}.pt"))


if __name__ == "__main__":
    main()
