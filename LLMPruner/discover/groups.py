"""From joined channel ids to groups: ``(parameter, dim, indices)`` lists removed together.

A *unit* is one connected set of ids (a KV group with its query heads, one MLP channel, one hidden
channel). Units touching the same parameter dims the same number of times form a *family* (all KV groups
of layer 3). Units joined with the logits or with an embedding's vocabulary are never prunable.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from LLMPruner.adapters import get_adapter
from LLMPruner.discover.trace import trace

logger = logging.getLogger(__name__)


@dataclass
class Member:
    """Parameter ``param``, dimension ``dim``; row ``u`` of ``indices`` belongs to unit ``u``."""
    param: str
    dim: int
    indices: torch.Tensor  # [n_units, k] long


@dataclass
class Family:
    kind: str               # "attention" | "mlp" | "hidden" | "unknown"
    layer: int | None       # decoder layer, or None for model-wide families
    members: list[Member] = field(default_factory=list)

    @property
    def n_units(self) -> int:
        return self.members[0].indices.shape[0]

    @property
    def key(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}@{self.layer}"

    def describe(self) -> str:
        parts = ", ".join(f"{m.param}[dim {m.dim}] x{m.indices.shape[1]}" for m in self.members)
        return f"{self.key}: {self.n_units} units of {{{parts}}}"


@dataclass
class Discovery:
    families: list[Family]
    layers: list[list[str]]  # parameter names of each decoder layer (whole-layer groups)

    def find(self, kind: str, layer: int | None = None) -> list[Family]:
        return [f for f in self.families if f.kind == kind and (layer is None or f.layer == layer)]

    def describe(self) -> str:
        return "\n".join(f.describe() for f in self.families)


def discover(model: nn.Module, example_ids: torch.Tensor | None = None) -> Discovery:
    """Trace ``model`` once and return its prunable families and whole-layer groups."""
    adapter = get_adapter(model)
    adapter.check_width_pruning(model.config)
    adapter.prepare(model)
    if example_ids is None:
        device = next(model.parameters()).device
        example_ids = torch.tensor([[1, 2]], device=device) % model.config.vocab_size
    tracer = trace(model, example_ids)
    labels = tracer.space.components()
    blocked = set(np.unique(labels[tracer.output_ids.reshape(-1).numpy()]).tolist())
    for name in tracer.indexed:
        blocked.update(np.unique(labels[tracer.param_ids[name][0].numpy()]).tolist())
    for ids in tracer.shared:  # e.g. a per-head-dim norm weight shared by all heads
        ids = ids[ids >= 0]
        blocked.update(np.unique(labels[ids.numpy()]).tolist())

    layer_of, layer_params = _layer_index(model, adapter)
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    slots = [(n, d) for n in sorted(tracer.param_ids, key=order.get) for d in range(len(tracer.param_ids[n]))]
    slot_labels = {s: labels[tracer.param_ids[s[0]][s[1]].numpy()] for s in slots}

    touches: dict[int, list[tuple[int, int]]] = defaultdict(list)  # label -> [(slot, count)]
    for si, s in enumerate(slots):
        labs, counts = np.unique(slot_labels[s], return_counts=True)
        for lab, c in zip(labs.tolist(), counts.tolist()):
            if lab not in blocked:
                touches[lab].append((si, c))
    by_signature: dict[tuple, list[int]] = defaultdict(list)
    for lab, sig in touches.items():
        by_signature[tuple(sig)].append(lab)

    families = [_family(sig, labs, slots, slot_labels, tracer, adapter, layer_of)
                for sig, labs in by_signature.items()]
    families.sort(key=lambda f: (f.layer if f.layer is not None else -1, f.kind))
    logger.debug("discovered %d families", len(families))
    return Discovery(families=families, layers=layer_params)


def _family(signature, labs, slots, slot_labels, tracer, adapter, layer_of) -> Family:
    labs = np.asarray(labs)
    members = []
    for si, k in signature:
        name, dim = slots[si]
        lab = slot_labels[(name, dim)]
        order = np.argsort(lab, kind="stable")
        start = np.searchsorted(lab[order], labs)
        idx = order[start[:, None] + np.arange(k)[None, :]]
        members.append(Member(param=name, dim=dim, indices=torch.as_tensor(np.sort(idx, 1))))
    first = members[0].indices[:, 0].argsort()  # units in the order of their first index
    for m in members:
        m.indices = m.indices[first]
    names = {m.param for m in members}
    layers = {layer_of.get(n) for n in names}
    layer = layers.pop() if len(layers) == 1 else None
    if names & tracer.indexed and any(n in layer_of for n in names):
        kind = "hidden"  # the residual stream: from the embeddings through every decoder layer
    elif names & tracer.indexed:
        kind = "unknown"  # an embedding space outside the layers (OPT-350m's word_embed_proj_dim)
    else:
        kinds = {adapter.kind_of(n) for n in names} - {None}
        kind = kinds.pop() if len(kinds) == 1 else "unknown"
    return Family(kind=kind, layer=layer, members=members)


def _layer_index(model: nn.Module, adapter) -> tuple[dict[str, int], list[list[str]]]:
    layers = adapter.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    layer_of, params = {}, [[] for _ in layers]
    for name, _ in model.named_parameters():
        if name.startswith(prefix + "."):
            i = int(name[len(prefix) + 1:].split(".")[0])
            layer_of[name] = i
            params[i].append(name)
    return layer_of, params
