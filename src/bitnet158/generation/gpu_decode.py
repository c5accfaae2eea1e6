"""Decoding on an NVIDIA GPU: a static KV cache and one CUDA graph per decode step.

The prompt is prefilled through the model's ordinary forward (batched W2A8 tensor-core kernels).
Each decode step then runs a flat, fused sequence per layer, captured once as a CUDA graph:

    qkv  = W2A8(quant(rmsnorm(x)))                  one kernel: norm, quantization and GEMV
    attn = attention(rope(qkv), cache)               one kernel: rotary, cache write, attention
    x    = x + W2A8(quant(sub_norm(attn)))           one kernel, residual added in its epilogue
    h    = relu2(gate) * up of W2A8(quant(rmsnorm(x)))  one kernel, fused gate/up rows
    x    = x + W2A8(quant(sub_norm(h)))              one kernel

The cache slot of the next token lives in device memory and the step increments it, so the same
graph replays at every length. Sampling runs on the GPU; the host only copies each step's tokens
back to emit text, and the next step is already queued when it does.

Models with dense `nn.Linear` layers (for comparisons) run the same step with cuBLAS GEMVs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitnet158.kernels import gpu, gpu_attention
from bitnet158.model import BitNetForCausalLM, KVCache
from bitnet158.model.bitnet import RMSNorm, fuse_projections_
from bitnet158.nn.bitlinear import PackedBitLinear


class GPUDecoder:
    """Prefill and graph-captured decode steps for `batch` sequences of at most `max_length` tokens."""

    def __init__(self, model: BitNetForCausalLM, batch: int, max_length: int, use_graph: bool = True) -> None:
        config = model.config
        self.model = fuse_projections_(model)
        self.batch = batch
        device, dtype = model.device, model.dtype
        self.cache = KVCache(config, batch, max_length, device, dtype)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)  # the graph's input
        self.slot = torch.zeros((), dtype=torch.int32, device=device)  # cache slot of the next token
        head_dim = config.head_dim
        # The same float32 expression as `rotary_cos_sin`, so that the angles agree bit for bit.
        self.inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
        self.attention_workspace = gpu_attention.attention_workspace(
            batch, config.num_attention_heads, config.num_key_value_heads, head_dim, device
        )
        self.use_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def reset(self, padding: torch.Tensor) -> None:
        """Start new sequences with `padding[b]` left pad tokens each."""
        self.cache.length = 0
        self.cache.set_padding(padding)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the (left-padded) prompts `[batch, seq]`; the last position's logits `[batch, vocab]`."""
        logits = self.model(input_ids, self.cache)[:, -1]
        self.slot.fill_(self.cache.length)
        return logits

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row `[batch]`; the next logits `[batch, vocab]` (a buffer reused each step)."""
        if self.cache.length + 1 > self.cache.max_length:
            raise ValueError(f"{self.cache.length + 1} tokens do not fit a KV cache of {self.cache.max_length}")
        self.tokens.copy_(tokens)
        if not self.use_graph:
            logits = self._step()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        self.cache.advance(1)
        return logits

    def _capture(self) -> None:
        # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), undoing the step's
        # effects: its cache write lands in the slot the real step overwrites.
        slot = self.slot.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
                self.slot.copy_(slot)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        self.slot.copy_(slot)

    def _step(self) -> torch.Tensor:
        """One decode step for every row; advances `self.slot` on the device."""
        model, config = self.model, self.model.config
        x = F.embedding(self.tokens, model.model.embed_tokens.weight)  # [batch, hidden]
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _norm_linear(layer.input_layernorm, attn.qkv_proj, x)
            heads = gpu_attention.decode_attention(
                qkv, self.cache.keys[i], self.cache.values[i], self.inv_freq, self.slot, self.cache.padding,
                config.num_attention_heads, workspace=self.attention_workspace,
            )
            x = _norm_linear(attn.attn_sub_norm, attn.o_proj, heads, residual=x)
            if mlp.relu2:
                h = _norm_linear(layer.post_attention_layernorm, mlp.gate_up_proj, x, relu2_gate_up=True)
            else:
                gate, up = _norm_linear(layer.post_attention_layernorm, mlp.gate_up_proj, x).chunk(2, dim=-1)
                h = F.silu(gate) * up
            x = _norm_linear(mlp.ffn_sub_norm, mlp.down_proj, h, residual=x)
        logits = model.lm_head(model.model.norm(x))
        self.slot += 1
        return logits


def _norm_linear(
    norm: RMSNorm, linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
    relu2_gate_up: bool = False,
) -> torch.Tensor:
    """`linear(norm(x))` (+ `residual`, in place), or `relu(gate)^2 * up` of a fused gate/up linear."""
    fusable = isinstance(linear, PackedBitLinear) and linear.bias is None and linear.in_features <= gpu.FUSED_MAX_K
    if fusable and (linear.out_features % 4 == 0 or not relu2_gate_up):
        weight = gpu.layer_weight(linear)
        if residual is not None:
            return gpu.fused_gemv(x, norm.weight, norm.eps, weight, linear.weight_scale, linear.out_features,
                                  "residual", residual, residual)
        epilogue = "relu2_gate_up" if relu2_gate_up else "none"
        return gpu.fused_gemv(x, norm.weight, norm.eps, weight, linear.weight_scale, linear.out_features, epilogue)
    y = linear(norm(x))
    if relu2_gate_up:
        gate, up = y.chunk(2, dim=-1)
        return F.relu(gate).square() * up
    if residual is not None:
        return residual.add_(y)
    return y
