"""The OBS allocation's dense statistics (``obs_allocation.stream_grams``) from the layer-streamed pass.

``--obs_allocation residual`` needs, per pruned layer, the Gram of each
consumer's dense input and the energy of the layer's output. In memory, ``obs_allocation.layer_grams``
runs the dense stream layer by layer on the loaded model; here the same code runs on a stream whose
first state comes from the embeddings stage (``apply.embed``) and whose layers are loaded from the
weight source one at a time, and released once the allocation has read that layer's curves."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn

from LLMPruner.score.activations import consumers
from LLMPruner.adapters import get_adapter
from LLMPruner.discover import Family
from LLMPruner.select.allocation import stream_grams
from LLMPruner.stream.apply import PassOptions, embed
from LLMPruner.stream.weights import Part, WeightSource, layers_prefix


def streamed_grams(model: nn.Module, source: WeightSource, families: list[Family], examples: torch.Tensor,
                   opts: PassOptions
                   ) -> Iterator[tuple[int, dict[str, torch.Tensor], float]]:
    """``obs_allocation.layer_grams`` of the meta-device ``model`` whose weights are in ``source``: one
    decoder layer on ``opts.device`` at a time, the boundary states on the host."""
    layers = get_adapter(model).decoder_layers(model)
    prefix = layers_prefix(model, layers)
    h0, calls = embed(model, source, examples, opts)
    hidden = [h.clone() for h in h0.split(opts.batch_size)]  # each batch replaced as the stream moves on
    del h0
    loaded: dict[int, Part] = {}

    def forward(layer: nn.Module, b: int, h: torch.Tensor) -> torch.Tensor:
        return calls[len(h)](layer, h.to(opts.device))

    def enter(i: int) -> None:
        loaded[i] = Part(model, prefix, i)
        loaded[i].load(source, opts.device, opts.dtype)

    def leave(i: int) -> None:
        loaded.pop(i).release()

    try:
        yield from stream_grams(layers, consumers(model, families), hidden, forward, enter, leave,
                                device=opts.linalg_device)
    finally:
        for part in loaded.values():
            part.release()
