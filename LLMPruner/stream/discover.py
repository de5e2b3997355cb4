"""Discovery without the weights: trace a one-layer model of the same widths, then repeat its layer.

``LLMPruner.discover.discover`` traces a real forward pass, which needs real tensors. For a model that does
not fit, we trace a *template*: the same config with one decoder layer and a tiny vocabulary (the
vocabulary dim is never prunable and no family's indices depend on it), then rename the layer-0 members
for every layer. Valid for uniform models (every decoder layer the same shape), which is what
``skeleton`` accepts; ``tests/test_offload_discover.py`` checks it against the full trace.
"""
from __future__ import annotations

import copy
import logging

import torch.nn as nn

from LLMPruner.adapters import get_adapter
from LLMPruner.discover import discover
from LLMPruner.discover.groups import Discovery
from LLMPruner.discover.groups import Family, Member
from LLMPruner.stream.weights import layers_prefix

logger = logging.getLogger(__name__)


def template_config(config, n_layers: int = 1):
    """``config`` with ``n_layers`` decoder layers and the smallest vocabulary its special ids allow."""
    cfg = copy.deepcopy(config)
    ids = []
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        v = getattr(cfg, key, None)
        ids += v if isinstance(v, list) else [v] if isinstance(v, int) else []
    cfg.vocab_size = max([16] + [i + 1 for i in ids])
    cfg.num_hidden_layers = n_layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = cfg.layer_types[:n_layers]
    return cfg


def discover_streamed(skeleton_model: nn.Module) -> Discovery:
    """The ``Discovery`` that ``discover(full model)`` would return, for a meta-device skeleton."""
    from transformers import AutoModelForCausalLM
    config = skeleton_model.config
    template = AutoModelForCausalLM.from_config(template_config(config)).eval()
    template.config._attn_implementation = config._attn_implementation
    found = discover(template)
    adapter = get_adapter(skeleton_model)
    prefix = layers_prefix(template, adapter.decoder_layers(template))
    n_layers = len(adapter.decoder_layers(skeleton_model))
    assert prefix == layers_prefix(skeleton_model, adapter.decoder_layers(skeleton_model)), prefix
    order = {n: i for i, (n, _) in enumerate(skeleton_model.named_parameters())}
    layer0 = prefix + ".0."

    def renamed(name: str, i: int) -> str:
        return f"{prefix}.{i}." + name[len(layer0):] if name.startswith(layer0) else name

    families = []
    for fam in found.families:
        if fam.layer is not None:
            families += [Family(fam.kind, i, [Member(renamed(m.param, i), m.dim, m.indices) for m in fam.members])
                         for i in range(n_layers)]
            continue
        members = []
        for m in fam.members:
            copies = range(n_layers) if m.param.startswith(layer0) else [0]
            members += [Member(renamed(m.param, i), m.dim, m.indices) for i in copies]
        members.sort(key=lambda m: order[m.param])  # stable: a parameter's dims keep their order
        families.append(Family(fam.kind, None, members))
    families.sort(key=lambda f: (f.layer if f.layer is not None else -1, f.kind))
    layers = [[renamed(n, i) for n in found.layers[0]] for i in range(n_layers)]
    del template
    logger.info("discovered %d families from a one-layer template", len(families))
    return Discovery(families=families, layers=layers)
