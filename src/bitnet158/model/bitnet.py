"""The BitNet b1.58 decoder of microsoft/bitnet-b1.58-2B-4T.

Llama-style blocks (RMSNorm, RoPE, grouped-query attention, no biases) with two BitNet additions:
`attn_sub_norm` before `o_proj` and `ffn_sub_norm` before `down_proj`, and a relu² gated MLP.
Module and tensor names follow Hugging Face's `BitNetForCausalLM`, so state dicts line up.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bitnet158.errors import UserError
from bitnet158.kernels import cpu_decode
from bitnet158.model.checkpoint import load_weights, resolve_dtype, save_weights
from bitnet158.model.config import BitNetConfig
from bitnet158.model.kv_cache import KVCache
from bitnet158.nn.bitlinear import BitLinear, PackedBitLinear
from bitnet158.nn.convert import freeze_
from bitnet158.packing import pack_2bit, unpack_2bit


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[batch, seq, head_dim]` for integer positions `[batch, seq]`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [batch, heads, seq, head_dim]`, pairing dimension i with i + head_dim / 2."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, config: BitNetConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = BitLinear(config.hidden_size, q_size, bias=False)
        self.k_proj = BitLinear(config.hidden_size, kv_size, bias=False)
        self.v_proj = BitLinear(config.hidden_size, kv_size, bias=False)
        self.o_proj = BitLinear(q_size, config.hidden_size, bias=False)
        self.attn_sub_norm = RMSNorm(q_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        if hasattr(self, "qkv_proj"):  # fused by `fuse_projections_`
            q, k, v = self.split_qkv(self.qkv_proj(x))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(self.attn_sub_norm(self.attend(q, k, v, cos, sin, mask, cache)))

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's output `[..., (heads + 2 kv_heads) * head_dim]` as q, k and v."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return qkv.split([q_size, kv_size, kv_size], dim=-1)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """Attention of the projected `q, k, v [batch, seq, heads * head_dim]`, rotary applied here and the new
        keys and values appended to `cache`; `[batch, seq, heads * head_dim]`, before `attn_sub_norm`."""
        batch, seq, _ = q.shape
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return out.transpose(1, 2).reshape(batch, seq, -1)


class MLP(nn.Module):
    def __init__(self, config: BitNetConfig) -> None:
        super().__init__()
        self.gate_proj = BitLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = BitLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = BitLinear(config.intermediate_size, config.hidden_size, bias=False)
        self.ffn_sub_norm = RMSNorm(config.intermediate_size, config.rms_norm_eps)
        self.relu2 = config.hidden_act == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):  # fused by `fuse_projections_`
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate = F.relu(gate).square() if self.relu2 else F.silu(gate)
        return self.down_proj(self.ffn_sub_norm(gate * up))


# Fused projections: one linear for q/k/v and one for gate/up read the input once and launch once.
# A fused `PackedBitLinear` packs the concatenated ternary codes, with one scale per output row.
_FUSIONS = (
    ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
)


@torch.no_grad()
def _concat_linears(parts: list[nn.Module]) -> nn.Module:
    if all(isinstance(p, PackedBitLinear) for p in parts):
        first = parts[0]
        fused = PackedBitLinear(first.in_features, sum(p.out_features for p in parts), device=first.weight.device)
        fused.weight = pack_2bit(torch.cat([unpack_2bit(p.weight, p.out_features) for p in parts]))
        fused.weight_scale = torch.cat([p.weight_scale.float().expand(p.out_features) for p in parts])
        return fused
    if all(type(p) is nn.Linear and p.bias is None for p in parts):
        first = parts[0]
        fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=False, device="meta")
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        return fused
    raise TypeError(f"cannot fuse {[type(p).__name__ for p in parts]}")


@torch.no_grad()
def _split_linear(fused: nn.Module, sizes: list[int]) -> list[nn.Module]:
    parts = []
    if isinstance(fused, PackedBitLinear):
        codes = unpack_2bit(fused.weight, fused.out_features).split(sizes)
        scales = fused.weight_scale.float().expand(fused.out_features).split(sizes)
        for part_codes, scale in zip(codes, scales, strict=True):
            layer = PackedBitLinear(fused.in_features, len(part_codes), device=fused.weight.device)
            layer.weight = pack_2bit(part_codes)
            layer.weight_scale = scale[:1].clone() if bool((scale == scale[0]).all()) else scale.clone()
            parts.append(layer)
        return parts
    for weight in fused.weight.split(sizes):
        layer = nn.Linear(fused.in_features, weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
        parts.append(layer)
    return parts


def fuse_projections_(model: BitNetForCausalLM) -> BitNetForCausalLM:
    """Replace q/k/v by one `qkv_proj` and gate/up by one `gate_up_proj` in every layer, in place.

    Inference layers only (packed, or plain `nn.Linear`); the outputs are those of the unfused layers.
    `save_pretrained` still writes the unfused Hugging Face names."""
    with torch.inference_mode(False):  # normal tensors even when called under inference mode
        return _fuse(model)


def _fuse(model: BitNetForCausalLM) -> BitNetForCausalLM:
    for layer in model.model.layers:
        for block_name, fused_name, names in _FUSIONS:
            block = getattr(layer, block_name)
            if hasattr(block, fused_name):
                continue
            setattr(block, fused_name, _concat_linears([getattr(block, n) for n in names]))
            for name in names:
                delattr(block, name)
    return model


def unfuse_projections_(model: BitNetForCausalLM) -> BitNetForCausalLM:
    """Undo `fuse_projections_`, in place."""
    for layer in model.model.layers:
        for block_name, fused_name, names in _FUSIONS:
            block = getattr(layer, block_name)
            if not hasattr(block, fused_name):
                continue
            sizes = _projection_sizes(model.config, names)
            for name, part in zip(names, _split_linear(getattr(block, fused_name), sizes), strict=True):
                setattr(block, name, part)
            delattr(block, fused_name)
    return model


def _projection_sizes(config: BitNetConfig, names: tuple[str, ...]) -> list[int]:
    if names[0] == "q_proj":
        kv = config.num_key_value_heads * config.head_dim
        return [config.num_attention_heads * config.head_dim, kv, kv]
    return [config.intermediate_size, config.intermediate_size]


class DecoderLayer(nn.Module):
    def __init__(self, config: BitNetConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class BitNetModel(nn.Module):
    def __init__(self, config: BitNetConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final-normed hidden states `[batch, seq, hidden]`; with a `KVCache`, the tokens are appended to it."""
        cos, sin, mask = self.attention_inputs(input_ids, cache)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.norm(x)

    def attention_inputs(
        self, input_ids: torch.Tensor, cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The rotary cos and sin of the tokens `input_ids [batch, seq]`, and their attention mask (None: causal
        over `input_ids` alone)."""
        seq = input_ids.shape[1]
        if cache is None:
            positions = torch.arange(seq, device=input_ids.device)[None].expand(input_ids.shape[0], -1)
            mask = None
        else:
            if cache.length + seq > cache.max_length:
                raise ValueError(f"{cache.length + seq} tokens do not fit a KV cache of {cache.max_length}")
            positions, mask = cache.positions(seq), cache.attention_mask(seq)
        dtype = self.embed_tokens.weight.dtype
        return *rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype), mask


class BitNetForCausalLM(nn.Module):
    """`model(input_ids)` returns logits `[batch, seq, vocab]`. With a `KVCache`, the tokens are
    appended to the cache and attend to everything before them.

    A freshly built model trains (fp master weights in `BitLinear`); `bitnet158.nn.freeze_` turns
    it into packed inference layers, which is what `from_pretrained` returns.
    """

    def __init__(self, config: BitNetConfig) -> None:
        super().__init__()
        self.config = config
        self.model = BitNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation for training from scratch: normal(0, std) weights, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None and input_ids.device.type == "cpu":  # one new token: native CPU decoder, if it applies
            logits = cpu_decode.decode_step(self, input_ids, cache)
            if logits is not None:
                return logits
        return self.lm_head(self.model(input_ids, cache))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> BitNetForCausalLM:
        """Load a Hugging Face BitNet folder (packed or master weights), or a `.gguf` file, as a packed
        inference model.

        `dtype` is that of the embeddings, norms and activations: by default the config's `torch_dtype`,
        on the CPU too, where tensors stored in it stay views of the memory-mapped file (no copy).
        `progress(done, total)` is called after each tensor.
        """
        folder = Path(path)
        if folder.suffix == ".gguf" and folder.is_file():
            from bitnet158.formats.gguf_import import load_gguf  # imports this module

            model = load_gguf(folder, device, dtype, progress)
            return fuse_projections_(model) if torch.device(device).type == "cuda" else model
        if not folder.is_dir():
            raise UserError(f"{folder}: no such model folder")
        config = BitNetConfig.from_json(folder / "config.json")
        device = torch.device(device)
        with torch.device("meta"):
            model = freeze_(cls(config))
        load_weights(model, folder, device, resolve_dtype(config, dtype), progress)
        if device.type == "cuda":  # fused projections on the GPU; the CPU keeps its layers as stored
            fuse_projections_(model)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write `config.json` and packed safetensors (sharded past `max_shard_bytes`) to `path`."""
        fused = hasattr(self.model.layers[0].self_attn, "qkv_proj") if len(self.model.layers) else False
        if fused:  # the files hold Hugging Face's unfused names
            unfuse_projections_(self)
        try:
            save_weights(self, Path(path), max_shard_bytes)
        finally:
            if fused:
                fuse_projections_(self)
