"""Compensate: correct the kept weights for what was removed. ``refit`` (the least-squares statistics and
solves, FLAP's bias), ``sequential`` (layer by layer on the pruned model's own inputs: the recommended
refit) and ``reconstruct`` (Adam steps on a pruned layer's MLP toward the dense MLP)."""
