"""Recovery on the real stories260K: perplexity before/after LoRA recovery and distillation, throughput.

    python bench/recover_stories.py            # needs ../shared and hf_prune.py (prunes at 0.25 first)

1. prune stories260K at 0.25 (hf_prune.py, block-wise layers 1-3, Taylor) unless --prune_model exists;
2. split ../shared/data/tinystories: first 20 % of the stories for training, the other 80 % for perplexity;
3. recover with post_training.py on (a) Alpaca instructions and (b) the in-domain 20 %, one example per
   story (the reference's recipe), reporting TinyStories perplexity (128-token windows) before and after;
4. distillation grid: LoRA + CE, LoRA + KD, full + KD on the same packed blocks (--steps x 16 blocks of 256
   tokens) of (a) the in-domain 20 % and (b) ../shared/data/c4 text, with the share of lost PPL recovered;
5. throughput: post_training's Trainer against a plain peft + Trainer loop on the same model and data.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLMPRUNER_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from common import table  # noqa: E402


def prune(folder: Path) -> None:
    subprocess.run([sys.executable, "hf_prune.py", "--pruning_ratio", "0.25", "--device", "cpu", "--eval_device",
                    "cpu", "--block_wise", "--block_mlp_layer_start", "1", "--block_mlp_layer_end", "4",
                    "--block_attention_layer_start", "1", "--block_attention_layer_end", "4", "--pruner_type",
                    "taylor", "--taylor", "param_first", "--base_model", str(SHARED / "models/stories260K"),
                    "--calibration_data", str(SHARED / "data/tinystories/tinystories_val.txt"),
                    "--log_dir", str(folder.parent), "--save_ckpt_log_name", folder.name, "--save_model"],
                   cwd=REPO, check=True)


def split_stories(tmp: Path) -> tuple[str, str]:
    stories = [s for s in (SHARED / "data/tinystories/tinystories_val.txt").read_text().split("\n\n") if s.strip()]
    cut = len(stories) // 5
    (tmp / "train.txt").write_text("\n\n".join(stories[:cut]))
    (tmp / "heldout.txt").write_text("\n\n".join(stories[cut:]))
    return str(tmp / "train.txt"), str(tmp / "heldout.txt")


def recover(prune_model: str, data: str, heldout: str, out: Path, args, extra: tuple[str, ...] = (),
            lr: float | None = None) -> dict:
    import post_training
    argv = ["--prune_model", prune_model, "--data_path", data, "--output_dir", str(out), "--batch_size", "16",
            "--micro_batch_size", "8", "--num_epochs", "1", "--max_steps", str(args.steps), "--learning_rate",
            str(lr or args.lr), "--warmup_steps", "5", "--cutoff_len", "256", "--val_set_size", "64",
            "--eval_steps", str(args.steps), "--save_steps", str(args.steps), "--eval_ppl", heldout, "--merge",
            "--seed", "0", *extra]
    return post_training.main(argv)


KD_RUNS = {"LoRA + CE": ("--distill_loss", "none"), "LoRA + KD": ("--train_mode", "lora"),
           "full + KD": ("--train_mode", "full")}


def kd_flags(run: str, args) -> tuple[str, ...]:
    """The distillation flags of a KD_RUNS entry (none for LoRA + CE: today's recipe, unchanged)."""
    if "KD" not in run:
        return ()
    lora = ("--lora_r", str(args.lora_r_kd), "--lora_alpha", str(2 * args.lora_r_kd)) if "LoRA" in run else ()
    return ("--teacher", str(SHARED / "models/stories260K"), "--distill_loss", args.kd_loss, "--kd_alpha",
            str(args.kd_alpha), "--kd_temperature", str(args.kd_temperature), *lora)


def distillation_grid(prune_model: str, texts: dict[str, str], heldout: str, tmp: Path, args) -> list[dict]:
    """Every KD_RUNS entry on the same packed blocks of each text; PPL on the held-out stories."""
    rows = []
    for data_name, text in texts.items():
        for run, flags in KD_RUNS.items():
            kd = kd_flags(run, args)
            lr = args.lr_full if "full" in run else args.lr_lora_kd if "KD" in run else args.lr
            out = tmp / f"{data_name}_{run.replace(' + ', '_')}"
            report = recover(prune_model, text, heldout, out, args, ("--distill_on", text, *flags, *kd), lr=lr)
            rows.append({"data": data_name, "run": run, "lr": f"{lr:g}", "ppl": next(iter(report["ppl_after"].values())),
                         "train_s": report["train_runtime_s"]})
    return rows


def evaluate_text(folder: str, text: str) -> dict[str, float]:
    from LLMPruner.checkpoint import load_model
    from LLMPruner.evaluate.ppl import evaluate_ppl
    model, tok = load_model(folder, dtype=torch.float32)
    return evaluate_ppl(model.eval(), tok, [text], 128)


def throughput(prune_model: str, data: str, examples: int) -> dict[str, float]:
    """tokens/s of one epoch over ``examples`` Alpaca examples: ours vs a plain peft + Trainer loop."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from LLMPruner.checkpoint import load_model
    from LLMPruner.recover import RecoveryConfig, build_instruction_datasets, build_trainer
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    results: dict[str, float] = {}
    for name in ("post_training", "plain peft+Trainer") * 2:  # alternate, keep each one's best
        model, tok = load_model(prune_model, dtype=torch.float32)
        tok.pad_token_id = 0
        train, _ = build_instruction_datasets(data, tok, cutoff_len=256, val_set_size=0)
        train = train.select(range(examples))
        tokens = sum(len(ids) for ids in train["input_ids"])
        with tempfile.TemporaryDirectory() as out:
            if name == "post_training":
                trainer = build_trainer(model, tok, train, {}, RecoveryConfig(
                    output_dir=out, batch_size=16, micro_batch_size=8, num_epochs=1, learning_rate=1e-3,
                    lora_target_modules=targets, save_steps=10**6, disable_tqdm=True, use_cpu=True))
            else:
                lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                        target_modules=targets, task_type="CAUSAL_LM"))
                trainer = Trainer(model=lora, train_dataset=train, data_collator=DataCollatorForSeq2Seq(
                    tok, pad_to_multiple_of=8, padding=True, return_tensors="pt"), args=TrainingArguments(
                    output_dir=out, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                    num_train_epochs=1, learning_rate=1e-3, save_strategy="no", report_to="none",
                    disable_tqdm=True, use_cpu=True))
            start = time.perf_counter()
            trainer.train()
            results[name] = max(results.get(name, 0.0), tokens / (time.perf_counter() - start))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prune_model", default=str(REPO / "prune_log" / "stories_0.25"))
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of 16 examples per recovery run")
    # the KD defaults (lr_lora_kd, lr_full, kd_temperature, kd_loss) were chosen on a split inside the training
    # 20 % (docs/recovery.md), never on the reported held-out 80 %; LoRA + CE keeps the reference's recipe
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA + CE learning rate")
    p.add_argument("--lr_lora_kd", type=float, default=1e-2, help="LoRA + KD learning rate")
    p.add_argument("--lr_full", type=float, default=3e-3, help="full-weight (full + KD) learning rate")
    p.add_argument("--kd_temperature", type=float, default=2.0)
    p.add_argument("--kd_loss", choices=("kl", "kl+ce"), default="kl", help="--distill_loss of the KD runs")
    p.add_argument("--kd_alpha", type=float, default=0.5, help="CE weight with --kd_loss kl+ce")
    p.add_argument("--lora_r_kd", type=int, default=8, help="LoRA rank of LoRA + KD (alpha = 2 r: r 8 is the post_training default, alpha 16)")
    p.add_argument("--throughput_examples", type=int, default=512)
    p.add_argument("--only_distillation", action="store_true", help="skip steps 3 and 5")
    args = p.parse_args()
    torch.set_num_threads(1)
    if not SHARED.exists():
        sys.exit(f"needs {SHARED} (the project's ../shared material)")
    if not Path(args.prune_model, "config.json").is_file():
        prune(Path(args.prune_model))
    alpaca = str(SHARED / "data/alpaca/alpaca_5000.json")
    ppl = lambda d: round(next(iter(d.values())), 3)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        train_txt, heldout = split_stories(Path(tmp))
        dense_pruned = {name: ppl(evaluate_text(folder, heldout)) for name, folder in
                        (("dense", str(SHARED / "models/stories260K")), ("pruned", args.prune_model))}
        report: dict = {"summary": dict(dense_pruned)}
        if not args.only_distillation:
            report.update(alpaca=recover(args.prune_model, alpaca, heldout, Path(tmp) / "a", args),
                          tinystories=recover(args.prune_model, train_txt, heldout, Path(tmp) / "t", args))
            report["summary"].update(recovered_alpaca=ppl(report["alpaca"]["ppl_after"]),
                                     recovered_tinystories=ppl(report["tinystories"]["ppl_after"]))
        grid = distillation_grid(args.prune_model, {"TinyStories 20 %": train_txt, "C4": str(SHARED / "data/c4/c4_demo.jsonl")},
                                 heldout, Path(tmp), args)
    dense, pruned = dense_pruned["dense"], dense_pruned["pruned"]
    for row in grid:
        row["recovered"] = f"{100 * (pruned - row['ppl']) / (pruned - dense):.0f} %"
    report["distillation"] = grid
    report["settings"] = vars(args)
    if not args.only_distillation:
        report["tokens_per_s"] = throughput(args.prune_model, alpaca, args.throughput_examples)
    out = REPO / "results" / "recover_stories.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"dense {dense:.2f}, pruned {pruned:.2f}; {args.steps} steps x 16 blocks of 256 tokens; KD: "
          f"{args.kd_loss} (alpha {args.kd_alpha}), T={args.kd_temperature}, LoRA r {args.lora_r_kd}")
    print(table(grid, ["data", "run", "lr", "ppl", "recovered", "train_s"]))


if __name__ == "__main__":
    main()
