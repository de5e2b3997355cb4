"""Record one forward pass with a ``TorchFunctionMode`` and propagate channel ids through it.

Any Python control flow in the model's code is fine: we see the torch calls that actually ran, with
their real arguments and outputs, and apply the rule of ``rules.py`` for each.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from LLMPruner.discover import rules
from LLMPruner.discover.ids import IdSpace

logger = logging.getLogger(__name__)


class UnknownOpError(RuntimeError):
    pass


class Tracer(TorchFunctionMode):
    """Shadows (channel-id tensors) for every activation derived from the model's parameters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.space = IdSpace()
        self.param_name = {id(p): n for n, p in model.named_parameters()}
        #: parameter name -> one id tensor per dimension
        self.param_ids: dict[str, list[torch.Tensor]] = {}
        #: names of parameters whose rows index a lookup table (embedding vocabularies)
        self.indexed: set[str] = set()
        self._shadows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.unknown: dict[str, int] = {}
        #: ids of inputs broadcast across distinct channels (shared by them, never prunable)
        self.shared: list[torch.Tensor] = []

    # -- shadows ---------------------------------------------------------------------------
    def ids_of(self, p: torch.Tensor) -> list[torch.Tensor] | None:
        name = self.param_name.get(id(p))
        if name is None:
            return None
        if name not in self.param_ids:
            self.param_ids[name] = [self.space.fresh(n) for n in p.shape]
        return self.param_ids[name]

    def shadow_of(self, t: torch.Tensor) -> torch.Tensor | None:
        hit = self._shadows.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        ids = self.ids_of(t)
        if ids is not None and len(ids) == 1:  # a 1-D parameter used elementwise (norm weight, bias)
            return ids[0]
        return None

    def _set(self, out, shadow) -> None:
        if isinstance(out, torch.Tensor) and isinstance(shadow, torch.Tensor):
            assert out.shape == shadow.shape, (out.shape, shadow.shape)
            self._shadows[id(out)] = (out, shadow)
        elif isinstance(out, (list, tuple)) and isinstance(shadow, (list, tuple)):
            for o, s in zip(out, shadow):
                self._set(o, s)

    # -- the mode --------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.Tensor)]
        if any(self.shadow_of(t) is not None or self.ids_of(t) is not None for t in tensors):
            self._propagate(func, args, kwargs, out)
        return out

    def _propagate(self, func, args, kwargs, out) -> None:
        name = getattr(func, "__name__", str(func))
        if not isinstance(out, (torch.Tensor, list, tuple)) or name == "__get__" or name in rules.METADATA:
            return
        if name == "linear":
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            w_out, w_in = self.ids_of(w)
            b = self.ids_of(bias)[0] if bias is not None else None
            self._set(out, rules.linear(self.space, self.shadow_of(x), w_in, w_out, b, out.shape))
        elif name == "embedding":
            w = args[1] if len(args) > 1 else kwargs["weight"]
            vocab, dim = self.ids_of(w)
            self.indexed.add(self.param_name[id(w)])
            self._set(out, dim.expand(out.shape).clone())
        elif name == "scaled_dot_product_attention":
            q, k, v = (self._shadow_or_none(t) for t in args[:3])
            self._set(out, rules.attention(self.space, q, k, v, out.shape))
        elif name == "layer_norm":
            w = args[2] if len(args) > 2 else kwargs.get("weight")
            b = args[3] if len(args) > 3 else kwargs.get("bias")
            x, w, b = (self.shadow_of(t) if isinstance(t, torch.Tensor) else None for t in (args[0], w, b))
            self._set(out, rules.layer_norm(self.space, self._shadow_or_none(args[0]) if x is None else x,
                                            w, b, self.shared))
        elif name == "baddbmm":
            b1 = args[1] if len(args) > 1 else kwargs["batch1"]
            b2 = args[2] if len(args) > 2 else kwargs["batch2"]
            inp = self.shadow_of(args[0])
            self._set(out, rules.baddbmm(self.space, inp, self._shadow_or_none(b1), self._shadow_or_none(b2),
                                         out.shape, self.shared))
        elif name in rules.MATMUL:
            self._set(out, rules.collapse_matmul(self.space, self._shadow_or_none(args[0]),
                                                 self._shadow_or_none(args[1]), out.shape))
        elif name in rules.MOVE:
            self._set(out, rules.move(func, args, kwargs, self.shadow_of))
        elif name in rules.IDENTITY:
            self._set(out, self._shadow_or_none(args[0]).expand(out.shape).clone())
        elif name in rules.ELEMENTWISE or name in rules.REDUCE:
            self._elementwise_or_reduce(name, args, kwargs, out)
        elif name in rules.MIN_MAX:
            other = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("dim"))
            if isinstance(other, torch.Tensor):
                self._elementwise_or_reduce("minimum", args, kwargs, out)
            else:  # a reduction; with ``dim`` the result is (values, indices): the values carry the ids
                keep = kwargs.get("keepdim", False) or (len(args) > 2 and args[2] is True)
                self._set(out[0] if isinstance(out, tuple) else out,
                          rules.reduce(self._shadow_or_none(args[0]), other, keep))
        else:
            self.unknown[name] = self.unknown.get(name, 0) + 1

    def _elementwise_or_reduce(self, name, args, kwargs, out) -> None:
        if name in rules.REDUCE:
            dims = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool) else None)
            keep = kwargs.get("keepdim", False) or (len(args) > 2 and args[2] is True)
            self._set(out, rules.reduce(self._shadow_or_none(args[0]), dims, keep))
            return
        shadows = [self.shadow_of(a) for a in _flat(args) if isinstance(a, torch.Tensor)]
        shadows = [s for s in shadows if s is not None]
        if isinstance(out, torch.Tensor) and shadows:
            self._set(out, rules.elementwise(self.space, shadows, out.shape, self.shared))

    def _shadow_or_none(self, t) -> torch.Tensor:
        s = self.shadow_of(t) if isinstance(t, torch.Tensor) else None
        if s is None:
            shape = t.shape if isinstance(t, torch.Tensor) else ()
            return torch.full(shape, -1, dtype=torch.long)
        return s


def _flat(xs) -> list:
    out = []
    for x in xs:
        if isinstance(x, (list, tuple)):
            out.extend(_flat(x))
        else:
            out.append(x)
    return out


def trace(model: nn.Module, input_ids: torch.Tensor) -> Tracer:
    """Run ``model(input_ids)`` once under the tracer; the logits' ids are marked as outputs."""
    tracer = Tracer(model)
    with torch.no_grad(), tracer:
        logits = model(input_ids=input_ids, use_cache=False).logits
    if tracer.unknown:
        raise UnknownOpError(
            "discovery does not know how channels flow through these torch ops: "
            + ", ".join(f"{k} (x{v})" for k, v in sorted(tracer.unknown.items()))
            + "; add a rule in LLMPruner/discover/rules.py")
    tracer.output_ids = tracer.shadow_of(logits)
    return tracer
