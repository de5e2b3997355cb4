"""Boundary states: the hidden states between decoder layers, and how a layer is called on them.

The model's own forward computes everything outside the decoder layers (embeddings, positions, the
causal mask, rotary cos/sin, final norm, head, loss), so no architecture is spelled here: the layer list
is swapped, for the duration of one call, for

* ``Catcher`` (embedding stage): records the first layer's input and keyword arguments, then stops;
* ``Feed`` (head stage): ignores its input and returns a given last hidden state, so the model's own
  final norm, head and loss run on it.

A ``LayerCall`` replays the recorded arguments: ``layer(x, *args, **kwargs)`` for a batch of the same
size (calibration windows have no padding, so the mask and positions depend only on the shape).
``StateStore`` keeps one ``[N, T, H]`` tensor per boundary on the CPU or, when asked, on disk.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn


class StopForward(Exception):
    pass


class Catcher(nn.Module):
    def __init__(self, like: nn.Module) -> None:
        super().__init__()
        self.attention_type = getattr(like, "attention_type", None)  # read by some models' mask mapping
        self.args: tuple = ()
        self.kwargs: dict = {}

    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        raise StopForward


class Feed(nn.Module):
    def __init__(self, like: nn.Module, out: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.attention_type = getattr(like, "attention_type", None)
        self.out, self.as_tuple = out, as_tuple

    def forward(self, *args, **kwargs):
        return (self.out,) if self.as_tuple else self.out


@contextlib.contextmanager
def swapped(layers: nn.ModuleList, make):
    """Every entry of ``layers`` replaced by ``make(original)`` (one shared instance) for the block."""
    saved = list(layers)
    stand_in = make(saved[0])
    try:
        for i in range(len(layers)):
            layers[i] = stand_in
        yield stand_in
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@dataclass
class LayerCall:
    """How the model calls its decoder layers, for one batch size."""
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    as_tuple: bool = False

    def __call__(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = layer(x, *_to(self.args, x.device), **_to(self.kwargs, x.device))
        self.as_tuple = isinstance(out, tuple)
        return out[0] if self.as_tuple else out


def capture(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor) -> tuple[torch.Tensor, LayerCall]:
    """Run the model up to its first decoder layer: ``(hidden states [B, T, H], how layers are called)``.
    Gradients flow into the returned states when enabled (the embedding's backward)."""
    device = next(p.device for p in model.parameters() if not p.is_meta)
    with swapped(layers, Catcher) as catcher:
        try:
            model(input_ids=input_ids.to(device), use_cache=False)
        except StopForward:
            pass
    assert catcher.args, "the model never called its first decoder layer"
    x, *rest = catcher.args
    return x, LayerCall(tuple(rest), {k: v for k, v in catcher.kwargs.items() if k != "hidden_states"})


def head_loss(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, last: torch.Tensor,
              as_tuple: bool) -> torch.Tensor:
    """The model's own language-model loss with ``last`` as the output of its last decoder layer."""
    with swapped(layers, lambda like: Feed(like, last, as_tuple)):
        ids = input_ids.to(last.device)
        return model(input_ids=ids, labels=ids, use_cache=False).loss


#: fp32 logits held at once where a stage runs the head (a slice of positions of one example): SmolLM2's
#: 49,152-word vocabulary gives slices of 10 positions, Llama-3's 128,256 slices of 4.
HEAD_CHUNK_BYTES = 2**21


def head_slices(seq_len: int, vocab_size: int, chunk_bytes: int | None = None) -> list[tuple[int, int]]:
    """``(a, b)`` position ranges whose predictions (``a..b-1`` predicting ``a+1..b``) cover a window of
    ``seq_len`` once, each with at most ``chunk_bytes`` (default ``HEAD_CHUNK_BYTES``) of fp32 logits (at
    least one prediction). The head on positions ``a..b`` gives the mean loss of its ``b - a`` predictions."""
    step = max(1, (HEAD_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * vocab_size))
    return [(a, min(a + step, seq_len - 1)) for a in range(0, seq_len - 1, step)]


def sliced_head_losses(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, last: torch.Tensor,
                       as_tuple: bool, device: torch.device | str = "cpu", requires_grad: bool = False):
    """Yield ``(a, b, h, loss)`` for one window (``input_ids`` ``[1, T]``, ``last`` ``[1, T, H]`` on any
    device) a slice of positions at a time (``head_slices``): ``h`` is ``last[:, a:b+1]`` on ``device``
    (a leaf needing gradients when ``requires_grad``), ``loss`` the slice's share of the window's mean
    ``head_loss``, so the shares add up to it and the logits never exceed ``HEAD_CHUNK_BYTES``."""
    t = input_ids.shape[1]
    for a, b in head_slices(t, model.config.vocab_size):
        h = last[:, a:b + 1].to(device).requires_grad_(requires_grad)
        yield a, b, h, head_loss(model, layers, input_ids[:, a:b + 1], h, as_tuple) * ((b - a) / (t - 1))


@torch.no_grad()
def mean_head_loss(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, last: torch.Tensor,
                   as_tuple: bool, device: torch.device | str = "cpu") -> float:
    """``head_loss`` of a batch of equal-length windows, computed one window and slice at a time
    (``sliced_head_losses``): the batch's mean loss."""
    n = input_ids.shape[0]
    return sum(loss.item() for k in range(n) for *_, loss in
               sliced_head_losses(model, layers, input_ids[k:k + 1], last[k:k + 1], as_tuple, device)) / n


class StateStore:
    """Boundary states by index; on the CPU, or in files under a temporary folder (``to_disk``)."""

    def __init__(self, to_disk: bool = False, folder: str | Path | None = None) -> None:
        self.on_disk, self.folder = to_disk, folder
        self._mem: dict[int, torch.Tensor] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="llmpruner-states-", dir=folder) if to_disk else None

    def put(self, i: int, x: torch.Tensor) -> None:
        x = x.detach().to("cpu")
        if self._tmp is None:
            self._mem[i] = x
        else:
            torch.save(x.contiguous(), Path(self._tmp.name) / f"{i}.pt")

    def get(self, i: int) -> torch.Tensor:
        if self._tmp is None:
            return self._mem[i]
        return torch.load(Path(self._tmp.name) / f"{i}.pt", mmap=True)

    def drop(self, i: int) -> None:
        self._mem.pop(i, None)
        if self._tmp is not None:
            (Path(self._tmp.name) / f"{i}.pt").unlink(missing_ok=True)

    def close(self) -> None:
        self._mem.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
