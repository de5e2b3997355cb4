"""Recipes: named, measured configurations shipped with the package (``LLMPruner/recipes/*.json``).

A recipe is a partial ``PruneConfig`` (the settings it chooses; the size is the user's: ``--target_params``,
``--param_budget`` or ``--pruning_ratio``), a one-line summary and the figures measured with it
(``bench/smollm2.py``: WikiText-2 / PTB on the protocol's 160 windows). ``hf_prune.py --recipe NAME`` applies
it under the flags given explicitly; ``--recipe auto`` prunes with each recipe marked ``auto`` and keeps the
one whose model has the lowest loss on held-out calibration documents; ``--list_recipes`` prints the table.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from LLMPruner.config import ConfigError, PruneConfig, read_mapping

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
AUTO = "auto"


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    settings: dict[str, dict[str, Any]]  # the partial configuration, by section
    measured: dict[str, str]
    auto: bool = True

    def config(self) -> PruneConfig:
        return PruneConfig.from_dict(self.settings, source=f"recipe {self.name}")

    def flags(self) -> dict[str, Any]:
        """``{flag name: value}`` of the settings this recipe chooses (not the defaults it leaves)."""
        values = {k: v for section in self.settings.values() for k, v in section.items()}
        mode = values.pop("mode", None)
        if mode in ("block_wise", "channel_wise", "layer_wise"):
            values.update({m: m == mode for m in ("block_wise", "channel_wise", "layer_wise")})
        return values


def overlay(args, values: dict[str, Any], explicit: set[str] | list[str]) -> None:
    """Set ``values`` (flag name -> value) on the namespace ``args``, except the flags given explicitly; a mode
    switch given (or ``--prune_experts``) keeps every other switch as it is."""
    modes = ("block_wise", "channel_wise", "layer_wise")
    mode_given = any(m in explicit for m in modes) or "prune_experts" in explicit
    for name, value in values.items():
        if name in explicit or (name in modes and mode_given) or not hasattr(args, name):
            continue
        setattr(args, name, value)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.json"))


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a recipe file (the same JSON/YAML layout) by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ConfigError(f"--recipe {name_or_path!r}: no such recipe; choose one of "
                              f"{', '.join(recipe_names() + [AUTO])}, or give a recipe file")
    data = read_mapping(path)
    recipe = Recipe(name=path.stem, summary=data.get("summary", ""), settings=data.get("config", {}),
                    measured=data.get("measured", {}), auto=bool(data.get("auto", True)))
    recipe.config().validate()  # a recipe with an unknown setting or value fails here, naming it
    return recipe


def auto_recipes() -> list[Recipe]:
    return [r for r in map(load_recipe, recipe_names()) if r.auto]


def recipe_table() -> str:
    """``--list_recipes``: each recipe, what it does, its settings and the figures measured with it."""
    lines = ["recipes (hf_prune.py --recipe NAME; explicit flags override a recipe's values; --recipe auto "
             "chooses among them by held-out loss):", ""]
    for recipe in map(load_recipe, recipe_names()):
        lines.append(f"{recipe.name}: {recipe.summary}")
        lines += [f"    {line}" for line in recipe.config().describe().splitlines()]
        if recipe.measured:
            figures = "; ".join(f"{k} {v}" for k, v in recipe.measured.items())
            lines.append(f"    measured (WikiText-2 / PTB, 160 windows, bench/smollm2.py): {figures}")
        lines.append("")
    lines.append("auto: prunes with each recipe above, compares their models' loss on held-out calibration "
                 "documents, keeps the best (the table is printed and saved as recipe_auto.json)")
    return "\n".join(lines)


def dump_recipe(recipe: Recipe) -> str:
    return json.dumps({"summary": recipe.summary, "auto": recipe.auto, "config": recipe.settings,
                       "measured": recipe.measured}, indent=2)
