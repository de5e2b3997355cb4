"""A GGUF file as a weight source for ``--offload``: one tensor dequantised at a time.

Without it, a ``.gguf`` ``--base_model`` is dequantised whole onto the CPU (transformers' GGUF loader) and
streamed from that copy, so the host must hold the model in float32 (or ``--dtype``): 280 GB for a 70B
model whose Q4 file is 40 GB. ``GGUFSource`` instead reads each tensor's bytes from the file when its layer
is loaded (``readinto`` at the offset gguf-py's reader gives, not through the reader's memory map, for the
reason ``SafetensorsSource`` gives), dequantises them with gguf-py (as transformers does), turns the q/k
rows back from llama.cpp's interleaved rotary layout, and names them as the stock model does
(``checkpoint.gguf_layers``' map). The config and tokenizer come from transformers' GGUF reader, which reads
only the metadata for them. Uniform ``llama``-architecture files only (what the skeleton can hold); others
keep the whole-model path.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from LLMPruner.checkpoint.build import CheckpointError
from LLMPruner.checkpoint.gguf_layers import dequantized, gguf_field, gguf_to_hf
from LLMPruner.stream.weights import WeightSource

logger = logging.getLogger(__name__)

class GGUFSource(WeightSource):
    """The tensors of a uniform ``llama`` GGUF ``file`` by the stock model's parameter names, each read and
    dequantised to float32 when asked for; ``config`` (transformers' reading of the file) says their names."""

    def __init__(self, file: str | Path, config) -> None:
        import gguf
        self.file, self.config = Path(file), config
        reader = gguf.GGUFReader(self.file)
        arch = gguf_field(reader, "general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{self.file}: GGUF architecture {arch!r} is not streamed (llama only)")
        names = gguf_to_hf(config, arch)
        unknown = [t.name for t in reader.tensors if t.name not in names]
        if unknown:
            raise CheckpointError(f"{self.file}: tensors {unknown[:3]} have no transformers counterpart here")
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # per tensor: (GGUF name, quantisation type, the reader's array dtype and shape, byte offset, bytes,
        # the tensor's shape in torch order)
        self._where = {names[t.name]: (t.name, t.tensor_type, t.data.dtype, tuple(t.data.shape), int(t.data_offset),
                                       int(t.n_bytes), [int(d) for d in reversed(t.shape.tolist())])
                       for t in reader.tensors}
        del reader  # drops the reader's memory map

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        gguf_name, qtype, dtype, shape, offset, nbytes, torch_shape = self._where[name]
        raw = np.empty(nbytes, dtype=np.uint8)
        with open(self.file, "rb") as fh:
            fh.seek(offset)
            got = fh.readinto(memoryview(raw))
        if got != nbytes:
            raise CheckpointError(f"{self.file}: tensor {gguf_name!r} truncated ({got} of {nbytes} bytes)")
        return dequantized(gguf_name, raw.view(dtype).reshape(shape), qtype, torch_shape, self.head_dim)


def open_gguf(file: Path):
    """``(GGUFSource, tokenizer, config)`` for a uniform llama GGUF, or ``None`` (the whole-model path)."""
    from transformers import AutoConfig, AutoTokenizer
    from LLMPruner.checkpoint.gguf_layers import has_per_layer_shapes
    if has_per_layer_shapes(file):
        return None
    config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    if getattr(config, "model_type", None) != "llama" or getattr(config, "layer_shapes", None):
        return None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(file)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    source = GGUFSource(file, config)
    logger.info("--offload: streaming %s (GGUF) one tensor at a time, dequantised to float32", file)
    return source, tokenizer, config
