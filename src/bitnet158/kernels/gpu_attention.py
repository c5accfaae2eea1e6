"""Decode attention on NVIDIA GPUs: rotary embedding, cache write and attention for one new token per row.

Each row is one sequence's new token at its own cache position, in its own cache slot: `generate()`
decodes a batch of left-padded sequences that share one length, the server decodes requests of any
lengths in any slots. One program per (row, key/value head, split of the cache): the splits read their
part of the cache in parallel (one program per head would walk the whole cache alone), and the last
split to finish combines the partial softmaxes (flash-decoding, without a second kernel). Programs read
only their own row's data, so a row's result does not depend on the other rows of the batch.

A row's cache is cut into at most MAX_SPLITS equal parts of whole BLOCK_L blocks, by its own length: the
programs of the splits past it leave at once. A short cache then costs few programs, whatever the longest
cache the graph was captured for (when the splits were cut by that, the server's 32 rows of about 100
tokens left 15 of 16 programs per head with nothing to read, and attention took 31 us per layer).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from bitnet158.kernels.gpu import _early_launch, _round_to, _wait_for_previous_kernel

MAX_SPLITS = 16  # splits per head
BLOCK_L = 64  # cache positions per step of a split
# The running max of a split with no keys yet: finite, so that exp(_EMPTY - _EMPTY) is 1, not NaN.
_EMPTY: tl.constexpr = tl.constexpr(-1.0e30)


class AttentionWorkspace(NamedTuple):
    """Scratch memory for `decode_attention`, reusable across calls (and graph replays) of one shape."""

    partial_out: torch.Tensor  # [B, H, MAX_SPLITS, D] float32: each split's unnormalised output
    partial_stats: torch.Tensor  # [B, H, MAX_SPLITS, 2] float32: each split's running max and sum
    arrivals: torch.Tensor  # [B, KV] int32, zero between calls: splits done so far


def attention_workspace(batch: int, num_heads: int, kv_heads: int, head_dim: int, device) -> AttentionWorkspace:
    return AttentionWorkspace(
        torch.empty(batch, num_heads, MAX_SPLITS, head_dim, dtype=torch.float32, device=device),
        torch.empty(batch, num_heads, MAX_SPLITS, 2, dtype=torch.float32, device=device),
        torch.zeros(batch, kv_heads, dtype=torch.int32, device=device),
    )


@triton.jit
def _rotate(lo, hi, cos, sin, dtype: tl.constexpr):
    """x * cos + rotate_half(x) * sin of the two halves of a head, each product and sum rounded as in `apply_rotary`."""
    first = _round_to(_round_to(lo * cos, dtype) + _round_to(-hi * sin, dtype), dtype)
    second = _round_to(_round_to(hi * cos, dtype) + _round_to(lo * sin, dtype), dtype)
    return first, second


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, k_cache, v_cache, out_ptr, inv_freq_ptr, lengths_ptr, padding_ptr, slots_ptr, part_out, part_stats,
    arrivals,
    stride_qkv, stride_cb, stride_ch, stride_cl, stride_out, sm_scale,
    KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr,
    SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (b, g, s): the GROUP query heads of key/value head g of row b, over cache positions
    [s * split_l, (s + 1) * split_l) of the row's slot `slots[b]`, where `split_l` is the fewest whole
    BLOCK_L blocks that cut the row's cache into SPLITS parts.

    `qkv` holds `[q (H * D) | k (KV * D) | v (KV * D)]` of the new token. The new token sits at cache
    position `length = lengths[b]` (read from device memory, so a captured graph replays at any length);
    its rotary position is `length - padding[b]`. Keys before `padding[b]` are left padding and are
    skipped. Split 0 writes the new key and value to the cache and attends to them from registers; the
    other splits read only positions below `length`, so no split reads what another writes (rows must
    be in different slots).

    The query heads are padded to 16 rows (zeros, never stored) so that scores and outputs are
    tensor-core dots; each head dimension is handled as two halves, as the rotary embedding pairs them."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lengths_ptr + b)
    split_l = tl.maximum(tl.cdiv(length, SPLITS * BLOCK_L), 1) * BLOCK_L
    used = tl.maximum(tl.cdiv(length, split_l), 1)  # split 0 always: it holds the new token
    if split >= used:
        return
    dtype: tl.constexpr = qkv_ptr.dtype.element_ty
    half: tl.constexpr = HEAD_DIM // 2
    ROWS: tl.constexpr = 16 if GROUP < 16 else GROUP
    pad = tl.load(padding_ptr + b)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    d = tl.arange(0, half)
    angle = (length - pad).to(tl.float32) * tl.load(inv_freq_ptr + d)
    cos = _round_to(tl.cos(angle), dtype)
    sin = _round_to(tl.sin(angle), dtype)
    # Lengths, padding and slots are not written by the kernel before this one: read them while it ends.
    _wait_for_previous_kernel()
    rows = tl.arange(0, ROWS)
    is_head = rows < GROUP
    heads = g * GROUP + rows
    row = qkv_ptr + b * stride_qkv
    q_ptrs = row + heads[:, None] * HEAD_DIM + d[None, :]
    q1, q2 = _rotate(tl.load(q_ptrs, mask=is_head[:, None], other=0.0).to(tl.float32),
                     tl.load(q_ptrs + half, mask=is_head[:, None], other=0.0).to(tl.float32), cos, sin, dtype)
    k_row = row + KV_HEADS * GROUP * HEAD_DIM + g * HEAD_DIM
    v_row = k_row + KV_HEADS * HEAD_DIM
    k1, k2 = _rotate(tl.load(k_row + d).to(tl.float32), tl.load(k_row + half + d).to(tl.float32), cos, sin, dtype)
    v1 = tl.load(v_row + d).to(tl.float32)
    v2 = tl.load(v_row + half + d).to(tl.float32)
    cache_k = k_cache + slot * stride_cb + g * stride_ch
    cache_v = v_cache + slot * stride_cb + g * stride_ch
    first = split == 0
    write = d < tl.where(first, half, 0)  # all of the head in split 0, none elsewhere
    tl.store(cache_k + length * stride_cl + d, k1.to(dtype), mask=write)
    tl.store(cache_k + length * stride_cl + half + d, k2.to(dtype), mask=write)
    tl.store(cache_v + length * stride_cl + d, v1.to(dtype), mask=write)
    tl.store(cache_v + length * stride_cl + half + d, v2.to(dtype), mask=write)
    own = tl.sum(q1 * k1[None, :] + q2 * k2[None, :], axis=1) * sm_scale
    m_i = tl.where(first, own, _EMPTY)
    mine = tl.where(first, 1.0, 0.0)
    l_i = mine + tl.zeros([ROWS], tl.float32)
    acc1 = mine * tl.broadcast_to(v1[None, :], [ROWS, half])
    acc2 = mine * tl.broadcast_to(v2[None, :], [ROWS, half])
    q1 = q1.to(dtype)
    q2 = q2.to(dtype)
    offs_l = tl.arange(0, BLOCK_L)
    end = tl.minimum(length, (split + 1) * split_l)
    for l0 in range(tl.maximum(split * split_l, (pad // BLOCK_L) * BLOCK_L), end, BLOCK_L):
        slots = l0 + offs_l
        ok = (slots < end) & (slots >= pad)
        kp = cache_k + slots[:, None] * stride_cl + d[None, :]
        vp = cache_v + slots[:, None] * stride_cl + d[None, :]
        kb1 = tl.load(kp, mask=ok[:, None], other=0.0)
        kb2 = tl.load(kp + half, mask=ok[:, None], other=0.0)
        vb1 = tl.load(vp, mask=ok[:, None], other=0.0)
        vb2 = tl.load(vp + half, mask=ok[:, None], other=0.0)
        s = tl.dot(q1, tl.trans(kb1), input_precision=PRECISION)
        s = tl.dot(q2, tl.trans(kb2), s, input_precision=PRECISION) * sm_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p = p.to(dtype)
        acc1 = tl.dot(p, vb1, acc1 * alpha[:, None], input_precision=PRECISION)
        acc2 = tl.dot(p, vb2, acc2 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    # Publish this split's partial result; the release/acquire of the counter orders it before the
    # last split reads it.
    part = (b * KV_HEADS * GROUP + heads) * SPLITS + split
    tl.store(part_out + part[:, None] * HEAD_DIM + d[None, :], acc1, mask=is_head[:, None])
    tl.store(part_out + part[:, None] * HEAD_DIM + half + d[None, :], acc2, mask=is_head[:, None])
    tl.store(part_stats + part * 2, m_i, mask=is_head)
    tl.store(part_stats + part * 2 + 1, l_i, mask=is_head)
    counter = arrivals + b * KV_HEADS + g
    if tl.atomic_add(counter, 1, sem="acq_rel") == used - 1:
        tl.store(counter, 0)  # ready for the next call
        group_heads = g * GROUP + tl.arange(0, GROUP)
        splits = tl.arange(0, SPLITS)
        parts = (b * KV_HEADS * GROUP + group_heads[:, None]) * SPLITS + splits[None, :]  # [GROUP, SPLITS]
        ran = (splits < used)[None, :]
        m_s = tl.load(part_stats + parts * 2, mask=ran, other=_EMPTY, cache_modifier=".cg")
        l_s = tl.load(part_stats + parts * 2 + 1, mask=ran, other=0.0, cache_modifier=".cg")
        m_all = tl.max(m_s, axis=1)
        weight = tl.exp(m_s - m_all[:, None])
        total = tl.sum(l_s * weight, axis=1)
        o1 = tl.load(part_out + parts[:, :, None] * HEAD_DIM + d[None, None, :], mask=ran[:, :, None], other=0.0,
                     cache_modifier=".cg")
        o2 = tl.load(part_out + parts[:, :, None] * HEAD_DIM + half + d[None, None, :], mask=ran[:, :, None],
                     other=0.0, cache_modifier=".cg")
        out1 = tl.sum(o1 * weight[:, :, None], axis=1) / total[:, None]
        out2 = tl.sum(o2 * weight[:, :, None], axis=1) / total[:, None]
        out_row = out_ptr + b * stride_out + group_heads[:, None] * HEAD_DIM
        tl.store(out_row + d[None, :], out1.to(dtype))
        tl.store(out_row + half + d[None, :], out2.to(dtype))


def decode_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    inv_freq: torch.Tensor,
    lengths: torch.Tensor,
    padding: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
    out: torch.Tensor | None = None,
    workspace: AttentionWorkspace | None = None,
) -> torch.Tensor:
    """Attention of one new token per row. `qkv [B, (H + 2 KV) D]`; caches `[S, KV, L, D]` (one layer, S
    slots); per row (int tensors `[B]`): `lengths`, the new token's cache position; `padding`, left pad
    tokens; `slots`, the cache slot it reads and writes (distinct rows, distinct slots).
    `workspace` (from `attention_workspace`) saves allocating one per call: the decode graph passes its own.

    Writes the rotated key and the value into position `lengths[b]` of slot `slots[b]` and returns `[B, H * D]`."""
    batch = qkv.shape[0]
    _, kv_heads, _, head_dim = k_cache.shape
    group = num_heads // kv_heads
    if group & (group - 1) or head_dim & (head_dim - 1) or k_cache.stride(3) != 1:
        raise ValueError(f"decode attention needs power-of-two head groups and head_dim, got {group}, {head_dim}")
    if out is None:
        out = torch.empty(batch, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    if workspace is None:
        workspace = attention_workspace(batch, num_heads, kv_heads, head_dim, qkv.device)
    _decode_attention_kernel[(batch, kv_heads, MAX_SPLITS)](
        qkv, k_cache, v_cache, out, inv_freq, lengths, padding, slots, *workspace,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), head_dim**-0.5,
        KV_HEADS=kv_heads, GROUP=group, HEAD_DIM=head_dim, BLOCK_L=BLOCK_L, SPLITS=MAX_SPLITS,
        PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",  # float32 models: no tf32 rounding
        num_warps=4, **_early_launch(qkv.device),
    )
    return out


__all__ = ["AttentionWorkspace", "attention_workspace", "decode_attention"]
