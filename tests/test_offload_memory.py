"""Memory of the offloaded pipeline: the head's logits in slices of positions (same scores as in memory),
and a process peak that the per-stage resets of ``VmHWM`` do not hide."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from LLMPruner.score.estimate import taylor_scores
from LLMPruner.discover import discover
from LLMPruner.stream import memory, states, taylor
from LLMPruner.stream.weights import StateDictSource, skeleton

EXAMPLES = torch.randint(0, 64, (4, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("seq_len, vocab, budget, want", [
    (13, 64, 3 * 4 * 64, [(0, 3), (3, 6), (6, 9), (9, 12)]),   # 3 predictions a slice, the last one short
    (13, 64, 1, [(i, i + 1) for i in range(12)]),             # below one position: one prediction each
    (13, 64, 2**30, [(0, 12)]),                                # the whole window
    (2, 49152, 2**21, [(0, 1)]),
])
def test_head_slices_cover_every_prediction_once(seq_len, vocab, budget, want):
    got = states.head_slices(seq_len, vocab, budget)
    assert got == want
    predicted = [p for a, b in got for p in range(a, b)]  # position p predicts token p + 1
    assert predicted == list(range(seq_len - 1))


@pytest.mark.parametrize("tied, mode", [(False, "param_first"), (False, "param_mix"), (True, "vectorize"),
                                        (True, "param_first")])
def test_sliced_head_gives_the_in_memory_scores(monkeypatch, tied, mode):
    """Slices of 3 positions (5 per window of 13) against the in-memory full-window loss; every family,
    so the embedding/head's own scores (tied or not) go through the sliced head too."""
    model = tiny_model(num_hidden_layers=2, tie_word_embeddings=tied)
    families = discover(model).families
    ref = taylor_scores(model, families, EXAMPLES, mode)
    monkeypatch.setattr(states, "HEAD_CHUNK_BYTES", 3 * 4 * model.config.vocab_size)
    calls = []
    real = states.head_loss
    monkeypatch.setattr(states, "head_loss", lambda *a, **k: calls.append(a[3].shape[1]) or real(*a, **k))
    got = taylor.streamed_taylor_scores(skeleton(model.config), StateDictSource.of(model), families, EXAMPLES, mode)
    assert calls[:4] == [4, 4, 4, 4] and len(calls) == 4 * len(EXAMPLES)  # the slices ran: 4 a window
    assert set(got) == set(ref)
    worst = max(((ref[k] - got[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)).item() for k in ref)
    assert worst <= 1e-4


@pytest.mark.parametrize("budget", [1, 3 * 4 * 64, 2**30])
def test_sliced_mean_loss_is_the_models_loss(monkeypatch, budget):
    """The guard's calibration loss (``--offload_sequential``), a slice of positions at a time, equals the
    model's own loss on the whole batch."""
    model = tiny_model(num_hidden_layers=2)
    want = model(input_ids=EXAMPLES, labels=EXAMPLES, use_cache=False).loss.item()
    last = model.model(input_ids=EXAMPLES, use_cache=False).last_hidden_state
    layers = model.model.layers
    # the model's own final norm runs inside head_loss: hand it the last layer's output, not the normed one
    out = {}
    hook = layers[-1].register_forward_hook(lambda m, a, y: out.setdefault("h", y[0] if isinstance(y, tuple) else y))
    model(input_ids=EXAMPLES, use_cache=False)
    hook.remove()
    assert not torch.equal(out["h"], last)
    monkeypatch.setattr(states, "HEAD_CHUNK_BYTES", budget)
    got = states.mean_head_loss(model, layers, EXAMPLES, out["h"].detach(), as_tuple=False)
    assert got == pytest.approx(want, rel=1e-5)


def test_windows_of_one_token_are_refused():
    model = tiny_model(num_hidden_layers=1)
    families = discover(model).families
    with pytest.raises(ValueError, match="--calibration_seq_len"):
        taylor.streamed_taylor_scores(skeleton(model.config), StateDictSource.of(model), families,
                                      EXAMPLES[:, :1], "param_first")


PEAK_SCRIPT = """
import json, torch
from LLMPruner.stream import memory
peaks = {}
with memory.stage("big", "cpu", peaks):
    block = torch.ones(64 * 2**20)  # 256 MiB, touched
    big_rss = memory.host_rss("VmRSS")
    del block
with memory.stage("small", "cpu", peaks):
    pass
print(json.dumps({"peaks": peaks, "big_rss": big_rss, "hwm": memory.host_rss("VmHWM"),
                  "process": memory.process_peak_rss()}))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs a writable /proc/self/clear_refs")
def test_process_peak_survives_the_per_stage_resets():
    """A stage that allocates 256 MiB, then a small stage (in a fresh process, whose memory no other test
    has touched): the log's per-stage peaks differ by the block, ``VmHWM`` afterwards only knows the small
    stage, ``process_peak_rss`` still has the big one (the kernel updates its counters lazily: a few MiB of
    slack)."""
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    mib, peaks, big_rss = 2**20, got["peaks"], got["big_rss"]
    assert peaks["big"]["peak_host_rss_mb"] >= big_rss / mib - 4, got
    assert peaks["small"]["peak_host_rss_mb"] < peaks["big"]["peak_host_rss_mb"] - 200, got
    assert got["hwm"] < big_rss - 200 * mib, got            # the reset hid the first stage
    assert got["process"] >= big_rss - 4 * mib, got          # the whole process did not forget it


def test_the_refit_statistics_count_on_the_device_and_are_logged_for_the_host(caplog):
    """A refit makes one batch's ``x^T x`` of its widest input on the device (float32) before the float64
    Grams go to the host: ``--max_memory`` counts it, and the host's share is logged."""
    import logging
    from LLMPruner.stream.pipeline import _check_memory
    model, ex = tiny_model(), torch.zeros(4, 8, dtype=torch.long)
    with caplog.at_level(logging.INFO, logger="LLMPruner"):
        _check_memory(model, "64MB", torch.float32, ex, False, False, "cpu")
        assert "host memory" not in caplog.text
        with pytest.raises(ValueError, match="--max_memory 64MB: one stage needs about 0.07 GB"):
            _check_memory(model, "64MB", torch.float32, ex, False, False, "cpu", stats_width=4096)  # 4 x 4096^2 B
    assert "widest input (4096 channels) take about 384.0 MB of host memory" in caplog.text


def test_reconstruction_and_obs_statistics_count_on_the_device():
    """``--reconstruct_steps`` under ``--offload``: the widest MLP's float32 copy, gradients and two Adam
    moments (16 bytes a parameter) and the float32 inputs and targets of its tokens (8 bytes a token and
    hidden channel); the OBS allocation's Grams are summed in float64 on the device (8 bytes an entry)."""
    from LLMPruner.stream.pipeline import _check_memory, reconstruct_bytes
    model = tiny_model()                      # hidden 32, MLP 48: 3 x 32 x 48 = 4,608 parameters per MLP
    fams = [f for f in discover(model).families if f.kind == "mlp"]
    ex = torch.zeros(4, 8, dtype=torch.long)  # 32 tokens
    assert reconstruct_bytes(model, fams, ex) == 16 * 4608 + 8 * 32 * 32
    assert reconstruct_bytes(model, fams, None) == 16 * 4608
    _check_memory(model, "64MB", torch.float32, ex, False, False, "cpu", stats_width=2000)   # 16 MB float32
    with pytest.raises(ValueError, match="--max_memory 64MB"):
        _check_memory(model, "64MB", torch.float32, ex, False, False, "cpu", stats_width=2000, gram_elem=8,
                      reconstruct=40 * 2**20)
