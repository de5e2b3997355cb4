"""Bad checkpoints give clear errors; interrupted saves leave nothing loadable; pickles need opt-in."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from LLMPruner.adapters import UnsupportedArchitectureError
from LLMPruner.checkpoint import CheckpointError, load_model, load_pruned, save_pruned
from LLMPruner.checkpoint import save as save_module
from test_checkpoint_roundtrip import IDS, block_wise, logits
from tolerance import assert_paths_agree, assert_same

torch.set_num_threads(1)


@pytest.fixture
def saved(tmp_path):
    model = block_wise(tiny_model())
    return model, save_pruned(model, None, tmp_path / "ckpt")


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_pruned(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(str(tmp_path / "nope"))


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="config.json.*params.json.*notes.txt"):
        load_model(tmp_path)


def test_truncated_weights(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors.*SHA-256"):
        load_pruned(folder)
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupted"):
        load_pruned(folder, verify_checksums=False)


def test_tampered_weights(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one byte of one weight: shapes and header are still fine
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*SHA-256"):
        load_pruned(folder)


def test_missing_and_unexpected_tensors_are_named(saved):
    _, folder = saved
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\].*"
                                              r"unexpected \['model.layers.1.mlp.extra.weight'\]"):
        load_pruned(folder, verify_checksums=False)


def test_config_disagreeing_with_weights(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["layer_shapes"][0]["intermediate_size"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.weight: saved \(32, 24\), "
                                              r"config implies \(32, 25\)"):
        load_pruned(folder)


def test_config_with_wrong_number_of_layer_shapes(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["layer_shapes"] = config["layer_shapes"][:2]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer_shapes has 2 entries but num_hidden_layers is 3"):
        load_pruned(folder)


def test_uniform_config_disagreeing_with_weights(tmp_path):
    folder = save_pruned(tiny_model(), None, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 40
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp.gate_proj.weight: saved \(48, 32\), config implies \(40, 32\)"):
        load_pruned(folder)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*llama"):
        load_pruned(tmp_path)


class Interrupt(KeyboardInterrupt):
    pass


def _interrupt(*args, **kwargs):
    raise Interrupt()


def test_interrupted_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    model = block_wise(tiny_model())
    monkeypatch.setattr(save_module, "sha256_file", _interrupt)  # after the weights are written
    with pytest.raises(Interrupt):
        save_pruned(model, None, tmp_path / "ckpt")
    assert list((tmp_path / "ckpt").iterdir()) == []  # no temporary folder left either
    with pytest.raises(CheckpointError, match="not a checkpoint folder; expected config.json"):
        load_model(tmp_path / "ckpt")


def test_interrupted_save_keeps_the_previous_checkpoint(saved, monkeypatch):
    model, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(save_module, "sha256_file", _interrupt)
    with pytest.raises(Interrupt):
        save_pruned(tiny_model(seed=1), None, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    loaded, _ = load_pruned(folder, attn_implementation="eager")
    assert_same(logits(loaded, IDS), logits(model, IDS))


def test_interrupt_while_moving_files_in_leaves_no_config(saved, monkeypatch):
    _, folder = saved
    calls = []

    def replace_then_interrupt(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise Interrupt()
        os.replace(src, dst)

    monkeypatch.setattr(save_module.os, "replace", replace_then_interrupt)
    with pytest.raises(Interrupt):
        save_pruned(tiny_model(seed=1), None, folder)
    assert not (folder / "config.json").exists()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pruned(folder)


def test_save_into_a_log_folder_keeps_other_files(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text("{}")
    save_pruned(block_wise(tiny_model()), None, folder, max_shard_size="20KB")
    save_pruned(tiny_model(), None, folder)  # fewer, different files: stale shards must go
    assert (folder / "results.json").read_text() == "{}"
    assert not list(folder.glob("model-*")) and not (folder / "modeling_pruned.py").exists()
    load_pruned(folder)


def test_legacy_pickle_needs_opt_in_and_converts(tmp_path):
    model = block_wise(tiny_model())
    path = tmp_path / "prune_log" / "pytorch_model.bin"
    path.parent.mkdir()
    torch.save({"model": model, "tokenizer": None}, path)  # what the reference writes
    with pytest.raises(CheckpointError, match="pickle.*allow_pickle=True"):
        load_model(path.parent)
    converted, _ = load_model(path.parent, allow_pickle=True)
    assert type(converted).__name__ == "LlamaForCausalLM"  # a fresh model, not the unpickled object
    assert_paths_agree(logits(converted, IDS), logits(model, IDS))  # sdpa vs eager
    folder = save_pruned(converted, None, tmp_path / "converted")
    loaded, _ = load_pruned(folder, attn_implementation="eager")
    assert_same(logits(loaded, IDS), logits(model, IDS))


def test_bad_round_to():
    with pytest.raises(ValueError, match="round_to=0"):
        save_pruned(tiny_model(), None, "/nonexistent/never-written", round_to=0)


def test_round_to_is_recorded_and_not_warned_about_at_save(tmp_path, caplog):
    """The saver cannot tell pruned layers from untouched ones (stories260K's unpruned 172-wide MLPs used
    to draw "not a multiple of round_to" warnings): rounding is checked where the plan is chosen."""
    model = block_wise(tiny_model())  # MLP widths 24, 48, 16
    folder = save_pruned(model, None, tmp_path / "ckpt", round_to=16)
    assert json.loads((folder / "pruning.json").read_text())["round_to"] == 16
    assert "multiple" not in caplog.text
