"""The embedded engine's Triton kernels (`batchagent_rs.kernels`) against their PyTorch references,
on random paged layouts.

They need a CUDA device: `python -m pytest tests/test_engine_kernels.py` on a GPU machine (or on the
CPU, slowly, with `TRITON_INTERPRET=1`); elsewhere the module is skipped before Triton is imported.
Every check draws fresh random inputs, scatters each sequence's pages over the cache in random
order, poisons the output buffer with NaN first, and compares with the reference computed in
float64 on the same (upcast) inputs by relative norm error.
"""

from __future__ import annotations

import math
import os

import pytest

torch = pytest.importorskip("torch")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip(
        "the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to run them on the CPU, slowly)",
        allow_module_level=True,
    )
pytest.importorskip("triton", reason="the kernels are written in Triton, which is not installed")

from batchagent_rs.kernels import (  # noqa: E402
    cascade_decode_attention,
    fused,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_tiles,
)
from batchagent_rs.kernels import reference as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

# Relative norm error allowed per input dtype: float32 runs IEEE dots (far under 1e-4); bf16 and
# fp16 round the inputs and the output.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# (query heads, KV heads, head dim): Qwen2.5-7B, Qwen2.5-0.5B, plain multi-head, one KV head.
HEADS = [(28, 4, 128), (14, 2, 64), (8, 8, 64), (16, 1, 128)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "an output element was not written (NaN poison left) or is NaN"
    return float((out.double() - want).norm() / want.norm().clamp_min(1e-30))


class Pages:
    """A paged cache with pages handed out in random order."""

    def __init__(
        self, n_pages: int, page: int, kv_heads: int, dim: int, dtype: torch.dtype, gen: torch.Generator
    ):
        self.page = page
        self.k = torch.randn(n_pages, page, kv_heads, dim, generator=gen).to(DEVICE, dtype)
        self.v = torch.randn(n_pages, page, kv_heads, dim, generator=gen).to(DEVICE, dtype)
        self.free = torch.randperm(n_pages, generator=gen).tolist()

    def table(self, lengths: list[int]) -> torch.Tensor:
        width = max(1, max((math.ceil(n / self.page) for n in lengths), default=1))
        rows = []
        for n in lengths:
            pages = [self.free.pop() for _ in range(math.ceil(n / self.page))]
            rows.append(pages + [0] * (width - len(pages)))
        return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


def pages_needed(lengths: list[int], page: int) -> int:
    return sum(math.ceil(n / page) for n in lengths)


# Seeds and page sizes: the engine's default 16-token page, and the smaller pages a block stored as a
# diff of another is made of (`--kv-page-size`).
PAGES = [(0, 16), (1, 16), (0, 4), (1, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize(("seed", "page"), PAGES)
def test_paged_decode_matches_reference(
    dtype: torch.dtype, heads: tuple[int, int, int], seed: int, page: int
) -> None:
    q_heads, kv_heads, dim = heads
    gen = torch.Generator().manual_seed(1000 * seed + q_heads + dim)
    # Lengths cover 0, 1, a page boundary, one past it, several tiles, and random values.
    lengths = [0, 1, 15, 16, 17, 64, 65, 300, *torch.randint(1, 700, (9,), generator=gen).tolist()]
    pages = Pages(pages_needed(lengths, page) + 5, page, kv_heads, dim, dtype, gen)
    tables = pages.table(lengths)
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lengths), q_heads, dim, generator=gen).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))
    _, lse = paged_decode_attention(q, pages.k, pages.v, tables, lens, out=out)
    want, want_lse = ref.paged_decode_attention(
        q.double(), pages.k.double(), pages.v.double(), tables, lens, 1 / math.sqrt(dim)
    )
    assert rel_err(out, want) < TOLERANCE[dtype]
    assert torch.equal(out[0], torch.zeros_like(out[0])), "a sequence of length 0 has a zero output"
    assert torch.isinf(lse[0]).all() and (lse[0] < 0).all()
    assert rel_err(lse[1:], want_lse[1:]) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize(("seed", "page"), PAGES)
def test_cascade_matches_full_attention(
    dtype: torch.dtype, heads: tuple[int, int, int], seed: int, page: int
) -> None:
    q_heads, kv_heads, dim = heads
    gen = torch.Generator().manual_seed(7 + 1000 * seed + q_heads + dim)
    # Groups: a big one (several tiles of stacked queries), singles, an empty prefix, a prefix that
    # ends inside a page, and a group whose suffixes include empty ones.
    sizes = [37, 1, 4, 1, 9]
    prefix_lengths = [1024, 33, 0, 16, int(torch.randint(1, 400, (1,), generator=gen))]
    suffix_lengths = torch.randint(0, 200, (sum(sizes),), generator=gen).tolist()
    suffix_lengths[0] = 0
    suffix_lengths[sizes[0]] = 1  # the single-sequence group right after the big one
    suffix_lengths[sizes[0] + 1] = 5  # the empty-prefix group: a suffix is all there is
    n = pages_needed(prefix_lengths, page) + pages_needed(suffix_lengths, page) + 3
    pages = Pages(n, page, kv_heads, dim, dtype, gen)
    prefix_tables = pages.table(prefix_lengths)
    suffix_tables = pages.table(suffix_lengths)
    starts = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    plens = torch.tensor(prefix_lengths, dtype=torch.int32, device=DEVICE)
    slens = torch.tensor(suffix_lengths, dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(sizes), q_heads, dim, generator=gen).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))
    cascade_decode_attention(q, pages.k, pages.v, prefix_tables, plens, starts, suffix_tables, slens, out=out)
    want = ref.cascade_decode_attention(
        q.double(), pages.k.double(), pages.v.double(), prefix_tables, plens, starts, suffix_tables, slens,
        1 / math.sqrt(dim),
    )  # fmt: skip
    assert rel_err(out, want) < TOLERANCE[dtype]

    # The same attention through the plain paged kernel, each sequence's table being its prefix's
    # pages followed by its own (prefix lengths that are whole pages only), agrees too.
    whole = [i for i, n in enumerate(prefix_lengths) if n % page == 0]
    rows = [r for p in whole for r in range(int(starts[p]), int(starts[p + 1]))]
    tables, lens = [], []
    for p in whole:
        for r in range(int(starts[p]), int(starts[p + 1])):
            pre = prefix_tables[p, : prefix_lengths[p] // page].tolist()
            suf = suffix_tables[r, : math.ceil(suffix_lengths[r] / page)].tolist()
            tables.append(pre + suf)
            lens.append(prefix_lengths[p] + suffix_lengths[r])
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    flat, _ = paged_decode_attention(q[rows], pages.k, pages.v, table, torch.tensor(lens, device=DEVICE))
    assert rel_err(flat, want[rows]) < TOLERANCE[dtype]


def test_bad_layouts_are_refused() -> None:
    q = torch.zeros(2, 6, 64, device=DEVICE)
    cache = torch.zeros(4, 16, 4, 64, device=DEVICE)
    table = torch.zeros(2, 1, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="query heads"):
        paged_decode_attention(q, cache, cache, table, lens)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(
            torch.zeros(2, 4, 48, device=DEVICE), cache[..., :48], cache[..., :48], table, lens
        )
    with pytest.raises(ValueError, match="group starts"):
        cascade_decode_attention(
            torch.zeros(2, 8, 64, device=DEVICE), cache, cache, table, lens, lens, table, lens
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize(("seed", "page"), PAGES)
def test_paged_prefill_matches_reference(
    dtype: torch.dtype, heads: tuple[int, int, int], seed: int, page: int
) -> None:
    q_heads, kv_heads, dim = heads
    gen = torch.Generator().manual_seed(31 + 1000 * seed + q_heads + dim)
    # (new tokens, context): a whole prompt, chunks after a cached prefix (inside a page, on a page
    # boundary), one decode token, a chunk longer than a tile, a one-token prompt, random ones.
    shapes = [(40, 40), (17, 33), (16, 48), (1, 300), (130, 200), (1, 1), (64, 64), (65, 129)]
    for _ in range(4):
        n = int(torch.randint(1, 150, (1,), generator=gen))
        shapes.append((n, n + int(torch.randint(0, 400, (1,), generator=gen))))
    if INTERPRET:
        shapes = shapes[:5]
    lens = [ctx for _, ctx in shapes]
    pages = Pages(pages_needed(lens, page) + 5, page, kv_heads, dim, dtype, gen)
    tables = pages.table(lens)
    starts = torch.tensor([0, *torch.tensor([n for n, _ in shapes]).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(int(starts[-1]), q_heads, dim, generator=gen).to(DEVICE, dtype)
    out = torch.full_like(q, float("nan"))
    tiles = prefill_tiles(starts).to(DEVICE)
    paged_prefill_attention(
        q, pages.k, pages.v, tables, starts.to(DEVICE), ctx.to(DEVICE), tiles=tiles, out=out
    )
    want = ref.paged_prefill_attention(
        q.double(), pages.k.double(), pages.v.double(), tables, starts, ctx, 1 / math.sqrt(dim)
    )
    assert rel_err(out, want) < TOLERANCE[dtype]
    # A decode token through the prefill kernel is the decode kernel's attention.
    row = int(starts[3])
    single, _ = paged_decode_attention(q[row : row + 1], pages.k, pages.v, tables[3:4], ctx[3:4].to(DEVICE))
    assert rel_err(out[row : row + 1], single.double()) < TOLERANCE[dtype]


# The fused element-wise kernels round where PyTorch's arithmetic in the input dtype rounds; what
# may differ is the order of one float32 sum (RMSNorm's mean) and a product and sum contracted
# into one FMA (RoPE), so a few elements may land one rounding step apart.
FUSED_TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [896, 3584, 64])
def test_add_rms_norm_and_silu_and_mul_match_reference(dtype: torch.dtype, cols: int) -> None:
    gen = torch.Generator().manual_seed(cols)
    rows = 37
    x = torch.randn(rows, cols, generator=gen).to(DEVICE, dtype)
    delta = torch.randn(rows, cols, generator=gen).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(cols, generator=gen)).to(DEVICE, dtype)
    for d in (None, delta):
        out, res = fused.add_rms_norm(x, weight, 1e-6, d)
        want, want_res = ref.add_rms_norm(x, weight, 1e-6, d)
        assert torch.equal(res, want_res)
        assert rel_err(out, want.double()) < FUSED_TOLERANCE[dtype]
    gate_up = torch.randn(rows, 2 * cols, generator=gen).to(DEVICE, dtype) * 3
    got = fused.silu_and_mul(gate_up)
    assert rel_err(got, ref.silu_and_mul(gate_up).double()) < FUSED_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_rope_and_cache_matches_reference(dtype: torch.dtype, heads: tuple[int, int, int]) -> None:
    q_heads, kv_heads, dim = heads
    gen = torch.Generator().manual_seed(q_heads * dim)
    tokens, page, n_pages = 29, 16, 8
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * dim + 8, generator=gen).to(DEVICE, dtype)
    qkv = qkv[:, : (q_heads + 2 * kv_heads) * dim]  # rows with a stride longer than their length
    pos = torch.randint(0, 5000, (tokens,), generator=gen).double()
    freqs = pos[:, None] / (10000.0 ** (torch.arange(0, dim, 2).double() / dim))[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)
    slots = torch.randperm(n_pages * page, generator=gen)[:tokens].to(DEVICE)
    k_cache = torch.full((n_pages, page, kv_heads, dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    q = fused.rope_and_cache(qkv, cos, sin, slots, k_cache, v_cache, q_heads, kv_heads)
    wq = ref.rope(qkv[:, : q_heads * dim].reshape(tokens, q_heads, dim), cos, sin)
    wk = ref.rope(qkv[:, q_heads * dim : (q_heads + kv_heads) * dim].reshape(tokens, kv_heads, dim), cos, sin)
    wv = qkv[:, (q_heads + kv_heads) * dim :].reshape(tokens, kv_heads, dim)
    # The compiler may contract a product and a sum into one FMA: a rounding step apart at most.
    assert rel_err(q, wq.double()) < FUSED_TOLERANCE[dtype]
    assert rel_err(k_cache.view(-1, kv_heads, dim)[slots], wk.double()) < FUSED_TOLERANCE[dtype]
    assert torch.equal(v_cache.view(-1, kv_heads, dim)[slots], wv)
