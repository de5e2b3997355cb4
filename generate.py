"""Generate text with a base, pruned or pruned+LoRA model.

    python generate.py --model out/pruned [--lora out/tune/checkpoint-200] --prompt "Once upon a time"
    python generate.py --model out/pruned --reference_prompts --greedy
    python generate.py --model out/pruned --interactive
"""
from __future__ import annotations

import argparse
import logging

import torch

from LLMPruner.evaluate.generate import REFERENCE_PROMPTS, SamplingConfig, generate
from LLMPruner.evaluate.models import CheckpointSpec, load_for_eval


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face id or folder (base or pruned)")
    p.add_argument("--lora", default=None, help="peft adapter folder to merge")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--reference_prompts", action="store_true", help="LLM-Pruner's prompt set")
    src.add_argument("--interactive", action="store_true", help="read prompts from stdin")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"])
    return p.parse_args(argv)


def main(argv=None) -> list[str]:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    # 1. sampling flags are checked before the model loads
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    # 2. load (merging LoRA if given)
    spec = CheckpointSpec(name="model", model=args.model, lora=args.lora)
    model, tokenizer = load_for_eval(spec, device=args.device, dtype=args.dtype)
    # 3. generate
    if args.interactive:
        outputs = []
        while True:
            try:
                prompt = input("prompt> ")
            except EOFError:
                return outputs
            outputs += generate(model, tokenizer, [prompt], sampling)
            print(prompt + outputs[-1])
    prompts = list(REFERENCE_PROMPTS) if args.reference_prompts or not args.prompt else args.prompt
    outputs = generate(model, tokenizer, prompts, sampling)
    for prompt, text in zip(prompts, outputs):
        print(f"=== {prompt!r}\n{prompt}{text}\n")
    return outputs


if __name__ == "__main__":
    main()
