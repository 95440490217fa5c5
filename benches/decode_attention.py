"""Decode-attention kernels of the embedded engine on a GPU, side by side with plain PyTorch.

(Not named `kernels.py`: scripts in benches/ run with benches/ first on sys.path, and a module
named `kernels` there would shadow Hugging Face's `kernels` package, which transformers probes for.)

    python benches/decode_attention.py --out benches/results/kernels-h200.json

For each model shape (Qwen2.5-7B: 28 query / 4 KV heads of 128; Qwen2.5-0.5B: 14 / 2 of 64) and
a decode step of workload W (256 sequences, a 1,024-token shared prefix, then each sequence's own
128 prompt tokens and 64 generated so far), in bf16, it times (median of CUDA-event timings by
`triton.testing.do_bench`, after warm-up):
- `torch_sdpa`: the PyTorch way without a paged kernel: gather each sequence's pages into a padded
  ``[seqs, heads, len, dim]`` tensor and call `scaled_dot_product_attention` (the gather included,
  since a paged cache has to be gathered every step);
- `paged`: `batchagent_rs.kernels.paged_decode_attention`, each block table listing the shared prefix's pages
  then the sequence's own (the prefix is read once per sequence, from L2 when it fits);
- `cascade`: `batchagent_rs.kernels.cascade_decode_attention`, the prefix read once per 64 stacked query rows.
It reports each time, the ratio to `torch_sdpa`, and the effective bandwidth: the KV bytes a
per-sequence read moves (seqs x context x KV heads x dim x 2 tensors x 2 bytes) over the time,
against the copy bandwidth measured in the same run. Outputs are checked against each other first.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import import_subpackage  # benches/engine.py: loads the kernels without the API's deps

kernels = import_subpackage("kernels")
cascade_decode_attention = kernels.cascade_decode_attention
paged_decode_attention = kernels.paged_decode_attention

SHAPES = {"qwen2.5-7b": (28, 4, 128), "qwen2.5-0.5b": (14, 2, 64)}


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second."""
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() / (ms / 1000)


def step(name: str, heads: tuple[int, int, int], seqs: int, prefix: int, own: int, page: int = 16) -> dict:
    q_heads, kv_heads, dim = heads
    gen = torch.Generator(device="cuda").manual_seed(0)
    prefix_pages = math.ceil(prefix / page)
    own_pages = math.ceil(own / page)
    n_pages = prefix_pages + seqs * own_pages
    k = torch.randn(n_pages, page, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(n_pages, page, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    perm = torch.randperm(n_pages, device="cuda", generator=gen).to(torch.int32)
    prefix_table = perm[:prefix_pages][None, :]
    own_tables = perm[prefix_pages:].view(seqs, own_pages)
    flat_tables = torch.cat([prefix_table.expand(seqs, -1), own_tables], dim=1).contiguous()
    context = prefix + own
    lens = torch.full((seqs,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(seqs, q_heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    starts = torch.tensor([0, seqs], dtype=torch.int32, device="cuda")
    plens = torch.tensor([prefix], dtype=torch.int32, device="cuda")
    olens = torch.full((seqs,), own, dtype=torch.int32, device="cuda")

    def torch_sdpa() -> torch.Tensor:
        n = flat_tables.shape[1]
        kk = k[flat_tables.long()].view(seqs, n * page, kv_heads, dim)[:, :context].transpose(1, 2)
        vv = v[flat_tables.long()].view(seqs, n * page, kv_heads, dim)[:, :context].transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None, :], kk, vv, enable_gqa=True)[
            :, :, 0
        ]

    def paged() -> torch.Tensor:
        return paged_decode_attention(q, k, v, flat_tables, lens)[0]

    def cascade(block_m: int = 64) -> torch.Tensor:
        return cascade_decode_attention(
            q, k, v, prefix_table, plens, starts, own_tables, olens, block_m=block_m,
            max_group_size=seqs, max_prefix_len=prefix,
        )  # fmt: skip

    want = torch_sdpa().float()
    checks = {}
    for fn in (paged, cascade):
        got = fn().float()
        checks[fn.__name__] = float((got - want).norm() / want.norm())
        if not checks[fn.__name__] < 2e-2:
            raise SystemExit(
                f"{name}: {fn.__name__} disagrees with torch_sdpa: relative error {checks[fn.__name__]}"
            )
    kv_bytes = seqs * context * kv_heads * dim * 2 * 2
    row = {
        "shape": name,
        "heads": heads,
        "seqs": seqs,
        "prefix": prefix,
        "own": own,
        "rel_err_vs_sdpa": checks,
    }
    times = {}
    for fn in (torch_sdpa, paged, cascade):
        times[fn.__name__] = do_bench(fn, warmup=100, rep=500, return_mode="median")
    row["ms"] = times
    row["cascade_ms_by_block_m"] = {
        bm: do_bench(lambda bm=bm: cascade(bm), warmup=100, rep=300, return_mode="median")
        for bm in (16, 32, 64, 128)
    }
    row["speedup_vs_torch_sdpa"] = {n: times["torch_sdpa"] / t for n, t in times.items()}
    row["effective_tb_s"] = {n: kv_bytes / (t / 1000) / 1e12 for n, t in times.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benches/results/decode-attention.json")
    parser.add_argument("--seqs", type=int, default=256)
    args = parser.parse_args()
    bw = copy_bandwidth()
    rows = []
    for name, heads in SHAPES.items():
        for own in (128 + 64, 128 + 448):
            rows.append(step(name, heads, args.seqs, 1024, own))
    report = {
        "bench": "kernels",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "copy_bandwidth_tb_s": bw / 1e12,
        "steps": rows,
    }
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s on {report['device']}")
    head = ("shape", "context", "sdpa ms", "paged ms", "cascade ms", "paged x", "cascade x")
    print(f"{head[0]:14} " + " ".join(f"{h:>10}" for h in head[1:]))
    for r in rows:
        t = r["ms"]
        s = r["speedup_vs_torch_sdpa"]
        cells = (t["torch_sdpa"], t["paged"], t["cascade"], s["paged"], s["cascade"])
        print(f"{r['shape']:14} {r['prefix'] + r['own']:>10} " + " ".join(f"{c:>10.3f}" for c in cells))


if __name__ == "__main__":
    main()
