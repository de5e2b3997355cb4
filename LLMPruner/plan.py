"""A pruning plan: what to keep, by parameter name. Print it, save it as JSON, replay it on a fresh model."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PruningPlan:
    #: parameter name -> {dim: kept indices}
    keep: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    #: decoder layers kept (None: all)
    keep_layers: list[int] | None = None
    #: family key (e.g. "attention@3") -> removed unit indices, for reading
    removed_units: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"keep": {n: {str(d): idx for d, idx in dims.items()} for n, dims in self.keep.items()},
                "keep_layers": self.keep_layers, "removed_units": self.removed_units}

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        keep = {n: {int(d): list(idx) for d, idx in dims.items()} for n, dims in data.get("keep", {}).items()}
        return cls(keep=keep, keep_layers=data.get("keep_layers"), removed_units=data.get("removed_units", {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def describe(self) -> str:
        lines = [f"{key}: remove {len(units)} units {units[:8]}{' ...' if len(units) > 8 else ''}"
                 for key, units in self.removed_units.items() if units]
        if self.keep_layers is not None:
            lines.append(f"keep decoder layers {self.keep_layers}")
        return "\n".join(lines) or "(nothing removed)"
