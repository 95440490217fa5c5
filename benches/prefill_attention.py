#!/usr/bin/env python3
"""Prefill attention of the embedded engine on a GPU: the paged Triton kernel
(`batchagent_rs.kernels.paged_prefill_attention`) over a sweep of launch settings, against PyTorch's
FlashAttention-2 varlen kernel (`torch.ops.aten._flash_attention_forward`, K and V gathered from the
pages) where no chunk has cached context, on the step shapes of workload W (JSON out).

Shapes (one step's attention in one layer, bf16, pages scattered over the cache in random order):
- `W_prefix_off`: W without prefix sharing, a full 16,384-token step: 14 whole 1,152-token prompts
  and a 256-token first chunk of the next, none with cached context;
- `W_prefix_on`: W's prefill with the 1,024-token prefix cached: 128 chunks of 128 tokens at
  context 1,152;
- `long_fresh`: one 8,192-token prompt; `long_after_context`: a 2,048-token chunk after 8,192
  cached tokens.
Heads of Qwen2.5-7B (28/4 x 128) and Qwen2.5-0.5B (14/2 x 64). Every variant's output is checked
against a float32 PyTorch reference (relative norm error) before it is timed; timings are medians
of `triton.testing.do_bench`; TFLOP/s counts the causal attention's useful work (4 x head_dim x
heads per query-key pair a query sees).

Usage: python benches/prefill_attention.py --out benches/results/prefill-attention-h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import import_subpackage  # benches/engine.py: loads the kernels without the API's deps

PAGE = 16
HEADS = {"qwen2.5-7b": (28, 4, 128), "qwen2.5-0.5b": (14, 2, 64)}
# (new tokens, context) per sequence.
SHAPES: dict[str, list[tuple[int, int]]] = {
    "W_prefix_off": [(1152, 1152)] * 14 + [(256, 256)],
    "W_prefix_on": [(128, 1152)] * 128,
    "long_fresh": [(8192, 8192)],
    "long_after_context": [(2048, 10240)],
}
# (BLOCK_M, BLOCK_N, warps, stages); the first is the launch used before this sweep.
CONFIGS = {
    128: [
        (64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
        (128, 32, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 4),
    ],
    64: [
        (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
        (64, 32, 4, 3), (128, 32, 4, 3), (128, 64, 8, 2),
    ],
}  # fmt: skip


class Layout:
    """One step's prefill layout over a paged cache whose pages are handed out in random order."""

    def __init__(self, shapes: list[tuple[int, int]], heads: tuple[int, int, int], gen: torch.Generator):
        self.shapes = shapes
        qh, kvh, dim = heads
        n_pages = sum(math.ceil(c / PAGE) for _, c in shapes) + 4
        dtype = torch.bfloat16
        self.k = torch.randn(n_pages, PAGE, kvh, dim, generator=gen).to("cuda", dtype)
        self.v = torch.randn(n_pages, PAGE, kvh, dim, generator=gen).to("cuda", dtype)
        free = torch.randperm(n_pages, generator=gen).tolist()
        width = max(math.ceil(c / PAGE) for _, c in shapes)
        rows, slots = [], []
        for n, c in shapes:
            pages = [free.pop() for _ in range(math.ceil(c / PAGE))]
            rows.append(pages + [0] * (width - len(pages)))
            slots += [pages[p // PAGE] * PAGE + p % PAGE for p in range(c - n, c)]
        self.tables = torch.tensor(rows, dtype=torch.int32, device="cuda")
        self.slots = torch.tensor(slots, dtype=torch.int64, device="cuda")
        self.starts = torch.tensor(
            [0, *torch.tensor([n for n, _ in shapes]).cumsum(0).tolist()], dtype=torch.int32
        )
        self.ctx = torch.tensor([c for _, c in shapes], dtype=torch.int32)
        tokens = int(self.starts[-1])
        self.q = torch.randn(tokens, qh, dim, generator=gen).to("cuda", dtype)
        self.fresh = all(n == c for n, c in shapes)
        self.flops = sum(4 * dim * qh * (n * (c - n) + n * (n + 1) // 2) for n, c in shapes)

    def reference(self) -> torch.Tensor:
        """Float32 attention, one sequence at a time (SDPA's math on upcast inputs)."""
        qh, kvh = self.q.shape[1], self.k.shape[2]
        out = torch.empty(self.q.shape, dtype=torch.float32, device="cuda")
        for i, (n, c) in enumerate(self.shapes):
            a = int(self.starts[i])
            pages = self.tables[i, : math.ceil(c / PAGE)].long()
            k = self.k[pages].flatten(0, 1)[:c].float().repeat_interleave(qh // kvh, 1).transpose(0, 1)
            v = self.v[pages].flatten(0, 1)[:c].float().repeat_interleave(qh // kvh, 1).transpose(0, 1)
            q = self.q[a : a + n].float().transpose(0, 1)
            mask = torch.arange(c, device="cuda")[None, :] <= torch.arange(c - n, c, device="cuda")[:, None]
            out[a : a + n] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)
        return out


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    if torch.isnan(out).any():
        return float("nan")
    return float((out.float() - want).norm() / want.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "launch_before": {"block_m": 64, "by_head_dim": {"128": [64, 8, 2], "64": [64, 4, 2]}},
        "configs_columns": ["block_m", "block_n", "warps", "stages"],
        "shapes": {k: v[:2] + ([["...", len(v)]] if len(v) > 2 else []) for k, v in SHAPES.items()},
        "runs": [],
    }
    gen = torch.Generator().manual_seed(0)
    for model, heads in HEADS.items():
        for shape_name, shapes in SHAPES.items():
            row = measure(Layout(shapes, heads, gen), CONFIGS[heads[2]])
            row = {"model": model, "shape": shape_name, **row}
            result["runs"].append(row)
            ok = [(v["ms"], k) for k, v in row["variants"].items() if "ms" in v and v["rel_err"] < 2e-2]
            print(
                f"{model:13s} {shape_name:19s} {row['gflop']:8.1f} GFLOP  "
                + "  ".join(f"{k}={ms:.3f}ms" for ms, k in sorted(ok)[:4]),
                flush=True,
            )
            Path(args.out).write_text(json.dumps(result, indent=1))
            torch.cuda.empty_cache()
    result["best"] = best_configs(result)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result["best"], indent=1))


def measure(lay: Layout, configs: list[tuple[int, int, int, int]]) -> dict[str, Any]:
    """Every launch in `configs` (and FlashAttention where no chunk has cached context) on one
    layout: checked against the float32 reference, then timed."""
    import triton.testing

    kernels = import_subpackage("kernels")
    pa = kernels.prefill_attention

    want = lay.reference()
    variants: dict[str, Any] = {}
    starts_d, ctx_d = lay.starts.to("cuda"), lay.ctx.to("cuda")
    for cfg in configs:
        name = "triton_m{}_n{}_w{}_s{}".format(*cfg)
        tiles = kernels.prefill_tiles(lay.starts, cfg[0]).to("cuda")
        out = torch.full_like(lay.q, float("nan"))

        def run(out: torch.Tensor = out, tiles: torch.Tensor = tiles, cfg: tuple = cfg) -> None:
            pa.paged_prefill_attention(
                lay.q, lay.k, lay.v, lay.tables, starts_d, ctx_d, tiles=tiles, block_m=cfg[0],
                launch=cfg[1:], out=out,
            )  # fmt: skip

        try:
            run()
            torch.cuda.synchronize()
            err = rel_err(out, want)
            ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
            variants[name] = {"ms": ms, "tflops": lay.flops / ms / 1e9, "rel_err": err}
        except Exception as exc:  # a launch that does not fit (shared memory, registers)
            variants[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    if lay.fresh:
        cu = lay.starts.to("cuda")
        max_len = max(n for n, _ in lay.shapes)

        def flash() -> torch.Tensor:
            # PyTorch's FlashAttention-2 varlen kernel over the chunks' K and V gathered from the
            # pages (grouped-query heads go through it as they are).
            kvh, dim = lay.k.shape[2], lay.k.shape[3]
            k = lay.k.view(-1, kvh, dim).index_select(0, lay.slots)
            v = lay.v.view(-1, kvh, dim).index_select(0, lay.slots)
            return torch.ops.aten._flash_attention_forward(
                lay.q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=1 / math.sqrt(dim)
            )[0]

        try:
            err = rel_err(flash(), want)
            ms = triton.testing.do_bench(flash, warmup=25, rep=200, return_mode="median")
            variants["flash_varlen"] = {"ms": ms, "tflops": lay.flops / ms / 1e9, "rel_err": err}
        except Exception as exc:
            variants["flash_varlen"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return {"gflop": lay.flops / 1e9, "variants": variants}


def best_configs(result: dict[str, Any]) -> dict[str, Any]:
    """Per model, the Triton launch with the least total time over the shapes; the 7B's BLOCK_M
    is the one for every head dim (the tile list is built before the model's head dim is known to
    the kernel), so the 0.5B's best is taken among launches with that BLOCK_M."""
    out: dict[str, Any] = {}
    block_m = None
    for model, heads in HEADS.items():
        runs = [r for r in result["runs"] if r["model"] == model]
        totals: dict[str, float] = {}
        for cfg in CONFIGS[heads[2]]:
            name = "triton_m{}_n{}_w{}_s{}".format(*cfg)
            vals = [r["variants"].get(name, {}) for r in runs]
            if all("ms" in v and v["rel_err"] < 2e-2 for v in vals):
                totals[name] = sum(v["ms"] for v in vals)
        usable = {k: v for k, v in totals.items() if block_m is None or k.startswith(f"triton_m{block_m}_")}
        best = min(usable, key=lambda k: usable[k]) if usable else None
        if best is not None and block_m is None:
            block_m = int(best.split("_")[1][1:])
        cfg = next((c for c in CONFIGS[heads[2]] if "triton_m{}_n{}_w{}_s{}".format(*c) == best), None)
        out[model] = {"total_ms_by_launch": totals, "best": best, "config": cfg}
    return out


if __name__ == "__main__":
    main()
