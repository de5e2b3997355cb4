"""Perplexity: both protocols against independent computations, on stories260K and a tiny model."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import need_shared, tiny_model
from LLMPruner.evaluate.ppl import evaluate_ppl, perplexity, sliding_perplexity


def _loss_ppl(model, ids: torch.Tensor, seq_len: int) -> float:
    """Independent: mean of HF's own per-window loss (equal-length windows) over non-overlapping windows."""
    n = ids.numel() // seq_len
    losses = [model(ids[i * seq_len:(i + 1) * seq_len][None], labels=ids[i * seq_len:(i + 1) * seq_len][None]).loss
              for i in range(n)]
    return math.exp(torch.stack(losses).mean().item())


@torch.no_grad()
def test_reference_ppl_on_local_file_matches_independent_computation(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = need_shared("models", "stories260K")
    text = need_shared("data", "tinystories", "tinystories_val.txt").read_text()[:20000]
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    (tmp_path / "t.txt").write_text(text)
    got = evaluate_ppl(model, tok, [str(tmp_path / "t.txt")], seq_len=128, batch_size=3)[str(tmp_path / "t.txt")]
    ids = tok(text, return_tensors="pt").input_ids[0]
    assert got == pytest.approx(_loss_ppl(model, ids, 128), rel=1e-5)
    assert 3.0 < got < 9.0  # in-domain text: the real model is good (dense ~5.4)


@torch.no_grad()
def test_reference_ppl_equals_per_token_nll_mean_over_windows():
    model = tiny_model()
    ids = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(0))
    logits = [model(ids[i:i + 40][None]).logits[0].float() for i in range(0, 200, 40)]
    nll = torch.cat([torch.nn.functional.cross_entropy(lg[:-1], ids[i * 40 + 1:(i + 1) * 40], reduction="none")
                     for i, lg in enumerate(logits)])
    assert perplexity(model, ids, 40, batch_size=2) == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)


@torch.no_grad()
def test_sliding_scores_each_token_once_with_hf_recipe():
    model = tiny_model()
    ids = torch.randint(0, 64, (150,), generator=torch.Generator().manual_seed(1))
    seq_len, stride = 48, 16
    nll_sum, count, prev_end = 0.0, 0, 0  # the Hugging Face "perplexity of fixed-length models" loop
    for begin in range(0, ids.numel(), stride):
        end = min(begin + seq_len, ids.numel())
        trg = end - prev_end
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-trg] = -100
        n_scored = (labels[:, 1:] != -100).sum().item()
        nll_sum += model(window, labels=labels).loss.item() * n_scored
        count += n_scored
        prev_end = end
        if end == ids.numel():
            break
    assert count == ids.numel() - 1
    got = sliding_perplexity(model, ids, seq_len, stride)
    assert got == pytest.approx(math.exp(nll_sum / count), rel=1e-5)
    assert got < perplexity(model, ids, seq_len) * 1.5  # sane, same magnitude as non-overlapping


def test_bad_protocol_stride_and_missing_files_give_clear_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="--ppl_protocol 'rolling'.*reference"):
        evaluate_ppl(model, None, ["x"], protocol="rolling")
    with pytest.raises(ValueError, match="--ppl_stride 0"):
        sliding_perplexity(model, torch.arange(10), 8, 0)
    with pytest.raises(ValueError, match="unknown perplexity dataset 'nope.txt'"):
        evaluate_ppl(model, None, ["nope.txt"])
    with pytest.raises(FileNotFoundError, match="wikitext2.*local data dir"):
        evaluate_ppl(model, None, ["wikitext2"], data_dir=tmp_path)
