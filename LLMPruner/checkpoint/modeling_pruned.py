"""LLaMA-family causal LMs whose decoder layers keep different numbers of heads and MLP channels.

LLMPruner copies this file, unchanged, into every heterogeneously pruned checkpoint, so that stock
transformers loads such a folder with no LLMPruner installed:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

It needs only torch and transformers. The layers are the stock ones; after the stock constructor (which
``from_pretrained`` runs on the meta device, so nothing is allocated) each layer's projections are
replaced by ones of the size given in ``config.layer_shapes``: one dict per layer with
``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size``. ``config.head_dim`` and
``config.hidden_size`` are shared by all layers.
"""
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def resize_layer(layer: nn.Module, shape: dict, hidden_size: int, head_dim: int) -> None:
    """Replace one decoder layer's seven projections by empty ones of the shape in ``shape``."""
    attn, mlp = layer.self_attn, layer.mlp
    heads, kv_heads, inter = (int(shape[k]) for k in SHAPE_KEYS)
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"layer shape {shape}: query heads must be a positive multiple of KV heads")
    q, kv = heads * head_dim, kv_heads * head_dim
    for parent, name, fan_in, fan_out in ((attn, "q_proj", hidden_size, q), (attn, "k_proj", hidden_size, kv),
                                          (attn, "v_proj", hidden_size, kv), (attn, "o_proj", q, hidden_size),
                                          (mlp, "gate_proj", hidden_size, inter),
                                          (mlp, "up_proj", hidden_size, inter),
                                          (mlp, "down_proj", inter, hidden_size)):
        old = getattr(parent, name)
        setattr(parent, name, nn.Linear(fan_in, fan_out, bias=old.bias is not None,
                                        device=old.weight.device, dtype=old.weight.dtype))
    attn.num_key_value_groups = heads // kv_heads
    mlp.intermediate_size = inter


def resize_layers(model: nn.Module) -> None:
    """Give every decoder layer of ``model`` its own shape from ``model.config.layer_shapes``."""
    config = model.config
    shapes = getattr(config, "layer_shapes", None)
    if not shapes:
        return
    if len(shapes) != config.num_hidden_layers:
        raise ValueError(f"config.layer_shapes has {len(shapes)} entries but num_hidden_layers is "
                         f"{config.num_hidden_layers}: the config is inconsistent")
    for layer, shape in zip(model.model.layers, shapes):
        resize_layer(layer, shape, config.hidden_size, config.head_dim)


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        resize_layers(self)


class PrunedMistralForCausalLM(MistralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        resize_layers(self)


class PrunedQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        resize_layers(self)


#: config.model_type -> the class above that builds it
PRUNED_CLASSES = {"llama": PrunedLlamaForCausalLM, "mistral": PrunedMistralForCausalLM,
                  "qwen2": PrunedQwen2ForCausalLM}
