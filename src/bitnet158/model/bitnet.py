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
from bitnet158.model.checkpoint import load_weights, resolve_dtype, save_weights
from bitnet158.model.config import BitNetConfig
from bitnet158.model.kv_cache import KVCache
from bitnet158.nn.bitlinear import BitLinear
from bitnet158.nn.convert import freeze_


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
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_heads != self.num_kv_heads
        )
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.o_proj(self.attn_sub_norm(out))


class MLP(nn.Module):
    def __init__(self, config: BitNetConfig) -> None:
        super().__init__()
        self.gate_proj = BitLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = BitLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = BitLinear(config.intermediate_size, config.hidden_size, bias=False)
        self.ffn_sub_norm = RMSNorm(config.intermediate_size, config.rms_norm_eps)
        self.relu2 = config.hidden_act == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.relu(gate).square() if self.relu2 else F.silu(gate)
        return self.down_proj(self.ffn_sub_norm(gate * self.up_proj(x)))


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
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


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
        seq = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        if cache is None:
            positions = torch.arange(seq, device=input_ids.device)[None].expand(input_ids.shape[0], -1)
            mask = None
        else:
            if cache.length + seq > cache.max_length:
                raise ValueError(f"{cache.length + seq} tokens do not fit a KV cache of {cache.max_length}")
            positions, mask = cache.positions(seq), cache.attention_mask(seq)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(seq)
        return self.lm_head(self.model.norm(x))

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

            return load_gguf(folder, device, dtype, progress)
        if not folder.is_dir():
            raise UserError(f"{folder}: no such model folder")
        config = BitNetConfig.from_json(folder / "config.json")
        device = torch.device(device)
        with torch.device("meta"):
            model = freeze_(cls(config))
        load_weights(model, folder, device, resolve_dtype(config, dtype), progress)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write `config.json` and packed safetensors (sharded past `max_shard_bytes`) to `path`."""
        save_weights(self, Path(path), max_shard_bytes)
