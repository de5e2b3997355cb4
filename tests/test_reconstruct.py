"""Local MLP reconstruction after the sequential refit (LLMPruner/compensate/reconstruct.py, ``--reconstruct_steps``):
it lowers the held-out reconstruction error, never raises it (a failed fit keeps the refit), changes only
the pruned layers' MLPs and no structure, saves and reloads, and its flags are checked."""
import copy
import json
import logging

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from cli_helpers import run_cli
from conftest import need_shared, tiny_model
from LLMPruner.checkpoint import load_pruned, save_pruned
from LLMPruner.prune import prune
from LLMPruner.compensate.reconstruct import Reconstruction, check_reconstruction, reconstruct_mlp
from LLMPruner.shrink import count_parameters

EX = torch.randint(0, 64, (32, 32), generator=torch.Generator().manual_seed(5))


def _mlps(seed=0, inter=24, kept=12):
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers import LlamaConfig
    torch.manual_seed(seed)
    dense = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=inter, num_attention_heads=2, num_key_value_heads=2))
    pruned = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=kept, num_attention_heads=2, num_key_value_heads=2))
    with torch.no_grad():  # the pruned MLP: the dense one's first ``kept`` channels, as slicing leaves it
        pruned.gate_proj.weight.copy_(dense.gate_proj.weight[:kept])
        pruned.up_proj.weight.copy_(dense.up_proj.weight[:kept])
        pruned.down_proj.weight.copy_(dense.down_proj.weight[:, :kept])
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(seed + 1))
    return dense, pruned, x


def _held_out_error(mlp, dense, x):
    with torch.no_grad():
        return float(((mlp(x[1::2]) - dense(x[1::2])) ** 2).sum())


def test_reconstruction_lowers_the_held_out_error():
    dense, pruned, x = _mlps()
    before = _held_out_error(pruned, dense, x)
    report = reconstruct_mlp(pruned, dense, x, Reconstruction(steps=300, lr=1e-2))
    after = _held_out_error(pruned, dense, x)
    assert after < 0.8 * before, report
    assert "lowers the held-out error" in report


def test_a_reconstruction_that_does_not_help_keeps_the_weights():
    dense, pruned, x = _mlps(seed=1)
    saved = copy.deepcopy(pruned.state_dict())
    report = reconstruct_mlp(pruned, dense, x, Reconstruction(steps=20, lr=50.0))  # diverges
    assert "kept the refit" in report
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_steps_stop_at_the_first_check_that_is_not_better():
    dense, pruned, x = _mlps(seed=1)
    calls = []
    pruned.register_forward_hook(lambda m, a, y: calls.append(1))  # deep-copied with the module: counts its fit
    report = reconstruct_mlp(pruned, dense, x, Reconstruction(steps=20, lr=50.0, checks=4))  # diverges
    assert "at step 5 of 20): kept the refit" in report
    assert len(calls) == 1 + 5 + 1  # the error before, five steps, the first check (1,000 held-out tokens)


@pytest.mark.parametrize("errors, kept", [([1.0, 0.9, 0.8, 0.85, 0.95], False),  # up, but below the refit
                                          ([1.0, 0.9, 1.1], True)])               # above it at the 2nd look
def test_the_steps_are_given_up_only_above_the_refits_error(monkeypatch, errors, kept):
    import LLMPruner.compensate.reconstruct as R
    dense, pruned, x = _mlps(seed=3)
    saved = copy.deepcopy(pruned.state_dict())
    scripted, looks = iter(errors), []
    monkeypatch.setattr(R, "_error", lambda mlp, xc, yc: looks.append(1) or next(scripted))
    report = reconstruct_mlp(pruned, dense, x, Reconstruction(steps=200, lr=1e-2, checks=4))
    assert len(looks) == len(errors), report
    if kept:
        assert "at step 100 of 200): kept the refit" in report
        assert all(torch.equal(v, saved[k]) for k, v in pruned.state_dict().items())
    else:
        assert "(200 steps) lowers the held-out error 1 -> 0.95 (5.0 %)" in report, report
        assert not torch.equal(pruned.down_proj.weight, saved["down_proj.weight"])


def test_checks_change_nothing_while_the_error_keeps_falling():
    dense, pruned, x = _mlps()
    one, four = copy.deepcopy(pruned), copy.deepcopy(pruned)
    reconstruct_mlp(one, dense, x, Reconstruction(steps=300, lr=1e-2, checks=1))
    report = reconstruct_mlp(four, dense, x, Reconstruction(steps=300, lr=1e-2, checks=4))
    assert "(300 steps) lowers" in report, report
    for p, q in zip(one.parameters(), four.parameters()):
        assert torch.equal(p, q)


def test_nothing_removed_means_nothing_to_fit():
    dense, _, x = _mlps(seed=2, kept=24)
    pruned = copy.deepcopy(dense)
    saved = copy.deepcopy(pruned.state_dict())
    report = reconstruct_mlp(pruned, dense, x, Reconstruction(steps=10, lr=1e-3))
    assert "kept the refit" in report  # the error is already 0: it cannot fall
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, saved[k]), k


def _prune(model, steps):
    m = copy.deepcopy(model)
    prune(m, pruner_type="l2", param_budget=0.3, attention_layers=range(0), mlp_layers=range(1, 3),
          compensation="refit", selection="obs", examples=EX, reconstruct_steps=steps, reconstruct_lr=3e-3)
    return m


def test_only_the_pruned_layers_mlps_change_and_the_structure_is_the_same(tmp_path):
    base = tiny_model(seed=11)
    plain, rec = _prune(base, 0), _prune(base, 60)
    assert count_parameters(plain) == count_parameters(rec)
    changed = set()
    for (name, p), q in zip(plain.named_parameters(), rec.parameters()):
        assert p.shape == q.shape, name
        if not torch.equal(p, q):
            changed.add(name)
    assert changed, "the reconstruction changed nothing"
    assert all(".mlp." in n and n.split(".")[2] in ("1", "2") for n in changed), sorted(changed)
    # the reconstructed model saves and reloads with the same logits
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")))
    save_pruned(rec, tok, tmp_path / "m")
    back, _ = load_pruned(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(back(EX[:2]).logits, rec(EX[:2]).logits, rtol=1e-4, atol=1e-5)


def test_the_checks_name_the_flag():
    with pytest.raises(ValueError, match="--reconstruct_steps 5 needs --compensation refit"):
        check_reconstruction(5, 1e-3, "none")
    with pytest.raises(ValueError, match="--reconstruct_steps -1"):
        check_reconstruction(-1, 1e-3, "refit")
    with pytest.raises(ValueError, match="--reconstruct_lr 0"):
        check_reconstruction(5, 0, "refit")
    check_reconstruction(0, 1e-3, "none")  # off: any compensation
    with pytest.raises(ValueError, match="--compensation refit"):
        prune(tiny_model(), pruner_type="l2", param_budget=0.2, compensation="none", reconstruct_steps=3,
              examples=EX)


@pytest.mark.parametrize("extra,message", [
    (["--reconstruct_steps", "10"], "--reconstruct_steps 10 needs --compensation refit"),
    (["--reconstruct_steps", "-2", "--compensation", "refit"], "--reconstruct_steps -2: must be >= 0"),
    (["--reconstruct_steps", "5", "--compensation", "refit", "--reconstruct_lr", "-1"], "--reconstruct_lr -1.0"),
])
def test_cli_refuses_bad_reconstruction_flags(tmp_path, extra, message):
    argv = ["--base_model", str(tmp_path), "--log_dir", str(tmp_path / "log"), *extra]
    status, _, err = run_cli("hf_prune.py", argv)
    assert status == 2 and message in err, err[-2000:]
    assert not (tmp_path / "log").exists()


def test_cli_run_with_reconstruction_logs_each_layer_and_saves_a_model_that_loads(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="LLMPruner.compensate.reconstruct")
    stories = need_shared("models", "stories260K")
    text = need_shared("data", "tinystories", "tinystories_val.txt")
    argv = ["--base_model", str(stories), "--device", "cpu", "--eval_device", "cpu", "--pruner_type", "l2",
            "--param_budget", "0.2", "--skip_attention", "--block_mlp_layer_start", "1", "--block_mlp_layer_end",
            "4", "--compensation", "refit", "--selection", "obs", "--reconstruct_steps", "30",
            "--num_examples", "32", "--calibration_seq_len", "32", "--calibration_data", str(text),
            "--save_model", "--log_dir", str(tmp_path / "prune_log"), "--save_ckpt_log_name", "rec"]
    status, _, err = run_cli("hf_prune.py", argv)
    assert status == 0, err[-3000:]
    run_dir = tmp_path / "prune_log" / "rec"
    lines = [r.getMessage() for r in caplog.records if r.name == "LLMPruner.compensate.reconstruct"]
    assert [line.split(":")[0] for line in lines] == [f"model.layers.{i}.mlp" for i in (1, 2, 3)], lines
    results = json.loads((run_dir / "results.json").read_text())
    model, _ = load_pruned(run_dir)
    assert count_parameters(model) == results["params_after"] < results["params_before"]
