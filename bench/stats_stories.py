"""Dense vs heterogeneously pruned stories260K, side by side: parameters, MACs, memory, latency, PPL.

    python bench/stats_stories.py [--shared ../shared] [--out /tmp/bench_stats]

The "pruned" model is a naive slice (first heads / first MLP channels kept in layers 1-3), only to
exercise statistics on per-layer shapes; it is not LLM-Pruner's importance-based selection.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import common  # noqa: F401  (puts the checkout on sys.path: runnable from any folder)
from LLMPruner.adapters import get_adapter
from LLMPruner.evaluate.ppl import evaluate_ppl
from LLMPruner.evaluate.report import write_report
from LLMPruner.evaluate.stats import model_statistics
from LLMPruner.structure import LayerShape


@torch.no_grad()
def slice_layer(adapter, layer, shape: LayerShape, hidden: int, head_dim: int) -> None:
    """Keep the first heads/kv heads/MLP channels of ``layer`` (weights copied, not re-initialised)."""
    attn, mlp = layer.self_attn, layer.mlp
    old = {n: getattr(attn, n).weight.clone() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    old.update({n: getattr(mlp, n).weight.clone() for n in ("gate_proj", "up_proj", "down_proj")})
    adapter.resize_layer(layer, shape, hidden, head_dim)
    q, kv, inter = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim, shape.intermediate_size
    attn.q_proj.weight.copy_(old["q_proj"][:q]); attn.o_proj.weight.copy_(old["o_proj"][:, :q])
    attn.k_proj.weight.copy_(old["k_proj"][:kv]); attn.v_proj.weight.copy_(old["v_proj"][:kv])
    mlp.gate_proj.weight.copy_(old["gate_proj"][:inter]); mlp.up_proj.weight.copy_(old["up_proj"][:inter])
    mlp.down_proj.weight.copy_(old["down_proj"][:, :inter])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    p.add_argument("--out", default="/tmp/bench_stats")
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, text = Path(args.shared) / "models/stories260K", Path(args.shared) / "data/tinystories/tinystories_val.txt"
    tok = AutoTokenizer.from_pretrained(path)
    results = {}
    for name in ("dense", "pruned"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if name == "pruned":
            adapter = get_adapter(model)
            s = adapter.read_structure(model)
            for i in (1, 2, 3):
                slice_layer(adapter, adapter.decoder_layers(model)[i], LayerShape(6, 3, 129), s.hidden_size, s.head_dim)
            adapter.update_config(model)
        results[name] = {"ppl": evaluate_ppl(model, tok, [str(text)], seq_len=128),
                         "stats": model_statistics(model, seq_len=128, repeats=20)}
        results[name]["structure"] = get_adapter(model).read_structure(model).to_dict()
    json_path, md_path = write_report(results, args.out)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
