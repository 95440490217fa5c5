"""GPU kernels of the embedded engine (Triton), each with a plain PyTorch reference in `reference`.

- `paged_decode_attention`: one decode query per sequence over a paged KV cache, grouped-query
  heads served by one read of each KV token;
- `cascade_decode_attention`: the same where groups of sequences share a prefix, whose KV is read
  once per tile of stacked queries instead of once per sequence, merged with each sequence's own
  suffix by log-sum-exp;
- `paged_prefill_attention`: the new tokens of packed prefill chunks attending causally to their
  sequence's paged context (a block-diagonal causal mask, no padding);
- `add_rms_norm`, `silu_and_mul`, `rope_and_cache`: the layers' element-wise work fused (`fused`).

Importing this package needs `torch` and `triton`; the kernels run on CUDA devices (or under
`TRITON_INTERPRET=1` on the CPU, slowly, for debugging).
"""

from .cascade import cascade_decode_attention
from .fused import add_rms_norm, rope_and_cache, silu_and_mul
from .paged_attention import paged_decode_attention
from .prefill_attention import paged_prefill_attention, prefill_tiles

__all__ = [
    "add_rms_norm",
    "cascade_decode_attention",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_tiles",
    "rope_and_cache",
    "silu_and_mul",
]
