"""Our (Hugging Face) tensor names and llama.cpp's `bitnet` names for the same tensors."""

from __future__ import annotations

GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
}
PER_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.attn_sub_norm.weight": "attn_sub_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.ffn_sub_norm.weight": "ffn_sub_norm.weight",
}


def gguf_name(name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `blk.3.ffn_up.weight`."""
    if name in GLOBAL:
        return GLOBAL[name]
    prefix, layer, rest = name.split(".", 3)[1:] if name.startswith("model.layers.") else ("", "", "")
    if prefix != "layers" or rest not in PER_LAYER:
        raise KeyError(name)
    return f"blk.{layer}.{PER_LAYER[rest]}"


def scale_name(weight_name: str) -> str:
    """llama.cpp's per-tensor scale beside a linear weight: `blk.0.attn_q.weight` -> `blk.0.attn_q.scale`."""
    return weight_name.removesuffix(".weight") + ".scale"
