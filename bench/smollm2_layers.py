"""What one decoder layer, or one pruned MLP, is worth on SmolLM2 (the analyses of docs/smollm2.md §6).

    python bench/smollm2_layers.py sink                              # each MLP's output on position 0
    python bench/smollm2_layers.py scan [--layers 1-28]              # the dense model without one layer
    python bench/smollm2_layers.py fold --layer 17 --into "16m;16m,16a,15m,15a"
    python bench/smollm2_layers.py restore --pruned FOLDER           # one pruned MLP made dense again
    python bench/smollm2_layers.py temperature [--pruned FOLDER]     # logits divided by tau

``fold`` removes a layer and folds a least-squares map of earlier activations onto that layer's residual
contribution into the linears that read them (``16m``: layer 16's ``down_proj``, ``16a``: its ``o_proj``;
ReplaceMe-style; ``;`` separates variants). ``restore`` needs a pruned model saved by
``bench/obs_explore.py --save``. ``temperature`` divides the logits of the dense (and the pruned) model by
each ``--taus`` value, on the calibration tokens too (where a tau would be chosen). Perplexity: the first
``--windows`` windows of the two held-out splits of ``bench/obs_explore.py --heldout`` (C4 documents
outside calibration, PTB valid) and of the protocol's WikiText-2 ids. The model is an fp32 SmolLM2 folder (``--model``, as for ``bench/obs_explore.py``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402
from obs_explore import heldout_sets  # noqa: E402
from smollm2 import C4, PROTOCOL, _ppl, _ppls  # noqa: E402

from LLMPruner.score.depth import only_layers  # noqa: E402


def eval_sets(tok, windows: int) -> dict[str, torch.Tensor]:
    held = heldout_sets(tok)
    wt2 = torch.tensor(json.loads(PROTOCOL.read_text())["wikitext2"])
    return {"c4_heldout": held["c4_heldout"][:windows], "ptb_valid": held["ptb_valid"][:windows],
            "wikitext2": wt2[:windows]}


def perplexities(model, sets: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(_ppl(model, v), 3) for k, v in sets.items()}


def without_layer(model, index: int):
    """``model`` with decoder layer ``index`` taken out (restored on exit; forwards without a KV cache)."""
    return only_layers(model, [i for i in range(len(model.model.layers)) if i != index])


@torch.no_grad()
def capture(model, examples: torch.Tensor, modules: dict[str, torch.nn.Module], outputs: bool = False):
    """``{name: [B, T, d]}`` of each module's input (``outputs``: also ``name + ":out"``, its first output)."""
    seen: dict[str, list[torch.Tensor]] = {}

    def grab(name):
        def fn(m, args, kwargs, y):
            seen.setdefault(name, []).append((args[0] if args else kwargs["hidden_states"]).detach())
            if outputs:
                seen.setdefault(name + ":out", []).append((y[0] if isinstance(y, tuple) else y).detach())
        return fn

    handles = [m.register_forward_hook(grab(n), with_kwargs=True) for n, m in modules.items()]
    try:
        for s in range(0, len(examples), 8):
            model(input_ids=examples[s:s + 8], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def sink(model, examples) -> list[dict]:
    layers = model.model.layers
    got = capture(model, examples, {f"{i}": l.mlp for i, l in enumerate(layers)}, outputs=True)
    res = capture(model, examples, {f"{i}": l for i, l in enumerate(layers)}, outputs=True)
    rows = []
    for i in range(len(layers)):
        y = got[f"{i}:out"].double()
        h = res[f"{i}:out"].double().norm(dim=-1)
        rows.append({"layer": i, "MLP output energy on position 0": float(y[:, 0].pow(2).sum() / y.pow(2).sum()),
                     "residual norm, position 0": round(float(h[:, 0].mean()), 1),
                     "residual norm, others": round(float(h[:, 1:].mean()), 1)})
    return rows


def scan(model, sets, layers: range) -> list[dict]:
    rows = [{"removed": "none (dense)", **perplexities(model, sets)}]
    for i in layers:
        with without_layer(model, i):
            rows.append({"removed": f"layer {i}", **perplexities(model, sets)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _linear(model, spec: str) -> torch.nn.Linear:
    layer = model.model.layers[int(spec[:-1])]
    return {"m": layer.mlp.down_proj, "a": layer.self_attn.o_proj}[spec[-1]]


@torch.no_grad()
def fold(model, examples, sets, index: int, variants: list[list[str]]) -> list[dict]:
    """Remove layer ``index`` and fold ``T`` (ridge least squares of its contribution ``out - in`` on the
    named linears' inputs, position 0 left out; even positions fit, odd choose the ridge) into them."""
    rows = []
    for specs in variants:
        mods = {s: _linear(model, s) for s in specs}
        got = capture(model, examples, {**mods, "target": model.model.layers[index]}, outputs=True)
        old = {s: m.weight.detach().clone() for s, m in mods.items()}
        row = {"removed": f"layer {index}", "folded into": ",".join(specs) or "-"}
        if specs:
            a = torch.cat([got[s][:, 1:] for s in specs], -1).double()
            d = (got["target:out"] - got["target"])[:, 1:].double()
            af, df = a[:, 0::2].reshape(-1, a.shape[-1]), d[:, 0::2].reshape(-1, d.shape[-1])
            ac, dc = a[:, 1::2].reshape(-1, a.shape[-1]), d[:, 1::2].reshape(-1, d.shape[-1])
            g, b = af.T @ af, af.T @ df
            best = (math.inf, None, None)
            for r in (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0):
                t = torch.linalg.solve(g + r * g.diagonal().mean() * torch.eye(len(g), dtype=g.dtype), b)
                err = float((ac @ t - dc).pow(2).sum() / dc.pow(2).sum())
                if err < best[0]:
                    best = (err, r, t)
            row.update({"unexplained (held out)": round(best[0], 3), "ridge": best[1]})
            off = 0
            for s, m in mods.items():
                m.weight += best[2][off:off + m.weight.shape[1]].T.to(m.weight.dtype)
                off += m.weight.shape[1]
        with without_layer(model, index):
            row.update(perplexities(model, sets))
        for s, m in mods.items():
            m.weight.copy_(old[s])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def restore(model, pruned, sets) -> list[dict]:
    """Per pruned MLP: the perplexities with that MLP dense again, and the nats it costs."""
    base = perplexities(pruned, sets)
    rows = [{"model": "pruned", **base}]
    for i, (p, d) in enumerate(zip(pruned.model.layers, model.model.layers)):
        if p.mlp.down_proj.weight.shape == d.mlp.down_proj.weight.shape:
            continue
        mine = p.mlp
        p.mlp = copy.deepcopy(d.mlp)
        got = perplexities(pruned, sets)
        p.mlp = mine
        row = {"model": f"layer {i} MLP dense", "channels removed": d.mlp.down_proj.weight.shape[1] -
               mine.down_proj.weight.shape[1], **got}
        row.update({f"{k} nats": round(math.log(base[k] / got[k]), 4) for k in sets})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def temperature(models: dict, sets: dict[str, torch.Tensor], taus: list[float]) -> list[dict]:
    """Per model and split: perplexity with the logits divided by each tau."""
    rows = []
    for label, model in models.items():
        for split, windows in sets.items():
            ppl = _ppls(model, windows, tuple(taus))
            row = {"model": label, "split": split, **{f"tau {t:g}": round(v, 2) for t, v in zip(taus, ppl)}}
            row["best tau"] = taus[min(range(len(taus)), key=ppl.__getitem__)]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("sink", "scan", "fold", "restore", "temperature"))
    p.add_argument("--model", default="/tmp/smollm2_fp32", help="fp32 SmolLM2 folder")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--layers", default="1-28", help="scan: first-last layer to remove, one at a time")
    p.add_argument("--layer", type=int, default=17, help="fold: the layer removed")
    p.add_argument("--into", default="16m", help="fold: ';'-separated variants of ','-separated linears")
    p.add_argument("--pruned", default=None, help="restore, temperature: a pruned model folder (bench/obs_explore.py --save)")
    p.add_argument("--taus", default="0.95,1,1.05,1.1,1.15", help="temperature: the divisors of the logits")
    args = p.parse_args()
    from LLMPruner.checkpoint import load_model, load_pruned
    from LLMPruner.data.calibration import calibration_examples
    model, tok = load_model(args.model, device="cpu", dtype=torch.float32)
    model.eval()
    examples = calibration_examples(str(C4), tok, 128, 128, seed=0)
    if args.what == "sink":
        rows = sink(model, examples)
    elif args.what == "scan":
        first, last = (int(v) for v in args.layers.split("-"))
        rows = scan(model, eval_sets(tok, args.windows), range(first, last + 1))
    elif args.what == "fold":
        variants = [[s for s in v.split(",") if s] for v in args.into.split(";")]
        rows = fold(model, examples, eval_sets(tok, args.windows), args.layer, variants)
    elif args.what == "temperature":
        models = {"dense": model}
        if args.pruned:
            models["pruned"] = load_pruned(args.pruned)[0].eval()
        sets = {"calibration": examples, **eval_sets(tok, args.windows)}
        rows = temperature(models, sets, [float(t) for t in args.taus.split(",")])
    else:
        if not args.pruned:
            sys.exit("restore needs --pruned FOLDER (a model saved by bench/obs_explore.py --save)")
        pruned = load_pruned(args.pruned)[0].eval()
        rows = restore(model, pruned, eval_sets(tok, args.windows))
    print(table(rows, list(dict.fromkeys(k for r in rows for k in r))))


if __name__ == "__main__":
    main()
