"""One results table for many checkpoints: JSON (everything) and Markdown (the headline numbers)."""
from __future__ import annotations

import json
from pathlib import Path

#: statistics columns shown in the Markdown table: key -> (header, format)
STAT_COLUMNS = {"params": ("params", "{:,}"), "macs_total": ("MACs", "{:.3g}"),
                "model_mb": ("MB", "{:.2f}"), "forward_ms": ("fwd ms", "{:.2f}"),
                "generate_tokens_per_s": ("gen tok/s", "{:.1f}")}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def markdown_table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per checkpoint; PPL, each task's acc/acc_norm, averages, statistics."""
    ppl_names = sorted({k for r in results.values() for k in r.get("ppl", {})})
    tasks = list(dict.fromkeys(t for r in results.values() for t in r.get("zeroshot", {})))
    stats = [k for k in STAT_COLUMNS if any(k in r.get("stats", {}) for r in results.values())]
    header = (["checkpoint"] + [f"PPL {Path(n).stem}" for n in ppl_names] + [f"{t} acc/norm" for t in tasks]
              + (["avg acc/norm"] if tasks else []) + [STAT_COLUMNS[k][0] for k in stats])
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in results.items():
        cells = [name] + [_fmt(r.get("ppl", {}).get(n), "{:.2f}") for n in ppl_names]
        for t in tasks + (["average"] if tasks else []):
            accs = r.get("zeroshot", {}).get(t) if t != "average" else r.get("average")
            cells.append("-" if not accs else
                         f"{accs['acc']:.4f}/{_fmt(accs.get('acc_norm'), '{:.4f}')}")
        cells += [_fmt(r.get("stats", {}).get(k), STAT_COLUMNS[k][1]) for k in stats]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_report(results: dict[str, dict], folder: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "results.json", folder / "results.md"
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown_table(results), encoding="utf-8")
    return json_path, md_path
