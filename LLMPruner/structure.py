"""Per-layer shapes of a (possibly heterogeneously) pruned model, as JSON-able data.

A pruned model's layers can each keep a different number of heads and MLP channels. ``ModelStructure``
records them so that a checkpoint can be rebuilt without first allocating the unpruned model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class LayerShape:
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


@dataclass
class ModelStructure:
    hidden_size: int
    head_dim: int
    layers: list[LayerShape] = field(default_factory=list)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    def is_uniform(self) -> bool:
        return len(set(self.layers)) <= 1

    def to_dict(self) -> dict:
        return {"hidden_size": self.hidden_size, "head_dim": self.head_dim,
                "layers": [asdict(layer) for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelStructure":
        return cls(hidden_size=int(data["hidden_size"]), head_dim=int(data["head_dim"]),
                   layers=[LayerShape(**layer) for layer in data["layers"]])

    def describe(self) -> str:
        """One line per layer, e.g. ``layer 3: heads 6/kv 3, mlp 129``."""
        lines = [f"hidden {self.hidden_size}, head_dim {self.head_dim}, {self.num_hidden_layers} layers"]
        for i, s in enumerate(self.layers):
            lines.append(f"  layer {i}: heads {s.num_attention_heads}/kv {s.num_key_value_heads}, "
                         f"mlp {s.intermediate_size}")
        return "\n".join(lines)
