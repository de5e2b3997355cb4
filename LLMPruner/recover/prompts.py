"""Prompt templates for instruction tuning (Alpaca-style), as data.

A template is a dict with ``prompt_input`` / ``prompt_no_input`` format strings and the
``response_split`` marker that ends the prompt. ``Prompter.generate_prompt(instruction, input, label)``
returns the user prompt (no label) or the full training text (with label). ``no_instruction`` drops the
template: the text is just ``instruction[\\ninput]\\n`` followed by the label.
"""
from __future__ import annotations

import json
from pathlib import Path

TEMPLATES: dict[str, dict[str, str]] = {
    "alpaca": {
        "description": "Template used by Alpaca-LoRA and LLM-Pruner.",
        "prompt_input": ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.\n\n"
                         "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
        "prompt_no_input": ("Below is an instruction that describes a task. Write a response that "
                            "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                            "### Response:\n"),
        "response_split": "### Response:",
    },
    "alpaca_short": {
        "description": "A shorter Alpaca template.",
        "prompt_input": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "prompt_no_input": "### Instruction:\n{instruction}\n\n### Response:\n",
        "response_split": "### Response:",
    },
    "vicuna": {
        "description": "Vicuna v1.1 conversation style.",
        "prompt_input": ("A chat between a curious user and an artificial intelligence assistant. "
                         "USER: {instruction}\n{input} ASSISTANT: "),
        "prompt_no_input": ("A chat between a curious user and an artificial intelligence assistant. "
                            "USER: {instruction} ASSISTANT: "),
        "response_split": "ASSISTANT:",
    },
}


def load_template(name: str) -> dict[str, str]:
    """A built-in template by name, or a JSON file with the same keys."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        template = json.loads(path.read_text(encoding="utf-8"))
        missing = {"prompt_input", "prompt_no_input", "response_split"} - set(template)
        if missing:
            raise ValueError(f"--prompt_template_name {name!r}: template file lacks {sorted(missing)}")
        return template
    raise ValueError(f"--prompt_template_name {name!r}: unknown template; use one of {sorted(TEMPLATES)} "
                     f"or a .json file with prompt_input/prompt_no_input/response_split")


class Prompter:
    """Builds prompts from a template; ``template_name=None`` means no template (``--no_instruction``)."""

    def __init__(self, template_name: str | None = "alpaca"):
        self.template = None if template_name is None else load_template(template_name)

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        if self.template is None:
            text = f"{instruction}\n{input}\n" if input else f"{instruction}\n"
        elif input:
            text = self.template["prompt_input"].format(instruction=instruction, input=input)
        else:
            text = self.template["prompt_no_input"].format(instruction=instruction)
        return text + label if label else text

    def get_response(self, output: str) -> str:
        if self.template is None:
            return output
        return output.split(self.template["response_split"], 1)[-1].strip()
