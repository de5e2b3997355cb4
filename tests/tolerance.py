"""How exact a comparison is, stated once for the whole suite.

``assert_same`` — one computation against itself: a save -> load round trip, a plan replayed on a fresh
copy of the same model, the same forward pass before and after a no-op. The same kernels run on the same
numbers in the same order, so the results are bit-identical (atol = rtol = 0), on any release.

``assert_paths_agree`` — two computation paths that are equal in exact arithmetic but not in float32:
fused vs per-expert experts, offloaded vs in memory, GGUF vs safetensors, eager vs SDPA attention, a
rebuilt ALiBi bias vs the stock one, CPU vs another device. Each path sums in its own order and each
torch/transformers release may pick another kernel (transformers 5.25 runs a fused copy of MoE experts
through a different kernel than the model built in memory: 9e-8 apart), so exact equality would test the
kernels, not our code. float32 has a 24-bit mantissa (relative step 6e-8); through the few layers of a
tiny test model the rounding grows to ~1e-6 of a logit's size. PATHS = relative 1e-5 plus absolute 1e-5
(for logits near zero) leaves a margin of ten over that, and is still 1,000 times tighter than any real
error these tests look for (a wrong row or head moves logits by 1e-2 or more).
"""
from __future__ import annotations

import torch

#: two computation paths, float32 (see the module docstring)
PATHS = dict(rtol=1e-5, atol=1e-5)
#: one computation against itself
SAME = dict(rtol=0, atol=0)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """Bit-identical: ``actual`` and ``expected`` are one computation run twice."""
    torch.testing.assert_close(actual, expected, **SAME, msg=msg)


def assert_paths_agree(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """Equal to float32 rounding: ``actual`` and ``expected`` come from two computation paths."""
    torch.testing.assert_close(actual, expected, **PATHS, msg=msg)


#: decoding with a KV cache vs one forward pass over the whole sequence: attention over the cache is a
#: different reduction per generated token, and the differences compound over the generated steps
DECODING = dict(rtol=1e-4, atol=1e-4)


def assert_decoding_agrees(cached: torch.Tensor, full: torch.Tensor, msg: str | None = None) -> None:
    """Logits of ``generate`` (KV cache) against one forward pass of the same sequence."""
    torch.testing.assert_close(cached, full, **DECODING, msg=msg)
