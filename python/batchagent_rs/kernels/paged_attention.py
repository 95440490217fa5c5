"""Paged decode attention (Triton): one query token per sequence over its paged KV cache.

One program per (sequence, KV head) handles every query head of that KV head's group, so each KV
token is read from memory once per step for the whole group (grouped-query attention: Qwen2.5-7B
has 7 query heads per KV head). The loop gathers `BLOCK_N` tokens at a time through the block
table (pages need not be contiguous or ordered) and keeps an online softmax in float32.
Layouts: see `batchagent_rs.kernels.reference`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# A constexpr: Triton kernels read module globals only when they are constexpr.
LN2 = tl.constexpr(0.6931471805599453)


# The block tables' width changes from step to step in eager steps (see prefill_attention.py).
@triton.jit(do_not_specialize=["stride_bts"])
def _paged_decode_kernel(
    Q,
    K,
    V,
    BT,
    LENS,
    Out,
    LSE,
    qk_scale,
    stride_qs,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_bts,
    stride_os,
    stride_oh,
    stride_ls,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(LENS + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    qh = kvh * GROUP + g
    gmask = g < GROUP
    q = tl.load(Q + seq * stride_qs + qh[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < seq_len
        page = tl.load(BT + seq * stride_bts + t // PAGE, mask=tmask, other=0).to(tl.int64)
        slot = t % PAGE
        k = tl.load(
            K + page[:, None] * stride_kp + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :],
            mask=tmask[:, None],
            other=0.0,
        )
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + page[:, None] * stride_vp + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :],
            mask=tmask[:, None],
            other=0.0,
        )
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    tl.store(
        Out + seq * stride_os + qh[:, None] * stride_oh + d[None, :],
        out.to(Out.dtype.element_ty),
        mask=gmask[:, None],
    )
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(LSE + seq * stride_ls + qh, lse, mask=gmask)


def check_layout(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """(group size, page size, head dim) after checking the shapes agree; raises ValueError."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"q must be [seqs, heads, dim] and the caches [pages, page_size, kv_heads, dim]: "
            f"got q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        )
    heads, dim = q.shape[1], q.shape[2]
    kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    if dim != k_cache.shape[3] or heads % kv_heads:
        raise ValueError(
            f"head dim {dim} vs cache {k_cache.shape[3]}, {heads} query heads vs {kv_heads} KV heads"
        )
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {dim}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("the head dimension must be contiguous")
    return heads // kv_heads, page, dim


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    block_n: int = 64,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over a paged cache: ``(out [seqs, heads, dim] in q's dtype, lse [seqs, heads]
    float32, natural log; -inf for a sequence of length 0, whose output is zero)``. `out`, when given,
    receives the output (a preallocated buffer, e.g. for CUDA graph capture; float32 keeps the output
    unrounded), and `lse_out` (float32, ``[seqs, heads]``) the log-sum-exp."""
    group, page, dim = check_layout(q, k_cache, v_cache)
    seqs, heads = q.shape[0], q.shape[1]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must have q's shape {tuple(q.shape)} with a contiguous head dimension")
    if lse_out is None:
        lse = torch.empty((seqs, heads), dtype=torch.float32, device=q.device)
    elif lse_out.shape != (seqs, heads) or lse_out.dtype != torch.float32:
        raise ValueError(f"lse_out must be a float32 tensor of shape {(seqs, heads)}")
    else:
        lse = lse_out
    if seqs == 0:
        return out, lse
    block_tables = block_tables.to(torch.int32)
    seq_lens = seq_lens.to(torch.int32)
    grid = (seqs, k_cache.shape[2])
    _paged_decode_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, out, lse,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        lse.stride(0),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=dim,
        PAGE=page,
        BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32,
        num_warps=4,
    )  # fmt: skip
    return out, lse
