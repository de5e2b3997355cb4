"""Image-text checkpoints around a supported language model: prune the language model alone (``--text_only``).

Gemma-3 4B-27B (``gemma3``), Mistral Small 3.1/3.2 (``mistral3``) and LLaVA (``llava``) are image-text models:
their config holds the language model's own config (``text_config``: ``gemma3_text``, ``mistral``) beside a
``vision_config``, and the language model lives under ``model.language_model`` with the head ``lm_head``.
``text_only_model`` moves those modules (no copy) into the causal LM of ``text_config``: the same logits
on text, a text-only checkpoint of a supported model type once pruned; the vision tower and projector are
dropped. This is never silent: without ``text_only`` such a checkpoint is an error naming the flag.

Checkpoints name the language model's tensors ``language_model.model.*`` / ``language_model.lm_head.*``
(the layout transformers writes) or ``model.language_model.*`` / ``lm_head.*`` (its in-memory names);
``TextOnlySource`` streams either as the text model's names for ``--offload``.
"""
from __future__ import annotations

import copy
import logging

import torch.nn as nn

from LLMPruner.stream.weights import WeightSource
from LLMPruner.checkpoint.build import CheckpointError

logger = logging.getLogger(__name__)

#: checkpoint prefix -> the text-only model's prefix
TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))


def text_config_of(config):
    """The language model's config of an image-text ``config``; None for a text model."""
    text = getattr(config, "text_config", None)
    return text if text is not None and getattr(config, "vision_config", None) is not None else None


def config_to_prune(config, text_only: bool, source: str):
    """``config`` itself, or its ``text_config`` with ``text_only``; an image-text config without it is a
    ``CheckpointError`` naming ``--text_only``. ``text_only`` on a text model changes nothing. (The text
    config as stored: ``streamed_text_config`` gives the one a streamed pass builds its model from.)"""
    text = text_config_of(config)
    if text is None:
        return config
    if not text_only:
        raise CheckpointError(
            f"{source}: model_type {config.model_type!r} is an image-text model around a {text.model_type!r} "
            f"language model; --text_only prunes that language model alone (the vision tower and projector "
            f"are dropped, the result is a text-only {text.model_type!r} checkpoint)")
    return text


def streamed_text_config(config):
    """A copy of the image-text ``config``'s ``text_config`` whose ``tie_word_embeddings`` is what the built
    image-text model does (the composite config's flag may disagree with ``text_config``'s; decided on the
    meta device), for a model that is never loaded whole (``--offload``)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    model.tie_weights()  # what loading does (on the meta device, building alone does not)
    text = copy.deepcopy(text_config_of(config))
    text.tie_word_embeddings = model.get_output_embeddings().weight is \
        model.model.language_model.get_input_embeddings().weight
    return text


def text_only_model(model: nn.Module) -> nn.Module:
    """The causal LM of ``model.config.text_config`` holding ``model``'s language model and head (moved,
    not copied); ``model`` itself if it is a text model."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    text = text_config_of(model.config)
    if text is None:
        return model
    language, head = model.model.language_model, model.get_output_embeddings()
    dropped = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in {id(p): p for p in [*language.parameters(), *head.parameters()]}.values())
    config = text  # the very object the language model's modules hold: pruning rewrites it for all of them
    config.tie_word_embeddings = head.weight is language.get_input_embeddings().weight
    with init_empty_weights():
        causal = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    causal.model = language
    causal.lm_head = head
    causal.config = config
    causal.generation_config = copy.deepcopy(model.generation_config)
    logger.info("--text_only: pruning the %s language model of %s; %d vision/projector parameters dropped",
                config.model_type, model.config.model_type, dropped)
    return causal.eval()


class TextOnlySource(WeightSource):
    """An image-text checkpoint's language-model tensors under the text-only model's names."""

    def __init__(self, inner: WeightSource, config) -> None:
        self.inner, self.config = inner, config
        self._names: dict[str, str] = {}
        for name in inner.keys():
            for old, new in TEXT_PREFIXES:
                if name.startswith(old):
                    self._names.setdefault(new + name[len(old):], name)
                    break

    def keys(self) -> set[str]:
        return set(self._names)

    def get(self, name: str):
        return self.inner.get(self._names[name])
