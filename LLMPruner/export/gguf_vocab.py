"""The tokenizer as llama.cpp reads it: ``tokenizer.ggml.*`` keys and the chat template.

Two kinds of Hugging Face ``tokenizer.json`` are written (what llama.cpp's ``convert_hf_to_gguf.py``
does, read from its ``_set_vocab_gpt2`` / ``_set_vocab_llama_hf``):

- byte-level BPE (GPT-2 style, SmolLM2, Llama 3, Qwen2): ``tokenizer.ggml.model = "gpt2"``, the tokens,
  their types, the merges, and ``tokenizer.ggml.pre``, the pre-tokenizer llama.cpp must use. llama.cpp
  recognises a pre-tokenizer by the SHA-256 of the token ids of one fixed text (``CHECK_TEXT``); the few
  hashes below are taken from its table. Others need ``tokenizer_pre=`` (``--tokenizer_pre``).
- SentencePiece-style BPE with byte fallback (LLaMA 1/2, Mistral, stories260K):
  ``tokenizer.ggml.model = "llama"``. llama.cpp merges the adjacent pair whose joined token has the
  highest score, so each token scores minus the rank of the first merge producing it.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
from hashlib import sha256
from pathlib import Path

import gguf

from LLMPruner.export.gguf_arch import GGUFExportError

logger = logging.getLogger(__name__)

CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
              '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')

#: SHA-256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp pre-tokenizer (from its convert_hf_to_gguf)
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",      # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",   # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",   # Llama 3 variants
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",       # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",       # Qwen3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",       # GPT-2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",      # Mistral Nemo
}


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, *, tokenizer_pre: str | None = None) -> None:
    """Write ``tokenizer`` (a transformers tokenizer) into ``writer``; ``vocab_size`` rows of the embedding."""
    with tempfile.TemporaryDirectory(prefix="llmpruner-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp)
        if not (path / "tokenizer.json").is_file():
            raise GGUFExportError(f"tokenizer {type(tokenizer).__name__}: no tokenizer.json to export (the GGUF "
                                  "exporter needs a fast tokenizer)")
        spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        model = spec.get("model", {})
        spm = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
        tokens, types = _tokens_and_types(tokenizer, vocab_size, spm=spm)
        if spm:
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_add_space_prefix(_adds_space_prefix(spec))
            writer.add_token_list(tokens)
            writer.add_token_scores(_spm_scores(tokens, model.get("merges") or []))
            writer.add_token_types(types)
            special = gguf.SpecialVocab(path, load_merges=False, n_vocab=vocab_size)
        elif model.get("type") == "BPE":
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(tokenizer_pre or _pre_tokenizer(tokenizer))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(path, load_merges=True, n_vocab=vocab_size)
        else:
            raise GGUFExportError(f"tokenizer model {model.get('type')!r}: the GGUF exporter writes BPE "
                                  "tokenizers (byte-level or with byte fallback) only")
        special.chat_template = getattr(tokenizer, "chat_template", None) or special.chat_template
        special.add_to_gguf(writer, quiet=True)


def _tokens_and_types(tokenizer, vocab_size: int, spm: bool) -> tuple[list[str], list[int]]:
    """Token strings by id and their llama.cpp types (as convert_hf_to_gguf's ``get_vocab_base``; a
    SentencePiece-style vocabulary also marks its unknown token)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    unk = getattr(tokenizer, "unk_token_id", None) if spm else None
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if i in added:
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
            if i == unk:
                kind = gguf.TokenType.UNKNOWN
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(token)
        types.append(kind)
    return tokens, types


def _spm_scores(tokens: list[str], merges: list) -> list[float]:
    """Score of each token: minus the rank of the first merge that yields it (0 for base pieces)."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    return [-float(rank.get(t, 0)) if t in rank else 0.0 for t in tokens]


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer prepends '▁' to the text (Metaspace 'first'/'always', or a Prepend normalizer)."""
    blob = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")])
    if '"Metaspace"' in blob:
        return '"prepend_scheme": "never"' not in blob and '"add_prefix_space": false' not in blob
    return '"Prepend"' in blob


def _pre_tokenizer(tokenizer) -> str:
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    pre = KNOWN_PRE.get(digest)
    if pre is None:
        raise GGUFExportError(f"tokenizer pre-tokenizer hash {digest} is not one the exporter knows "
                              f"({sorted(set(KNOWN_PRE.values()))}); pass --tokenizer_pre NAME with the name "
                              "llama.cpp's convert_hf_to_gguf.py gives this tokenizer")
    logger.info("tokenizer pre-tokenizer: %s", pre)
    return pre
