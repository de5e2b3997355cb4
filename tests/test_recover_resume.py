"""post_training.py's ``--resume_from_checkpoint last`` survives interrupted and disk-full checkpoint writes
(issue 11, item 4): it resumes from the newest *complete* checkpoint and reproduces the uninterrupted run;
a disk-full error says so, naming the folder and the free bytes. stories260K, in process."""
from __future__ import annotations

import errno
import json
import logging
import shutil
import sys

import pytest
import torch

from conftest import REPO, STORIES, need_shared
from LLMPruner.recover import DiskFullError, last_complete_checkpoint

sys.path.insert(0, str(REPO))
import post_training  # noqa: E402

pytestmark = pytest.mark.slow


def flags(tmp_path, out, max_steps: int = -1) -> list[str]:
    need_shared("models", "stories260K")
    records = json.loads(need_shared("data", "alpaca", "alpaca_5000.json").read_text())[:16]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    return ["--prune_model", str(STORIES), "--data_path", str(data), "--output_dir", str(out), "--device", "cpu",
            "--batch_size", "4", "--micro_batch_size", "2", "--num_epochs", "1", "--max_steps", str(max_steps),
            "--val_set_size", "0", "--save_steps", "2", "--save_total_limit", "10", "--cutoff_len", "128",
            "--learning_rate", "5e-3", "--warmup_steps", "0", "--logging_steps", "1",
            "--prompt_template_name", "alpaca_short"]


def adapter(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter_model.safetensors"))


def losses(checkpoint) -> list[float]:
    return [h["loss"] for h in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
            if "loss" in h]


def test_resume_last_skips_incomplete_checkpoints_and_reproduces_the_run(tmp_path, caplog):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert post_training.main(flags(tmp_path, full))["global_step"] == 4  # checkpoint-2, checkpoint-4
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "adapter")
    ck4, ck6 = resumed / "checkpoint-4", resumed / "checkpoint-6"
    state = (ck4 / "trainer_state.json").read_text()
    (ck4 / "trainer_state.json").write_text(state[: len(state) // 2])  # a write cut off by a full disk
    (ck4 / "optimizer.pt").unlink()
    ck6.mkdir()  # an interrupted save: only the adapter config made it
    shutil.copy(ck4 / "adapter_config.json", ck6)

    assert last_complete_checkpoint(resumed) == str(resumed / "checkpoint-2")
    with caplog.at_level(logging.WARNING):
        report = post_training.main(flags(tmp_path, resumed) + ["--resume_from_checkpoint", "last"])
    assert f"skipping {ck6}: incomplete (no trainer_state.json)" in caplog.text
    assert f"skipping {ck4}: incomplete (trainer_state.json is truncated" in caplog.text
    assert report["global_step"] == 4
    assert losses(ck4) == pytest.approx(losses(full / "checkpoint-4"), rel=1e-5)
    a, b = adapter(full / "adapter"), adapter(resumed / "adapter")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)


def test_resume_last_without_a_complete_checkpoint_lists_what_it_skipped(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint-N folder in .*skipped checkpoint-2 "
                                                r"\(no trainer_state.json\)"):
        last_complete_checkpoint(tmp_path)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_disk_full_while_saving_a_checkpoint_says_so(tmp_path, monkeypatch, error):
    out = tmp_path / "out"

    def full_disk(*args, **kwargs):
        raise error
    monkeypatch.setattr(torch, "save", full_disk)  # the optimizer state is the first torch.save of a checkpoint
    with pytest.raises(DiskFullError) as info:
        post_training.main(flags(tmp_path, out, max_steps=2))
    message = str(info.value)
    assert "the disk is full" in message and str(out / "checkpoint-2") in message
    assert "bytes free" in message and "--resume_from_checkpoint last" in message
    assert info.value.errno == errno.ENOSPC
