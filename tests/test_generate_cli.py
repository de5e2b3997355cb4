"""generate.py: the tokenizer's spacing is kept (issue 11 item 7), the reference's flags, the Gradio page."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from cli_helpers import run_cli, script
from conftest import need_shared, tiny_model
from LLMPruner.evaluate.generate import SamplingConfig, generate

GREEDY = SamplingConfig(max_new_tokens=6, do_sample=False)


def full_decode(model, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@pytest.mark.slow
def test_stories_tokenizers_keep_the_space_after_the_prompt():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    path = need_shared("models", "stories260K")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    fast = AutoTokenizer.from_pretrained(path)  # tokenizer.json
    spm = SentencePieceBackend(vocab_file=str(path / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>")  # tokenizer.model through sentencepiece itself
    for tokenizer in (fast, spm):
        out = generate(model, tokenizer, ["Once upon a time,"], GREEDY)[0]
        assert out.startswith(" there was a little"), (type(tokenizer).__name__, out)  # was "there was"
        assert "Once upon a time," + out == full_decode(model, tokenizer, "Once upon a time,")


def test_a_metaspace_tokenizers_json_tokenizer_keeps_word_spacing():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "once", "upon", "a", "time", "there", "was", "girl", "cat", "sun", "ran", "big"]
    backend = Tokenizer(models.WordLevel({f"\u2581{w}" if i else w: i for i, w in enumerate(words)},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    model = tiny_model(vocab_size=len(words))
    prompt = "once upon a time"
    out = generate(model, tokenizer, [prompt], GREEDY)[0]
    assert out.startswith(" ") and out.strip(), out  # the first new word comes after a space
    assert prompt + out == full_decode(model, tokenizer, prompt)


@pytest.mark.slow
def test_the_references_flags_pick_the_model(tmp_path):
    stories = str(need_shared("models", "stories260K"))
    status, out, err = run_cli("generate.py", ["--model_type", "pretrain", "--base_model", stories,
                                               "--prompt", "Once upon a time,", "--greedy", "--max_new_tokens", "5"])
    assert status == 0, err
    assert "Once upon a time, there was a little" in out
    parse = script("generate.py").parse_args
    args = parse(["--model_type", "pruneLLM", "--ckpt", stories])
    assert (args.model, args.lora, args.web) == (stories, None, True)  # the reference's generate.py is a web page
    args = parse(["--model_type", "tune_prune_LLM", "--ckpt", stories, "--lora_ckpt", str(tmp_path), "--prompt", "x"])
    assert (args.model, args.lora, args.web) == (stories, str(tmp_path), False)
    for argv, message in [(["--model_type", "pruneLLM", "--ckpt", stories, "--lora_ckpt", str(tmp_path)],
                           "--lora_ckpt"), (["--model", stories, "--model_type", "pretrain"], "give one of them"),
                          (["--model_type", "pretrain"], "needs --base_model")]:
        status, _, err = run_cli("generate.py", argv)
        assert status == 2 and message in err, err


@pytest.mark.slow
def test_the_web_page_answers_through_gradio(tmp_path):
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("gradio is not installed (optional: pip install -e .[ui])")
    from gradio_client import Client
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from LLMPruner.evaluate import webui
    path = need_shared("models", "stories260K")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    blocks, respond = webui.build_ui(model, tokenizer, "stories260K", GREEDY)
    expected = "Once upon a time," + generate(model, tokenizer, ["Once upon a time,"], GREEDY)[0]
    assert respond("Once upon a time,", 1.0, 0.95, 50, 6, True) == expected  # the button's function
    url = webui.launch(blocks, block=False)
    try:
        client = Client(url, verbose=False)
        assert client.predict("Once upon a time,", 1.0, 0.95, 50, 6, True, api_name="/generate") == expected
        assert client.predict("Once", 1.0, 0.95, 50, 3, False, api_name="/generate").startswith("Once")
    finally:
        blocks.close()
