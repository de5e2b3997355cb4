"""Text generation for a base, pruned or pruned+LoRA model, with the reference's prompt set."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

logger = logging.getLogger(__name__)

#: the prompts LLM-Pruner's ``hf_prune.py`` generates for after pruning (from the LLaMA paper)
REFERENCE_PROMPTS = (
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    "Building a website can be done in 10 simple steps:\n",
    "Tweet: \"I hate it when my phone battery dies.\"\nSentiment: Negative\n###\n"
    "Tweet: \"My day has been 👍\"\nSentiment: Positive\n###\n"
    "Tweet: \"This is the link to the article\"\nSentiment: Neutral\n###\n"
    "Tweet: \"This new music video was incredibile\"\nSentiment:",
    "Translate English to French:\n\nsea otter => loutre de mer\n\npeppermint => menthe poivrée\n\n"
    "plush girafe => girafe peluche\n\ncheese =>",
)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling flags; the defaults are the reference's (top-k 50, top-p 0.95, temperature 1)."""
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens {self.max_new_tokens}: must be >= 1")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"--temperature {self.temperature}: must be > 0 when sampling (or pass --greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p {self.top_p}: must be in (0, 1]")


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], sampling: SamplingConfig = SamplingConfig()) -> list[str]:
    """The continuation (prompt excluded) of each prompt, one at a time (no padding effects)."""
    device = next(model.parameters()).device
    kwargs = asdict(sampling)
    seed = kwargs.pop("seed")
    if not sampling.do_sample:
        for key in ("temperature", "top_p", "top_k"):
            kwargs.pop(key)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    outputs = []
    for prompt in prompts:
        torch.manual_seed(seed)
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)  # [1, T]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kwargs)
        outputs.append(continuation(tokenizer, out[0], ids.shape[1]))
        logger.debug("prompt %r -> %r", prompt, outputs[-1])
    model.train(was_training)
    return outputs


def continuation(tokenizer, sequence: torch.Tensor, prompt_len: int) -> str:
    """The text after the prompt, with the tokenizer's own spacing.

    Decoding the new tokens alone loses the space a SentencePiece/Metaspace tokenizer attaches to a
    word's first piece ("Once upon a time," + "there"), so the whole sequence is decoded and the
    decoded prompt is cut off its front.
    """
    full = tokenizer.decode(sequence, skip_special_tokens=True)
    prompt = tokenizer.decode(sequence[:prompt_len], skip_special_tokens=True)
    if full.startswith(prompt):
        return full[len(prompt):]
    return tokenizer.decode(sequence[prompt_len:], skip_special_tokens=True)  # decoding is not prefix-stable
