"""``prune_offloaded``: discover -> score -> select -> (compensate) -> shrink -> save, one layer at a time.

The same decisions as ``LLMPruner.prune.prune`` (the plan is built by the same ``choose`` /
``choose_by_budget`` / ``make_plan`` from the same scores), computed without ever holding the model:
weights come from the checkpoint's safetensors files (or a CPU copy) one decoder layer at a time, and
the pruned model is written shard by shard into a ``save_pruned`` folder.
"""
from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from LLMPruner.score.activations import consumers
from LLMPruner.adapters import get_adapter
from LLMPruner.select.budget import BudgetCriterion, choose_by_budget, non_embedding_parameters
from LLMPruner.checkpoint import save_pruned
from LLMPruner.compensate.refit import Compensation
from LLMPruner.score.estimate import Grouping, TaylorMode, channel_reduce, slots_of, unit_scores
from LLMPruner.select.obs import DAMP, Selection, check_selection, obs_reselect
from LLMPruner.select.allocation import Allocation, obs_counts
from LLMPruner.plan import PruningPlan
from LLMPruner.prune import ACTIVATION_PRUNERS, Mode, _check, _check_tokens, _targets, widest_input
from LLMPruner.compensate.reconstruct import LR as RECONSTRUCT_LR, Reconstruction, check_reconstruction
from LLMPruner.select.units import Rounding, choose, make_plan
from LLMPruner.structure import ModelStructure
from LLMPruner.stream.allocation import streamed_grams
from LLMPruner.stream.apply import PassOptions, streamed_apply
from LLMPruner.stream.discover import discover_streamed
from LLMPruner.stream.memory import parse_memory, process_peak_rss, return_freed_memory, stage
from LLMPruner.stream.states import StateStore
from LLMPruner.stream.taylor import streamed_taylor_scores
from LLMPruner.stream.weights import Part, SafetensorsSource, StateDictSource, WeightSource, layers_prefix, skeleton, \
    skeleton_from_folder

logger = logging.getLogger(__name__)


@dataclass
class OffloadResult:
    plan: PruningPlan
    structure: ModelStructure
    folder: Path | None = None
    peaks: dict = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0


def open_source(name_or_path: str | Path, dtype: torch.dtype | str = "auto", *, allow_pickle: bool = False,
                text_only: bool = False):
    """``(folder, GGUF source or CPU model, tokenizer, config)`` for ``prune_offloaded``: a uniform
    safetensors folder is streamed from disk (an image-text one's language model with ``text_only``,
    ``TextOnlySource``), a uniform llama GGUF one dequantised tensor at a time
    (``gguf_source.GGUFSource``); anything else (other GGUFs, Meta layout, a Hub id) is loaded once on the
    CPU, and its CPU copy is the source (host memory, but never more than one layer on the device)."""
    from transformers import AutoConfig, AutoTokenizer
    from LLMPruner.checkpoint import load_model
    from LLMPruner.checkpoint.gguf_in import gguf_file_of
    from LLMPruner.checkpoint.load import has_tokenizer
    from LLMPruner.checkpoint.multimodal import TextOnlySource, config_to_prune, streamed_text_config
    from LLMPruner.stream.gguf_source import open_gguf
    from LLMPruner.stream.weights import SafetensorsSource, is_safetensors_folder
    if is_safetensors_folder(name_or_path):
        full = AutoConfig.from_pretrained(name_or_path)
        config = config_to_prune(full, text_only, str(name_or_path))
        if not getattr(config, "layer_shapes", None):
            get_adapter(config)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path) if has_tokenizer(Path(name_or_path)) else None
            if config is not full:
                config = streamed_text_config(full)
                return TextOnlySource(SafetensorsSource(name_or_path), config), tokenizer, config
            return Path(name_or_path), tokenizer, config
    gguf_file = gguf_file_of(Path(name_or_path)) if Path(name_or_path).exists() else None
    opened = open_gguf(gguf_file) if gguf_file is not None else None
    if opened is not None:
        return opened
    logger.warning("--offload: %s is not a uniform safetensors folder or llama GGUF; loading it once on the CPU "
                   "and streaming layers from that copy", name_or_path)
    model, tokenizer = load_model(name_or_path, device="cpu", dtype=dtype, allow_pickle=allow_pickle,
                                  text_only=text_only)
    return model, tokenizer, model.config


def open_model(model_or_folder: nn.Module | WeightSource | str | Path) -> tuple[nn.Module, WeightSource]:
    """A meta-device skeleton and where its weights are: a safetensors folder, a model's CPU copy, or a
    source that carries its ``config`` (``GGUFSource``)."""
    if isinstance(model_or_folder, WeightSource):
        return skeleton(copy.deepcopy(model_or_folder.config)), model_or_folder
    if isinstance(model_or_folder, nn.Module):
        skel = skeleton(copy.deepcopy(model_or_folder.config))  # the pass rewrites the skeleton's config
        return skel, StateDictSource.of(model_or_folder)
    return skeleton_from_folder(model_or_folder), SafetensorsSource(model_or_folder)


def prune_offloaded(model_or_folder: nn.Module | WeightSource | str | Path, *, save_to: str | Path | None = None, tokenizer=None,
                    mode: Mode = "block_wise", pruning_ratio: float = 0.5, pruner_type: str = "l2",
                    taylor: TaylorMode = "param_first", grouping_strategy: Grouping = "sum",
                    attention_layers: range | None = None, mlp_layers: range | None = None,
                    global_pruning: bool = False, examples: torch.Tensor | None = None, seed: int = 0,
                    round_to: int = 1, param_budget: float | None = None, compensation: Compensation = "none",
                    ridge: float | None = None, sequential: bool = False, calibration_batch_size: int = 8,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    max_memory: str | int | None = None, offload_states_to_disk: bool = False,
                    provenance: dict | None = None, unit_rounding: Rounding = "reference",
                    budget_criterion: BudgetCriterion = "uniform", selection: Selection = "score",
                    obs_damp: float = DAMP, obs_allocation: Allocation = "uniform",
                    obs_max_fraction: float | None = None, reconstruct_steps: int = 0,
                    reconstruct_lr: float = RECONSTRUCT_LR,
                    linalg_device: str | torch.device | None = None) -> OffloadResult:
    """Prune a model that is never loaded whole; with ``save_to``, write the pruned checkpoint there.
    ``selection="obs"``, ``obs_allocation`` (not ``kl``/``fisher``), ``reconstruct_steps`` and
    ``linalg_device`` mean what they mean in ``prune.prune``, in the same sequential pass
    (``compensation="refit"``); ``max_memory`` then counts the float64 matrices on ``linalg_device`` when
    that is not the host."""
    _check(pruning_ratio, 1, pruner_type, param_budget, examples, compensation)
    check_selection(selection, compensation)
    check_reconstruction(reconstruct_steps, reconstruct_lr, compensation)
    if selection == "obs" and sequential:
        raise ValueError("--offload_sequential with --selection obs: the guard keeps the better of the sequential "
                         "and the one-shot model, and OBS selection has no one-shot model; drop one of them")
    if mode not in ("block_wise", "channel_wise"):
        raise ValueError(f"--offload with mode {mode!r}: choose block_wise or channel_wise "
                         "(--layer_wise keeps whole layers: prune without --offload)")
    peaks: dict = {}
    return_freed_memory()
    with stage("discover", device, peaks):
        model, source = open_model(model_or_folder)
        params_before = sum(p.numel() for p in model.parameters())
        targets = _targets(discover_streamed(model).families, mode, attention_layers, mlp_layers, param_budget)
        if compensation in ("refit", "refit_oneshot"):
            _check_tokens(model, targets, examples)  # as in memory: a rank-deficient refit is refused
        _check_memory(model, max_memory, dtype, examples, pruner_type == "taylor", mode == "channel_wise", device,
                      candidates=2 if sequential or reconstruct_steps else 1,
                      stats_width=widest_input(model, targets) if compensation in ("refit", "refit_oneshot") else 0,
                      reconstruct=reconstruct_bytes(model, targets, examples) if reconstruct_steps else 0,
                      gram_elem=8 if compensation == "refit_oneshot" or obs_allocation != "uniform" else 4,
                      host_grams=5 if selection == "obs" else 4, linalg_device=linalg_device)
    # --compensation refit is the in-memory sequential refit (layer i refit on the outputs of the pruned
    # layers 0..i-1, sequential.refit_sequential_layer); refit_oneshot and bias use the dense model's
    # statistics, as in memory. ``sequential`` (--offload_sequential) runs any compensation on the pruned
    # inputs and keeps that model only if its calibration loss is not above the one-shot one's.
    if (sequential or compensation == "refit") and mode == "channel_wise":
        raise ValueError(f"--compensation {compensation}{' --offload_sequential' if sequential else ''} with "
                         "--channel_wise: sequential compensation works on per-layer families; use "
                         "--compensation bias without --offload_sequential")
    opts = PassOptions(device=device, dtype=dtype, batch_size=calibration_batch_size, compensation=compensation,
                       ridge=1e-3 if ridge is None else ridge, refit_ridge=ridge,
                       reselect=pruner_type if pruner_type in ACTIVATION_PRUNERS else None,
                       sequential=sequential or compensation == "refit", guard=sequential,
                       grouping=grouping_strategy,
                       reconstruct=Reconstruction(reconstruct_steps, reconstruct_lr, seed=seed) if reconstruct_steps
                       else None, linalg_device=linalg_device)
    width = pruning_ratio if param_budget is None else param_budget
    per_layer = pruner_type in ACTIVATION_PRUNERS and not global_pruning and param_budget is None \
        and mode == "block_wise"

    def select(fams, scores):  # prune.prune's choice, for its first (only) step
        if param_budget is not None:
            return choose_by_budget(model, fams, scores, int(width * non_embedding_parameters(model)), round_to,
                                    budget_criterion, bias_compensation=compensation == "bias")
        return choose(fams, scores, width, global_pruning, round_to, rounding=unit_rounding)

    plan = None
    if targets and width > 0 and not per_layer:
        with stage("score", device, peaks):
            scores = _scores(model, source, targets, pruner_type, taylor, grouping_strategy, examples, seed + 1,
                             opts, offload_states_to_disk)
            plan = make_plan(model, targets, select(targets, scores))
    elif not targets or width == 0:
        plan = PruningPlan()
    if selection == "obs" and targets and width > 0:
        with stage("obs allocation", device, peaks):
            plan = _obs_counts(model, source, targets, plan, select, examples, opts, obs_allocation, obs_damp,
                               obs_max_fraction)
        opts.reselect, per_layer = obs_reselect(obs_damp, device=linalg_device), False  # OBS chooses the units
    if save_to is not None:
        Path(save_to).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".llmpruner-stream-", dir=save_to)) if save_to is not None else None
    try:
        from LLMPruner.stream.writer import ShardWriter
        writer = ShardWriter(staging, len(get_adapter(model).decoder_layers(model)) + 1) if staging else None
        with stage("prune+write (layers)", device, peaks):
            opts.metric = pruner_type if per_layer else None
            plan = streamed_apply(model, source, targets, plan, writer, opts, examples=examples,
                                  select=select if per_layer else None,
                                  states=StateStore(offload_states_to_disk))
        logger.info("offloaded plan:\n%s", plan.describe())
        structure = get_adapter(model).update_config(model)
        folder = None
        if save_to is not None:
            with stage("save", device, peaks):
                folder = save_pruned(model, tokenizer, save_to, provenance, round_to=round_to if round_to > 1 else None,
                                     weights_writer=writer.move_into)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    peaks["whole process"] = {"peak_host_rss_mb": round(process_peak_rss() / 2**20, 1)}
    logger.info("peak host RSS of the whole process (since it started, the model's loading included): %.1f MB",
                peaks["whole process"]["peak_host_rss_mb"])
    return OffloadResult(plan=plan, structure=structure, folder=folder, peaks=peaks, params_before=params_before,
                         params_after=sum(p.numel() for p in model.parameters()))


def _obs_counts(model, source, targets, plan: PruningPlan | None, select, examples, opts: PassOptions, how,
                damp, max_fraction) -> PruningPlan:
    """How many units each family loses under ``--selection obs`` (which ones, the sequential pass's OBS
    chooses): the plan's counts (per-layer activation selection: the ratio's, which do not depend on the
    scores), moved between layers by ``obs_allocation.obs_counts`` on the streamed dense statistics."""
    if plan is None:
        plan = make_plan(model, targets, select(targets, {f.key: torch.zeros(f.n_units) for f in targets}))
    removed = obs_counts(model, targets, plan.removed_units, examples, how, damp, opts.batch_size,
                         max_fraction=max_fraction, device=opts.linalg_device,
                         grams_of=lambda: streamed_grams(model, source, targets, examples, opts))
    return make_plan(model, targets, removed)


def reconstruct_bytes(model: nn.Module, targets, examples: torch.Tensor | None) -> int:
    """Device memory ``--reconstruct_steps`` adds to a layer's stage beyond the dense copy of the layer
    (counted as a second candidate): the widest MLP's float32 working copy, gradients and Adam's two
    moments, and the float32 inputs and targets of at most ``reconstruct.MAX_TOKENS`` tokens."""
    from LLMPruner.compensate.reconstruct import MAX_TOKENS
    mlps = {n.rpartition(".")[0].rpartition(".")[0] for n in consumers(model, targets)
            if get_adapter(model).kind_of(n) == "mlp"}
    widest = max((sum(p.numel() for p in model.get_submodule(m).parameters()) for m in mlps), default=0)
    tokens = 0 if examples is None else min(examples.numel(), MAX_TOKENS)
    return 16 * widest + 8 * tokens * model.config.hidden_size


def _scores(model, source, targets, pruner_type, taylor, grouping, examples, seed, opts, to_disk):
    if pruner_type == "random":
        return unit_scores(targets, None, grouping, seed)
    if pruner_type in ("l1", "l2"):
        return unit_scores(targets, streamed_magnitude_scores(model, source, targets, 1 if pruner_type == "l1" else 2,
                                                              opts), grouping)
    if pruner_type == "taylor":
        channel = streamed_taylor_scores(model, source, targets, examples, taylor, device=opts.device,
                                         dtype=opts.dtype, states=StateStore(to_disk))
        return unit_scores(targets, channel, grouping)
    channel: dict = {}
    stats_opts = PassOptions(device=opts.device, dtype=opts.dtype, batch_size=opts.batch_size, metric=pruner_type,
                             grouping=grouping)
    streamed_apply(model, source, targets, PruningPlan(), None, stats_opts, examples=examples,
                   states=StateStore(to_disk), collect=channel)
    return unit_scores(targets, channel, grouping)


def streamed_magnitude_scores(model, source, targets, p: int, opts: PassOptions) -> dict:
    """``estimate.magnitude_scores``, one part at a time."""
    layers = get_adapter(model).decoder_layers(model)
    prefix = layers_prefix(model, layers)
    needed = slots_of(targets)
    out = {}
    for i in [None] + list(range(len(layers))):
        part = Part(model, prefix, i)
        names = [n for n in part.names if n in needed]
        if not names:
            continue
        part.load(source, opts.device, opts.dtype)
        params = part.params()
        out.update({(n, d): channel_reduce(params[n].detach().float().abs().pow(p), d) for n in names
                    for d in needed[n]})
        part.release()
    return out


def _check_memory(model, max_memory, dtype, examples, with_grad: bool, outer_scored: bool, device,
                  candidates: int = 1, stats_width: int = 0, reconstruct: int = 0, gram_elem: int = 4,
                  host_grams: int = 3, linalg_device: str | torch.device | None = None) -> None:
    """The largest part (x2 where it takes gradients: the layers under Taylor, the embeddings/head only when
    the hidden size is scored) plus a few copies of the boundary states must fit ``--max_memory``; with
    two candidates (``--offload_sequential``) a layer and the states are held twice over. ``stats_width``
    (a refit): one batch's ``x^T x`` of the widest refitted input is made on the device in float32
    (``gram_elem`` 4; float64 where the Gram is summed on the device: ``refit_oneshot``'s statistics, the OBS
    allocation's) before it goes to the host, where ``host_grams`` float64 ``[in, in]`` matrices live (the
    fit and check halves, and the refit's kept-column Gram of each half and its damped copy, or OBS's
    merged Gram, damped inverse and factor): logged,
    and counted in ``--max_memory`` when ``linalg_device`` puts them on a device rather than the host.
    ``reconstruct``: bytes ``--reconstruct_steps`` adds (``reconstruct_bytes``; its dense copy of the layer
    is the second candidate)."""
    layers = get_adapter(model).decoder_layers(model)
    prefix = layers_prefix(model, layers)
    elem = torch.finfo(dtype).bits // 8 if dtype is not None else 4
    sizes = {}
    for i in [None] + list(range(len(layers))):
        part = Part(model, prefix, i)
        grads = 2 if with_grad and (i is not None or outer_scored) else 1
        sizes[part.name] = sum(model.get_parameter(n).numel() for n in part.names) * elem * grads
    largest = max(sizes, key=sizes.get)
    states = 0 if examples is None else examples.numel() * model.config.hidden_size * elem
    need = max(sizes[largest], candidates * max(v for k, v in sizes.items() if k != "embeddings/head")) \
        + 4 * candidates * states + gram_elem * stats_width ** 2 + reconstruct
    on_device = linalg_device is not None and torch.device(linalg_device).type != "cpu"
    if on_device:
        need += host_grams * 8 * stats_width ** 2
    if stats_width:
        logger.info("offload: the refit's statistics of its widest input (%d channels) take about %.1f MB of %s "
                    "memory per layer (float64 Grams)", stats_width, host_grams * 8 * stats_width ** 2 / 2**20,
                    f"{linalg_device} (--linalg_device)" if on_device else "host")
    logger.info("offload: largest part %s %.1f MB%s; boundary states %.1f MB each; about %.1f MB on %s per stage",
                largest, sizes[largest] / 2**20, " (gradients included)" if with_grad else "", states / 2**20,
                need / 2**20, device)
    if max_memory is not None and need > parse_memory(max_memory):
        raise ValueError(f"--max_memory {max_memory}: one stage needs about {need / 1e9:.2f} GB on {device} "
                         f"(the largest part, {largest}, is {sizes[largest] / 1e9:.2f} GB); raise --max_memory, "
                         "pick a smaller --dtype or fewer --num_examples")
