"""Hugging Face: RigL under Accelerate's prepared model and optimizer (equal to plain PyTorch), and
RigLCallback in the Trainer on a small randomly initialised GPT-2 (no download): exact counts and
zeros, an update step that changes no weight it keeps, and a resumed run equal to a straight one."""
import pytest
import torch

from rigl_ds import RigL

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

pytestmark = pytest.mark.slow


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def tokens(n=48, length=16):
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 64, (n, length), generator=g)


def run_plain_or_accelerated(accelerated: bool):
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if accelerated:
        from accelerate import Accelerator

        acc = Accelerator(cpu=True)
        model, opt = acc.prepare(model, opt)
    sp = RigL(model, opt, total_steps=12, sparsity=0.8, delta=3)
    data = tokens()
    for t in range(12):
        x = data[4 * t:4 * t + 4]
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        acc.backward(loss) if accelerated else loss.backward()
        if sp.step():
            opt.step()
    return sp, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_rigl_on_accelerate_prepared_model_and_optimizer_equals_plain_pytorch():
    """The AcceleratedOptimizer (which lacks torch's step-hook attributes) is unwrapped: same masks and
    weights as the plain loop, bit for bit."""
    sp, w = run_plain_or_accelerated(True)
    ref, ref_w = run_plain_or_accelerated(False)
    assert sp.last_update["step"] == 6 and sp.last_update["churn"] > 0
    for n in ref.masks:
        assert torch.equal(sp.masks[n], ref.masks[n]), n
        assert int(sp.masks[n].sum()) == sp.nnz[n]
    for n in ref_w:
        assert torch.equal(w[n], ref_w[n]), n


class Snapshots:
    """A callback recording every parameter before and after each optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                outer.before = {n: p.detach().clone() for n, p in model.named_parameters()}

            def on_optimizer_step(self, args, state, control, model=None, **kw):
                outer.after.append((state.global_step, outer.before,
                                    {n: p.detach().clone() for n, p in model.named_parameters()}))

        self.cb, self.after = CB(), []


def token_dataset():
    """:func:`tokens` as the Trainer's dataset (labels = inputs)."""
    from torch.utils.data import Dataset

    class DS(Dataset):
        def __init__(self):
            self.t = tokens()

        def __len__(self):
            return len(self.t)

        def __getitem__(self, i):
            return {"input_ids": self.t[i], "labels": self.t[i]}

    return DS()


def trainer(out, callbacks, max_steps=12, save_steps=6):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
                             save_steps=save_steps, save_strategy="steps", logging_strategy="no", report_to=[],
                             use_cpu=True, seed=3, data_seed=3, lr_scheduler_type="constant", dataloader_num_workers=0,
                             disable_tqdm=True)
    return Trainer(model=tiny_gpt2(seed=1), args=args, train_dataset=token_dataset(), callbacks=callbacks)


def test_trainer_callback_masks_gpt2_and_skips_the_update_step(tmp_path):
    from rigl_ds.integrations.hf import STATE_FILE, RigLCallback

    rigl, snaps = RigLCallback(sparsity=0.8, delta=3, distribution="uniform"), Snapshots()
    tr = trainer(tmp_path / "a", [rigl, snaps.cb])
    tr.train()
    sp = rigl.sparsifier
    params = dict(tr.model.named_parameters())
    assert sorted(sp.masks) == sorted(n for n in params if n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")))
    for n, m in sp.masks.items():
        assert int(m.sum()) == sp.nnz[n] == m.numel() - int(0.8 * m.numel())      # zeros floored (SPEC)
        assert torch.count_nonzero(params[n].detach()[~m]) == 0, n
    assert sp.step_count == 12 and sp.last_update["step"] == 6
    # the updates (steps 3 and 6) moved no parameter, except dropped weights, now zero
    for step, before, after in snaps.after:
        if step in (3, 6):              # global_step counts completed steps: these are sparsifier steps 3, 6
            for n in before:
                if n in sp.masks:
                    kept = after[n] != 0
                    assert torch.equal(after[n][kept], before[n][kept]), (step, n)
                else:
                    assert torch.equal(after[n], before[n]), (step, n)
        else:
            assert not torch.equal(after["transformer.ln_f.weight"], before["transformer.ln_f.weight"]), step
    assert (tmp_path / "a" / "checkpoint-6" / STATE_FILE).is_file()


@pytest.mark.parametrize("method", ["rigl", "gap_cyclic"])
def test_trainer_resumed_from_a_checkpoint_equals_the_straight_run(tmp_path, method):
    """Also for C-GaP, whose dense partition at the resume step is denser than its initial masks
    (building the sparsifier must not zero the weights the Trainer loaded), resumed from a folder
    outside output_dir."""
    import shutil

    from rigl_ds.integrations.hf import RigLCallback

    kw = dict(sparsity=0.8, delta=3) if method == "rigl" else \
        dict(method="gap_cyclic", sparsity=0.8, gap_partitions=2, gap_phase=4, gap_rounds=1)
    straight = RigLCallback(**kw)
    a = trainer(tmp_path / "a", [straight])
    a.train()
    trainer(tmp_path / "b", [RigLCallback(**kw)], max_steps=12).train()
    shutil.move(tmp_path / "b" / "checkpoint-6", tmp_path / "elsewhere")      # resume from step 6, moved
    shutil.rmtree(tmp_path / "b")
    resumed = RigLCallback(resume_from=str(tmp_path / "elsewhere"), **kw)
    b = trainer(tmp_path / "b", [resumed])
    b.train(resume_from_checkpoint=str(tmp_path / "elsewhere"))
    for n in straight.sparsifier.masks:
        assert torch.equal(straight.sparsifier.masks[n], resumed.sparsifier.masks[n]), n
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    assert resumed.sparsifier.step_count == 12


def test_trainer_callback_refuses_fp16_fsdp_deepspeed_unattached_gap_parallel_and_a_resume_without_its_file(tmp_path):
    from rigl_ds.checkpoint import CheckpointError
    from rigl_ds.integrations.hf import STATE_FILE, RigLCallback

    trainer(tmp_path / "a", [RigLCallback(sparsity=0.8, delta=3)], max_steps=6).train()
    (tmp_path / "a" / "checkpoint-6" / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="resuming at step 6, but .* does not exist"):
        trainer(tmp_path / "a", [RigLCallback(sparsity=0.8, delta=3)]).train(
            resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    tr = trainer(tmp_path / "c", [RigLCallback(sparsity=0.8, delta=3)])
    tr.args.fp16 = True
    with pytest.raises(ValueError, match="fp16 is not supported"):
        RigLCallback(sparsity=0.8).on_train_begin(tr.args, tr.state, tr.control, model=tr.model, optimizer=None)
    tr.args.fp16 = False
    tr.args.fsdp = "full_shard"
    with pytest.raises(ValueError, match="FSDP setting is not supported yet"):
        RigLCallback(sparsity=0.8).on_train_begin(tr.args, tr.state, tr.control, model=tr.model, optimizer=None)
    tr.args.fsdp, tr.args.deepspeed = None, {"zero_optimization": {"stage": 3}}
    with pytest.raises(ValueError, match=r"needs the Trainer.*RigLCallback\(...\).attach\(trainer\).*found NoneType"):
        RigLCallback(sparsity=0.8).on_train_begin(tr.args, tr.state, tr.control, model=tr.model, optimizer=None)
    # attached to a Trainer that lists it already: once; an engine whose step is wrapped already: refused
    cb = next(c for c in tr.callback_handler.callbacks if isinstance(c, RigLCallback))
    assert cb.attach(tr) is cb and sum(isinstance(c, RigLCallback) for c in tr.callback_handler.callbacks) == 1
    from deepspeed import DeepSpeedEngine

    wrapped = DeepSpeedEngine.__new__(DeepSpeedEngine)           # no engine is built: the check comes first
    object.__setattr__(wrapped, "step", lambda: None)
    tr.model_wrapped = wrapped
    with pytest.raises(ValueError, match="step is wrapped already"):
        cb.on_train_begin(tr.args, tr.state, tr.control, model=tr.model, optimizer=None)
    with pytest.raises(ValueError, match=r"method='gap_parallel' is not supported under the Trainer .* "
                                         r"use rigl-ds train \(engine.name ddp, fsdp2 or deepspeed\)"):
        RigLCallback(method="gap_parallel", gap_partitions=2)


def test_trainer_clips_by_the_norm_of_the_masked_gradient(tmp_path):
    """The Trainer clips between backward and the callback: the callback masks gradients as backward
    produces them, so with SGD (no momentum, no weight decay) and a clip far below the gradient norm,
    an ordinary step moves the parameters by exactly lr x max_grad_norm in total, and no masked weight.
    (Clipped by the dense gradient's norm, as before, the step was shorter by the masked part.)"""
    from transformers import Trainer, TrainingArguments

    from rigl_ds.integrations.hf import RigLCallback

    lr, clip = 1e-2, 1e-3
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=lr,
                             optim="sgd", weight_decay=0.0, max_grad_norm=clip, save_strategy="no",
                             logging_strategy="no", report_to=[], use_cpu=True, seed=3, data_seed=3,
                             lr_scheduler_type="constant", dataloader_num_workers=0, disable_tqdm=True)
    rigl, snaps = RigLCallback(sparsity=0.8, delta=5, distribution="uniform"), Snapshots()
    tr = Trainer(model=tiny_gpt2(seed=1), args=args, train_dataset=token_dataset(), callbacks=[rigl, snaps.cb])
    tr.train()
    sp = rigl.sparsifier
    assert sp.last_update is None and len(snaps.after) == 2          # ordinary steps only
    for step, before, after in snaps.after:
        moved = {n: (after[n] - before[n]).double() for n in before}
        total = torch.sqrt(sum(d.square().sum() for d in moved.values()))
        assert total.item() == pytest.approx(lr * clip, rel=1e-4), step
        for n, m in sp.masks.items():
            assert torch.count_nonzero(moved[n][~m]) == 0 and torch.count_nonzero(moved[n][m]) > 0, (step, n)


def test_trainer_gmp_keeps_pruned_weights_at_zero_on_the_steps_it_prunes(tmp_path):
    """GMP prunes on steps whose optimizer step runs: the gradients the hooks masked under the old
    masks are masked again under the new ones before that step, so no pruned weight moves."""
    from rigl_ds.integrations.hf import RigLCallback

    rigl, snaps = RigLCallback(method="gmp", sparsity=0.8, delta=2, t_end=0.75, distribution="uniform"), Snapshots()
    tr = trainer(tmp_path / "g", [rigl, snaps.cb], max_steps=8, save_steps=100)
    tr.train()
    sp = rigl.sparsifier
    params = dict(tr.model.named_parameters())
    assert sp.last_update is not None and sp.last_update["step"] >= 4     # pruned more than once
    for n, m in sp.masks.items():
        assert int(m.sum()) == sp.nnz[n] and torch.count_nonzero(params[n].detach()[~m]) == 0, n
