"""Layer-streamed pruning (``LLMPruner.stream``) against the in-memory path: discovery, Taylor scores
(all four modes), activation statistics, plans, compensation and the saved folder, on tiny models built
in code and on the real stories260K (streamed from its safetensors file)."""
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from LLMPruner import load_pruned, prune, save_pruned
from LLMPruner.score.estimate import taylor_scores
from LLMPruner.discover import discover
from LLMPruner.stream.discover import discover_streamed
from LLMPruner.stream.memory import parse_memory
from LLMPruner.stream.pipeline import prune_offloaded
from LLMPruner.stream.placement import place_model, unplace_model
from LLMPruner.stream.states import StateStore
from LLMPruner.stream.taylor import streamed_taylor_scores
from LLMPruner.stream.weights import SafetensorsSource, StateDictSource, skeleton, skeleton_from_folder

EXAMPLES = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))


def _families(d):
    return [(f.key, [(m.param, m.dim, m.indices.tolist()) for m in f.members]) for f in d.families]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def _rel(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)


@pytest.mark.parametrize("tied", [False, True])
def test_template_discovery_equals_the_full_trace(tied):
    model = tiny_model(num_hidden_layers=4, tie_word_embeddings=tied)
    full, streamed = discover(model), discover_streamed(skeleton(model.config))
    assert _families(streamed) == _families(full)
    assert streamed.layers == full.layers


@pytest.mark.parametrize("tied, mode", [(False, "vectorize"), (False, "param_first"), (False, "param_second"),
                                        (False, "param_mix"), (True, "vectorize"), (True, "param_first")])
def test_streamed_taylor_equals_in_memory(tied, mode):
    """Every family, the hidden one included (embeddings, tied head, norms)."""
    model = tiny_model(num_hidden_layers=3, tie_word_embeddings=tied)
    families = discover(model).families
    ref = taylor_scores(model, families, EXAMPLES, mode)
    got = streamed_taylor_scores(skeleton(model.config), StateDictSource.of(model), families, EXAMPLES, mode)
    assert _rel(ref, got) <= 1e-4


def test_states_on_disk_give_the_same_scores(tmp_path):
    model = tiny_model(num_hidden_layers=3)
    families = discover(model).families
    a = streamed_taylor_scores(skeleton(model.config), StateDictSource.of(model), families, EXAMPLES, "param_mix")
    b = streamed_taylor_scores(skeleton(model.config), StateDictSource.of(model), families, EXAMPLES, "param_mix",
                               states=StateStore(to_disk=True, folder=tmp_path))
    assert _rel(a, b) == 0
    assert not list(tmp_path.iterdir())  # the temporary state files are gone


def test_tied_fisher_of_the_hidden_family_is_refused():
    model = tiny_model(num_hidden_layers=2, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="--offload with --taylor param_second and tied embeddings"):
        streamed_taylor_scores(skeleton(model.config), StateDictSource.of(model), discover(model).families,
                               EXAMPLES, "param_second")


CASES = {
    "taylor": dict(pruner_type="taylor"),
    "taylor+refit_oneshot": dict(pruner_type="taylor", compensation="refit_oneshot"),
    "wanda": dict(pruner_type="wanda"),
    "fluctuation+refit_oneshot": dict(pruner_type="fluctuation", compensation="refit_oneshot"),
    "wanda+bias": dict(pruner_type="wanda", compensation="bias", pruning_ratio=0.5),
    # 0.4 of 2 KV groups removes none (reference rounding): the attention kind loses nothing, so it gets no
    # bias tensors, in memory and under --offload (per-layer selection, and a plan chosen beforehand)
    "wanda+bias, attention loses nothing": dict(pruner_type="wanda", compensation="bias"),
    "taylor+bias, attention loses nothing": dict(pruner_type="taylor", compensation="bias"),
    "l2 global": dict(pruner_type="l2", global_pruning=True),
    "wanda budget": dict(pruner_type="wanda", param_budget=0.3),
    "taylor channel_wise": dict(pruner_type="taylor", mode="channel_wise"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tied", [False, True])
def test_offloaded_pruning_saves_the_in_memory_folder(tmp_path, case, tied):
    kw = dict(CASES[case])
    mode = kw.pop("mode", "block_wise")
    ratio = 0.5 if mode == "channel_wise" else 0.4  # hidden 32 -> 16: still a multiple of the heads
    ratio = kw.pop("pruning_ratio", ratio)
    ranges = {} if mode == "channel_wise" or "param_budget" in kw else \
        dict(attention_layers=range(0, 3), mlp_layers=range(1, 3))
    model = tiny_model(num_hidden_layers=3, tie_word_embeddings=tied)
    dense = copy.deepcopy(model)
    common = dict(mode=mode, pruning_ratio=ratio, examples=EXAMPLES, seed=3, calibration_batch_size=4, **ranges, **kw)
    in_memory = prune(model, **common)
    save_pruned(model, None, tmp_path / "mem")
    streamed = prune_offloaded(dense, save_to=tmp_path / "off", **common)
    assert streamed.plan.to_dict() == in_memory.plans[-1].to_dict()
    assert streamed.structure == in_memory.structure
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "off")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    config = [json.loads((tmp_path / f / "config.json").read_text()) for f in ("mem", "off")]
    assert config[0] == config[1]
    if "loses nothing" in case:
        assert not any(k.endswith("o_proj.bias") for k in b) and any(k.endswith("down_proj.bias") for k in b)
        assert not config[1]["attention_bias"] and config[1]["mlp_bias"]
    assert (tmp_path / "off" / "model.safetensors.index.json").exists()  # one shard per part
    reloaded, _ = load_pruned(tmp_path / "off")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(EXAMPLES).logits, model(EXAMPLES).logits, rtol=1e-4, atol=1e-5)


def test_max_memory_too_small_names_the_flag():
    model = tiny_model(num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"--max_memory 10kB: one stage needs about"):
        prune_offloaded(model, pruner_type="taylor", examples=EXAMPLES, attention_layers=range(0, 2),
                        mlp_layers=range(0, 2), max_memory="10kB")
    assert parse_memory("8GB") == 8 * 10**9 and parse_memory("1.5GiB") == 3 * 2**29
    with pytest.raises(ValueError, match="--max_memory 'lots': expected a size such as 8GB"):
        parse_memory("lots")


@pytest.mark.parametrize("device_map", ["auto", "cpu", "per-module"])
def test_device_map_gives_the_same_scores(device_map):
    model = tiny_model(num_hidden_layers=3, tie_word_embeddings=True)
    families = discover(model).families
    ref = taylor_scores(model, families, EXAMPLES, "param_first")
    if device_map == "per-module":
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                      **{f"model.layers.{i}": "cpu" for i in range(3)}}
    place_model(model, device_map, max_memory="1GB")
    got = taylor_scores(model, families, EXAMPLES, "param_first")
    unplace_model(model)
    assert _rel(ref, got) == 0


@pytest.mark.slow
def test_stories260k_streamed_from_safetensors(stories_path, tmp_path):
    """The real model, read tensor by tensor from its file: discovery, Taylor (GQA, tied head), plans and
    the saved folder equal the in-memory ones."""
    from LLMPruner import load_model
    model, _ = load_model(stories_path, dtype=torch.float32)
    examples = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    skel = skeleton_from_folder(stories_path)
    assert _families(discover_streamed(skel)) == _families(discover(model))
    families = [f for f in discover(model).families if f.kind != "hidden"]
    for mode in ("param_first", "param_mix"):
        ref = taylor_scores(model, families, examples, mode)
        got = streamed_taylor_scores(skeleton_from_folder(stories_path), SafetensorsSource(stories_path), families,
                                     examples, mode)
        assert _rel(ref, got) <= 1e-4
    common = dict(pruner_type="taylor", pruning_ratio=0.5, examples=examples, attention_layers=range(1, 4),
                  mlp_layers=range(1, 4))
    streamed = prune_offloaded(stories_path, save_to=tmp_path / "off", **common)
    in_memory = prune(model, **common)
    assert streamed.plan.to_dict() == in_memory.plans[-1].to_dict()
    save_pruned(model, None, tmp_path / "mem")
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "off")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
