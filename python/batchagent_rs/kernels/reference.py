"""Plain PyTorch references for the kernels in this package.

Each reference computes the same function as its Triton kernel, one sequence at a time, in the
precision of its inputs upcast to float64 by the tests. They are slow on purpose: clarity is the
point, and the tests compare the kernels against them on random inputs.

Layouts shared by every kernel and reference:
- `q`: ``[num_seqs, num_q_heads, head_dim]``, one decode query per sequence;
- `k_cache`, `v_cache`: ``[num_pages, page_size, num_kv_heads, head_dim]``, the paged KV cache;
- `block_tables`: ``[num_seqs, max_pages]`` int32, page ids of each sequence in order;
- `seq_lens`: ``[num_seqs]`` int32, tokens of each sequence in the cache (the query attends to all).
Grouped-query attention: query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)``.
"""

from __future__ import annotations

import math

import torch


def gather_kv(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence, ``[length, num_kv_heads, head_dim]``."""
    page_size = cache.shape[1]
    n_pages = (length + page_size - 1) // page_size
    blocks = cache[pages[:n_pages].long()]  # [n_pages, page_size, kv_heads, dim]
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:length]


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per head over `k`/`v` ``[length, kv_heads, dim]``: the output ``[heads, dim]`` and the
    natural-log sum of exponentials of the scores ``[heads]`` (``-inf`` and a zero output when
    `length` is 0)."""
    heads, dim = q.shape
    group = heads // k.shape[1]
    if k.shape[0] == 0:
        return q.new_zeros(heads, dim), q.new_full((heads,), -math.inf)
    k = k.repeat_interleave(group, dim=1)  # [length, heads, dim]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,lhd->hl", q, k) * scale
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[:, None])
    return torch.einsum("hl,lhd->hd", probs, v), lse


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over a paged cache: ``(out [seqs, heads, dim], lse [seqs, heads])``."""
    outs, lses = [], []
    for i in range(q.shape[0]):
        length = int(seq_lens[i])
        k = gather_kv(k_cache, block_tables[i], length)
        v = gather_kv(v_cache, block_tables[i], length)
        out, lse = attention_with_lse(q[i], k, v, scale)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def merge_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets, from each set's output and log-sum-exp."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a - safe)
    wb = torch.exp(lse_b - safe)
    return out_a * wa[..., None] + out_b * wb[..., None], lse


def cascade_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    group_starts: torch.Tensor,
    suffix_block_tables: torch.Tensor,
    suffix_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode attention where the sequences of group ``p`` (rows ``group_starts[p]`` up to
    ``group_starts[p+1]``) share the prefix held in ``prefix_block_tables[p]`` (``prefix_lens[p]``
    tokens), followed by each sequence's own suffix: the same as attention over prefix + suffix."""
    out = torch.empty_like(q)
    for p in range(prefix_lens.shape[0]):
        pk = gather_kv(k_cache, prefix_block_tables[p], int(prefix_lens[p]))
        pv = gather_kv(v_cache, prefix_block_tables[p], int(prefix_lens[p]))
        for i in range(int(group_starts[p]), int(group_starts[p + 1])):
            sk = gather_kv(k_cache, suffix_block_tables[i], int(suffix_lens[i]))
            sv = gather_kv(v_cache, suffix_block_tables[i], int(suffix_lens[i]))
            out[i], _ = attention_with_lse(q[i], torch.cat([pk, sk]), torch.cat([pv, sv]), scale)
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of packed new tokens ``q [tokens, heads, dim]``: sequence ``i``'s rows
    ``query_starts[i]`` up to ``query_starts[i+1]`` are the last of its ``context_lens[i]`` cached
    tokens, and each sees the keys up to its own position."""
    out = torch.empty_like(q)
    for i in range(context_lens.shape[0]):
        a, b = int(query_starts[i]), int(query_starts[i + 1])
        length = int(context_lens[i])
        k = gather_kv(k_cache, block_tables[i], length)
        v = gather_kv(v_cache, block_tables[i], length)
        for j in range(a, b):
            pos = length - (b - a) + (j - a)
            out[j], _ = attention_with_lse(q[j], k[: pos + 1], v[: pos + 1], scale)
    return out


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`transformers`' residual add and RMSNorm, in its order of rounding."""
    if delta is not None:
        x = x + delta
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype), x


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [tokens, heads, dim] * cos + rotate_half(x) * sin`` with ``cos, sin [tokens, dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
