"""Read GGUF files with per-layer shapes (llama.cpp's ``deci``, or ``llama`` with per-layer arrays).

transformers' GGUF reader knows neither the ``deci`` architecture nor per-layer arrays for
``attention.head_count`` / ``head_count_kv`` / ``feed_forward_length``, so these files are read here: the
metadata with the ``gguf`` package into a ``LlamaConfig``, every tensor dequantised to float32, q/k rows
turned back from llama.cpp's interleaved rotary layout to transformers' rotate-half one, and the model
built by ``model_from_state_dict`` (per-layer shapes on the meta device, then assigned). The tokenizer is
rebuilt by transformers' own GGUF tokenizer converter. Tensor names come from gguf-py's ``TensorNameMap``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from LLMPruner.checkpoint.build import CheckpointError, model_from_state_dict

logger = logging.getLogger(__name__)

PER_LAYER_KEYS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length")
UNPADDED_KEY = "llmpruner.feed_forward_length"  # MLP widths before LLMPruner's exporter padded them
READABLE = ("llama", "deci")


def has_per_layer_shapes(file: Path) -> bool:
    """Whether ``file`` needs this reader: architecture ``deci``, per-layer arrays in the metadata, or
    pruned heads (heads x head_dim != hidden size, which transformers' ``LlamaConfig`` refuses)."""
    import gguf
    try:
        reader = gguf.GGUFReader(file)
    except (ValueError, OSError):
        return False  # not a GGUF at all: transformers' reader reports it
    arch = gguf_field(reader, "general.architecture")
    if arch == "deci" or any(isinstance(gguf_field(reader, f"{arch}.{k}"), list) for k in PER_LAYER_KEYS):
        return True
    if gguf_field(reader, UNPADDED_KEY) is not None:
        return True
    heads = gguf_field(reader, f"{arch}.attention.head_count")
    head_dim = gguf_field(reader, f"{arch}.attention.key_length")
    hidden = gguf_field(reader, f"{arch}.embedding_length")
    return arch in READABLE and None not in (heads, head_dim, hidden) and heads * head_dim != hidden


def load_per_layer_gguf(file: Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a GGUF whose layers may each have their own shape."""
    import gguf
    reader = gguf.GGUFReader(file)
    arch = gguf_field(reader, "general.architecture")
    if arch not in READABLE:
        raise CheckpointError(f"{file}: GGUF architecture {arch!r} with per-layer shapes; readable: {READABLE}")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{file}: a rope_freqs tensor (Llama 3.1 RoPE scaling) is not read back here")
    unpadded = gguf_field(reader, UNPADDED_KEY)
    config = _config(reader, arch, tensors, unpadded)
    names = gguf_to_hf(config, arch)
    head_dim = config.head_dim
    state_dict = {}
    for gguf_name, t in tensors.items():
        hf_name = names.get(gguf_name)
        if hf_name is None:
            raise CheckpointError(f"{file}: tensor {gguf_name!r} has no transformers counterpart")
        data = dequantized(gguf_name, t.data, t.tensor_type, [int(d) for d in reversed(t.shape.tolist())], head_dim)
        if unpadded is not None and gguf_name.startswith("blk."):
            data = _unpad(gguf_name, data, unpadded[int(gguf_name.split(".")[1])])
        state_dict[hf_name] = data.to(dtype)
    model = model_from_state_dict(config, state_dict)
    logger.info("read %s (GGUF %r, per-layer shapes) into %s", file, arch, type(model).__name__)
    return model, _tokenizer(file)


ROTARY = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")


def dequantized(gguf_name: str, data: np.ndarray, qtype, shape: list[int], head_dim: int) -> torch.Tensor:
    """One GGUF tensor as transformers holds it: ``data`` (the reader's array) dequantised to float32 by
    gguf-py, in torch's ``shape``, q/k rows turned back from llama.cpp's interleaved rotary layout."""
    import gguf
    t = torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32)).reshape(shape)  # a writable copy
    return rotate_half_rows(t, head_dim) if gguf_name.endswith(ROTARY) else t


def gguf_field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def _unpad(gguf_name: str, data: torch.Tensor, width: int) -> torch.Tensor:
    """Drop the zero MLP channels the exporter appended (rows of gate/up, columns of down)."""
    if gguf_name.endswith(("ffn_gate.weight", "ffn_up.weight", "ffn_gate.bias", "ffn_up.bias")):
        kept, dropped = data[:width], data[width:]
    elif gguf_name.endswith("ffn_down.weight"):
        kept, dropped = data[:, :width], data[:, width:]
    else:
        return data
    if dropped.numel() and dropped.abs().max() != 0:
        raise CheckpointError(f"{gguf_name}: channels past {UNPADDED_KEY}={width} are not zero padding")
    return kept.contiguous()


def _config(reader, arch: str, tensors: dict, unpadded: list[int] | None = None):
    from transformers import LlamaConfig

    def key(name: str, default=None):
        value = gguf_field(reader, f"{arch}.{name}")
        return default if value is None else value

    n_layers = int(key("block_count"))
    hidden = int(key("embedding_length"))
    heads, kv, ffn = (key(k) for k in PER_LAYER_KEYS)
    kv = heads if kv is None else kv  # llama.cpp's default: as many KV heads as query heads
    ffn = unpadded if unpadded is not None else ffn
    heads, kv, ffn = ([int(x) for x in v] if isinstance(v, list) else [int(v)] * n_layers for v in (heads, kv, ffn))
    if min(heads) < 1 or min(kv) < 1 or min(ffn) < 1:
        raise CheckpointError("GGUF layers without attention or MLP (Nemotron-style) are not read back here: "
                              f"heads {heads}, kv heads {kv}, ffn {ffn}")
    head_dim = int(key("attention.key_length", hidden // heads[0]))
    rope = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    if key("rope.scaling.type") == "linear" and key("rope.scaling.factor"):
        rope = {**rope, "rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    tok = lambda k: gguf_field(reader, f"tokenizer.ggml.{k}")  # noqa: E731
    config = LlamaConfig(  # heads set below: LlamaConfig refuses hidden % heads != 0, which pruning makes
        vocab_size=int(key("vocab_size", len(tok("tokens") or []))), hidden_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=1, num_key_value_heads=1, head_dim=head_dim,
        intermediate_size=max(ffn), max_position_embeddings=int(key("context_length", 2048)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)), rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=any(n.endswith("attn_q.bias") for n in tensors),
        mlp_bias=any(n.endswith("ffn_up.bias") for n in tensors),
        bos_token_id=tok("bos_token_id"), eos_token_id=tok("eos_token_id"), pad_token_id=tok("padding_token_id"))
    config.num_attention_heads, config.num_key_value_heads = max(heads), max(kv)
    config.layer_shapes = [{"num_attention_heads": h, "num_key_value_heads": k, "intermediate_size": f}
                           for h, k, f in zip(heads, kv, ffn)]
    return config


def gguf_to_hf(config, arch: str) -> dict[str, str]:
    """GGUF tensor name -> transformers parameter name, for every parameter of the stock model."""
    import gguf
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    archs = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(archs[arch], config.num_hidden_layers)
    out = {}
    for hf_name in skeleton.state_dict():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            out.setdefault(gguf_name, hf_name)  # tied: token_embd is the embedding, not the LM head
    return out


def rotate_half_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of the exporter's ``_interleave_rotary``: rows [x0, y0, x1, y1, ...] -> [x0, x1, ..., y0, y1, ...]."""
    rest = w.shape[1:]
    return w.reshape(-1, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _tokenizer(file: Path):
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer
    _, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(file))
    backend, extra = convert_gguf_tokenizer("llama", tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**tokenizer_config, **extra})
