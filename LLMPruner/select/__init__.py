"""Select: which units go. ``units`` (per-layer or global choice at a ratio, the reference's rounding, the
pruning plan), ``budget`` (a global parameter budget spread over families), ``obs`` (structured Optimal
Brain Surgeon on the pruned model's inputs) and ``allocation`` (OBS counts moved between layers by the
residual-stream error)."""
