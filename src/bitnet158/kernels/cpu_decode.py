"""The CPU decode step in native code: one new token per sequence through the whole model in one call.

`decode_step(model, input_ids, cache)` runs what `BitNetForCausalLM.forward` computes for a single new
token with a `KVCache` or the server's `SlotCache` slots (embedding, every layer, final norm, lm_head)
in csrc/decode.cpp, with the same ternary kernels as `bitlinear_forward` (fused q/k/v and gate/up: each
input is quantized once), and without Python between layers. It returns None where it does not apply
(extension missing or switched off, autograd on, a training model, dtypes other than float32/bfloat16),
and the model's own forward runs instead.

Each sequence's result depends only on its own token and cache: the integer sums are exact in every
kernel style and the float parts run row by row in a fixed order, so a batch gives every row what it
would get alone (the server relies on it).

Differences from the PyTorch path: activations stay float32 in every model dtype (a bfloat16 model's
PyTorch path rounds them to bfloat16), and norms, softmax and RoPE round differently in the last bits,
which can flip an activation's int8 code now and then: logits agree to float rounding, not bit for bit.

The decoder is built once per model (fused weights in the kernels' layouts, about the size of the
packed ternary weights, plus float32 copies of the norm weights) and checked against the model's
weights whenever a new `KVCache` or `SlotCache` shows up; weights changed in place during one
generation are not seen. Single sequences use each projection's fastest GEMV style; batches use the
GEMM style (`cpu.gemm_style`), whose weights are repacked at the first batched step (shared where the
styles agree).
"""

from __future__ import annotations

import weakref
from itertools import accumulate
from typing import TYPE_CHECKING

import torch
from torch import nn

from bitnet158.kernels import cpu
from bitnet158.nn.bitlinear import PackedBitLinear
from bitnet158.packing import pack_2bit, unpack_2bit

if TYPE_CHECKING:
    from bitnet158.model import BitNetForCausalLM, KVCache
    from bitnet158.model.slot_cache import SlotBatch, SlotCache

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _fused(parts: list[PackedBitLinear]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Packed weight, per-row (or single) float32 scales and rows of the parts stacked along the output."""
    if len(parts) == 1:
        layer = parts[0]
        return layer.weight, layer.weight_scale.float().contiguous(), layer.out_features
    rows = sum(p.out_features for p in parts)
    weight = pack_2bit(torch.cat([unpack_2bit(p.weight, p.out_features) for p in parts]))
    scales = torch.cat([p.weight_scale.float().expand(p.out_features) for p in parts])
    return weight, scales.contiguous(), rows


class NativeDecoder:
    """The native decoder of one model; `step` is one decode step."""

    def __init__(self, model: BitNetForCausalLM) -> None:
        self.model = weakref.ref(model)  # the model holds this decoder
        self.relu2 = model.model.layers[0].mlp.relu2
        self.out_dtype = model.lm_head.weight.dtype
        self.vocab = model.config.vocab_size
        self._sources = _sources(model)
        self.key = _key(self._sources)
        self._keep: list[torch.Tensor] = []  # everything the native side points into
        self._repacked: dict[tuple[int, str], torch.Tensor] = {}  # (projection, style) -> weight
        self._handles: dict[bool, object] = {}  # batched -> native decoder
        self.last_cache: weakref.ref | None = None  # the cache this decoder last checked the weights for

    def _handle(self, batched: bool) -> object:
        handle = self._handles.get(batched)
        if handle is None:
            handle = self._handles[batched] = self._build(self.model(), batched)
        return handle

    def _build(self, model: BitNetForCausalLM, batched: bool) -> object:
        config = model.config

        def ptr(t: torch.Tensor) -> int:
            t = t.contiguous()
            self._keep.append(t)
            return t.data_ptr()

        def ternary(parts: list[PackedBitLinear]) -> tuple:
            packed, scales, rows = _fused(parts)
            # batches: the style of a GEMM (past GEMV_MAX_M rows), or the one BITNET158_CPU_STYLE forces
            style = cpu.choose_style(rows, parts[0].in_features, cpu.GEMV_MAX_M + 1 if batched else 1)
            key = (id(parts[0]), style)
            if key not in self._repacked:
                self._repacked[key] = cpu.repack(packed, rows, style)
            return (cpu.STYLES.index(style), ptr(self._repacked[key]), ptr(scales), scales.numel(), rows,
                    parts[0].in_features)

        layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.qkv_proj] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj, attn.v_proj]
            gate_up = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
            norms = tuple(ptr(n.weight.detach().float()) for n in (layer.input_layernorm, attn.attn_sub_norm,
                                                                   layer.post_attention_layernorm, mlp.ffn_sub_norm))
            layers.append((norms, ternary(qkv), ternary([attn.o_proj]), ternary(gate_up), ternary([mlp.down_proj])))
        embed, head = model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach()
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim))
        return cpu._cpu.decoder_new(
            (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
             config.intermediate_size, config.vocab_size, config.rms_norm_eps, model.model.layers[0].mlp.relu2,
             _DTYPES[embed.dtype], _DTYPES[head.dtype]),
            (ptr(embed), ptr(head), ptr(model.model.norm.weight.detach().float()), ptr(inv_freq)),
            layers,
        )

    def step(self, input_ids: torch.Tensor, cache: KVCache | SlotBatch) -> torch.Tensor:
        """Logits `[batch, 1, vocab]` (the model's dtype) of the tokens `input_ids [batch, 1]`; advances `cache`."""
        if cache.length + 1 > cache.max_length:
            raise ValueError(f"{cache.length + 1} tokens do not fit a KV cache of {cache.max_length}")
        ids = input_ids.reshape(-1)
        if ids.dtype != torch.int64 or not ids.is_contiguous():
            ids = ids.to(torch.int64).contiguous()
        logits = self.run(ids, _places(cache), _storage(cache), None)
        cache.advance(1)
        return logits[:, None] if self.out_dtype == torch.float32 else logits[:, None].to(self.out_dtype)

    def run(self, ids: torch.Tensor, places: torch.Tensor, storage: KVCache | SlotCache,
            outputs: torch.Tensor | None) -> torch.Tensor:
        """Float32 logits `[len(outputs), vocab]` (every row's without `outputs`) after one native step of the
        tokens `ids [rows]` (int64) at `places [rows, 4]` (see `_places`); does not advance the cache."""
        rows = ids.shape[0]
        count = rows if outputs is None else outputs.shape[0]
        logits = torch.empty(count, self.vocab, dtype=torch.float32)
        cpu._cpu.decoder_step(self._handle(rows > 1), ids.data_ptr(), rows, places.data_ptr(),
                              storage.keys.data_ptr(), storage.values.data_ptr(), _DTYPES[storage.keys.dtype],
                              storage.keys.shape[1], storage.max_length, 0 if outputs is None else outputs.data_ptr(),
                              count, logits.data_ptr())
        return logits

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits `[batch, vocab]` of final-normed `hidden [batch, hidden_size]`: the step's last part
        on its own, for benchmarks and tests of the lm_head kernels."""
        hidden = hidden.float().contiguous()
        logits = torch.empty(hidden.shape[0], self.vocab, dtype=torch.float32)
        cpu._cpu.decoder_lm_head(self._handle(False), hidden.data_ptr(), hidden.shape[0], logits.data_ptr())
        return logits


def _storage(cache: KVCache | SlotBatch) -> KVCache | SlotCache:
    """What holds the keys and values `[layers, rows, kv_heads, max_length, head_dim]`."""
    return getattr(cache, "cache", cache)  # a SlotBatch views its SlotCache


def _places(cache: KVCache | SlotBatch) -> torch.Tensor:
    """Where each sequence lives in the cache, int64 `[batch, 4]`: its row, the keys it holds (where the
    new one goes), its first visible key and the new token's rotary position (csrc/decode.cpp's `Place`)."""
    if hasattr(cache, "slot_list"):  # SlotBatch: one slot per sequence, no padding
        held = [cache.cache.lengths[slot] for slot in cache.slot_list]
        return torch.tensor([[slot, n, 0, n] for slot, n in zip(cache.slot_list, held, strict=True)])
    # KVCache: row b of left-padded sequences of one length; rotary positions and mask as KVCache computes them
    padding = cache.padding.to(torch.int64).clamp(min=0)
    length = torch.full_like(padding, cache.length)
    return torch.stack([torch.arange(len(padding)), length, padding.clamp(max=cache.length),
                        (length - padding).clamp(min=0)], dim=1)


def _sources(model: BitNetForCausalLM) -> list[torch.Tensor]:
    tensors = [model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight]
    for module in model.model.layers.modules():
        if isinstance(module, PackedBitLinear):
            tensors += [module.weight, module.weight_scale]
        elif isinstance(module, nn.Module) and hasattr(module, "eps") and hasattr(module, "weight"):
            tensors.append(module.weight)  # RMSNorm
    return tensors


def _key(tensors: list[torch.Tensor]) -> tuple:
    return tuple((id(t), t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)


def _model_supported(model: BitNetForCausalLM) -> bool:
    config = model.config
    if config.num_attention_heads % config.num_key_value_heads or config.head_dim % 2:
        return False
    layers = model.model.layers
    if not len(layers) or len({layer.mlp.relu2 for layer in layers}) != 1:
        return False
    linears = [m for m in layers.modules() if isinstance(m, nn.Linear | PackedBitLinear)]
    if not all(isinstance(m, PackedBitLinear) and m.bias is None and m.weight.device.type == "cpu" for m in linears):
        return False  # training layers, biases or another device: the PyTorch path
    head, embed = model.lm_head, model.model.embed_tokens.weight
    return (type(head) is nn.Linear and head.bias is None and head.weight.dtype in _DTYPES
            and embed.dtype in _DTYPES and head.weight.device.type == "cpu" and embed.device.type == "cpu")


def decode_step(model: BitNetForCausalLM, input_ids: torch.Tensor, cache: KVCache | SlotBatch) -> torch.Tensor | None:
    """`model(input_ids, cache)` for one new token per row through the native decoder, or None where it
    does not apply (see the module docstring)."""
    from bitnet158.model.kv_cache import KVCache  # here: bitnet158.model imports this module
    from bitnet158.model.slot_cache import SlotBatch

    if type(cache) is SlotBatch:
        if any(n != 1 for n in cache.num_new):  # a prefill
            return None
    elif type(cache) is not KVCache:
        return None
    if not (input_ids.dim() == 2 and input_ids.shape[1] == 1 and input_ids.device.type == "cpu"):
        return None
    decoder = _decoder(model, _storage(cache))
    return None if decoder is None else decoder.step(input_ids, cache)


def applies(model: BitNetForCausalLM, cache: SlotCache) -> bool:
    """Whether `forward_slots` can run `model` on `cache` (now, with autograd as it is)."""
    return _decoder(model, cache) is not None


def forward_slots(
    model: BitNetForCausalLM, cache: SlotCache, slots: list[int], tokens: list[list[int]]
) -> torch.Tensor:
    """Append `tokens[i]` (a chunk of a prompt, or one sampled token) to slot `slots[i]` of `cache`, all in one
    native step; the float32 logits after each slot's last new token, `[len(slots), vocab]`. Where `applies`.

    Every token is a row of the step, at its own position: a row's result depends only on its slot's
    tokens so far, so how prompts are cut into chunks and what runs beside them changes nothing."""
    decoder = _decoder(model, cache)
    if decoder is None:
        raise RuntimeError("the native decoder does not apply to this model and cache")
    ends = [cache.lengths[slot] + len(new) for slot, new in zip(slots, tokens, strict=True)]
    if any(not new for new in tokens) or max(ends) > cache.max_length:
        raise ValueError(f"every slot needs 1 to {cache.max_length} - its length new tokens")
    ids = torch.tensor([token for new in tokens for token in new], dtype=torch.int64)
    places = torch.tensor([[slot, position, 0, position] for slot, new, end in zip(slots, tokens, ends, strict=True)
                           for position in range(end - len(new), end)], dtype=torch.int64)
    last_rows = torch.tensor(list(accumulate(len(new) for new in tokens)), dtype=torch.int64) - 1
    logits = decoder.run(ids, places, cache, last_rows)
    for slot, end in zip(slots, ends, strict=True):
        cache.lengths[slot] = end
    return logits


def _decoder(model: BitNetForCausalLM, storage: KVCache | SlotCache) -> NativeDecoder | None:
    """The model's native decoder for a step on `storage`, built or rebuilt if needed; None where it does not apply."""
    if not (cpu.available() and not torch.is_grad_enabled() and storage.keys.device.type == "cpu"
            and storage.keys.dtype in _DTYPES and storage.keys.is_contiguous()):
        return None
    decoder: NativeDecoder | None = model.__dict__.get("_native_decoder")
    if decoder is None or decoder.last_cache is None or decoder.last_cache() is not storage:
        # A new generation (or a new server's cache): check the model, and rebuild if its weights changed,
        # once rather than every step.
        if not _model_supported(model):
            return None
        if decoder is None or decoder.key != _key(_sources(model)) or decoder.relu2 != model.model.layers[0].mlp.relu2:
            decoder = NativeDecoder(model)
            model.__dict__["_native_decoder"] = decoder
        decoder.last_cache = weakref.ref(storage)
    return decoder
