"""Shard-by-shard safetensors writing: one shard per part (the embeddings/head, then each decoder layer),
written as soon as the part is final, plus the ``model.safetensors.index.json`` that transformers reads.
Peak memory is one part, never the model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"


class ShardWriter:
    def __init__(self, folder: str | Path, n_shards: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n_shards, self.written = n_shards, 0
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> Path:
        from safetensors.torch import save_file
        assert self.written < self.n_shards, f"only {self.n_shards} shards were announced"
        self.written += 1
        name = f"model-{self.written:05d}-of-{self.n_shards:05d}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        clash = set(tensors) & set(self.weight_map)
        assert not clash, f"tensors written twice: {sorted(clash)[:3]}"
        save_file(tensors, str(self.folder / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            self.weight_map[k] = name
            self.total_size += v.numel() * v.element_size()
        return self.folder / name

    def finish(self) -> None:
        assert self.written == self.n_shards, f"{self.written} of {self.n_shards} shards written"
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def move_into(self, dest: str | Path) -> None:
        """``save_pruned``'s ``weights_writer``: move the finished shards and index into ``dest``."""
        for path in sorted(self.folder.glob("model*.safetensors*")):
            shutil.move(str(path), str(Path(dest) / path.name))

    def adopt(self, other: "ShardWriter") -> None:
        """Take ``other``'s shards (a candidate written in parallel with the same layout) instead of these."""
        assert other.n_shards == self.n_shards and other.written == self.written, "candidates of different layouts"
        for path in self.folder.glob("model*.safetensors*"):
            path.unlink()
        for path in sorted(other.folder.glob("model*.safetensors*")):
            shutil.move(str(path), str(self.folder / path.name))
        self.weight_map, self.total_size = other.weight_map, other.total_size
        other.discard()

    def discard(self) -> None:
        """Delete this writer's folder and everything in it."""
        shutil.rmtree(self.folder, ignore_errors=True)
