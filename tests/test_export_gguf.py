"""GGUF export without llama.cpp: layout helpers, metadata, out types, errors, round trips, the CLIs.

The same files run in a real llama.cpp in tests/test_export_gguf_llamacpp.py.
"""
from __future__ import annotations

import json

import subprocess
import sys

import gguf
import pytest
import torch

from conftest import REPO, need_shared, tiny_model
from LLMPruner.checkpoint import load_model, save_pruned
from LLMPruner.checkpoint.gguf_layers import rotate_half_rows
from LLMPruner.export import GGUFExportError, choose_target, export_gguf
from LLMPruner.export.gguf_out import _interleave_rotary
from LLMPruner.prune import prune
from tolerance import assert_paths_agree

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"
LAYOUTS = {"heterogeneous": range(1, 4), "uniform": range(0, 5)}  # stories260K: 5 layers


def pruned_stories(layers: range | None):
    model, tok = load_model(need_shared("models", "stories260K"))
    if layers is not None:
        prune(model, mode="block_wise", pruning_ratio=0.25, pruner_type="l2", attention_layers=layers,
              mlp_layers=layers)
    return model, tok


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}, reader


def test_rotary_rows_hand_computed():
    rows = torch.arange(8.0).reshape(8, 1)  # two heads of head_dim 4
    assert _interleave_rotary(rows, 4).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = torch.randn(12, 5)
    assert torch.equal(rotate_half_rows(_interleave_rotary(w, 6), 6), w)
    assert torch.equal(_interleave_rotary(torch.arange(4.0), 4), torch.tensor([0.0, 2, 1, 3]))  # biases


def test_architecture_table_and_fallbacks():
    assert choose_target("llama", uniform=True)[0] == "llama"
    assert choose_target("llama", uniform=False)[0] == "deci"
    assert choose_target("qwen2", uniform=False)[0] == "deci"
    with pytest.raises(GGUFExportError, match=r"'qwen3' with per-layer shapes.*prune uniformly.*safetensors"):
        choose_target("qwen3", uniform=False)
    with pytest.raises(GGUFExportError, match=r"'gemma'.*prune uniformly.*safetensors"):
        choose_target("gemma", uniform=False)
    with pytest.raises(GGUFExportError, match=r"'opt'.*convert_hf_to_gguf\.py"):
        choose_target("opt", uniform=True)


def test_unsupported_model_is_refused_before_writing(tmp_path, stories_path):
    from transformers import AutoTokenizer
    model = tiny_model("opt", vocab_size=512, hidden_size=32, ffn_dim=48, num_attention_heads=4)
    out = tmp_path / "opt.gguf"
    with pytest.raises(GGUFExportError, match="'opt'"):
        export_gguf(model, AutoTokenizer.from_pretrained(stories_path), out)
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(GGUFExportError, match="--outtype 'q4_k'"):
        export_gguf(tiny_model(), None, out, outtype="q4_k")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_metadata_and_f32_round_trip(tmp_path, layout):
    model, tok = pruned_stories(LAYOUTS[layout])
    s = model.config  # after pruning the adapter keeps the config true to the weights
    out = export_gguf(model, tok, tmp_path / "m.gguf", outtype="f32")
    meta, reader = fields(out)
    arch = meta["general.architecture"]
    assert arch == ("deci" if layout == "heterogeneous" else "llama")
    heads = [6 if 1 <= i < 4 else 8 for i in range(5)] if layout == "heterogeneous" else 6
    assert meta[f"{arch}.attention.head_count"] == heads
    assert meta[f"{arch}.attention.head_count_kv"] == ([h // 2 for h in heads] if isinstance(heads, list) else 3)
    widths = [192, 160, 160, 160, 192] if layout == "heterogeneous" else 160  # 172 / 129 padded to 32s
    assert meta[f"{arch}.feed_forward_length"] == widths
    assert meta[f"{arch}.attention.key_length"] == meta[f"{arch}.rope.dimension_count"] == 8
    assert meta[f"{arch}.embedding_length"] == 64 and meta[f"{arch}.block_count"] == 5
    assert meta[f"{arch}.rope.freq_base"] == s.rope_parameters["rope_theta"]
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(s.rms_norm_eps)
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # tied embeddings
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    # 1e-5: the file read back (LLMPruner's reader: transformers reads neither 'deci' nor 6 heads x 8 != 64)
    back, back_tok = load_model(out)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert back_tok(PROMPT, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        assert_paths_agree(back(ids).logits, model(ids).logits)
    shapes = getattr(back.config, "layer_shapes", None)
    # uniform layers may still carry layer_shapes: 6 heads do not divide hidden 64, so the config keeps
    # placeholder head counts and the real ones per layer (LLMPruner.adapters.base.constructible_heads)
    assert (shapes is not None and len({json.dumps(x, sort_keys=True) for x in shapes}) > 1) == \
        (layout == "heterogeneous")
    # the zero channels of the padding are dropped again: the pruned widths come back
    assert [l.mlp.down_proj.in_features for l in back.model.layers] == \
        [l.mlp.down_proj.in_features for l in model.model.layers]


def test_dense_round_trip_through_transformers_reader(tmp_path):
    model, tok = pruned_stories(None)
    out = export_gguf(model, tok, tmp_path / "dense.gguf", outtype="f32", pad_to=1)
    meta, _ = fields(out)
    assert meta["general.architecture"] == "llama" and meta["llama.attention.head_count"] == 8
    assert "llmpruner.feed_forward_length" not in meta
    back, _ = load_model(out)  # 8 heads x 8 == 64, nothing padded: stock transformers' GGUF reader
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert_paths_agree(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize("outtype, matrix_type, tol", [("f16", "F16", 0.05), ("bf16", "BF16", 0.3),
                                                       ("q8_0", "Q8_0", 0.6)])
def test_outtypes_write_valid_files(tmp_path, outtype, matrix_type, tol):
    model, tok = pruned_stories(LAYOUTS["heterogeneous"])
    out = export_gguf(model, tok, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    meta, reader = fields(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"  # vectors stay f32
    assert types["blk.1.attn_q.weight"] == types["blk.1.ffn_down.weight"] == matrix_type  # padded: 160
    expected = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    assert meta["general.file_type"] == expected
    back, _ = load_model(out)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (back(ids).logits - model(ids).logits).abs().max().item()
    assert 0 < diff < tol, diff  # rounded, and still the same model


def test_unpadded_widths_are_written_as_pruned(tmp_path):
    model, tok = pruned_stories(LAYOUTS["heterogeneous"])
    out = export_gguf(model, tok, tmp_path / "m.gguf", outtype="q8_0", pad_to=1)
    meta, reader = fields(out)
    assert meta["deci.feed_forward_length"] == [172, 129, 129, 129, 172]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    # rows of 129 or 172 values cannot form q8_0 blocks of 32: f16, as llama.cpp's converter does
    assert types["blk.1.ffn_down.weight"] == types["blk.0.ffn_down.weight"] == "F16"
    assert types["blk.1.ffn_up.weight"] == "Q8_0"
    back, _ = load_model(tmp_path / "m.gguf")
    assert [l.mlp.down_proj.in_features for l in back.model.layers] == [172, 129, 129, 129, 172]
    with pytest.raises(GGUFExportError, match="--pad_to 0"):
        export_gguf(model, tok, tmp_path / "x.gguf", pad_to=0)


def test_export_cli_on_a_pruned_folder(tmp_path):
    model, tok = pruned_stories(LAYOUTS["heterogeneous"])
    save_pruned(model, tok, tmp_path / "pruned")
    out = tmp_path / "pruned.gguf"
    run = subprocess.run([sys.executable, str(REPO / "export.py"), "--model", str(tmp_path / "pruned"), "--to",
                          "gguf", "--outfile", str(out), "--outtype", "f32"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}" in run.stdout
    back, _ = load_model(out)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert_paths_agree(back(ids).logits, model(ids).logits)


def test_export_cli_errors_are_one_line(tmp_path):
    opt = tiny_model("opt", vocab_size=512, hidden_size=32, ffn_dim=48, num_attention_heads=4)
    from transformers import AutoTokenizer
    save_pruned(opt, AutoTokenizer.from_pretrained(need_shared("models", "stories260K")), tmp_path / "opt")
    run = subprocess.run([sys.executable, str(REPO / "export.py"), "--model", str(tmp_path / "opt"), "--outfile",
                          str(tmp_path / "x.gguf")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("export.py: error: model_type 'opt'") and "convert_hf_to_gguf.py" in last
    assert not (tmp_path / "x.gguf").exists()


def test_hf_prune_save_gguf(tmp_path):
    stories = need_shared("models", "stories260K")
    run = subprocess.run([sys.executable, str(REPO / "hf_prune.py"), "--base_model", str(stories), "--device", "cpu",
                          "--eval_device", "cpu", "--pruning_ratio", "0.25", "--pruner_type", "l2",
                          "--block_attention_layer_start", "1", "--block_attention_layer_end", "4",
                          "--block_mlp_layer_start", "1", "--block_mlp_layer_end", "4", "--log_dir", str(tmp_path),
                          "--save_ckpt_log_name", "run", "--save_model", "--save_gguf", "--gguf_outtype", "f32"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    folder = tmp_path / "run"
    pruned, tok = load_model(folder)
    back, _ = load_model(folder / "model.gguf")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert_paths_agree(back(ids).logits, pruned(ids).logits)
    assert gguf.GGUFReader(folder / "model.gguf").fields["general.architecture"].contents() == "deci"


def test_hf_prune_save_gguf_refuses_an_unsupported_architecture_first(tmp_path):
    opt = tiny_model("opt", vocab_size=512, hidden_size=32, ffn_dim=48, num_attention_heads=4)
    from transformers import AutoTokenizer
    save_pruned(opt, AutoTokenizer.from_pretrained(need_shared("models", "stories260K")), tmp_path / "opt")
    run = subprocess.run([sys.executable, str(REPO / "hf_prune.py"), "--base_model", str(tmp_path / "opt"),
                          "--device", "cpu", "--log_dir", str(tmp_path / "logs"), "--save_gguf"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "model_type 'opt'" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "logs").exists()  # nothing written before the check
