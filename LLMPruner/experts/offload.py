"""Expert pruning of MoE checkpoints larger than the machine (``hf_prune.py --prune_experts N --offload``).

* **score** — the checkpoint is first copied under the model's own tensor names (``fused_copy``: experts
  fused ``[E, ...]``, converted one layer at a time by transformers itself), then opened with accelerate's
  placement (``device_map="auto"``: the device up to ``--max_memory``, then host memory, then a temporary
  folder on disk), so a forward pass streams what does not fit; the experts' scores come from the same hooks
  as in memory (``experts.expert_scores``). Loading the original names with disk offload would first gather
  every expert in host memory (transformers fuses them before it offloads).
* **shrink** — the checkpoint is rewritten tensor by tensor from its own safetensors files
  (``rewrite_checkpoint``); no model is built. On disk, experts are one tensor per expert
  (``...layers.L.mlp.experts.E.gate_proj.weight``: kept ones renumbered 0..n-1, the others dropped) or
  fused ``[E, ...]`` tensors (GPT-OSS, quantised blocks and scales included: sliced); the router's
  ``[E, ...]`` tensors in the same block (weight, bias, score-correction bias) are sliced. Attention, norms,
  embeddings and shared experts are copied as they are. The config's expert count is written back.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch

from LLMPruner.experts.core import ExpertPruningError, set_expert_count

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
INDEX = "model.safetensors.index.json"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PER_EXPERT = re.compile(r"^(?P<pre>.*(?:^|\.)layers\.(?P<layer>\d+)\.(?P<block>[^.]+)\.experts\.)(?P<e>\d+)"
                         r"(?P<post>\..+)$")
_SHARED = ("shared_expert", "shared_mlp")


def local_folder(name_or_path: str | Path) -> Path:
    """A local safetensors folder, or the Hub snapshot of a model id (its configs, tokenizer, weights)."""
    path = Path(name_or_path)
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise ExpertPruningError(f"--base_model {name_or_path}: --prune_experts --offload rewrites a safetensors "
                                     "checkpoint, and this folder holds no *.safetensors files")
        return path
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                      "*.jinja", "*.tiktoken"]))


def fused_copy(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """``src``'s checkpoint written under the model's own tensor names (experts fused ``[E, ...]``), one
    decoder layer at a time: each layer's tensors, with the embeddings, norm and head, go through transformers'
    own loading as a one-layer model of the same config, and that model's layer is saved. A checkpoint in
    these names loads with accelerate's disk offload without first gathering every expert in host memory.
    Host memory holds one layer and the outer tensors at a time; ``dst`` takes about the model's size."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(src)
    n_layers = config.num_hidden_layers
    where: dict[int | None, list[tuple[Path, str]]] = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                m = _LAYER.search(name)
                where.setdefault(int(m.group(1)) if m else None, []).append((path, name))
    outer = _read(where.get(None, []))
    dst.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for layer in range(n_layers):
        tensors = dict(outer)
        for name, t in _read(where.get(layer, [])).items():
            tensors[_LAYER.sub(lambda m: m.group(0).replace(f"layers.{layer}.", "layers.0."), name, count=1)] = t
        mini = dst / f".layer-{layer}"
        mini.mkdir(exist_ok=True)
        save_file(tensors, str(mini / "model.safetensors"), metadata={"format": "pt"})
        _one_layer_config(config, layer, moe=any(".experts." in n for _, n in where.get(layer, []))).save_pretrained(mini)
        model, info = AutoModelForCausalLM.from_pretrained(mini, dtype=dtype, output_loading_info=True)
        shutil.rmtree(mini)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:  # a tensor left at its random initialisation, or one the layer does not have
            raise ExpertPruningError(f"--offload: decoder layer {layer} did not load as a one-layer model of its "
                                     f"config ({bad}); prune this model in memory instead")
        out = {}
        for name, t in model.state_dict().items():
            m = _LAYER.search(name)
            if m:
                out[_LAYER.sub(lambda m: m.group(0).replace("layers.0.", f"layers.{layer}."), name, count=1)] = t
            elif layer == 0 and not (name == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)):
                out[name] = t
        file = f"model-layer-{layer:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in out.items()}, str(dst / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in out})
        del model, tensors, out
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}) + "\n")
    config.save_pretrained(dst)
    return dst


def _read(located: list[tuple[Path, str]]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    out = {}
    for path in sorted({p for p, _ in located}):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: f.get_tensor(name) for p, name in located if p == path})
    return out


def _one_layer_config(config, layer: int, moe: bool):
    """``config`` for a model of decoder layer ``layer`` alone: per-layer lists cut to its entry, and the
    settings that make some layers dense (``mlp_only_layers``, ``first_k_dense_replace``, ...) set so
    that layer 0 is sparse exactly when ``layer`` is."""
    import copy
    one = copy.deepcopy(config)
    n = config.num_hidden_layers
    for key, value in vars(config).items():
        if isinstance(value, list) and len(value) == n and key != "mlp_only_layers":
            setattr(one, key, [value[layer]])
    one.num_hidden_layers = 1
    if hasattr(one, "mlp_only_layers"):
        one.mlp_only_layers = [] if moe else [0]
    if hasattr(one, "decoder_sparse_step"):
        one.decoder_sparse_step = 1
    if hasattr(one, "first_k_dense_replace"):
        one.first_k_dense_replace = 0 if moe else 1
    if hasattr(one, "moe_layer_freq"):
        one.moe_layer_freq = 1
    return one


def open_offloaded(folder: Path, device: str, max_memory: int | None, dtype: torch.dtype, offload_dir: Path):
    """The model with accelerate's placement: ``device`` up to ``max_memory`` bytes, then host memory, then
    ``offload_dir`` on disk (one forward pass streams the disk-held layers in)."""
    from transformers import AutoModelForCausalLM
    dev = torch.device(device)
    budget = None if max_memory is None else {"cpu" if dev.type == "cpu" else (dev.index or 0): max_memory}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="auto", max_memory=budget,
                                                 offload_folder=str(offload_dir))
    return model.eval()


def placement(model) -> str:
    """Where accelerate put the model's modules, e.g. ``cpu, disk``."""
    return ", ".join(sorted({str(v) for v in getattr(model, "hf_device_map", {}).values()}))


FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def rewrite_checkpoint(src: Path, dst: Path, keep: dict[int, list[int]], n_experts: int,
                       dtype: torch.dtype | None = None) -> dict[str, int]:
    """Write ``src``'s checkpoint into ``dst`` with only experts ``keep[layer]`` in every MoE layer; returns
    ``{"params_before", "params_after", "tensors"}``. ``dtype`` (``--dtype``): float32/16 and bfloat16 tensors
    are written in it, as the in-memory run saves the model it loaded in that dtype; other tensors (quantised
    blocks, FP8, integer scales) keep theirs. Fails (naming the layer) when a MoE layer's experts
    or router were not found among the tensor names, so a layout this does not understand never passes."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.safetensors"))
    new_index = {int(layer): {e: i for i, e in enumerate(kept)} for layer, kept in keep.items()}
    blocks = _moe_blocks(files, set(new_index))
    seen = {layer: {"experts": 0, "router": 0} for layer in new_index}
    before = after = 0
    weight_map = {}
    for path in files:
        out = {}
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            for name in f.keys():
                tensor = f.get_tensor(name)
                before += tensor.numel()
                renamed = _rewrite(name, tensor, new_index, blocks, n_experts, seen)
                if renamed is None:
                    continue
                new_name, new_tensor = renamed
                if dtype is not None and new_tensor.dtype in FLOATS:
                    new_tensor = new_tensor.to(dtype)
                out[new_name] = new_tensor.contiguous()
                after += new_tensor.numel()
                weight_map[new_name] = path.name
        save_file(out, str(dst / path.name), metadata=metadata or {"format": "pt"})
        logger.info("rewrote %s (%d tensors)", path.name, len(out))
    missing = [f"layer {layer}: {kind}" for layer, found in seen.items() for kind, n in found.items() if n == 0]
    if missing:
        raise ExpertPruningError("--prune_experts --offload: the checkpoint's tensor names do not show where the "
                                 f"experts or the router are ({', '.join(missing)}); prune it in memory instead")
    if (src / INDEX).is_file():
        index = json.loads((src / INDEX).read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.setdefault("metadata", {})["total_size"] = sum((dst / p.name).stat().st_size for p in files)
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    _copy_other_files(src, dst)
    _write_config(src, dst, len(next(iter(keep.values()))))
    return {"params_before": before, "params_after": after, "tensors": len(weight_map)}


def _moe_blocks(files: list[Path], layers: set[int]) -> dict[int, str]:
    """``{layer: prefix of its MoE block}`` (e.g. ``model.layers.3.mlp.``), from where the experts are."""
    from safetensors import safe_open
    blocks = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if ".experts." not in name:
                    continue
                m = _LAYER.search(name)
                if m and int(m.group(1)) in layers and not any(s in name for s in _SHARED):
                    blocks.setdefault(int(m.group(1)), name[:name.index(".experts.") + 1])
    return blocks


def _rewrite(name: str, tensor: torch.Tensor, new_index: dict[int, dict[int, int]], blocks: dict[int, str],
             n_experts: int, seen: dict) -> tuple[str, torch.Tensor] | None:
    """The tensor's new name and value, or ``None`` when it belongs to a removed expert."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    if layer not in new_index or layer not in blocks or not name.startswith(blocks[layer]):
        return name, tensor
    rest = name[len(blocks[layer]):]
    kept = new_index[layer]
    per_expert = _PER_EXPERT.match(name)
    if per_expert and name.startswith(blocks[layer] + "experts."):
        seen[layer]["experts"] += 1
        e = int(per_expert.group("e"))
        return (f"{per_expert.group('pre')}{kept[e]}{per_expert.group('post')}", tensor) if e in kept else None
    if any(rest.startswith(s) for s in _SHARED) or tensor.dim() == 0 or tensor.shape[0] != n_experts:
        return name, tensor
    seen[layer]["experts" if rest.startswith("experts.") else "router"] += 1
    idx = torch.tensor(sorted(kept, key=kept.get), dtype=torch.long)
    return name, tensor.index_select(0, idx)


def _copy_other_files(src: Path, dst: Path) -> None:
    for path in src.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name not in (INDEX, "config.json") \
                and not (dst / path.name).exists():
            shutil.copy2(path, dst / path.name)


def _write_config(src: Path, dst: Path, n_new: int) -> None:
    config = json.loads((src / "config.json").read_text())
    set_expert_count(config, n_new, str(src / "config.json"))
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


