"""Write a (pruned) LLaMA-family model as a GGUF file that llama.cpp runs, per-layer shapes included.

    from LLMPruner.export import export_gguf
    export_gguf(model, tokenizer, "pruned.gguf", outtype="q8_0")

The writer is the ``gguf`` package (llama.cpp's own gguf-py). Tensor names come from its
``TensorNameMap`` (Hugging Face name -> ``blk.N.attn_q.weight``), so no module name is spelled here.
What is written, following llama.cpp's ``convert_hf_to_gguf.py``:

- the architecture chosen in ``gguf_arch`` (``llama`` for uniform layers, ``deci`` for per-layer
  shapes) and ``{arch}.attention.head_count`` / ``head_count_kv`` / ``feed_forward_length`` as one
  number or one per layer; ``attention.key_length`` = ``value_length`` = ``rope.dimension_count`` =
  head_dim (pruned heads make hidden/heads wrong);
- q/k rows permuted per head from transformers' rotate-half layout to llama.cpp's interleaved one;
- no ``output.weight`` when the embeddings are tied (llama.cpp reuses ``token_embd``);
- RoPE theta and scaling (``linear``; ``llama3`` as the ``rope_freqs`` tensor), RMSNorm epsilon,
  the context length, the tokenizer and chat template (``gguf_vocab``).

``outtype``: ``f32`` (exact), ``f16``, ``bf16``, ``q8_0``; vectors (norms, biases) stay f32, and a
matrix whose rows are not a multiple of 32 falls back from q8_0 to f16, as in llama.cpp.

``pad_to`` (default 32): MLP widths are padded with zero channels to a multiple of it (zero rows of
gate/up, zero columns of down: silu(0) * 0 adds exactly nothing). Pruning leaves widths such as 1139;
llama.cpp's fast CPU matrix kernels need the inner dimension to be a multiple of 8-32 and q8_0 blocks
are 32 wide, so without padding the pruned model runs slower than the dense one (bench/gguf_speed.py).
``pad_to=1`` writes the pruned shapes as they are. The unpadded widths are recorded under
``llmpruner.feed_forward_length``, and ``load_model("x.gguf")`` drops the zero channels again.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
import torch.nn as nn

from LLMPruner.adapters import get_adapter
from LLMPruner.checkpoint.build import tied_keys
from LLMPruner.structure import ModelStructure
from LLMPruner.export.gguf_arch import GGUFExportError, Target, choose_target
from LLMPruner.export.gguf_vocab import add_tokenizer

logger = logging.getLogger(__name__)

OutType = Literal["f32", "f16", "bf16", "q8_0"]
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
QK = (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K)
UNPADDED_KEY = "llmpruner.feed_forward_length"  # per layer, before --pad_to (llama.cpp ignores it)


def export_gguf(model: nn.Module, tokenizer, outfile: str | Path, *, outtype: OutType = "f32",
                tokenizer_pre: str | None = None, name: str | None = None, pad_to: int = 32) -> Path:
    """Write ``model`` and ``tokenizer`` to ``outfile`` (atomically: a temporary file, then renamed)."""
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"--outtype {outtype!r}: choose one of {sorted(OUTTYPES)}")
    if not isinstance(pad_to, int) or pad_to < 1:
        raise GGUFExportError(f"--pad_to {pad_to!r}: must be a positive integer (1: no padding)")
    pruned = get_adapter(model).read_structure(model)
    structure = _padded(pruned, pad_to)
    config = model.config
    arch, target = choose_target(config.model_type, structure.is_uniform())
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = outfile.with_name(f".{outfile.name}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        vocab_size = model.get_input_embeddings().weight.shape[0]
        _add_hparams(writer, config, structure, vocab_size, OUTTYPES[outtype][1], name)
        if structure != pruned:  # the widths before padding, so that a reader can drop the zeros again
            writer.add_array(UNPADDED_KEY, [s.intermediate_size for s in pruned.layers])
        add_tokenizer(writer, tokenizer, vocab_size, tokenizer_pre=tokenizer_pre)
        n_tensors = _add_tensors(writer, model, arch, target, structure, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, outfile)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s: llama.cpp architecture %r, %s, %d tensors, %d layers (%s)", outfile, arch, outtype,
                n_tensors, structure.num_hidden_layers, "uniform" if structure.is_uniform() else "per-layer shapes")
    return outfile


def _add_hparams(writer: gguf.GGUFWriter, config, structure: ModelStructure, vocab_size: int,
                 file_type: gguf.LlamaFileType, name: str | None) -> None:
    layers = structure.layers
    assert layers and all(s.num_attention_heads > 0 and s.num_key_value_heads > 0 and s.intermediate_size > 0
                          for s in layers), f"every layer keeps heads and MLP channels: {structure.describe()}"

    def per_layer(key: str) -> int | list[int]:
        values = [getattr(s, key) for s in layers]
        return values[0] if structure.is_uniform() else values

    writer.add_name(name or Path(str(getattr(config, "name_or_path", "") or "model")).name or "model")
    writer.add_block_count(structure.num_hidden_layers)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(structure.hidden_size)
    writer.add_feed_forward_length(per_layer("intermediate_size"))
    writer.add_head_count(per_layer("num_attention_heads"))
    writer.add_head_count_kv(per_layer("num_key_value_heads"))
    writer.add_key_length(structure.head_dim)
    writer.add_value_length(structure.head_dim)
    writer.add_rope_dimension_count(structure.head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", "llama3"):
        raise GGUFExportError(f"rope_type {kind!r}: the GGUF exporter writes default, linear and llama3 RoPE")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        logger.warning("sliding_window=%d is not written: llama.cpp's llama/deci attend to the whole context, "
                       "so outputs differ beyond %d tokens", window, window)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_parameters(config) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def _padded(structure: ModelStructure, pad_to: int) -> ModelStructure:
    """The structure written: MLP widths rounded up to a multiple of ``pad_to``."""
    layers = [replace(s, intermediate_size=-(-s.intermediate_size // pad_to) * pad_to) for s in structure.layers]
    return ModelStructure(hidden_size=structure.hidden_size, head_dim=structure.head_dim, layers=layers)


def _pad_mlp(data: torch.Tensor, kind: gguf.MODEL_TENSOR, width: int) -> torch.Tensor:
    """Zero channels appended: rows of gate/up (and their biases), columns of down."""
    if kind in (gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP) and data.shape[0] < width:
        return torch.cat([data, data.new_zeros(width - data.shape[0], *data.shape[1:])], dim=0)
    if kind == gguf.MODEL_TENSOR.FFN_DOWN and data.ndim == 2 and data.shape[1] < width:
        return torch.cat([data, data.new_zeros(data.shape[0], width - data.shape[1])], dim=1)
    return data


def _add_tensors(writer: gguf.GGUFWriter, model: nn.Module, arch: str, target: Target,
                 structure: ModelStructure, outtype: str) -> int:
    config = model.config
    head_dim = structure.head_dim
    n_layers = len(get_adapter(model).decoder_layers(model))
    names = gguf.get_tensor_name_map(ARCH_BY_NAME[arch], n_layers)
    skip = set(tied_keys(model)) if getattr(config, "tie_word_embeddings", False) else set()
    count = 0
    for hf_name, tensor in model.state_dict().items():
        if hf_name in skip:
            continue
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise GGUFExportError(f"tensor {hf_name!r} of model_type {config.model_type!r} has no llama.cpp "
                                  f"{arch!r} counterpart; keep the safetensors folder")
        kind, gguf_name = found
        data = tensor.detach().to(torch.float32).cpu()
        if target.permute_qk and kind in QK:
            data = _interleave_rotary(data, head_dim)
        layer = _layer_index(gguf_name)
        if layer is not None:
            data = _pad_mlp(data, kind, structure.layers[layer].intermediate_size)
        _add_one(writer, gguf_name, data.numpy(), outtype)
        count += 1
    rope = _rope_parameters(config)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          _llama3_rope_factors(rope, head_dim))
        count += 1
    return count


def _layer_index(gguf_name: str) -> int | None:
    """``blk.12.ffn_up.weight`` -> 12."""
    parts = gguf_name.split(".")
    return int(parts[1]) if parts[0] == "blk" else None


def _interleave_rotary(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from [x_0..x_{d/2-1}, y_0..y_{d/2-1}] (rotate-half) to [x_0, y_0, x_1, y_1, ...].

    E.g. head_dim 4, one head, rows r0 r1 r2 r3 -> r0 r2 r1 r3. Works on weights [rows, in] and biases [rows].
    """
    assert w.shape[0] % head_dim == 0 and head_dim % 2 == 0, (tuple(w.shape), head_dim)
    rest = w.shape[1:]
    return w.reshape(-1, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def _add_one(writer: gguf.GGUFWriter, name: str, data: np.ndarray, outtype: str) -> None:
    qtype = OUTTYPES[outtype][0]
    if data.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        return
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        logger.info("%s: rows of %d values are not a multiple of 32; written as f16", name, data.shape[-1])
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
        return
    writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """Llama 3.1's per-frequency RoPE divisors (what transformers' ``llama3`` rope type applies)."""
    base = float(rope.get("rope_theta", 500000.0))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
