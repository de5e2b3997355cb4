"""Generate text with a base, pruned or pruned+LoRA model: from the command line, stdin, or a web page.

    python generate.py --model out/pruned [--lora out/tune/checkpoint-200] --prompt "Once upon a time"
    python generate.py --model out/pruned --reference_prompts --greedy
    python generate.py --model out/pruned --interactive
    python generate.py --model out/pruned --web                  # Gradio page (pip install -e .[ui])
    # the reference's flags (web page unless a prompt flag is given; its pickles need --allow_pickle):
    python generate.py --model_type pruneLLM --ckpt prune_log/x/pytorch_model.bin --allow_pickle
    python generate.py --model_type tune_prune_LLM --ckpt prune_log/x/pytorch_model.bin --lora_ckpt tune_log/x
"""
from __future__ import annotations

import argparse
import os
import logging

from LLMPruner import cli

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    p.add_argument("--model", default=None, help="Hugging Face id or folder (base or pruned)")
    p.add_argument("--lora", default=None, help="peft adapter folder to merge")
    ref = p.add_argument_group("the reference's flags (instead of --model/--lora)")
    ref.add_argument("--model_type", choices=cli.MODEL_TYPES, default=None,
                     help="pretrain: --base_model; pruneLLM: --ckpt; tune_prune_LLM: --ckpt + --lora_ckpt")
    ref.add_argument("--base_model", default=None, help="the model of --model_type pretrain")
    ref.add_argument("--ckpt", default=None, help="pruned model (folder, or the reference's pytorch_model.bin)")
    ref.add_argument("--lora_ckpt", default=None, help="peft adapter folder of --model_type tune_prune_LLM")
    ref.add_argument("--share_gradio", action="store_true", help="a public Gradio link for the web page")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--reference_prompts", action="store_true", help="LLM-Pruner's prompt set")
    src.add_argument("--interactive", action="store_true", help="read prompts from stdin")
    src.add_argument("--web", action="store_true", help="serve a Gradio page (needs gradio)")
    p.add_argument("--server_name", default="127.0.0.1", help="--web: address to listen on (0.0.0.0: all)")
    p.add_argument("--server_port", type=int, default=None, help="--web: port (default: Gradio's, 7860+)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"])
    p.add_argument("--allow_pickle", action="store_true",
                   help="let the model be a reference LLM-Pruner pickle (pytorch_model.bin): this RUNS PICKLED "
                        "CODE; only for files you trust")
    cli.add_debug_flag(p)
    args = p.parse_args(argv)
    args.model, args.lora, model_flag = cli.reference_model(args)
    args.device = cli.check_device("--device", args.device or cli.default_device())
    cli.check_source(model_flag, args.model, "model", f"{model_flag} ../shared/models/stories260K")
    if args.lora is not None and not os.path.isdir(args.lora):
        lora_flag = "--lora_ckpt" if args.model_type else "--lora"
        raise cli.UsageError(f"{lora_flag} {args.lora!r}: no such adapter folder")
    if args.model_type and not (args.prompt or args.reference_prompts or args.interactive):
        args.web = True  # the reference's generate.py is the web page
    return args


def main(argv=None) -> list[str]:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)  # every flag checked before torch and transformers are imported
    from LLMPruner.evaluate.generate import REFERENCE_PROMPTS, SamplingConfig, generate
    from LLMPruner.evaluate.models import CheckpointSpec, load_for_eval
    # 1. sampling flags are checked before the model loads
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)
    if args.web:
        from LLMPruner.evaluate import webui
        webui._gradio()  # fail before loading the model when gradio is absent
    # 2. load (merging LoRA if given)
    spec = CheckpointSpec(name="model", model=args.model, lora=args.lora)
    model, tokenizer = load_for_eval(spec, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    # 3. generate
    if args.web:
        about = f"Model: `{args.model}`" + (f" + LoRA `{args.lora}`" if args.lora else "")
        blocks, _ = webui.build_ui(model, tokenizer, about, sampling)
        webui.launch(blocks, server_name=args.server_name, server_port=args.server_port, share=args.share_gradio)
        return []
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
    cli.run(main, "generate.py")
