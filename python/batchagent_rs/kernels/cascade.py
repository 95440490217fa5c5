"""Shared-prefix (cascade) decode attention (Triton).

When many sequences share a prefix (a system prompt, a document, sibling agents' common turns),
plain paged decode reads the prefix's KV once per sequence per step. Here the attention is split
at the prefix boundary, as in cascade inference (FlashInfer) and Hydragen:

1. prefix: the decode queries of all sequences of a group, for one KV head, are stacked into the
   rows of one matrix (``sequences x group heads`` rows) and multiplied against the prefix's KV in
   tiles, so the prefix is read once per ``BLOCK_M`` rows instead of once per sequence, and the
   work runs on the tensor cores as a matrix product rather than as matrix-vector products;
2. suffix: each sequence's own tokens through the paged decode kernel;
3. merge: the two partial softmaxes combined by their log-sum-exp.

Sequences are grouped by prefix: the rows ``group_starts[p]`` up to ``group_starts[p+1]`` of `q`
share the prefix in ``prefix_block_tables[p]`` (``prefix_lens[p]`` tokens; a group with a prefix
of length 0 is allowed). Layouts: see `batchagent_rs.kernels.reference`.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .paged_attention import LN2, LOG2E, check_layout, paged_decode_attention


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


@triton.jit
def _prefix_kernel(
    Q,
    K,
    V,
    PBT,
    PLENS,
    STARTS,
    Out,
    LSE,
    qk_scale,
    chunk,
    splits,
    stride_op,
    stride_lp,
    stride_qs,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_pbt,
    stride_os,
    stride_oh,
    stride_ls,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    grp = tl.program_id(0)
    tile = tl.program_id(1) // splits
    split = tl.program_id(1) % splits
    kvh = tl.program_id(2)
    first = tl.load(STARTS + grp)
    n_rows = (tl.load(STARTS + grp + 1) - first) * GROUP
    if tile * BLOCK_M >= n_rows:
        return
    lo = split * chunk
    hi = tl.minimum(tl.load(PLENS + grp), lo + chunk)
    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < n_rows
    seq = first + r // GROUP
    qh = kvh * GROUP + r % GROUP
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + seq[:, None] * stride_qs + qh[:, None] * stride_qh + d[None, :], mask=rmask[:, None], other=0.0
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < hi
        page = tl.load(PBT + grp * stride_pbt + t // PAGE, mask=tmask, other=0).to(tl.int64)
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
    Out += split * stride_op
    LSE += split * stride_lp
    tl.store(Out + seq[:, None] * stride_os + qh[:, None] * stride_oh + d[None, :], out, mask=rmask[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    tl.store(LSE + seq * stride_ls + qh, lse, mask=rmask)


@triton.jit
def _merge_kernel(
    PARTS,
    LSES,
    Out,
    n_rows,
    n_parts,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Rows of Out from `n_parts` partial attentions over disjoint key sets (parts whose
    log-sum-exp is -inf hold no keys and may hold anything)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    d = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for i in range(0, n_parts):
        m = tl.maximum(m, tl.load(LSES + i * n_rows + r, mask=rmask, other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    for i in range(0, n_parts):
        lse = tl.load(LSES + i * n_rows + r, mask=rmask, other=float("-inf"))
        w = tl.exp(lse - m)
        part = tl.load(
            PARTS + i * n_rows * HEAD_DIM + r[:, None] * HEAD_DIM + d[None, :], mask=rmask[:, None], other=0.0
        )
        acc += tl.where(w[:, None] == 0.0, 0.0, part * w[:, None])
        total += w
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(Out + r[:, None] * HEAD_DIM + d[None, :], out.to(Out.dtype.element_ty), mask=rmask[:, None])


def cascade_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    group_starts: torch.Tensor,
    suffix_block_tables: torch.Tensor,
    suffix_lens: torch.Tensor,
    scale: float | None = None,
    block_m: int = 64,
    block_n: int = 64,
    max_group_size: int | None = None,
    max_prefix_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over a shared prefix then each sequence's own suffix (see the module doc).

    `max_group_size` (the largest ``group_starts[p+1] - group_starts[p]``) and `max_prefix_len`
    size the launch grid; each is computed on the device (one device-to-host copy) when not given
    (give both to capture the call in a CUDA graph). `out`, when given
    (contiguous, q's shape and dtype), receives the output."""
    group, page, dim = check_layout(q, k_cache, v_cache)
    seqs, heads = q.shape[0], q.shape[1]
    n_groups = prefix_lens.shape[0]
    if group_starts.shape[0] != n_groups + 1 or prefix_block_tables.shape[0] != n_groups:
        raise ValueError(f"{n_groups} prefixes need {n_groups + 1} group starts and {n_groups} block tables")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if seqs == 0:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    group_starts = group_starts.to(torch.int32)
    prefix_block_tables = prefix_block_tables.to(torch.int32)
    prefix_lens = prefix_lens.to(torch.int32)
    if max_group_size is None:
        max_group_size = int((group_starts[1:] - group_starts[:-1]).max())

    tiles = triton.cdiv(max_group_size * group, block_m)
    kv_heads = k_cache.shape[2]
    # Split the prefix into chunks when the grid would otherwise leave multiprocessors idle (one
    # big group: few tiles); the chunks' partial softmaxes are merged with the suffix's below.
    if max_prefix_len is None:
        max_prefix_len = int(prefix_lens.max()) if n_groups else 0
    programs = max(1, n_groups * tiles * kv_heads)
    target = 2 * _multiprocessors(q.device)
    splits = max(1, min(triton.cdiv(target, programs), triton.cdiv(max_prefix_len, 4 * block_n)))
    chunk = triton.cdiv(triton.cdiv(max(max_prefix_len, 1), splits), block_n) * block_n

    parts = torch.empty((splits + 1, seqs, heads, dim), dtype=torch.float32, device=q.device)
    lses = torch.empty((splits + 1, seqs, heads), dtype=torch.float32, device=q.device)
    # Rows that no group covers keep no prefix keys.
    lses[:splits].fill_(float("-inf"))
    if tiles > 0 and n_groups > 0 and max_prefix_len > 0:
        _prefix_kernel[(n_groups, tiles * splits, kv_heads)](
            q, k_cache, v_cache, prefix_block_tables, prefix_lens, group_starts, parts, lses,
            scale * LOG2E, chunk, splits, parts.stride(0), lses.stride(0),
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            prefix_block_tables.stride(0),
            parts.stride(1), parts.stride(2),
            lses.stride(1),
            GROUP=group,
            HEAD_DIM=dim,
            PAGE=page,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            IEEE=q.dtype == torch.float32,
            num_warps=4,
        )  # fmt: skip
    paged_decode_attention(
        q, k_cache, v_cache, suffix_block_tables, suffix_lens, scale, block_n=block_n, out=parts[splits],
        lse_out=lses[splits],
    )  # fmt: skip
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or not out.is_contiguous() or out.dtype != q.dtype:
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of q's shape {tuple(q.shape)}")
    rows = seqs * heads
    block_r = 16
    _merge_kernel[(triton.cdiv(rows, block_r),)](
        parts, lses, out, rows, splits + 1, HEAD_DIM=dim, BLOCK_R=block_r
    )
    return out
