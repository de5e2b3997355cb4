"""Flags that used to be silently wrong are refused or warned about, naming the values (issue 11, item 6):
``--round_to`` wider than a layer, ``--round_to`` warnings about layers never pruned, sequence lengths
beyond the model's positions, and ``--layer_wise`` with ``--compensation``/Taylor scores."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from conftest import REPO, need_shared, tiny_model
from test_cli_prune import run
from LLMPruner.checkpoint import save_pruned
from LLMPruner.prune import prune
from LLMPruner.prune_run import check_against_model

sys.path.insert(0, str(REPO))
import hf_prune  # noqa: E402


def test_round_to_wider_than_a_layer_is_refused_naming_the_width():
    model = tiny_model()  # MLP 48 channels per layer
    with pytest.raises(ValueError, match=r"--round_to 64: layer 1's mlp has only 48 channels.*below 48"):
        prune(model, pruner_type="l2", pruning_ratio=0.25, attention_layers=range(0), mlp_layers=range(1, 3),
              round_to=64)
    with pytest.raises(ValueError, match="--round_to 48: layer 0's attention has only 32 channels"):
        prune(model, pruner_type="l2", param_budget=0.2, round_to=48)  # a budget cannot round either
    before = [l.mlp.down_proj.in_features for l in model.model.layers]
    assert before == [48, 48, 48]  # refused before anything was pruned


def test_round_to_warns_only_about_pruned_layers(tmp_path, caplog):
    """Layer 0 (44 channels) is never pruned: neither pruning nor saving may complain about it."""
    model = tiny_model(intermediate_size=44)
    with caplog.at_level(logging.WARNING):
        prune(model, pruner_type="l2", pruning_ratio=0.25, attention_layers=range(0), mlp_layers=range(1, 3),
              round_to=8)
        save_pruned(model, None, tmp_path / "ckpt", round_to=8)
    assert [l.mlp.down_proj.in_features for l in model.model.layers] == [44, 32, 32]
    assert "multiple" not in caplog.text, caplog.text


def test_round_to_warns_about_a_pruned_layer_it_cannot_round(caplog):
    """Gemma-like head_dim 12: a KV group is 24 query rows, not a multiple of 16 (rounding works in units)."""
    model = tiny_model(head_dim=12)
    with caplog.at_level(logging.WARNING):
        prune(model, pruner_type="l2", pruning_ratio=0.5, attention_layers=range(1, 2), mlp_layers=range(0),
              round_to=16)
    assert "layer 1 keeps 24 attention channels: not a multiple of --round_to 16" in caplog.text


def test_layer_wise_needs_no_calibration_data_and_refuses_compensation():
    model = tiny_model()
    prune(model, mode="layer_wise", layer=2, pruner_type="taylor")  # the reference ignores the scorer here
    assert model.config.num_hidden_layers == 2
    examples = torch.randint(0, 64, (2, 8))
    with pytest.raises(ValueError, match="--compensation refit does not apply to --layer_wise"):
        prune(tiny_model(), mode="layer_wise", layer=2, compensation="refit", examples=examples)


@pytest.mark.parametrize("flags, message", [
    (["--calibration_seq_len", "100", "--pruner_type", "taylor"],
     "--calibration_seq_len 100: longer than the model's max_position_embeddings 64"),
    (["--max_seq_len", "65", "--test_after_train"], "--max_seq_len 65: longer than the model's "
                                                     "max_position_embeddings 64"),
])
def test_flags_checked_against_the_model(flags, message, local_flags):
    args = hf_prune.parse_args(local_flags + ["--block_attention_layer_start", "0", "--block_mlp_layer_start", "0"]
                               + flags)
    with pytest.raises(ValueError, match=message):
        check_against_model(tiny_model().config, args)


def test_a_combination_no_model_can_run_is_refused_while_parsing(local_flags):
    from LLMPruner.cli import UsageError
    with pytest.raises(UsageError, match="does not apply to --layer_wise"):  # PruneConfig.validate, before loading
        hf_prune.parse_args(local_flags + ["--layer_wise", "--layer", "2", "--compensation", "refit"])


def test_lengths_within_the_model_and_unused_lengths_pass(local_flags):
    args = hf_prune.parse_args(local_flags + ["--block_attention_layer_start", "0", "--block_mlp_layer_start", "0",
                                              "--max_seq_len", "64", "--calibration_seq_len", "64"])
    check_against_model(tiny_model().config, args)
    args = hf_prune.parse_args(local_flags + ["--layer_wise", "--layer", "2", "--max_seq_len", "4096"])
    check_against_model(tiny_model().config, args)  # no evaluation: any --max_seq_len


@pytest.fixture
def local_flags(tmp_path):
    """Flags naming local files, so parse_args' up-front checks pass offline (no Hub names)."""
    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text\n\nmore text\n")
    eval_dir = tmp_path / "data"
    (eval_dir / "wikitext2").mkdir(parents=True)
    (eval_dir / "ptb").mkdir()
    return ["--base_model", str(folder), "--calibration_data", str(text), "--log_dir", str(tmp_path / "log"),
            "--eval_data_dir", str(eval_dir), "--device", "cpu", "--eval_device", "cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    # the reported bug: "need calibration examples" although --calibration_data was given
    (["--layer_wise", "--layer", "3", "--compensation", "refit", "--calibration_data", "TEXT"],
     "--compensation refit does not apply to --layer_wise"),
    (["--round_to", "256"], "--round_to 256: layer 1's attention has only 64 channels"),
    (["--pruner_type", "taylor", "--calibration_data", "EMPTY"], "the file holds no text"),
    # a budget the ranges cannot give is refused, not silently under-delivered (5-layer model, MLP of 2 layers)
    (["--param_budget", "0.4", "--skip_attention", "--block_mlp_layer_start", "2", "--block_mlp_layer_end", "4"],
     "asks to remove 90,905 parameters, but the units it may prune (mlp of layers 2..3, every family keeping at "
     "least one unit) give only 65,664; widen the layer ranges"),
])
def test_cli_refuses_in_one_line_before_writing(tmp_path, flags, message):
    model = need_shared("models", "stories260K")
    text = need_shared("data", "tinystories", "tinystories_val.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    flags = [str(text) if f == "TEXT" else str(tmp_path / "empty.txt") if f == "EMPTY" else f for f in flags]
    proc = run(["--base_model", str(model), "--device", "cpu", "--block_attention_layer_start", "1",
                "--block_attention_layer_end", "4", "--block_mlp_layer_start", "1", "--block_mlp_layer_end", "4"]
               + flags, tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "need calibration examples" not in proc.stderr and "Traceback" not in proc.stderr
    log = tmp_path / "prune_log"
    assert not log.exists() or not list(log.iterdir()), list(log.iterdir())  # no run folder, no .failed


@pytest.mark.parametrize("model_type, check", [
    # GLM's fused gate_up_proj has two rows per MLP channel: rounding must count channels, not rows
    ("glm", lambda m: [l.mlp.down_proj.in_features % 8 for l in m.model.layers] == [0, 0, 0]),
    # BLOOM's first attention member is one ALiBi slope per head: a head is 8 channels, not 1, so
    # --round_to 8 must still prune heads (it used to keep all 4 of them, silently)
    ("bloom", lambda m: [b.self_attention.dense.in_features for b in m.transformer.h] == [16, 16, 16]),
])
def test_round_to_counts_channels_of_the_consumer(model_type, check):
    from test_architectures import build
    model = build(model_type)
    prune(model, pruner_type="l2", pruning_ratio=0.5 if model_type == "bloom" else 0.25, round_to=8,
          attention_layers=range(0, 3) if model_type == "bloom" else range(0), mlp_layers=range(0, 3))
    assert check(model)
