"""Pruning models larger than the machine: one decoder layer on the device at a time.

``weights`` (meta-device skeleton, tensors from safetensors or a CPU copy), ``discover`` (families from a
one-layer template), ``states`` (boundary hidden states and how layers are called), ``taylor`` (exact
Taylor scores, forward then top-down backward), ``apply`` (statistics, selection, compensation and
shrinking layer by layer, writing shard by shard), ``pipeline`` (``prune_offloaded``: the whole run),
``placement`` (accelerate's ``device_map`` for the in-memory path), ``memory`` (peaks per stage).
"""
