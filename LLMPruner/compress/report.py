"""The run's report: ``results.json`` (every figure), ``report.md`` (the table, the command, the pictures) and
the plots (matplotlib, the optional ``report`` extra; without it the report says so and has no pictures):

* ``layers.png``: attention heads and MLP width kept per layer, dense vs pruned;
* ``recovery.png``: the recovery's training loss (KL and CE with distillation) against tokens;
* ``gain.png``: perplexity against recovery tokens (pruned at 0, then each checkpoint);
* ``tradeoff.png``: perplexity and zero-shot accuracy against parameters, dense / pruned / recovered.

Every number in ``report.md`` is read from ``results.json``.
"""
from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

from LLMPruner.compress.spec import STAGES, CompressSpec, done_summary, is_done

logger = logging.getLogger(__name__)
MODELS = ("dense", "pruned", "recovered")


def collect(spec: CompressSpec) -> dict:
    """``results.json``: the spec and every finished stage's summary."""
    out = {"spec": json.loads((Path(spec.run_dir) / "spec.json").read_text())}
    for stage in STAGES[:-1]:
        if is_done(spec, stage):
            out[stage] = done_summary(spec, stage)
    return out


def plot_all(results: dict, folder: Path) -> list[str]:
    """The PNGs this run can draw (names relative to the run folder); none without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: report.md has no plots (pip install -e '.[report]')")
        return []
    made = []
    evaluation = (results.get("evaluate") or {}).get("results", {})
    structure = (results.get("prune") or {}).get("structure")
    dense_stats = evaluation.get("dense", {})
    if structure:
        layers = structure["layers"]
        before = ((results.get("prune") or {}).get("structure_before") or {}).get("layers") or \
            [{k: max(s[k] for s in layers) for k in layers[0]}] * len(layers)  # (the widest layer, if unknown)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        x = list(range(len(layers)))
        for ax, key, title in ((axes[0], "num_attention_heads", "attention heads kept"),
                               (axes[1], "intermediate_size", "MLP width kept")):
            ax.bar(x, [s[key] for s in before], color="#d9d9d9", label="dense")
            ax.bar(x, [s[key] for s in layers], color="#3b6ea8", label="pruned")
            ax.set_title(title)
            ax.set_xlabel("decoder layer")
        axes[0].legend(loc="lower right", fontsize=8)
        fig.suptitle(f"{results.get('spec', {}).get('base_model', '')}: per-layer shapes", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / "layers.png", dpi=110)
        plt.close(fig)
        made.append("layers.png")
    history = (results.get("recover") or {}).get("log_history") or []
    per_step = (results.get("spec", {}).get("batch_blocks", 8) * results.get("spec", {}).get("block_tokens", 128))
    curves = {k: [(h["step"] * per_step, h[k]) for h in history if k in h and "step" in h] for k in ("loss", "kl", "ce")}
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for key, label in (("kl", "KL to the dense model"), ("ce", "cross-entropy"), ("loss", "training loss")):
            if curves[key] and not (key == "loss" and curves["kl"]):
                ax.plot(*zip(*curves[key]), marker=".", label=label)
        ax.set_xlabel("recovery tokens")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax.set_title("recovery")
        fig.tight_layout()
        fig.savefig(folder / "recovery.png", dpi=110)
        plt.close(fig)
        made.append("recovery.png")
    curve = (results.get("evaluate") or {}).get("curve") or []
    if len(curve) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for name in curve[0]["ppl"]:
            ax.plot([p["tokens"] for p in curve], [p["ppl"].get(name) for p in curve], marker="o",
                    label=Path(name).stem)
            if name in dense_stats.get("ppl", {}):
                ax.axhline(dense_stats["ppl"][name], linestyle=":", color="gray")
        ax.set_xlabel("recovery tokens")
        ax.set_ylabel("perplexity (dotted: dense)")
        ax.legend(fontsize=8)
        ax.set_title("gain with recovery tokens")
        fig.tight_layout()
        fig.savefig(folder / "gain.png", dpi=110)
        plt.close(fig)
        made.append("gain.png")
    rows = [(m, evaluation[m]) for m in MODELS if m in evaluation and evaluation[m].get("stats", {}).get("params")]
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        style = {"dense": ("o", "#444444"), "pruned": ("s", "#c0504d"), "recovered": ("^", "#3b6ea8")}
        first = next((n for _, r in rows for n in r.get("ppl", {})), None)
        for m, r in rows:
            marker, color = style[m]
            params = r["stats"]["params"] / 1e6
            if first in r.get("ppl", {}):
                axes[0].scatter(params, r["ppl"][first], marker=marker, color=color, s=60, label=m)
            if r.get("average"):
                axes[1].scatter(params, r["average"].get("acc_norm", r["average"]["acc"]), marker=marker,
                                color=color, s=60, label=m)
        axes[0].set_ylabel(f"perplexity, {Path(first).stem}" if first else "perplexity")
        axes[1].set_ylabel("zero-shot accuracy (acc_norm, average)")
        if not any(r.get("average") for _, r in rows):
            axes[1].text(0.5, 0.5, "no zero-shot tasks (--tasks)", ha="center", va="center",
                         transform=axes[1].transAxes)
        for ax in axes:
            ax.set_xlabel("parameters (M)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "tradeoff.png", dpi=110)
        plt.close(fig)
        made.append("tradeoff.png")
    return made


def _table(results: dict) -> list[str]:
    evaluation = (results.get("evaluate") or {}).get("results", {})
    rows = [(m, evaluation[m]) for m in MODELS if m in evaluation]
    if not rows:
        return ["(no evaluation)"]
    ppl = sorted({n for _, r in rows for n in r.get("ppl", {})})
    tasks = list(dict.fromkeys(t for _, r in rows for t in r.get("zeroshot", {})))
    dense = dict(rows).get("dense", {})
    header = ["model", "parameters", "MACs"] + [f"PPL {Path(n).stem}" for n in ppl] + \
        [f"{t} acc_norm" for t in tasks] + (["average acc_norm", "% of dense"] if tasks else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows:
        stats = r.get("stats", {})
        cells = [name, f"{stats['params']:,}" if "params" in stats else "-",
                 f"{stats['macs_total']:.3g}" if "macs_total" in stats else "-"]
        cells += [f"{r['ppl'][n]:.2f}" if n in r.get("ppl", {}) else "-" for n in ppl]
        for t in tasks:
            acc = r.get("zeroshot", {}).get(t, {})
            cells.append(f"{acc.get('acc_norm', acc.get('acc', float('nan'))):.4f}" if acc else "-")
        if tasks:
            avg = (r.get("average") or {}).get("acc_norm")
            base = (dense.get("average") or {}).get("acc_norm")
            cells += [f"{avg:.4f}" if avg is not None else "-",
                      f"{100 * avg / base:.1f} %" if avg is not None and base else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(spec: CompressSpec) -> Path:
    """Write ``results.json``, the plots and ``report.md`` into the run folder; return ``report.md``."""
    folder = Path(spec.run_dir)
    results = collect(spec)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = plot_all(results, folder)
    prune, recover, export = (results.get(k) or {} for k in ("prune", "recover", "export"))
    command = results["spec"].get("command") or ""
    lines = [f"# {spec.base_model}: pruned, recovered, evaluated", "",
             f"Run folder `{folder}`; every figure below is in `results.json`.", "", "```bash", command, "```", "",
             "## Result", "", *_table(results), ""]
    if prune:
        lines += [f"Pruning (`{prune.get('recipe') or 'configuration'}`): {prune['params_before']:,} -> "
                  f"{prune['params_after']:,} parameters ({100 * (1 - prune['ratio']):.2f} % removed) in "
                  f"{prune.get('prune_seconds')} s.", ""]
    if recover and recover.get("recover") != "none":
        lines += [f"Recovery (`{recover['recover']}`): {recover['tokens']:,} tokens, {recover['steps']} steps, "
                  f"{recover.get('tokens_per_s')} tokens/s, {recover.get('train_seconds')} s of training.", ""]
    if export and export.get("export") not in (None, "none"):
        speed = export.get("llamacpp_tokens_per_s")
        lines += [f"Export (`{export['export']}`): `{export['path']}`, {export['bytes'] / 2**20:.1f} MiB"
                  + (f"; llama.cpp generation {speed} tokens/s (one thread)" if speed else "") + ".", ""]
    seconds = {s: (results.get(s) or {}).get("seconds") for s in STAGES[:-1] if results.get(s)}
    lines += ["Wall time per stage: " + ", ".join(f"{k} {v} s" for k, v in seconds.items()) + ".", ""]
    titles = {"layers.png": "Kept attention heads and MLP width per layer",
              "recovery.png": "Recovery loss", "gain.png": "Perplexity with recovery tokens",
              "tradeoff.png": "Quality against parameters"}
    for name in plots:
        lines += [f"## {titles[name]}", "", f"![{titles[name]}]({name})", ""]
    if not plots:
        lines += ["(No plots: matplotlib is not installed; `pip install -e '.[report]'`.)", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def command_line(argv: list[str]) -> str:
    return "python compress.py " + " ".join(shlex.quote(a) for a in argv)
