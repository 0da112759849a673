"""Loading a checkpoint never runs code from it, even when its checksum matches: a pickle payload is
refused by name, before anything is unpickled with code-running power (rigl_ds files, DeepSpeed
folders, DCP metadata and items)."""
import pathlib

import pytest
import torch

from rigl_ds import checkpoint as ckpt
from rigl_ds.checkpoint import CheckpointError
from rigl_ds.cli import main
from tests.unit.test_train import QUICK, SHORT


class Payload:
    """Unpickling this runs ``exec`` with code that writes ``marker``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_a_checkpoint_carrying_a_payload_is_refused_by_eval_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", QUICK, *SHORT, f"logging.run_dir={run}", "train.max_steps=3",
                 "train.eval_every_epochs=10"]) == 0
    good = ckpt.load(run / "checkpoints" / "step_00000003.pt")          # tensors and plain data: loads
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad" / "step_00000003.pt"
    ckpt.save_atomic(dict(good, extra=Payload(marker)), bad)             # with a matching .sha256
    capsys.readouterr()
    assert main(["eval", QUICK, "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {bad} holds an object other than tensors and plain data" in err and "exec" in err
    assert "refused: loading it could run code" in err
    assert main(["train", QUICK, *SHORT, f"logging.run_dir={tmp_path / 'resumed'}", f"resume={bad}"]) == 2
    assert "refused: loading it could run code" in capsys.readouterr().err
    assert not marker.exists()


def test_deepspeed_folder_is_scanned_before_deepspeed_unpickles_it(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    folder = tmp_path / "step_00000010"
    folder.mkdir()
    torch.save({"module": {"w": torch.ones(2)}, "loss_scaler": LossScaler(1.0)}, folder / "mp_rank_00_model_states.pt")
    ckpt.check_deepspeed_folder(folder)                                  # DeepSpeed's own classes pass
    marker = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": {"x": Payload(marker)}}, folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt names builtins.exec; "
                                              r"refused: loading it could run code"):
        ckpt.check_deepspeed_folder(folder)
    assert not marker.exists()


def test_dcp_metadata_and_items_are_restricted(tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    good = tmp_path / "good"
    dcp.save({"w": torch.arange(4.0), "meta": {"lr": 0.1, "steps": [1, 2]}}, checkpoint_id=str(good))
    state = {"w": torch.zeros(4), "meta": {"lr": 0.0, "steps": [0, 0]}}
    ckpt.load_dcp(state, good)                                           # DCP's own metadata classes pass
    assert torch.equal(state["w"], torch.arange(4.0)) and state["meta"] == {"lr": 0.1, "steps": [1, 2]}

    marker = tmp_path / "pwned"
    item = tmp_path / "item"                                             # a non-tensor item with a payload
    dcp.save({"w": torch.arange(4.0), "extra": Payload(marker)}, checkpoint_id=str(item))
    with pytest.raises(CheckpointError, match=r"'extra'.*refused: loading it could run code"):
        ckpt.load_dcp({"w": torch.zeros(4), "extra": None}, item)
    meta = tmp_path / "meta"                                             # the pickled metadata itself
    dcp.save({"w": torch.arange(4.0)}, checkpoint_id=str(meta))
    (meta / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: global 'builtins.exec' is not allowed; refused"):
        ckpt.load_dcp({"w": torch.zeros(4)}, meta)
    assert not marker.exists()
