"""Fused element-wise kernels of the model runner's layers (Triton).

Each replaces several PyTorch element-wise passes over the step's activations (in a 16k-token
prefill step of Qwen2.5-7B those passes took about a third of the step, around the matrix
products) with one read and one write, and rounds where PyTorch's bf16 arithmetic rounds, so that
the results equal `transformers`' Qwen2 / Llama arithmetic up to the order of one float32 sum:

- `add_rms_norm`: ``residual += delta`` (rounded to the input dtype) then RMSNorm of the sum
  (float32 statistics, the normalised value rounded before the weight multiplies it);
- `silu_and_mul`: ``silu(gate) * up`` from the fused gate-up projection, each rounded like
  ``act_fn(gate) * up``;
- `rope_and_cache`: the rotary embedding of q and k out of the fused q/k/v projection, q written
  contiguous, the rotated k and v written straight into their paged-cache slots.

References in `batchagent_rs.kernels.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(X, D, W, Out, Res, n_cols, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < n_cols
    x = tl.load(X + row * n_cols + c, mask=mask, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(D + row * n_cols + c, mask=mask, other=0.0).to(tl.float32)).to(
            x.dtype
        )
        tl.store(Res + row * n_cols + c, x, mask=mask)
    x32 = x.to(tl.float32)
    var = tl.sum(x32 * x32, 0) / n_cols
    y = (x32 * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(W + c, mask=mask, other=0.0)
    tl.store(Out + row * n_cols + c, (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype), mask=mask)


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + delta) * weight, x + delta)`` over the last dimension of a contiguous
    ``[rows, cols]`` `x` (without `delta`, the second is `x` itself)."""
    rows, cols = x.shape
    out = torch.empty_like(x)
    res = torch.empty_like(x) if delta is not None else x
    if rows:
        _add_rms_norm_kernel[(rows,)](
            x, delta if delta is not None else x, weight, out, res, cols, eps,
            HAS_DELTA=delta is not None, BLOCK=triton.next_power_of_2(cols), num_warps=8,
        )  # fmt: skip
    return out, res


@triton.jit
def _silu_and_mul_kernel(GU, Out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < n_cols
    g = tl.load(GU + row * 2 * n_cols + c, mask=mask, other=0.0)
    u = tl.load(GU + row * 2 * n_cols + n_cols + c, mask=mask, other=0.0)
    g32 = g.to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
    tl.store(Out + row * n_cols + c, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for a contiguous ``[rows, 2 * inter]`` gate-up projection."""
    rows, cols2 = gate_up.shape
    cols = cols2 // 2
    out = torch.empty((rows, cols), dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(cols, block))](gate_up, out, cols, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _rope_and_cache_kernel(
    QKV,
    COS,
    SIN,
    SLOTS,
    Q,
    KC,
    VC,
    stride_qkv,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    KV_PAD: tl.constexpr,
    DIM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, DIM)
    half: tl.constexpr = DIM // 2
    partner = (d + half) % DIM
    sign = tl.where(d < half, -1.0, 1.0)
    cos = tl.load(COS + t * DIM + d).to(tl.float32)
    sin = tl.load(SIN + t * DIM + d).to(tl.float32)
    base = QKV + t * stride_qkv
    slot = tl.load(SLOTS + t)

    h = tl.arange(0, HEADS_PAD)
    hm = (h < HEADS)[:, None]
    x = tl.load(base + h[:, None] * DIM + d[None, :], mask=hm, other=0.0)
    xr = (
        tl.load(base + h[:, None] * DIM + partner[None, :], mask=hm, other=0.0).to(tl.float32) * sign[None, :]
    )
    a = (x.to(tl.float32) * cos[None, :]).to(x.dtype).to(tl.float32)
    b = (xr.to(x.dtype).to(tl.float32) * sin[None, :]).to(x.dtype).to(tl.float32)
    tl.store(Q + t * HEADS * DIM + h[:, None] * DIM + d[None, :], (a + b).to(x.dtype), mask=hm)

    g = tl.arange(0, KV_PAD)
    gm = (g < KV_HEADS)[:, None]
    kbase = base + HEADS * DIM
    k = tl.load(kbase + g[:, None] * DIM + d[None, :], mask=gm, other=0.0)
    kr = (
        tl.load(kbase + g[:, None] * DIM + partner[None, :], mask=gm, other=0.0).to(tl.float32)
        * sign[None, :]
    )
    a = (k.to(tl.float32) * cos[None, :]).to(k.dtype).to(tl.float32)
    b = (kr.to(k.dtype).to(tl.float32) * sin[None, :]).to(k.dtype).to(tl.float32)
    tl.store(
        KC + slot * KV_HEADS * DIM + g[:, None] * DIM + d[None, :], (a + b).to(KC.dtype.element_ty), mask=gm
    )
    v = tl.load(kbase + KV_HEADS * DIM + g[:, None] * DIM + d[None, :], mask=gm, other=0.0)
    tl.store(VC + slot * KV_HEADS * DIM + g[:, None] * DIM + d[None, :], v.to(VC.dtype.element_ty), mask=gm)


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
    kv_heads: int,
) -> torch.Tensor:
    """Rotary embedding (``x * cos + rotate_half(x) * sin``) of q and k out of ``qkv [tokens,
    (heads + 2 * kv_heads) * dim]`` (rows contiguous, any row stride); returns q ``[tokens, heads,
    dim]`` and writes the rotated k and v into ``k_cache`` / ``v_cache [pages, page_size, kv_heads,
    dim]`` (contiguous) at `slots` (``page * page_size + offset``). `cos`, `sin`: ``[tokens, dim]``
    contiguous, in qkv's dtype."""
    tokens = qkv.shape[0]
    dim = cos.shape[1]
    if qkv.stride(1) != 1 or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError("qkv rows, cos and sin must be contiguous")
    if not k_cache.is_contiguous() or not v_cache.is_contiguous():
        raise ValueError("the caches must be contiguous")
    q = torch.empty((tokens, heads, dim), dtype=qkv.dtype, device=qkv.device)
    if tokens:
        _rope_and_cache_kernel[(tokens,)](
            qkv, cos, sin, slots, q, k_cache, v_cache, qkv.stride(0),
            HEADS=heads, KV_HEADS=kv_heads, HEADS_PAD=triton.next_power_of_2(heads),
            KV_PAD=triton.next_power_of_2(kv_heads), DIM=dim, num_warps=4,
        )  # fmt: skip
    return q
