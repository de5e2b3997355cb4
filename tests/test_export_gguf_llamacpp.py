"""Exported GGUFs run in a real llama.cpp (llama-cpp-python): logits and greedy tokens match transformers.

llama-cpp-python builds llama.cpp from source; `.ci/run` installs it from a cached wheel or builds one.
Where it is not installed these tests skip, saying so. The KV cache is kept in f32 (llama.cpp's default
is f16) so that an f32 export is compared at 1e-3.
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from conftest import REPO, need_shared, tiny_model
from LLMPruner.checkpoint import load_model
from LLMPruner.export import export_gguf
from LLMPruner.prune import prune

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (.ci/run builds it)")

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"
GREEDY = 24


def open_llama(path, n_ctx: int = 256):
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False,
                           type_k=0, type_v=0, flash_attn=False)  # 0 = GGML_TYPE_F32 cache


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == n:
            return out
    return out


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def check_in_llama_cpp(model, ids: list[int], path, atol: float = 1e-3, greedy: int = GREEDY) -> float:
    llm = open_llama(path)
    try:
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        diff = float(np.abs(llama_logits(llm, ids) - expected).max())
        assert diff <= atol, f"llama.cpp vs transformers: max abs logit difference {diff}"
        if greedy:
            assert llama_greedy(llm, ids, greedy) == hf_greedy(model, ids, greedy)
        return diff
    finally:
        llm.close()


@pytest.fixture(scope="module")
def stories_text() -> str:
    return need_shared("data", "tinystories", "tinystories_val.txt").read_text(encoding="utf-8")[:3000]


@pytest.mark.parametrize("layers, arch", [(None, "llama"), (range(1, 4), "deci"), (range(0, 5), "llama")],
                         ids=["dense", "heterogeneous", "uniform"])
def test_stories260k_in_llama_cpp(tmp_path, stories_text, layers, arch):
    model, tok = load_model(need_shared("models", "stories260K"))
    if layers is not None:
        examples = tok(stories_text, return_tensors="pt").input_ids[:, :256].reshape(4, 64)
        prune(model, mode="block_wise", pruning_ratio=0.25, pruner_type="taylor", taylor="param_first",
              attention_layers=layers, mlp_layers=layers, examples=examples)
    out = export_gguf(model, tok, tmp_path / "m.gguf", outtype="f32")
    llm = open_llama(out)
    try:
        assert llm.metadata["general.architecture"] == arch
        for line in stories_text.splitlines()[:20]:  # llama.cpp's own tokenizer agrees with transformers'
            assert llm.tokenize(line.encode(), add_bos=False, special=False) == \
                tok(line, add_special_tokens=False).input_ids, line
    finally:
        llm.close()
    check_in_llama_cpp(model, tok(PROMPT).input_ids, out)


@pytest.mark.parametrize("outtype, atol", [("f16", 0.05), ("bf16", 0.3), ("q8_0", 0.5)])
def test_stories260k_outtypes_run(tmp_path, outtype, atol):
    model, tok = load_model(need_shared("models", "stories260K"))
    prune(model, mode="block_wise", pruning_ratio=0.25, pruner_type="l2", attention_layers=range(1, 4),
          mlp_layers=range(1, 4))
    out = export_gguf(model, tok, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    check_in_llama_cpp(model, tok(PROMPT).input_ids, out, atol=atol, greedy=0)


@pytest.mark.parametrize("model_type, layers, arch", [("mistral", range(1, 3), "deci"),
                                                      ("qwen2", range(1, 3), "deci"),
                                                      ("qwen2", range(0, 3), "llama"),
                                                      ("qwen3", range(0, 3), "qwen3")])
def test_other_families_in_llama_cpp(tmp_path, model_type, layers, arch):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(need_shared("models", "stories260K"))
    model = tiny_model(model_type, vocab_size=512, hidden_size=64, head_dim=16, num_attention_heads=4,
                       num_key_value_heads=2, tie_word_embeddings=model_type != "mistral")
    with torch.no_grad():  # logits of a useful size
        model.get_input_embeddings().weight.mul_(20)
    prune(model, mode="block_wise", pruning_ratio=0.5, pruner_type="l2", attention_layers=layers, mlp_layers=layers)
    out = export_gguf(model, tok, tmp_path / "m.gguf", outtype="f32")
    llm = open_llama(out)
    assert llm.metadata["general.architecture"] == arch
    llm.close()
    check_in_llama_cpp(model, tok(PROMPT).input_ids, out, greedy=8)


@pytest.mark.slow
def test_smollm2_minus_20_percent_in_llama_cpp(tmp_path):
    spec = importlib.util.spec_from_file_location("gguf_speed", REPO / "bench" / "gguf_speed.py")
    setting = importlib.util.module_from_spec(spec)
    import sys
    sys.path.insert(0, str(REPO / "bench"))
    spec.loader.exec_module(setting)  # SMOLLM2_MINUS_20: the one place the -20 % setting is written
    source = need_shared("models", "SmolLM2-135M-Instruct-Q4_1")
    model, tok = load_model(source, dtype=torch.float32)
    before = sum(p.numel() for p in model.parameters())
    calib = torch.tensor(json.loads(need_shared("data", "smollm2_protocol.json").read_text())["calib"])
    prune(model, examples=calib, **setting.SMOLLM2_MINUS_20)
    assert sum(p.numel() for p in model.parameters()) < 0.87 * before
    out = export_gguf(model, tok, tmp_path / "smol.gguf", outtype="f32")
    ids = tok("The capital of France is").input_ids
    check_in_llama_cpp(model, ids, out, greedy=16)
    llm = open_llama(out)
    try:  # the chat template travels, and llama.cpp tokenizes its special tokens like transformers
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                       add_generation_prompt=True)
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok(chat).input_ids
    finally:
        llm.close()
    import gguf
    ours, theirs = gguf.GGUFReader(out), gguf.GGUFReader(next(source.glob("*.gguf")))
    heads = ours.fields["deci.attention.head_count"].contents()
    ffn = ours.fields["deci.feed_forward_length"].contents()  # per layer (padded to multiples of 32)
    assert heads == [9] * 30  # the best setting prunes MLP channels only
    assert ffn[:4] == [1536] * 4 and ffn[-2:] == [1536] * 2 and max(ffn[4:28]) < 1536
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key  # as llama.cpp's converter
    back, _ = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(back(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits,
                                   atol=1e-5, rtol=0)
