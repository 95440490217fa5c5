"""Paged prefill (context) attention (Triton): the new tokens of each sequence attend causally to
its whole paged context.

A step of the engine packs the new tokens of many sequences into one ``[tokens, heads, dim]``
matrix, no padding: sequence ``i``'s tokens are rows ``query_starts[i]`` up to
``query_starts[i+1]``, the last ``n_i`` of its ``context_lens[i]`` tokens, whose K and V are
already in the paged cache (written before the call). New token ``j`` of sequence ``i`` sits at
position ``context_lens[i] - n_i + j`` and sees the keys at positions up to its own: a
block-diagonal causal mask over the packed sequences, with each sequence's cached prefix (a prompt
chunk computed in an earlier step, prefix pages shared by block hash) in front of it.

One program per (tile of ``BLOCK_M`` query tokens of one sequence, query head). The tiles are
listed up front by `prefill_tiles` (host side, from the layout the scheduler already holds), so the
launch needs no device-to-host copy and the grid has no idle programs whatever the mix of chunk
lengths. Each program walks the context in ``BLOCK_N`` tokens through the block table, up to its
last query's position, with an online softmax in float32; only the last blocks need the causal
mask. Layouts: see `batchagent_rs.kernels.reference`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .paged_attention import LOG2E, check_layout


@triton.jit
def _prefill_blocks(
    acc, l_i, m_i, q, pos, lo, hi,
    K, V, BT, seq, kvh, qk_scale,
    stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_bts,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    """Keys ``lo .. hi`` (in blocks of BLOCK_N) into the online softmax; ``MASKED`` blocks apply the
    causal mask and the end of the context, the others need no mask at all."""
    d = tl.arange(0, HEAD_DIM)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        if MASKED:
            tmask = t < hi
            page = tl.load(BT + seq * stride_bts + t // PAGE, mask=tmask, other=0).to(tl.int64)
        else:
            page = tl.load(BT + seq * stride_bts + t // PAGE).to(tl.int64)
        slot = t % PAGE
        k_ptr = K + page[:, None] * stride_kp + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :]
        v_ptr = V + page[:, None] * stride_vp + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :]
        if MASKED:
            k = tl.load(k_ptr, mask=tmask[:, None], other=0.0)
        else:
            k = tl.load(k_ptr)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if MASKED:
            s = tl.where(tmask[None, :] & (t[None, :] <= pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptr, mask=tmask[:, None], other=0.0)
        else:
            v = tl.load(v_ptr)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


# The tile count and the block tables' width change from step to step; left unspecialized, a step
# whose values change divisibility by 16 does not compile a new variant in the middle of a run.
@triton.jit(do_not_specialize=["n_tiles", "stride_bts"])
def _paged_prefill_kernel(
    Q,
    K,
    V,
    BT,
    CTX,
    QSTARTS,
    TILES,
    Out,
    qk_scale,
    n_tiles,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_bts,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(TILES + tile)
    m0 = tl.load(TILES + n_tiles + tile)
    q_first = tl.load(QSTARTS + seq)
    q_len = tl.load(QSTARTS + seq + 1) - q_first
    ctx = tl.load(CTX + seq)
    kvh = head // GROUP

    m = m0 + tl.arange(0, BLOCK_M)
    mmask = m < q_len
    pos = ctx - q_len + m  # each query's position: it sees keys 0 ..= pos
    d = tl.arange(0, HEAD_DIM)
    rows = (q_first + m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + d[None, :], mask=mmask[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys past the tile's last query are never seen; the keys before `full` are seen by every
    # query of the tile and go through a loop with no mask (which the compiler pipelines); the
    # diagonal blocks after it are masked. Two loops, as in Triton's fused-attention tutorial.
    hi = tl.minimum(ctx, ctx - q_len + m0 + BLOCK_M)
    full = tl.maximum(ctx - q_len + m0 + 1, 0) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _prefill_blocks(
        acc, l_i, m_i, q, pos, 0, full, K, V, BT, seq, kvh, qk_scale,
        stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_bts,
        HEAD_DIM, PAGE, BLOCK_N, False, IEEE,
    )  # fmt: skip
    acc, l_i, m_i = _prefill_blocks(
        acc, l_i, m_i, q, pos, full, hi, K, V, BT, seq, kvh, qk_scale,
        stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_bts,
        HEAD_DIM, PAGE, BLOCK_N, True, IEEE,
    )  # fmt: skip

    # Every valid query sees at least key 0 (its own position or earlier), so l_i > 0 there.
    out = acc / tl.where(mmask, l_i, 1.0)[:, None]
    tl.store(
        Out + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mmask[:, None],
    )


# Launch settings: query tokens per tile (one value for every head size: the runner lists the tiles
# from the scheduler's layout without asking the kernel), and per head size the key block, warps
# and pipeline stages. Picked by a sweep on an H200 (benches/prefill_attention.py,
# benches/results/prefill-attention-h200.json): for head sizes 64 and 128, 4 warps beat 8 by 25%
# on W's step shapes and larger tiles or deeper pipelines gained nothing.
PREFILL_BLOCK_M = 64
PREFILL_LAUNCH: dict[int, tuple[int, int, int]] = {64: (64, 4, 2), 128: (64, 4, 2)}  # dim -> N, warps, stages


def prefill_launch(dim: int) -> tuple[int, int, int]:
    """(key block, warps, pipeline stages) of the prefill kernel for head size `dim` (head sizes
    not swept keep the launch used before the sweep)."""
    return PREFILL_LAUNCH.get(dim, (64, 4 if dim <= 64 else 8, 2))


def prefill_tiles(query_starts: torch.Tensor, block_m: int | None = None) -> torch.Tensor:
    """The launch's tile list, ``[2, tiles]`` int32 (row 0: the sequence, row 1: its first query
    token), from the layout's ``query_starts`` on the host (a CPU tensor: no device copy back);
    `block_m` defaults to `PREFILL_BLOCK_M`, the kernel's default."""
    block_m = PREFILL_BLOCK_M if block_m is None else block_m
    starts = query_starts.to("cpu", torch.int64)
    lens = starts[1:] - starts[:-1]
    per_seq = (lens + block_m - 1) // block_m
    seq = torch.repeat_interleave(torch.arange(lens.shape[0]), per_seq)
    first = torch.cumsum(per_seq, 0) - per_seq
    within = torch.arange(seq.shape[0]) - first[seq]
    return torch.stack([seq, within * block_m]).to(torch.int32)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    tiles: torch.Tensor | None = None,
    block_m: int | None = None,
    launch: tuple[int, int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens ``q [tokens, heads, dim]`` over each sequence's paged
    context (see the module doc); returns ``[tokens, heads, dim]`` in q's dtype. `tiles` is
    `prefill_tiles(query_starts, block_m)` on q's device; when not given it is computed from
    `query_starts`, which then costs a device-to-host copy if `query_starts` is on the device.
    `block_m` (query tokens per tile; the tiles' too) and `launch` (key block, warps, stages)
    default to `PREFILL_BLOCK_M` and `prefill_launch(dim)`."""
    group, page, dim = check_layout(q, k_cache, v_cache)
    block_m = PREFILL_BLOCK_M if block_m is None else block_m
    block_n, warps, stages = prefill_launch(dim) if launch is None else launch
    heads = q.shape[1]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must have q's shape {tuple(q.shape)} with a contiguous head dimension")
    if tiles is None:
        tiles = prefill_tiles(query_starts, block_m).to(q.device)
    n_tiles = tiles.shape[1]
    if n_tiles == 0 or q.shape[0] == 0:
        return out
    if not tiles.is_contiguous() or tiles.dtype != torch.int32:
        raise ValueError("tiles must be a contiguous int32 tensor from prefill_tiles")
    block_tables = block_tables.to(torch.int32)
    query_starts = query_starts.to(q.device, torch.int32)
    context_lens = context_lens.to(q.device, torch.int32)
    _paged_prefill_kernel[(n_tiles, heads)](
        q, k_cache, v_cache, block_tables, context_lens, query_starts, tiles, out,
        scale * LOG2E, n_tiles,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group,
        HEAD_DIM=dim,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32,
        num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    return out
