"""Channel ids and the links between them (a union-find over integer ids).

Every parameter dimension gets fresh ids, one per index (a ``[4, 3]`` weight: 4 ids for its rows, 3 for
its columns). Tracing links ids that must be removed together; connected ids form one unit of pruning.
``-1`` means "no channel identity" (e.g. the result of a reduction over channels).
"""
from __future__ import annotations

import numpy as np
import torch

NO_ID = -1


class IdSpace:
    def __init__(self) -> None:
        self.size = 0
        self._edges: list[np.ndarray] = []

    def fresh(self, n: int) -> torch.Tensor:
        ids = torch.arange(self.size, self.size + n, dtype=torch.long)
        self.size += n
        return ids

    def link(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Join ``a[i]`` with ``b[i]`` for every position (same shapes; ``NO_ID`` entries are skipped)."""
        a, b = torch.broadcast_tensors(a, b)
        a, b = a.reshape(-1), b.reshape(-1)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if keep.any():
            self._edges.append(torch.stack([a[keep], b[keep]], 1).numpy())

    def components(self) -> np.ndarray:
        """Component label of every id (labels are the smallest id of each component)."""
        parent = np.arange(self.size)
        if not self._edges:
            return parent
        edges = np.unique(np.concatenate(self._edges), axis=0)
        # vectorised label propagation: each round points every id at the smallest label of its
        # neighbours, then jumps pointers; converges in O(log n) rounds for these sparse graphs
        a, b = edges[:, 0], edges[:, 1]
        while True:
            la, lb = parent[a], parent[b]
            low = np.minimum(la, lb)
            changed = False
            for side in (la, lb):
                mask = low < parent[side]
                if mask.any():
                    np.minimum.at(parent, side[mask], low[mask])
                    changed = True
            parent = parent[parent]
            while True:
                nxt = parent[parent]
                if np.array_equal(nxt, parent):
                    break
                parent = nxt
            if not changed:
                return parent
