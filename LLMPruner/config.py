"""``PruneConfig``: every decision of a pruning run as data, nested by stage, checked in one place.

    config = PruneConfig.load("run/prune_config.json")    # or a recipe: load_recipe("quality").config()
    config.how_much.target_params = 6_000_000_000
    config.validate()                                    # the CLI's errors, naming the flag
    config.save("my.yaml")                               # JSON, or YAML when PyYAML is installed

Each field is named after the ``hf_prune.py`` flag that sets it, so a configuration, a recipe and a command
line say the same thing in the same words: ``--pruner_type taylor`` is ``score.pruner_type = "taylor"``.
The stages follow the method: *what* is pruned, *how much*, how units are *scored*, how they are *selected*,
how the kept weights are *compensated*, on which *calibration* text, and the *runtime* (device, dtype,
offload). The run folder of ``hf_prune.py`` keeps the configuration it ran (``prune_config.json``); ``--config
FILE`` replays it. Torch-free: parsers and validation run before any heavy import.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from LLMPruner import options as o

MODES = ("block_wise", "channel_wise", "layer_wise", "experts")


class ConfigError(ValueError):
    """A value or combination a run cannot use; the message names the flag, the value and what is allowed."""


@dataclass
class What:
    """Which structures: the mode, the layer ranges (an end below 0 counts from the last layer, a start in
    (0, 1) is a fraction of the depth), and the unit kinds."""
    mode: str = "block_wise"
    block_attention_layer_start: float = 3
    block_attention_layer_end: int | None = None
    block_mlp_layer_start: float = 3
    block_mlp_layer_end: int | None = None
    layer: int = 12
    skip_attention: bool = False
    query_heads: bool = False
    prune_layers: int = 0
    layer_importance: str = "block_influence"
    prune_experts: int = 0
    expert_importance: str = "reap"


@dataclass
class HowMuch:
    """How much: a ratio per pruned layer, a fraction of the non-embedding parameters, or a parameter count."""
    pruning_ratio: float | None = None
    param_budget: float | None = None
    target_params: int | None = None
    budget_criterion: str = "uniform"
    unit_rounding: str = "reference"
    round_to: int = 1
    iterative_steps: int = 1
    global_pruning: bool = False


@dataclass
class Score:
    pruner_type: str = "l2"
    taylor: str = "param_first"
    grouping_strategy: str = "sum"


@dataclass
class Select:
    selection: str = "score"
    obs_damp: float = o.DAMP
    obs_allocation: str = "uniform"


@dataclass
class Compensate:
    compensation: str = "none"
    ridge: float | None = None
    reconstruct_steps: int = 0
    reconstruct_lr: float = o.RECONSTRUCT_LR


@dataclass
class Calibration:
    calibration_data: str = "bookcorpus"
    num_examples: int = 10
    calibration_seq_len: int = 64
    calibration_batch_size: int = 8
    seed: int = 42


@dataclass
class Runtime:
    device: str | None = None
    dtype: str = "float32"
    offload: bool = False
    offload_sequential: bool = False
    offload_states_to_disk: bool = False
    max_memory: str | None = None
    device_map: str | None = None
    linalg_device: str = "cpu"


SECTIONS = {"what": What, "how_much": HowMuch, "score": Score, "select": Select, "compensate": Compensate,
            "calibration": Calibration, "runtime": Runtime}
_MODE_FLAGS = {"block_wise": "--block_wise", "channel_wise": "--channel_wise", "layer_wise": "--layer_wise"}


@dataclass
class PruneConfig:
    what: What = field(default_factory=What)
    how_much: HowMuch = field(default_factory=HowMuch)
    score: Score = field(default_factory=Score)
    select: Select = field(default_factory=Select)
    compensate: Compensate = field(default_factory=Compensate)
    calibration: Calibration = field(default_factory=Calibration)
    runtime: Runtime = field(default_factory=Runtime)

    # --- flat view: one name per flag ---
    def flat(self) -> dict[str, Any]:
        """``{flag name: value}`` over every stage (the names of ``hf_prune.py``'s flags)."""
        return {k: v for name in SECTIONS for k, v in dataclasses.asdict(getattr(self, name)).items()}

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "PruneConfig":
        """A configuration from flag names (an argparse namespace's ``vars``); other names are ignored."""
        config = cls()
        for name in SECTIONS:
            section = getattr(config, name)
            for f in dataclasses.fields(section):
                if f.name in values:
                    setattr(section, f.name, values[f.name])
        if "mode" not in values:  # a switch given wins; else experts with --prune_experts, else block-wise
            config.what.mode = next((m for m in _MODE_FLAGS if values.get(m)),
                                    "experts" if values.get("prune_experts") else "block_wise")
        return config

    def to_args(self) -> dict[str, Any]:
        """The flag values of this configuration, the mode as ``hf_prune.py``'s three switches."""
        flat = self.flat()
        mode = flat.pop("mode")
        flat.update({m: mode == m for m in _MODE_FLAGS})
        return flat

    # --- serialisation ---
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "configuration") -> "PruneConfig":
        """The configuration of ``data`` (sections may be partial: the rest keep their defaults)."""
        config = cls()
        for name, values in data.items():
            if name not in SECTIONS:
                raise ConfigError(f"{source}: unknown section {name!r}; sections: {', '.join(SECTIONS)}")
            section = getattr(config, name)
            known = {f.name for f in dataclasses.fields(section)}
            for key, value in (values or {}).items():
                if key not in known:
                    raise ConfigError(f"{source}: {name}.{key} is not a setting; {name} has {', '.join(sorted(known))}")
                setattr(section, key, value)
        if config.what.prune_experts and "mode" not in (data.get("what") or {}):
            config.what.mode = "experts"
        return config

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(dump(self.to_dict(), path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PruneConfig":
        return cls.from_dict(read_mapping(Path(path)), source=str(path))

    def describe(self) -> str:
        """One line per stage, the settings that differ from the defaults (``--list_recipes``, logs)."""
        default, lines = PruneConfig(), []
        for name in SECTIONS:
            mine, base = dataclasses.asdict(getattr(self, name)), dataclasses.asdict(getattr(default, name))
            changed = [f"{k}={v}" for k, v in mine.items() if v != base[k]]
            if changed:
                lines.append(f"{name}: {', '.join(changed)}")
        return "\n".join(lines) or "(the defaults)"

    # --- the one place options are checked ---
    def validate(self) -> "PruneConfig":
        """Raise ``ConfigError`` naming the flag, the value and what is allowed; return ``self`` when usable."""
        flat = self.flat()
        _check_choices(flat)
        _check_ranges(flat)
        _check_combinations(flat)
        return self


def _check_choices(c: dict[str, Any]) -> None:
    choices = {"mode": MODES, "pruner_type": o.ALL_PRUNERS, "taylor": o.TAYLOR_MODES,
               "grouping_strategy": o.GROUPINGS, "layer_importance": o.LAYER_IMPORTANCES,
               "expert_importance": o.EXPERT_IMPORTANCES, "budget_criterion": o.BUDGET_CRITERIA,
               "unit_rounding": o.ROUNDINGS, "selection": o.SELECTIONS, "obs_allocation": o.ALLOCATIONS,
               "compensation": o.COMPENSATIONS, "dtype": o.DTYPES}
    for name, allowed in choices.items():
        if c[name] not in allowed:
            raise ConfigError(f"--{name} {c[name]!r}: choose one of {', '.join(allowed)}")


def _check_ranges(c: dict[str, Any]) -> None:
    for name in ("pruning_ratio", "param_budget"):
        if c[name] is not None and not 0.0 <= c[name] < 1.0:
            raise ConfigError(f"--{name} {c[name]}: must be in [0, 1)")
    if c["target_params"] is not None:
        if c["param_budget"] is not None:
            raise ConfigError(f"--target_params {c['target_params']} and --param_budget {c['param_budget']}: both "
                              "set the budget; give one")
        c["target_params"] = o.parse_count(c["target_params"])
    for name, low in (("num_examples", 1), ("round_to", 1), ("iterative_steps", 1), ("calibration_seq_len", 1),
                      ("calibration_batch_size", 1), ("prune_layers", 0)):
        if c[name] < low:
            raise ConfigError(f"--{name} {c[name]}: must be >= {low}")
    if c["prune_experts"] < 0:
        raise ConfigError(f"--prune_experts {c['prune_experts']}: must be >= 1 (experts removed from every MoE layer)")
    if c["obs_damp"] <= 0:
        raise ConfigError(f"--obs_damp {c['obs_damp']}: must be > 0")
    for name in ("block_attention_layer_start", "block_mlp_layer_start"):
        if c[name] < 0:
            raise ConfigError(f"--{name} {c[name]}: must be >= 0 (a layer index, or a fraction of the depth in (0, 1))")
    if c["max_memory"] is not None:
        o.parse_memory(c["max_memory"])
    if c["device_map"] is not None:
        o.parse_device_map(c["device_map"])


#: flags of the width modes, with the test that says a configuration gave them (refused with --prune_experts)
WIDTH_FLAGS = {
    "--pruning_ratio": lambda c: c["pruning_ratio"] is not None,
    "--block_wise": lambda c: c["mode"] == "block_wise",
    "--channel_wise": lambda c: c["mode"] == "channel_wise", "--layer_wise": lambda c: c["mode"] == "layer_wise",
    "--param_budget": lambda c: c["param_budget"] is not None,
    "--target_params": lambda c: c["target_params"] is not None,
    "--compensation": lambda c: c["compensation"] != "none", "--selection": lambda c: c["selection"] != "score",
    "--prune_layers": lambda c: c["prune_layers"] > 0, "--query_heads": lambda c: c["query_heads"],
    "--skip_attention": lambda c: c["skip_attention"], "--iterative_steps": lambda c: c["iterative_steps"] != 1,
    "--global_pruning": lambda c: c["global_pruning"], "--reconstruct_steps": lambda c: c["reconstruct_steps"] > 0,
    "--offload_sequential": lambda c: c["offload_sequential"],
    "--offload_states_to_disk": lambda c: c["offload_states_to_disk"],
}


def _check_combinations(c: dict[str, Any]) -> None:
    if c["prune_experts"] or c["mode"] == "experts":
        if not c["prune_experts"]:
            raise ConfigError("what.mode experts needs --prune_experts N (experts removed from every MoE layer)")
        given = [flag for flag, test in WIDTH_FLAGS.items() if test(c)]
        if given:
            raise ConfigError(f"--prune_experts {c['prune_experts']} removes whole experts and nothing else; drop "
                              f"{', '.join(given)} (heads and channels of mixture-of-experts models are not pruned)")
    o.check_selection(c["selection"], c["compensation"])
    o.check_reconstruction(c["reconstruct_steps"], c["reconstruct_lr"], c["compensation"])
    if c["obs_allocation"] != "uniform" and c["selection"] != "obs":
        raise ConfigError(f"--obs_allocation {c['obs_allocation']} needs --selection obs")
    if c["linalg_device"] != "cpu" and c["compensation"] != "refit":
        raise ConfigError(f"--linalg_device {c['linalg_device']}: only --compensation refit (its statistics, OBS "
                          f"selection and solves) runs float64 linear algebra there, not --compensation "
                          f"{c['compensation']}; drop it")
    if c["mode"] == "layer_wise" and c["compensation"] != "none":
        raise ConfigError(f"--compensation {c['compensation']} does not apply to --layer_wise, which keeps the "
                          "first --layer decoder layers and changes no weights; drop it, or remove layers by "
                          "importance with --prune_layers N (which --compensation can follow)")
    _check_offload(c)


def _check_offload(c: dict[str, Any]) -> None:
    if not c["offload"]:
        for name in ("offload_states_to_disk", "offload_sequential"):
            if c[name]:
                raise ConfigError(f"--{name} needs --offload")
        if c["max_memory"] is not None and c["device_map"] is None:
            raise ConfigError(f"--max_memory {c['max_memory']} needs --offload or --device_map")
        return
    unsupported = {"--device_map": c["device_map"] is not None, "--layer_wise": c["mode"] == "layer_wise",
                   "--iterative_steps > 1": c["iterative_steps"] > 1, "--prune_layers": c["prune_layers"] > 0,
                   "--query_heads (not built into the layer-streamed pass)": c["query_heads"]}
    if c["offload_sequential"] and c["selection"] == "obs":
        raise ConfigError("--offload_sequential with --selection obs: the guard keeps the better of the sequential "
                          "and the one-shot model, and OBS selection has no one-shot model; drop one of them")
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(f"--offload cannot be combined with {', '.join(bad)} (the layer-streamed pass never holds "
                          "the whole model); drop them or prune without --offload")


def resolve_layer(value: float | None, n_layers: int, default: int) -> int:
    """A layer index of a range: ``None`` -> ``default``; below 0 counts from the end (``-2`` of 30 is 28);
    a fraction in (0, 1) is that share of the depth, rounded (0.125 of 32 is 4)."""
    if value is None:
        return default
    if 0 < value < 1:
        return round(value * n_layers)
    value = int(value)
    return n_layers + value if value < 0 else value


# --- files: JSON always, YAML when PyYAML is installed ---
def read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use JSON") from err
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (what, how_much, score, ...)")
    return data


def dump(data: dict[str, Any], path: Path) -> str:
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ConfigError(f"{path}: writing YAML needs PyYAML (pip install pyyaml); or use .json") from err
        return yaml.safe_dump(data, sort_keys=False)
    return json.dumps(data, indent=2) + "\n"
