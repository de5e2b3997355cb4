"""Mixture-of-experts models: whole experts removed from every MoE layer. ``core`` (scores: REAP, routing
frequency, random; slicing the experts and the router), ``offload`` (checkpoints larger than the machine:
scored with accelerate's placement, rewritten tensor by tensor)."""
