"""Knowledge distillation from the dense model: a ``Trainer`` subclass whose ``compute_loss`` is the KD loss.

The teacher runs under ``no_grad`` in its own dtype on its own device (the student's by default; every
data-parallel rank holds one) and is never wrapped by peft or the launcher. The student is called through
the (DDP / DeepSpeed / FSDP) wrapper as usual; its LM head is *tapped*: inside that forward call the head
receives the final hidden states ``[B, T, H]`` and, instead of the ``[B, T, V]`` logits, returns the loss
computed by ``kd_loss.chunked_kd_loss`` chunk by chunk (the teacher's head is tapped the same way). A model
whose logits are not just ``head(hidden)`` (soft-capping, logit scaling) is detected on the first batch and
falls back to full logits (still chunked for the loss).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from LLMPruner.recover.data import IGNORE_INDEX
from LLMPruner.recover.kd_loss import KDLoss, chunked_kd_loss

logger = logging.getLogger(__name__)

DistillLoss = Literal["kl", "kl+ce"]


@dataclass
class DistillConfig:
    loss: DistillLoss = "kl"
    alpha: float = 0.5          # weight of the CE term with loss="kl+ce" (the KL term gets 1 - alpha)
    temperature: float = 1.0
    chunk_tokens: int = 256     # rows of logits materialised at a time
    teacher_device: str | None = None  # None: the student's device

    @property
    def weights(self) -> tuple[float, float]:
        """``(w_kl, w_ce)``."""
        return (1.0, 0.0) if self.loss == "kl" else (1.0 - self.alpha, self.alpha)


class HeadTap:
    """Intercepts an LM head's forward: passes through normally, or hands the input to ``fn`` inside
    ``intercept(fn)`` and returns what ``fn`` returns (the rest of the model's forward is unchanged)."""

    def __init__(self, head: torch.nn.Module):
        self.head, self.fn = head, None
        self._forward = head.forward
        head.forward = self._tapped  # instance attribute: shadows the class's forward for this module only

    def _tapped(self, x, *args, **kwargs):
        return self._forward(x, *args, **kwargs) if self.fn is None else self.fn(x, self.head)

    @contextmanager
    def intercept(self, fn: Callable):
        self.fn = fn
        try:
            yield
        finally:
            self.fn = None


def output_head(model) -> torch.nn.Module:
    """The LM head (output embedding) of a model, through peft and launcher wrappers."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    assert head is not None and hasattr(head, "weight"), type(inner).__name__
    return head


def _tap(model) -> HeadTap:
    head = output_head(model)
    tap = getattr(head, "_llmpruner_tap", None)
    if tap is None:
        tap = HeadTap(head)
        head._llmpruner_tap = tap
    return tap


def logits_are_head_output(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether ``model``'s logits are exactly its head's output (nothing after it), on a small slice."""
    tap, seen = _tap(model), {}
    ids = input_ids[:1, :16]
    mask = None if attention_mask is None else attention_mask[:1, :16]

    def record(x, head):
        seen["out"] = tap._forward(x)
        return seen["out"]
    rng_devices = [ids.device] if ids.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=rng_devices), tap.intercept(record):  # dropout: RNG kept
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return "out" in seen and logits.shape == seen["out"].shape and bool(torch.equal(logits, seen["out"]))


def prepare_teacher(teacher: torch.nn.Module) -> torch.nn.Module:
    """Frozen, in eval mode; must not be a peft model."""
    if hasattr(teacher, "peft_config"):
        raise ValueError("--teacher: a peft-wrapped model cannot be the teacher; pass the dense model")
    teacher.eval().requires_grad_(False)
    return teacher


def distill_trainer_class(teacher: torch.nn.Module, config: DistillConfig):
    """A ``RecoveryTrainer`` subclass (NaN guard included) that trains on the KD loss of ``config``."""
    from LLMPruner.recover.train import _trainer_class

    class DistillTrainer(_trainer_class()):
        loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.kd = prepare_teacher(teacher), config
            self._fused: bool | None = None
            self._logged = {"kl": 0.0, "ce": 0.0, "n": 0}

        def _setup(self, model, inputs) -> None:
            device = torch.device(self.kd.teacher_device) if self.kd.teacher_device else inputs["input_ids"].device
            self.teacher.to(device)
            v_s, v_t = output_head(model).weight.shape[0], output_head(self.teacher).weight.shape[0]
            if v_s != v_t:
                raise ValueError(f"--teacher: its vocabulary has {v_t} entries, the student's {v_s}; the teacher "
                                 f"must share the student's tokenizer (pass the model it was pruned from)")
            ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            self._fused = logits_are_head_output(model, ids, mask) and \
                logits_are_head_output(self.teacher, ids.to(device), None if mask is None else mask.to(device))
            logger.info("distillation: %s, T=%g, weights (kl, ce)=%s, teacher on %s, %s", self.kd.loss,
                        self.kd.temperature, self.kd.weights, device,
                        f"fused head, {self.kd.chunk_tokens}-token chunks" if self._fused else
                        "full logits (the model post-processes its head's output)")

        def _teacher_rows(self, ids, mask, sel) -> tuple[torch.Tensor, torch.Tensor | None]:
            """The teacher's ``[N, H]`` hidden states and head weight (or ``[N, V]`` logits, None)."""
            device = next(self.teacher.parameters()).device
            ids, sel = ids.to(device), sel.to(device)
            mask = None if mask is None else mask.to(device)
            with torch.no_grad():
                if not self._fused:
                    return self.teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][sel], None
                seen = {}
                tap = _tap(self.teacher)
                with tap.intercept(lambda x, head: seen.setdefault("h", x).new_zeros(())):
                    self.teacher(input_ids=ids, attention_mask=mask, use_cache=False)
                return seen["h"][:, :-1][sel], tap.head.weight

        def _kd(self, model, inputs) -> KDLoss:
            if self._fused is None:
                self._setup(model, inputs)
            ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
            sel = labels[:, 1:] != IGNORE_INDEX                                   # [B, T-1]
            target = labels[:, 1:][sel]                                           # [N]
            teacher_h, teacher_w = self._teacher_rows(ids, mask, sel)
            w_kl, w_ce = self.kd.weights
            kw = dict(teacher_weight=teacher_w, temperature=self.kd.temperature, kl_weight=w_kl, ce_weight=w_ce,
                      chunk=self.kd.chunk_tokens)
            if not self._fused:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                return chunked_kd_loss(logits[:, :-1][sel], teacher_h, target, **kw)
            found = {}

            def head_loss(x, head):  # x [B, T, H]: the student's final hidden states
                found["kd"] = chunked_kd_loss(x[:, :-1][sel], teacher_h, target, student_weight=head.weight, **kw)
                return found["kd"].loss.reshape(1, 1, 1)
            with _tap(model).intercept(head_loss):
                out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            kd = found["kd"]
            return KDLoss(out.logits.reshape(()), kd.kl, kd.ce)  # the loss as it left the wrapper

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            kd = self._kd(model, inputs)
            if model.training:
                self._logged["kl"] += float(kd.kl)
                self._logged["ce"] += float(kd.ce)
                self._logged["n"] += 1
            return (kd.loss, None) if return_outputs else kd.loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self._kd(model, inputs).loss
            return loss.detach(), None, None

        def log(self, logs: dict, *args, **kwargs) -> None:
            if "loss" in logs and self._logged["n"]:  # every rank logs here: mean over all ranks' micro-batches
                sums = torch.tensor([self._logged[k] for k in ("kl", "ce", "n")], device=self.args.device)
                if self.args.world_size > 1:
                    sums = self.accelerator.reduce(sums, reduction="sum")
                logs["kl"], logs["ce"] = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
                self._logged = {"kl": 0.0, "ce": 0.0, "n": 0}
            super().log(logs, *args, **kwargs)

    return DistillTrainer
