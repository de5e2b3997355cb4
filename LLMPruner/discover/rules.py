"""How channel ids flow through each torch operation.

A *shadow* is an integer tensor of the same shape as an activation holding, at each position, the id of
the channel that position belongs to. Four kinds of rules:

* **move** ops (view, transpose, cat, slicing, expand, ...) only move values around: replay the op on the
  shadow. ``q.view(1, T, 4, 8)`` turns shadow ``[0..31]`` into 4 heads of 8 ids, exactly like the data.
* **elementwise** ops (add, mul, silu, ...) join the ids found at the same position of every input:
  a residual ``h + attn(h)`` joins the hidden channel ``c`` of both sides.
* **reductions** (mean over a dim, ...) keep an id only where it is constant along the reduced dims:
  RMSNorm's ``x.pow(2).mean(-1)`` has no channel identity, so it joins nothing.
* **contractions**: ``linear(x, W)`` joins ``x[..., i]`` with column ``i`` of ``W`` and gives row ids of
  ``W`` to the output; a matmul of two activations (attention ``q @ k^T``, ``p @ v``) joins everything in
  each batch slice (a head), since a head can only be removed whole.
"""
from __future__ import annotations

import torch

from LLMPruner.discover.ids import NO_ID, IdSpace

MOVE = {"view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "contiguous",
        "flatten", "unflatten", "__getitem__", "narrow", "split", "chunk", "cat", "concat", "concatenate",
        "stack", "repeat", "repeat_interleave", "index_select", "t", "movedim", "clone", "detach", "select",
        "unbind", "tile", "swapaxes", "expand_as", "view_as", "reshape_as", "broadcast_to", "roll", "flip"}
IDENTITY = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "cpu", "cuda", "requires_grad_",
            "dropout", "softmax", "log_softmax", "_softmax", "__neg__", "neg", "silu", "gelu", "relu",
            "sigmoid", "tanh", "exp", "rsqrt", "sqrt", "abs", "square", "erf", "log", "sin", "cos",
            "relu6", "leaky_relu", "hardswish", "mish", "softplus", "elu", "selu", "gelu_new", "__pos__",
            "clamp", "clip", "clamp_min", "clamp_max", "pow", "__pow__", "masked_fill", "nan_to_num", "expm1",
            "log1p"}
ELEMENTWISE = {"add", "sub", "mul", "div", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__",
               "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "add_",
               "mul_", "div_", "sub_", "where", "addcmul", "lerp", "maximum", "minimum", "true_divide",
               "multiply", "subtract", "divide", "fmod", "remainder", "copysign",
               # comparisons: a mask with the operands' channels (e.g. xIELU's x > 0)
               "gt", "lt", "ge", "le", "eq", "ne", "__gt__", "__lt__", "__ge__", "__le__", "__eq__", "__ne__"}
#: ``min``/``max``: elementwise against a tensor (``torch.min(x, eps)``), else a reduction over ``dim``
MIN_MAX = {"min", "max"}
REDUCE = {"mean", "sum", "var", "std", "amax", "amin", "norm", "logsumexp", "prod"}
#: queries of metadata (shapes), not values: nothing flows
METADATA = {"size", "dim", "numel", "stride", "__len__", "is_floating_point", "is_contiguous", "data_ptr"}
MATMUL = {"matmul", "bmm", "__matmul__", "__rmatmul__", "einsum_unsupported"}


def move(func, args, kwargs, shadow_of):
    """Replay a data-movement op on shadows; tensors without a shadow become NO_ID tensors."""
    def swap(x):
        if isinstance(x, torch.Tensor):
            s = shadow_of(x)
            return s if s is not None else torch.full(x.shape, NO_ID, dtype=torch.long)
        if isinstance(x, (list, tuple)):
            return type(x)(swap(y) for y in x)
        return x
    name = func.__name__
    if name in ("expand_as", "view_as", "reshape_as"):
        target = args[1].shape
        op = {"expand_as": "expand", "view_as": "view", "reshape_as": "reshape"}[name]
        return getattr(swap(args[0]), op)(target)
    return func(*swap(list(args)), **{k: swap(v) for k, v in kwargs.items()})


def elementwise(space: IdSpace, shadows: list[torch.Tensor], shape: torch.Size,
                shared: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Join ids position by position across the inputs; the output carries the first known id.

    An input *broadcast across distinct channels* is shared by them and joins none: Qwen3's q_norm weight
    ``[head_dim]`` times ``q`` ``[B, T, heads, head_dim]`` is used by every head, so removing a head must
    not remove it (joining it would also fuse all heads into one unit). Such inputs go to ``shared``.
    A norm weight ``[C]`` times ``x`` ``[B, T, C]`` is broadcast only over B and T, where x's ids do not
    vary, so it joins channel by channel as usual.
    """
    full = [torch.broadcast_to(s, shape) for s in shadows]
    own = [i for i, s in enumerate(shadows)
           if not any(_varies(full[j], _broadcast_dims(s, shape)) for j in range(len(full)) if j != i)]
    if shared is not None:
        shared.extend(shadows[i] for i in range(len(shadows)) if i not in own)
    if not own:
        return torch.full(shape, NO_ID, dtype=torch.long)
    out = full[own[0]].clone()
    for i in own[1:]:
        space.link(out, full[i])
        out = torch.where(out >= 0, out, full[i])
    return out


def _broadcast_dims(s: torch.Tensor, shape: torch.Size) -> tuple[int, ...]:
    """Output dims along which ``s`` is repeated by broadcasting (missing, or size 1 against size > 1)."""
    lead = len(shape) - s.ndim
    return tuple(d for d in range(len(shape)) if shape[d] > 1 and (d < lead or s.shape[d - lead] == 1))


def _varies(full: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """Whether ``full`` holds two different channel ids along ``dims`` somewhere (NO_ID ignored)."""
    if not dims or full.numel() == 0:
        return False
    hi = full.amax(dim=dims)
    lo = torch.where(full >= 0, full, torch.full_like(full, torch.iinfo(torch.long).max)).amin(dim=dims)
    return bool(((hi >= 0) & (lo != hi) & (lo != torch.iinfo(torch.long).max)).any())


def reduce(shadow: torch.Tensor, dims, keepdim: bool) -> torch.Tensor:
    if dims is None:
        return torch.full((), NO_ID, dtype=torch.long)
    hi, lo = shadow.amax(dim=dims, keepdim=keepdim), shadow.amin(dim=dims, keepdim=keepdim)
    return torch.where(hi == lo, hi, torch.full_like(hi, NO_ID))


def linear(space: IdSpace, x: torch.Tensor | None, w_in: torch.Tensor, w_out: torch.Tensor,
           bias: torch.Tensor | None, out_shape: torch.Size) -> torch.Tensor:
    """``y = x @ W^T + b``: x's last dim joins W's input ids; y carries W's output ids."""
    if x is not None:
        space.link(x, w_in.expand(x.shape))
    if bias is not None:
        space.link(w_out, bias)
    return w_out.expand(out_shape).clone()


def collapse_matmul(space: IdSpace, a: torch.Tensor, b: torch.Tensor, out_shape: torch.Size) -> torch.Tensor:
    """``a @ b`` of two activations: every id of a batch slice (e.g. a head) joins one fresh id."""
    batch = tuple(out_shape[:-2])
    a = torch.broadcast_to(a, batch + tuple(a.shape[-2:])).reshape(-1, a.shape[-2] * a.shape[-1])
    b = torch.broadcast_to(b, batch + tuple(b.shape[-2:])).reshape(-1, b.shape[-2] * b.shape[-1])
    fresh = space.fresh(a.shape[0])
    space.link(fresh[:, None].expand(a.shape), a)
    space.link(fresh[:, None].expand(b.shape), b)
    return fresh.reshape(batch + (1, 1)).expand(out_shape).clone()


def layer_norm(space: IdSpace, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               shared: list[torch.Tensor]) -> torch.Tensor:
    """``F.layer_norm``: the statistics have no channel identity; x, weight and bias join per channel."""
    return elementwise(space, [s for s in (x, weight, bias) if s is not None], x.shape, shared)


def baddbmm(space: IdSpace, inp: torch.Tensor | None, b1: torch.Tensor, b2: torch.Tensor,
            out_shape: torch.Size, shared: list[torch.Tensor]) -> torch.Tensor:
    """``beta * inp + alpha * (b1 @ b2)``: a matmul of two activations plus an elementwise term (ALiBi)."""
    prod = collapse_matmul(space, b1, b2, out_shape)
    return prod if inp is None else elementwise(space, [inp, prod], out_shape, shared)


def attention(space: IdSpace, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              out_shape: torch.Size) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(q k^T) v``, with grouped KV heads repeated."""
    rep = q.shape[-3] // k.shape[-3]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scores_shape = torch.Size(tuple(q.shape[:-1]) + (k.shape[-2],))
    scores = collapse_matmul(space, q, k.transpose(-1, -2), scores_shape)
    return collapse_matmul(space, scores, v, out_shape)
