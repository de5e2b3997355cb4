"""A small Gradio page to chat with a base, pruned or pruned+LoRA model (``generate.py --web``).

Gradio is optional (``pip install -e .[ui]``); only this module imports it. ``build_ui`` returns the
``gr.Blocks`` and the function behind its button, so a test (or a notebook) can call either.
"""
from __future__ import annotations

import logging
from LLMPruner.evaluate.generate import SamplingConfig, generate

logger = logging.getLogger(__name__)


def _gradio():
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError("the web UI needs gradio: pip install 'gradio>=4' (or pip install -e .[ui])") from err
    return gr


def build_ui(model, tokenizer, description: str = "", defaults: SamplingConfig = SamplingConfig()):
    """``(blocks, respond)``: the page, and ``respond(prompt, temperature, top_p, top_k, max_new_tokens,
    greedy) -> prompt + continuation`` (also served as the API endpoint ``/generate``)."""
    gr = _gradio()

    def respond(prompt: str, temperature: float, top_p: float, top_k: int, max_new_tokens: int,
                greedy: bool) -> str:
        try:
            sampling = SamplingConfig(max_new_tokens=int(max_new_tokens), do_sample=not greedy,
                                      temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                      repetition_penalty=defaults.repetition_penalty, seed=defaults.seed)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return prompt + generate(model, tokenizer, [prompt], sampling)[0]

    with gr.Blocks(title="LLMPruner: generate") as blocks:
        gr.Markdown(f"## Generate with a pruned model\n{description}")
        prompt = gr.Textbox(lines=2, label="Input", placeholder="Once upon a time")
        with gr.Row():
            temperature = gr.Slider(0.05, 2.0, value=defaults.temperature, label="Temperature")
            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, label="Top p")
            top_k = gr.Slider(0, 100, step=1, value=defaults.top_k, label="Top k")
            max_new = gr.Slider(1, 2000, step=1, value=defaults.max_new_tokens, label="Max new tokens")
            greedy = gr.Checkbox(value=not defaults.do_sample, label="Greedy")
        output = gr.Textbox(lines=8, label="Output")
        button = gr.Button("Generate", variant="primary")
        inputs = [prompt, temperature, top_p, top_k, max_new, greedy]
        button.click(respond, inputs, output, api_name="generate")
        prompt.submit(respond, inputs, output)
    return blocks, respond


def launch(blocks, server_name: str = "127.0.0.1", server_port: int | None = None, share: bool = False,
           block: bool = True) -> str:
    """Serve ``blocks``; returns the local URL (``block=False`` returns at once, for tests)."""
    blocks.queue()
    _, url, _ = blocks.launch(server_name=server_name, server_port=server_port, share=share,
                              prevent_thread_lock=not block, quiet=not block)
    logger.info("web UI at %s", url)
    return url

