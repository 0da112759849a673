"""The built-in GPT on the offline text corpus: next-byte windows, which weights are masked, the
FLOPs of attention, a quickstart run reporting validation loss and perplexity, exact resume."""
import json
import math
import os
import pathlib
import sys

import pytest
import torch

from rigl_ds.config import ConfigError, load_config
from rigl_ds.core.flops import forward_flops
from rigl_ds.core.layers import select_layers
from rigl_ds.data import build_data, describe_data
from rigl_ds.data.text import corpus_bytes, splits
from rigl_ds.models.gpt import GPT
from tests import procs

ROOT = pathlib.Path(__file__).resolve().parents[2]
QUICK = ROOT / "configs" / "lm" / "quickstart_gpt.yaml"


def test_windows_are_next_byte_pairs_of_the_corpus_and_match_describe():
    text = corpus_bytes(20_000)
    assert text == corpus_bytes(20_000) and len(text) == 20_000
    train, val = splits(20_000, 64)
    x, y = train[3]
    raw = torch.tensor(list(text[3 * 64:4 * 64 + 1]))
    assert torch.equal(x, raw[:-1]) and torch.equal(y, raw[1:])
    assert (len(train), len(val)) == ((18_000 - 1) // 64, (2_000 - 1) // 64)
    assert torch.equal(val[0][0], torch.tensor(list(text[18_000:18_064])))
    cfg = load_config(QUICK, ["data.corpus_bytes=20000"]).data
    info = describe_data(cfg)
    assert (info.train_size, info.val_size, info.num_classes, info.input_shape, info.input_dtype) == \
        (len(train), len(val), 256, (64,), torch.long)
    data = build_data(cfg, seed=0)
    xb, yb = next(data.train_batches(0))
    assert xb.shape == (32, 64) and xb.dtype == torch.long and torch.equal(xb[:, 1:], yb[:, :-1])


def test_a_corpus_file_is_read_as_bytes_and_a_short_one_is_refused(tmp_path):
    from rigl_ds.data import DataError

    f = tmp_path / "corpus.txt"
    f.write_bytes(bytes(range(256)) * 100)
    train, _ = splits(20_000, 16, str(f))
    assert train[0][0].tolist() == list(range(16))
    cfg = load_config(QUICK, [f"data.path={f}", "data.corpus_bytes=30000"]).data
    with pytest.raises(DataError, match=r"holds 25600 bytes, fewer than data.corpus_bytes=30000"):
        build_data(cfg, seed=0)
    cfg = load_config(QUICK, ["data.corpus_bytes=10000", "data.seq_len=1024"]).data
    with pytest.raises(DataError, match=r"leaves 1000 bytes of validation text, less than one window of "
                                        r"data.seq_len=1024"):
        describe_data(cfg)


def test_gpt_masks_the_block_linears_and_counts_attention_flops_by_hand():
    model = GPT(vocab=256, context=32, n_layer=2, n_head=4, d_model=64)
    names = [l.name for l in select_layers(model)]
    assert names == [f"blocks.{i}.{w}.weight" for i in range(2) for w in ("attn.qkv", "attn.proj", "fc", "out")]
    assert model.head.weight is model.tok.weight
    f = forward_flops(model, torch.zeros(1, 32, dtype=torch.long), {n: 0.5 for n in names})
    t, d, v = 32, 64, 256
    linear = t * (3 * d * d + d * d + 4 * d * d + 4 * d * d)          # multiply-adds per block
    assert f.per_layer["blocks.0.attn.attention"] == (2.0 * 2 * t * t * d,) * 2
    assert f.dense == 2 * (2 * linear + 2 * 2 * t * t * d + t * d * v)
    assert f.sparse == 2 * (2 * linear / 2 + 2 * 2 * t * t * d + t * d * v)
    assert model(torch.zeros(2, 32, dtype=torch.long)).shape == (2, 32, 256)


def test_image_and_text_settings_do_not_mix():
    with pytest.raises(ConfigError, match=r"model.name='gpt' with data.name='digits'"):
        load_config(QUICK, ["data.name=digits"])
    with pytest.raises(ConfigError, match=r"train.mixup=0.2: mixup mixes images"):
        load_config(QUICK, ["train.mixup=0.2"])


ARGS = ["train.epochs=1", "data.corpus_bytes=60000", "sparsity.delta=5", "logging.log_every=5", "logging.progress=false"]


def train(run_dir, *extra, env=None, check=True):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    p = procs.run([sys.executable, "-m", "rigl_ds.cli", "train", str(QUICK), *ARGS, f"logging.run_dir={run_dir}",
                   *extra], cwd=ROOT, env=e)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_quickstart_gpt_reports_perplexity_and_resumes_exactly(tmp_path):
    """A short run of configs/lm/quickstart_gpt.yaml: the summary and result.json give validation
    loss and perplexity = exp(loss) per byte, below the uniform 256; TensorBoard has
    eval/perplexity; a run killed at step 17 and resumed from step 10 ends bit-identical."""
    from tests.compare import assert_same_run, scalars

    straight = tmp_path / "straight"
    p = train(straight, "checkpoint.every_steps=10")
    res = json.loads((straight / "result.json").read_text())
    ev = res["eval"]
    assert ev["perplexity"] == pytest.approx(math.exp(ev["loss"]), rel=1e-12) and ev["perplexity"] < 64
    assert f"perplexity {ev['perplexity']:.3f} per byte" in p.stdout
    assert res["global_density"] == pytest.approx(0.2, abs=1e-4)
    assert "eval/perplexity" in scalars(straight / "tb")
    d = tmp_path / "killed"
    killed = train(d, "checkpoint.every_steps=10", env={"RIGL_DS_FAULT": "step:17"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    train(d, "checkpoint.every_steps=10", "resume=auto")
    assert_same_run(straight, d, res["steps"])
