"""Meta's original LLaMA checkpoint layout (``consolidated.NN.pth``, ``params.json``, ``tokenizer.model``).

``load_meta`` converts such a folder on load; ``save_meta`` exports a uniform model back (secondary).

Converted at the edge into a stock Hugging Face ``LlamaForCausalLM``: model-parallel shards are
concatenated along the dimension each weight was split on, and the rows of ``wq``/``wk`` are permuted
from Meta's interleaved rotary layout (pairs ``(0,1),(2,3),...``) to Hugging Face's half-split one.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from LLMPruner.checkpoint.build import CheckpointError, model_from_state_dict

logger = logging.getLogger(__name__)

#: Meta name suffix -> (Hugging Face name suffix, dim the model-parallel shards are split on; None: copies)
LAYER_KEYS = {"attention.wq.weight": ("self_attn.q_proj.weight", 0),
              "attention.wk.weight": ("self_attn.k_proj.weight", 0),
              "attention.wv.weight": ("self_attn.v_proj.weight", 0),
              "attention.wo.weight": ("self_attn.o_proj.weight", 1),
              "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
              "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
              "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
              "attention_norm.weight": ("input_layernorm.weight", None),
              "ffn_norm.weight": ("post_attention_layernorm.weight", None)}


def is_meta_folder(folder: Path) -> bool:
    return (folder / "params.json").is_file() and any(folder.glob("consolidated.*.pth"))


def load_meta(folder: str | Path, dtype: torch.dtype | str = "auto"):
    """``(model, tokenizer)`` from a folder in Meta's layout; ``dtype="auto"`` keeps the saved dtype."""
    folder = Path(folder)
    params = json.loads((folder / "params.json").read_text())
    if params.get("use_scaled_rope"):
        raise CheckpointError(f"{folder}/params.json: use_scaled_rope (Llama 3.1 rope scaling) is not "
                              "supported by this converter; convert with transformers' script instead")
    paths = sorted(folder.glob("consolidated.*.pth"))
    shards = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in paths]
    logger.info("converting Meta checkpoint %s (%d shard(s))", folder, len(shards))
    state_dict, config = convert_meta(shards, params)
    model = model_from_state_dict(config, state_dict)
    if dtype != "auto":
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model, _meta_tokenizer(folder)


def convert_meta(shards: list[dict[str, torch.Tensor]], params: dict):
    """Hugging Face ``(state_dict, LlamaConfig)`` from Meta shards and their ``params.json``."""
    from transformers import LlamaConfig
    dim, n_heads, n_layers = params["dim"], params["n_heads"], params["n_layers"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim = dim // n_heads
    embed_split = 1 if shards[0].get("tok_embeddings.weight", torch.empty(0, dim)).shape[1] != dim else 0
    embed = _concat(shards, "tok_embeddings.weight", embed_split)  # LLaMA 1/2 split columns, 3 rows
    out = {"model.embed_tokens.weight": embed, "model.norm.weight": _concat(shards, "norm.weight", None),
           "lm_head.weight": _concat(shards, "output.weight", 0)}
    for i in range(n_layers):
        layer = {hf_key: _concat(shards, f"layers.{i}.{meta_key}", split)
                 for meta_key, (hf_key, split) in LAYER_KEYS.items()}
        layer["self_attn.q_proj.weight"] = unpermute(layer["self_attn.q_proj.weight"], n_heads)
        layer["self_attn.k_proj.weight"] = unpermute(layer["self_attn.k_proj.weight"], n_kv)
        assert layer["self_attn.q_proj.weight"].shape == (n_heads * head_dim, dim), (i, params)
        assert layer["self_attn.k_proj.weight"].shape == (n_kv * head_dim, dim), (i, params)
        out.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
    vocab = embed.shape[0]
    assert embed.shape == (vocab, dim), (embed.shape, vocab, dim)
    tied = torch.equal(out["lm_head.weight"], embed)
    if tied:
        del out["lm_head.weight"]
    config = LlamaConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=n_layers,
                         num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
                         intermediate_size=out["model.layers.0.mlp.gate_proj.weight"].shape[0],
                         rms_norm_eps=params.get("norm_eps", 1e-5), tie_word_embeddings=tied,
                         max_position_embeddings=params.get("max_seq_len", 2048), bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": params.get("rope_theta", 10000.0)})
    return out, config


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rotary rows -> Hugging Face's: per head, rows (0,2,4,..,1,3,5,..)."""
    rows, cols = w.shape  # [n_heads * head_dim, in]
    assert rows % (2 * n_heads) == 0, (w.shape, n_heads)
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face rotary rows -> Meta's interleaved ones (the inverse of ``unpermute``)."""
    rows, cols = w.shape  # [n_heads * head_dim, in]
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def save_meta(model, folder: str | Path) -> Path:
    """Write a uniform LLaMA model as one ``consolidated.00.pth`` + ``params.json`` (no tokenizer: copy
    the base model's ``tokenizer.model`` beside it). Heterogeneous layers have no Meta equivalent."""
    config = model.config
    if getattr(config, "layer_shapes", None):
        raise CheckpointError("save_meta: layers of different shapes cannot be written in Meta's layout "
                              "(params.json has one n_heads/n_kv_heads/MLP width for all layers)")
    if config.model_type != "llama" or config.head_dim * config.num_attention_heads != config.hidden_size:
        raise CheckpointError(f"save_meta: needs a llama model with hidden_size == heads * head_dim; got "
                              f"model_type={config.model_type!r}, hidden {config.hidden_size}, "
                              f"{config.num_attention_heads} x {config.head_dim}")
    hf = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    out = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
           "output.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
    for i in range(config.num_hidden_layers):
        for meta_key, (hf_key, _) in LAYER_KEYS.items():
            out[f"layers.{i}.{meta_key}"] = hf[f"model.layers.{i}.{hf_key}"]
        out[f"layers.{i}.attention.wq.weight"] = permute(out[f"layers.{i}.attention.wq.weight"],
                                                          config.num_attention_heads)
        out[f"layers.{i}.attention.wk.weight"] = permute(out[f"layers.{i}.attention.wk.weight"],
                                                          config.num_key_value_heads)
    params = {"dim": config.hidden_size, "n_heads": config.num_attention_heads,
              "n_kv_heads": config.num_key_value_heads, "n_layers": config.num_hidden_layers,
              "norm_eps": config.rms_norm_eps, "vocab_size": config.vocab_size,
              "rope_theta": (config.rope_parameters or {}).get("rope_theta", 10000.0)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.clone() for k, v in out.items()}, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    return folder


def _concat(shards: list[dict], key: str, dim: int | None) -> torch.Tensor:
    """``key`` joined across model-parallel shards along ``dim`` (``None``: replicated, take shard 0)."""
    missing = [i for i, s in enumerate(shards) if key not in s]
    if missing:
        raise CheckpointError(f"Meta checkpoint: tensor {key!r} missing from shard(s) {missing}")
    if len(shards) == 1 or dim is None:
        return shards[0][key]
    return torch.cat([s[key] for s in shards], dim=dim)


def _meta_tokenizer(folder: Path):
    """Meta's SentencePiece BPE model as a Hugging Face ``LlamaTokenizer`` (no protobuf needed)."""
    import sentencepiece
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges
    path = folder / "tokenizer.model"
    if not path.is_file():
        logger.warning("%s has no tokenizer.model: returning no tokenizer", folder)
        return None
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    scores = {piece: sp.get_score(i) for i, piece in enumerate(pieces)}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), add_bos_token=True)
    tokenizer.update_post_processor()  # so that BOS is prepended, as Meta's generate() does
    return tokenizer


__all__ = ["convert_meta", "is_meta_folder", "load_meta", "permute", "save_meta", "unpermute"]
