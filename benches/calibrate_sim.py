#!/usr/bin/env python3
"""Measure the step time of Qwen2.5 models on a GPU and fit the simulator's step model.

The simulator (src/sim/profile.rs) prices one engine iteration ("step") as

    step_us = base_us
            + prefill_token_us * prefill_tokens
            + prefill_attn_ns  * sum(chunk_tokens * context_len_at_chunk_end) / 1000
            + decode_seq_us    * decode_seqs
            + kv_read_ns       * kv_tokens_read / 1000

With `--runner engine` (the default) it times the embedded engine's own model runner
(`batchagent_rs.engine.ModelRunner`: paged KV cache, the Triton kernels of `batchagent_rs.kernels`,
decode steps replayed as CUDA graphs) on a random-weight model of the architecture, one
`runner.greedy(layout)` per step as the engine's loop calls it. With `--runner sdpa` it builds the model from
`transformers.Qwen2Config` (bf16), runs engine-shaped forward passes written here (SDPA attention
over a contiguous KV cache) and times each one as a replayed CUDA graph. Either way it fits the
five constants by non-negative least squares on relative error over the same grid of prefill
chunks at offsets, decode batches x KV lengths and mixed steps. Random weights do not change the
timing: every kernel's work depends on shapes only.

Usage:
    python benches/calibrate_sim.py --model 7b --out DIR [--runner engine|sdpa]
    python benches/calibrate_sim.py --model 0.5b --out DIR [--quick]
    python benches/calibrate_sim.py --model all --out DIR

The output is DIR/<gpu>-qwen2.5-<model>.json in the simulator's profile layout.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback

MODELS = {
    "7b": {
        "label": "Qwen2.5-7B",
        "hidden": 3584,
        "intermediate": 18944,
        "layers": 28,
        "heads": 28,
        "kv_heads": 4,
        "vocab": 152064,
        "rope_theta": 1e6,
        "tie": False,
        "rms_eps": 1e-6,
        "max_pos": 131072,
    },
    "0.5b": {
        "label": "Qwen2.5-0.5B",
        "hidden": 896,
        "intermediate": 4864,
        "layers": 24,
        "heads": 14,
        "kv_heads": 2,
        "vocab": 151936,
        "rope_theta": 1e6,
        "tie": True,
        "rms_eps": 1e-6,
        "max_pos": 32768,
    },
}

FULL_GRID = {
    # The grid's power-of-two chunks fill GEMM tiles exactly; a live engine's token counts rarely do,
    # so three off-grid chunks sample the tile-quantisation cost.
    "prefill": [(c, o) for o in (0, 2048, 8192) for c in (128, 512, 1024, 2048, 4096, 8192)]
    + [(1056, 0), (3000, 0), (6000, 2048)],
    "decode": [(b, n) for n in (512, 2048, 8192) for b in (1, 8, 32, 64, 128, 256)],
    # Mixed steps (decode batch + one prefill chunk, as vLLM v1 schedules under chunked prefill) test
    # whether the model's additive form carries over: first held out of a prefill+decode fit, then
    # included in the final fit, since a loaded engine runs mostly such steps.
    "mixed": [
        (8, 2048, 512, 0),
        (32, 2048, 1024, 0),
        (16, 8192, 2048, 8192),
        (64, 2048, 2048, 2048),
        (128, 2048, 1024, 2048),
        (128, 512, 4096, 0),
        (64, 512, 8128, 0),
        (256, 2048, 512, 8192),
    ],
}
QUICK_GRID = {
    "prefill": [(128, 0), (2048, 0), (8192, 0), (2048, 8192)],
    "decode": [(1, 512), (32, 2048), (256, 512)],
    "mixed": [(32, 2048, 1024, 0)],
}

GPU_MEMORY_UTILIZATION = 0.9
MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 8192
BLOCK_SIZE = 16
COEF_NAMES = ("base_us", "prefill_token_us", "prefill_attn_ns", "decode_seq_us", "kv_read_ns")


# ----------------------------------------------------------------------------------------------
# Fit (pure Python so it can be checked without torch or numpy)
# ----------------------------------------------------------------------------------------------


def features(point: dict) -> list[float]:
    """Row of the design matrix; coefficients in the profile's units give microseconds."""
    return [
        1.0,
        float(point["prefill_tokens"]),
        float(point["attn_units"]) / 1000.0,
        float(point["decode_seqs"]),
        float(point["kv_tokens"]) / 1000.0,
    ]


def _lstsq(rows: list[list[float]], y: list[float]) -> list[float] | None:
    """Least squares by modified Gram-Schmidt QR; None if the columns are dependent."""
    m, n = len(rows), len(rows[0])
    cols = [[rows[i][j] for i in range(m)] for j in range(n)]
    q: list[list[float]] = []
    r = [[0.0] * n for _ in range(n)]
    for j in range(n):
        v = cols[j][:]
        for k in range(j):
            r[k][j] = sum(q[k][i] * v[i] for i in range(m))
            v = [v[i] - r[k][j] * q[k][i] for i in range(m)]
        norm = math.sqrt(sum(x * x for x in v))
        orig = math.sqrt(sum(x * x for x in cols[j]))
        if orig == 0.0 or norm <= 1e-10 * orig:
            return None
        r[j][j] = norm
        q.append([x / norm for x in v])
    qty = [sum(q[k][i] * y[i] for i in range(m)) for k in range(n)]
    x = [0.0] * n
    for j in reversed(range(n)):
        x[j] = (qty[j] - sum(r[j][k] * x[k] for k in range(j + 1, n))) / r[j][j]
    return x


def fit_step_model(points: list[dict]) -> list[float]:
    """Non-negative least squares on relative error, exact by enumerating active sets.

    With five unknowns there are 31 non-empty subsets; the NNLS optimum is the unconstrained least
    squares solution on one of them with all its coefficients non-negative, so the best such one is it.
    Rows are divided by the measured time so a 5 ms decode step counts as much as a 150 ms prefill.
    """
    a = [features(p) for p in points]
    y = [float(p["us"]) for p in points]
    n = len(COEF_NAMES)
    scale = [max(abs(row[j]) for row in a) or 1.0 for j in range(n)]
    aw = [[row[j] / scale[j] / yi for j in range(n)] for row, yi in zip(a, y, strict=True)]
    ones = [1.0] * len(y)
    best: tuple[float, list[float]] | None = None
    for size in range(1, n + 1):
        for subset in itertools.combinations(range(n), size):
            sol = _lstsq([[row[j] for j in subset] for row in aw], ones)
            if sol is None or any(s < 0.0 for s in sol):
                continue
            x = [0.0] * n
            for j, s in zip(subset, sol, strict=True):
                x[j] = s
            resid = sum((sum(row[j] * x[j] for j in range(n)) - 1.0) ** 2 for row in aw)
            if best is None or resid < best[0]:
                best = (resid, x)
    if best is None:
        raise ValueError("no non-negative fit exists for the measured points")
    return [best[1][j] / scale[j] for j in range(n)]


def predict(coefs: list[float], point: dict) -> float:
    return sum(c * f for c, f in zip(coefs, features(point), strict=True))


def error_summary(coefs: list[float], points: list[dict]) -> dict:
    rel = [(predict(coefs, p) - p["us"]) / p["us"] for p in points]
    if not rel:
        return {"points": 0}
    absr = [abs(r) for r in rel]
    return {
        "points": len(rel),
        "median_abs_rel_err": round(statistics.median(absr), 4),
        "max_abs_rel_err": round(max(absr), 4),
        "mean_rel_err": round(statistics.fmean(rel), 4),
    }


def round_sig(x: float, digits: int = 4) -> float:
    if x == 0.0:
        return 0.0
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


# ----------------------------------------------------------------------------------------------
# GPU side
# ----------------------------------------------------------------------------------------------


def load_torch():
    import torch
    import torch.nn.functional as F

    return torch, F


def make_triton_kernels():
    """Fused add+RMSNorm and in-place RoPE, as vLLM runs them; None when Triton is unusable."""
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None

    @triton.jit
    def _add_rmsnorm(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            x = x + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(res_ptr + row * n_cols + cols, x.to(res_ptr.dtype.element_ty), mask=mask)
        var = tl.sum(x * x, axis=0) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (x * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, row_stride, HALF: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        p = tl.load(pos_ptr + t)
        offs = tl.arange(0, HALF)
        base = qkv_ptr + t * row_stride + h * 2 * HALF
        x1 = tl.load(base + offs).to(tl.float32)
        x2 = tl.load(base + HALF + offs).to(tl.float32)
        c = tl.load(cos_ptr + p * HALF + offs)
        s = tl.load(sin_ptr + p * HALF + offs)
        tl.store(base + offs, (x1 * c - x2 * s).to(qkv_ptr.dtype.element_ty))
        tl.store(base + HALF + offs, (x2 * c + x1 * s).to(qkv_ptr.dtype.element_ty))

    return triton, _add_rmsnorm, _rope


class Ops:
    """Norm and RoPE, Triton-fused when that passes its check against eager PyTorch."""

    def __init__(self, torch, spec):
        self.torch = torch
        self.eps = spec["rms_eps"]
        self.kernels = make_triton_kernels()
        self.fused = False
        self.fused_error = None
        if self.kernels is not None:
            try:
                self.fused = self._check(spec)
            except Exception as e:
                self.fused_error = f"{type(e).__name__}: {e}"
                self.fused = False

    def _check(self, spec) -> bool:
        torch = self.torch
        dev = "cuda"
        hsz = spec["hidden"]
        x = torch.randn(37, hsz, device=dev, dtype=torch.bfloat16)
        res = torch.randn(37, hsz, device=dev, dtype=torch.bfloat16)
        w = torch.randn(hsz, device=dev, dtype=torch.bfloat16)
        ref_res = (x.float() + res.float()).to(torch.bfloat16)
        ref = self._rms_eager(ref_res, w)
        res2 = res.clone()
        self.fused = True
        out = self.add_rmsnorm(x, res2, w)
        ok = torch.allclose(out.float(), ref.float(), rtol=2e-2, atol=2e-2) and torch.allclose(
            res2.float(), ref_res.float(), rtol=1e-2, atol=1e-2
        )
        d = hsz // spec["heads"]
        nq = spec["heads"] + spec["kv_heads"]
        cos, sin = rope_tables(torch, d, spec["rope_theta"], 4096)
        qkv = torch.randn(19, (nq + spec["kv_heads"]) * d, device=dev, dtype=torch.bfloat16)
        pos = torch.randint(0, 4096, (19,), device=dev)
        ref_q = qkv.clone()
        self._rope_eager(ref_q, pos, cos, sin, nq, d)
        got = qkv.clone()
        self.rope_(got, pos, cos, sin, nq, d)
        ok = ok and torch.allclose(got.float(), ref_q.float(), rtol=2e-2, atol=2e-2)
        torch.cuda.synchronize()
        self.fused = bool(ok)
        if not ok:
            self.fused_error = "fused kernels disagreed with eager PyTorch"
        return self.fused

    def _rms_eager(self, x, w):
        xf = x.float()
        return (xf * self.torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * w.float()).to(x.dtype)

    def add_rmsnorm(self, x, res, w):
        """res += x (when res is not None); returns rmsnorm(res or x) * w."""
        if not self.fused:
            if res is not None:
                res.add_(x)
                return self._rms_eager(res, w)
            return self._rms_eager(x, w)
        triton, kern, _ = self.kernels
        n_rows, n_cols = x.shape
        out = self.torch.empty_like(x)
        block = triton.next_power_of_2(n_cols)
        kern[(n_rows,)](
            x,
            res if res is not None else x,
            w,
            out,
            n_cols,
            self.eps,
            HAS_RES=res is not None,
            BLOCK=block,
            num_warps=8 if block >= 2048 else 4,
        )
        return out

    def _rope_eager(self, qkv, pos, cos, sin, n_heads, d):
        half = d // 2
        t = qkv.shape[0]
        x = qkv[:, : n_heads * d].view(t, n_heads, d)
        c = cos[pos].unsqueeze(1)
        s = sin[pos].unsqueeze(1)
        x1 = x[..., :half].float()
        x2 = x[..., half:].float()
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        x[..., :half] = o1.to(qkv.dtype)
        x[..., half:] = o2.to(qkv.dtype)

    def rope_(self, qkv, pos, cos, sin, n_heads, d):
        """Rotates the first n_heads heads (queries then keys) of each row of qkv in place."""
        if not self.fused:
            self._rope_eager(qkv, pos, cos, sin, n_heads, d)
            return
        _, _, kern = self.kernels
        kern[(qkv.shape[0], n_heads)](qkv, pos, cos, sin, qkv.stride(0), HALF=d // 2, num_warps=1)


def rope_tables(torch, d, theta, n_pos):
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(n_pos, device="cuda", dtype=torch.float64), inv)
    return freqs.cos().float().contiguous(), freqs.sin().float().contiguous()


def attention_reference(torch, q, k, v, causal_offset):
    """fp32 attention with KV heads repeated; causal_offset None means no mask (decode)."""
    g = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = q.float() @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal_offset is not None:
        lq, lk = q.shape[-2], k.shape[-2]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ vf


def pick_attention(torch, F, spec):
    """Chooses the fastest SDPA route that computes the right thing for chunked prefill and decode.

    A prefill chunk at an offset needs a causal mask aligned to the bottom right (query i sees keys
    up to offset+i). SDPA's is_causal is top-left aligned, so the chunk goes through
    causal_lower_right (FlashAttention-2 underneath) or the flash op directly, whose causal mask is
    bottom-right; a materialised boolean mask with repeated KV heads is the slow last resort.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        from torch.nn.attention.bias import causal_lower_right
    except Exception:
        causal_lower_right = None

    def pf_lower_right(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=causal_lower_right(q.shape[-2], k.shape[-2]), enable_gqa=True
            )

    def pf_flash_op(q, k, v):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[0]

    def pf_masked(q, k, v):
        g = q.shape[1] // k.shape[1]
        lq, lk = q.shape[-2], k.shape[-2]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), attn_mask=mask
        )

    def dc_flash(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def dc_default(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def dc_repeat(q, k, v):
        g = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1))

    h, kvh = spec["heads"], spec["kv_heads"]
    d = spec["hidden"] // h
    dev = "cuda"
    bf = torch.bfloat16
    notes = {}

    def first_ok(cands, q, k, v, causal):
        ref = attention_reference(torch, q, k, v, causal)
        for name, fn in cands:
            try:
                out = fn(q, k, v)
                torch.cuda.synchronize()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                notes[name] = round(err, 5)
                if err < 2e-2:
                    return name, fn
            except Exception as e:
                notes[name] = f"{type(e).__name__}: {str(e)[:160]}"
        raise RuntimeError(f"no attention route passed its check: {notes}")

    q = torch.randn(1, h, 64, d, device=dev, dtype=bf)
    k = torch.randn(1, kvh, 64 + 96, d, device=dev, dtype=bf)
    v = torch.randn(1, kvh, 64 + 96, d, device=dev, dtype=bf)
    pf_cands = []
    if causal_lower_right is not None:
        pf_cands.append(("sdpa_flash_causal_lower_right", pf_lower_right))
    pf_cands += [
        ("aten_flash_attention_bottom_right_causal", pf_flash_op),
        ("sdpa_bool_mask_repeat_kv", pf_masked),
    ]
    pf_name, pf_fn = first_ok(pf_cands, q, k, v, 96)
    q = torch.randn(3, h, 1, d, device=dev, dtype=bf)
    k = torch.randn(3, kvh, 101, d, device=dev, dtype=bf)
    v = torch.randn(3, kvh, 101, d, device=dev, dtype=bf)
    dc_cands = [("sdpa_flash_gqa", dc_flash), ("sdpa_default_gqa", dc_default), ("sdpa_repeat_kv", dc_repeat)]
    dc_name, dc_fn = first_ok(dc_cands, q, k, v, None)
    return {"prefill": pf_name, "decode": dc_name, "checks_rel_err": notes}, pf_fn, dc_fn


class Model:
    """Weights of one model, with QKV and gate/up fused as vLLM fuses them."""

    def __init__(self, torch, F, spec, ops, attn):
        self.torch, self.F, self.spec, self.ops = torch, F, spec, ops
        self.attn_info, self.attn_prefill, self.attn_decode = attn
        self.h = spec["heads"]
        self.kvh = spec["kv_heads"]
        self.d = spec["hidden"] // self.h
        self.inter = spec["intermediate"]
        self.cos, self.sin = rope_tables(torch, self.d, spec["rope_theta"], 16384 + 256)
        self.hf_check = None
        self._build()

    def _build(self):
        torch = self.torch
        import transformers
        from transformers import Qwen2Config, Qwen2ForCausalLM

        s = self.spec
        kwargs = {
            "vocab_size": s["vocab"],
            "hidden_size": s["hidden"],
            "intermediate_size": s["intermediate"],
            "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"],
            "max_position_embeddings": s["max_pos"],
            "rope_theta": s["rope_theta"],
            "rms_norm_eps": s["rms_eps"],
            "tie_word_embeddings": s["tie"],
            "use_sliding_window": False,
        }
        try:
            cfg = Qwen2Config(attn_implementation="sdpa", **kwargs)
        except TypeError:
            cfg = Qwen2Config(**kwargs)
        try:
            cfg._attn_implementation = "sdpa"
        except Exception:
            pass
        self.transformers_version = transformers.__version__
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                model = Qwen2ForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
        model.eval()
        # Timing is independent of values, but zeros can run faster than real data and hide
        # mistakes, so every tensor gets fresh random values of a trained model's scale.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
                elif "norm" in name:
                    p.normal_(1.0, 0.05)
                else:
                    p.normal_(0.0, 0.02)
        m = model.model
        with torch.no_grad():
            self.embed = m.embed_tokens.weight
            self.norm = m.norm.weight
            self.lm_head = model.lm_head.weight
            self.layers = []
            for layer in m.layers:
                a = layer.self_attn
                self.layers.append(
                    {
                        "ln1": layer.input_layernorm.weight,
                        "ln2": layer.post_attention_layernorm.weight,
                        "qkv_w": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0),
                        "qkv_b": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], 0),
                        "o_w": a.o_proj.weight,
                        "gu_w": torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight], 0),
                        "d_w": layer.mlp.down_proj.weight,
                    }
                )
        self.tied = self.embed.data_ptr() == self.lm_head.data_ptr()
        try:
            self.hf_check = self._check_against_hf(model, cfg)
        except Exception as e:
            self.hf_check = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        del model, m
        gc.collect()
        torch.cuda.empty_cache()

    def weight_bytes(self) -> int:
        seen = {}
        for t in [self.embed, self.norm, self.lm_head] + [t for lyr in self.layers for t in lyr.values()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    def kv_bytes_per_token(self) -> int:
        return 2 * self.spec["layers"] * self.kvh * self.d * 2

    def _check_against_hf(self, model, cfg) -> dict:
        """Our engine-shaped forward against transformers' own forward on the same weights.

        Both run in bf16, so neither matches the exact function; the yardstick is transformers' own
        fp32 forward, and ours passes when it sits no further from that than transformers' bf16 run
        does (a wrong mask, rotation or cache slot lands near the unrelated-position distance).
        """
        torch = self.torch
        from transformers import Qwen2ForCausalLM

        n = 80
        ids = torch.randint(0, self.spec["vocab"], (n + 1,), device="cuda")
        with torch.no_grad():
            ref16 = model(input_ids=ids[None], use_cache=False).logits[0].float()
            # Prefill the first n tokens as two chunks (the second attends to the first's KV), then
            # decode token n+1 against that cache.
            s1 = self.make_step(chunk=48, offset=0, ids=ids[:48])
            l1 = s1.fn()[0]
            s2 = self.make_step(chunk=n - 48, offset=48, ids=ids[48:n], prefill_cache_from=s1)
            l2 = s2.fn()[0]
            s3 = self.make_step(batch=1, ctx=n, ids=ids[n:], decode_cache_from=s2)
            l3 = s3.fn()[0]
            del s1, s2, s3
            with torch.device("cuda"):
                m32 = Qwen2ForCausalLM(cfg).float()
            loaded = m32.load_state_dict(model.state_dict(), strict=False)
            m32.eval()
            ref32 = m32(input_ids=ids[None], use_cache=False).logits[0].float()
            del m32
            gc.collect()
            torch.cuda.empty_cache()
        inv_hf = getattr(getattr(model.model, "rotary_emb", None), "inv_freq", None)
        half = torch.arange(0, self.d, 2, device="cuda").double() / self.d
        inv_ours = 1.0 / (self.spec["rope_theta"] ** half)

        def rel(a, b):
            return round(((a - b).norm() / b.norm()).item(), 5)

        out = {}
        passed = True
        for name, ours, pos in (
            ("prefill_chunk0", l1[0], 47),
            ("prefill_chunk1_at_offset48", l2[0], n - 1),
            ("decode_step", l3[0], n),
        ):
            e_ours = rel(ours, ref32[pos])
            e_hf = rel(ref16[pos], ref32[pos])
            out[f"{name}_ours_bf16_vs_fp32_rel_err"] = e_ours
            out[f"{name}_transformers_bf16_vs_fp32_rel_err"] = e_hf
            passed = passed and e_ours <= 1.5 * e_hf + 0.01
        out["unrelated_position_logits_rel_err"] = rel(ref32[46], ref32[47])
        if inv_hf is not None:
            diff = ((inv_hf.double() - inv_ours).abs() / inv_ours).max().item()
            out["rope_inv_freq_max_rel_diff"] = round(diff, 8)
            passed = passed and diff < 1e-3
        # A key left out would leave a random tensor in the reference and fail the check visibly.
        out["fp32_reference_missing_keys"] = list(loaded.missing_keys)[:8]
        out["pass_rule"] = "ours_vs_fp32 <= 1.5 * transformers_bf16_vs_fp32 + 0.01 at every position"
        out["passed"] = passed
        return out

    def make_step(
        self,
        chunk=0,
        offset=0,
        batch=0,
        ctx=0,
        ids=None,
        prefill_cache_from=None,
        decode_cache_from=None,
        kv_buffers=None,
    ):
        return Step(self, chunk, offset, batch, ctx, ids, prefill_cache_from, decode_cache_from, kv_buffers)


class Step:
    """One engine iteration: an optional prefill chunk at an offset plus an optional decode batch.

    All tensors are allocated up front so the whole step can be captured as one CUDA graph, as
    vLLM and SGLang capture their decode steps.
    """

    def __init__(self, mdl, chunk, offset, batch, ctx, ids, pf_from, dc_from, kv_buffers):
        torch = mdl.torch
        self.m = mdl
        self.chunk, self.offset, self.batch, self.ctx = chunk, offset, batch, ctx
        n_layers = len(mdl.layers)
        tokens = chunk + batch
        self.ids = ids if ids is not None else torch.randint(0, mdl.spec["vocab"], (tokens,), device="cuda")
        pos = []
        if chunk:
            pos.append(torch.arange(offset, offset + chunk, device="cuda"))
        if batch:
            pos.append(torch.full((batch,), ctx, device="cuda", dtype=torch.long))
        self.pos = torch.cat(pos)
        idx = ([chunk - 1] if chunk else []) + list(range(chunk, tokens))
        self.logit_idx = torch.tensor(idx, device="cuda", dtype=torch.long)
        bf = torch.bfloat16
        self.pf = []
        if chunk:
            for i in range(n_layers):
                kc = torch.empty(1, mdl.kvh, offset + chunk, mdl.d, device="cuda", dtype=bf).normal_()
                vc = torch.empty(1, mdl.kvh, offset + chunk, mdl.d, device="cuda", dtype=bf).normal_()
                if pf_from is not None:
                    kc[:, :, :offset].copy_(pf_from.pf[i][0][:, :, :offset])
                    vc[:, :, :offset].copy_(pf_from.pf[i][1][:, :, :offset])
                self.pf.append((kc, vc))
        self.dc = []
        self.kv_buffers = 0
        if batch:
            nbuf = kv_buffers or n_layers
            self.kv_buffers = nbuf
            for i in range(nbuf):
                kc = torch.empty(batch, mdl.kvh, ctx + 1, mdl.d, device="cuda", dtype=bf).normal_()
                vc = torch.empty(batch, mdl.kvh, ctx + 1, mdl.d, device="cuda", dtype=bf).normal_()
                if dc_from is not None:
                    src_k, src_v = dc_from.pf[i]
                    kc[:, :, :ctx].copy_(src_k[:, :, :ctx].expand(batch, -1, -1, -1))
                    vc[:, :, :ctx].copy_(src_v[:, :, :ctx].expand(batch, -1, -1, -1))
                self.dc.append((kc, vc))

    def fn(self):
        m = self.m
        torch, F, ops = m.torch, m.F, m.ops
        h, kvh, d, inter = m.h, m.kvh, m.d, m.inter
        c, b = self.chunk, self.batch
        x = F.embedding(self.ids, m.embed)
        res = x
        hs = ops.add_rmsnorm(x, None, m.layers[0]["ln1"])
        n_layers = len(m.layers)
        for i, lw in enumerate(m.layers):
            qkv = F.linear(hs, lw["qkv_w"], lw["qkv_b"])
            ops.rope_(qkv, self.pos, m.cos, m.sin, h + kvh, d)
            q = qkv[:, : h * d]
            k = qkv[:, h * d : (h + kvh) * d]
            v = qkv[:, (h + kvh) * d :]
            outs = []
            if c:
                kc, vc = self.pf[i]
                o = self.offset
                kc[0, :, o : o + c].copy_(k[:c].view(c, kvh, d).transpose(0, 1))
                vc[0, :, o : o + c].copy_(v[:c].view(c, kvh, d).transpose(0, 1))
                qp = q[:c].view(c, h, d).transpose(0, 1).unsqueeze(0)
                att = m.attn_prefill(qp, kc, vc)
                outs.append(att[0].transpose(0, 1).reshape(c, h * d))
            if b:
                kc, vc = self.dc[i % self.kv_buffers]
                kc[:, :, self.ctx].copy_(k[c:].view(b, kvh, d))
                vc[:, :, self.ctx].copy_(v[c:].view(b, kvh, d))
                qd = q[c:].view(b, h, d).unsqueeze(2)
                att = m.attn_decode(qd, kc, vc)
                outs.append(att.reshape(b, h * d))
            att = outs[0] if len(outs) == 1 else torch.cat(outs)
            hs = ops.add_rmsnorm(F.linear(att, lw["o_w"]), res, lw["ln2"])
            gu = F.linear(hs, lw["gu_w"])
            act = F.silu(gu[:, :inter]) * gu[:, inter:]
            nxt = m.layers[i + 1]["ln1"] if i + 1 < n_layers else m.norm
            hs = ops.add_rmsnorm(F.linear(act, lw["d_w"]), res, nxt)
        logits = F.linear(hs[self.logit_idx], m.lm_head).float()
        return logits, logits.argmax(-1)


def time_step(torch, step, samples, target_ms):
    """Median GPU time of one step: CUDA-graph replays timed with events, or the profiler's kernel sum."""
    with torch.no_grad():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step.fn()
        torch.cuda.synchronize()
        act_peak = torch.cuda.max_memory_allocated() - before
        step.fn()
        torch.cuda.synchronize()
        graph = None
        method = "cuda_graph_replay_events"
        capture_error = None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step.fn()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step.fn()
            graph.replay()
            torch.cuda.synchronize()
            run = graph.replay
        except Exception as e:
            capture_error = f"{type(e).__name__}: {str(e)[:200]}"
            graph = None
            torch.cuda.synchronize()
            method = "profiler_kernel_sum"
        if graph is None:
            per = profiler_kernel_us(torch, step.fn, max(3, samples))
            return {
                "us": per,
                "us_min": per,
                "us_max": per,
                "inner": 1,
                "samples": 1,
                "method": method,
                "capture_error": capture_error,
                "activation_peak_bytes": act_peak,
            }
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        first_ms = start.elapsed_time(end)
        inner = max(1, min(100, int(target_ms / max(first_ms, 1e-3))))
        vals = []
        for _ in range(samples):
            start.record()
            for _ in range(inner):
                run()
            end.record()
            end.synchronize()
            vals.append(start.elapsed_time(end) * 1000.0 / inner)
        del graph
        return {
            "us": statistics.median(vals),
            "us_min": min(vals),
            "us_max": max(vals),
            "inner": inner,
            "samples": samples,
            "method": method,
            "activation_peak_bytes": act_peak,
        }


def profiler_kernel_us(torch, fn, reps):
    """Sum of device kernel durations per call (launch gaps excluded), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    total = sum(
        ev.time_range.elapsed_us() for ev in prof.events() if getattr(ev, "device_type", None) == cuda
    )
    return total / reps


def nvidia_smi_info() -> str | None:
    fields = "name,driver_version,memory.total,power.limit,clocks.max.sm,clocks.sm,temperature.gpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{fields}: {out.stdout.strip()}"


def point_record(kind, chunk=0, offset=0, batch=0, ctx=0) -> dict:
    return {
        "kind": kind,
        "chunk": chunk,
        "offset": offset,
        "batch": batch,
        "ctx": ctx,
        "prefill_tokens": chunk,
        "attn_units": chunk * (offset + chunk),
        "decode_seqs": batch,
        "kv_tokens": batch * ctx,
    }


def calibrate(model_key: str, quick: bool, out_dir: str, non_torch_base: int) -> str:
    torch, F = load_torch()
    spec = MODELS[model_key]
    grid = QUICK_GRID if quick else FULL_GRID
    samples, target_ms = (3, 10.0) if quick else (9, 50.0)
    dev_name = torch.cuda.get_device_name(0)
    total_mem = torch.cuda.mem_get_info()[1]
    t0 = time.time()
    ops = Ops(torch, spec)
    attn = pick_attention(torch, F, spec)
    mdl = Model(torch, F, spec, ops, attn)
    weights = mdl.weight_bytes()
    kvb = mdl.kv_bytes_per_token()
    print(
        f"[{model_key}] built in {time.time() - t0:.1f}s; weights {weights / 1e9:.2f} GB; "
        f"attention {mdl.attn_info['prefill']} / {mdl.attn_info['decode']}; fused ops {ops.fused}; "
        f"hf check {mdl.hf_check}",
        flush=True,
    )

    measurements = []

    def run_point(rec, **kw):
        step = None
        try:
            step = mdl.make_step(**kw)
            r = time_step(torch, step, samples, target_ms)
            rec.update(r)
            rec["us"] = round(rec["us"], 2)
            rec["us_min"] = round(rec["us_min"], 2)
            rec["us_max"] = round(rec["us_max"], 2)
            if step.kv_buffers and step.kv_buffers < len(mdl.layers):
                rec["kv_buffers"] = step.kv_buffers
        except torch.cuda.OutOfMemoryError as e:
            rec["skipped"] = f"out of memory: {str(e)[:160]}"
        except Exception as e:
            rec["skipped"] = f"{type(e).__name__}: {str(e)[:200]}"
            traceback.print_exc()
        finally:
            del step
            gc.collect()
            torch.cuda.empty_cache()
        label = " ".join(f"{k}={rec[k]}" for k in ("chunk", "offset", "batch", "ctx") if rec[k])
        if "skipped" in rec:
            print(f"[{model_key}] {rec['kind']:7s} {label:40s} SKIPPED {rec['skipped']}", flush=True)
        else:
            print(
                f"[{model_key}] {rec['kind']:7s} {label:40s} {rec['us']:10.1f} us "
                f"(min {rec['us_min']:.1f}, max {rec['us_max']:.1f}, x{rec['inner']}x{rec['samples']}, "
                f"{rec['method']})",
                flush=True,
            )
        measurements.append(rec)

    for c, o in grid["prefill"]:
        run_point(point_record("prefill", chunk=c, offset=o), chunk=c, offset=o)

    act_peak = max([p.get("activation_peak_bytes", 0) for p in measurements if "skipped" not in p] or [0])
    # vLLM's profile run also samples max_num_seqs rows: fp32 logits and probabilities over the vocab.
    sampler_bytes = 2 * MAX_NUM_SEQS * spec["vocab"] * 4
    free_now, _ = torch.cuda.mem_get_info()
    non_torch_now = (total_mem - free_now) - torch.cuda.memory_reserved()
    non_torch_inc = max(0, non_torch_now - non_torch_base)
    kv_avail = GPU_MEMORY_UTILIZATION * total_mem - weights - max(act_peak, sampler_bytes) - non_torch_inc
    kv_capacity = int(kv_avail // kvb) // BLOCK_SIZE * BLOCK_SIZE
    print(
        f"[{model_key}] kv capacity {kv_capacity} tokens ({kv_avail / 1e9:.1f} GB at {kvb} B/token)",
        flush=True,
    )

    def decode_fits(batch, ctx):
        return batch * (ctx + 1) <= kv_capacity

    def kv_buffers_for(batch, ctx):
        per_layer = 2 * batch * mdl.kvh * (ctx + 1) * mdl.d * 2
        free, _ = torch.cuda.mem_get_info()
        room = free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated() - 6 * 2**30
        n = int(room // per_layer)
        if n >= len(mdl.layers):
            return None
        # Distinct buffers larger than L2 read as cold as one per layer would.
        if n >= 2 and per_layer > 256 * 2**20:
            return n
        return 0

    for b, ln in grid["decode"]:
        rec = point_record("decode", batch=b, ctx=ln)
        if not decode_fits(b, ln):
            rec["skipped"] = f"{b} x {ln} tokens exceed the KV capacity of {kv_capacity} tokens"
            print(f"[{model_key}] decode  batch={b} ctx={ln}: SKIPPED {rec['skipped']}", flush=True)
            measurements.append(rec)
            continue
        nbuf = kv_buffers_for(b, ln)
        if nbuf == 0:
            rec["skipped"] = "KV buffers do not fit in free GPU memory"
            measurements.append(rec)
            continue
        run_point(rec, batch=b, ctx=ln, kv_buffers=nbuf)

    for b, ln, c, o in grid["mixed"]:
        rec = point_record("mixed", chunk=c, offset=o, batch=b, ctx=ln)
        if not decode_fits(b, ln):
            rec["skipped"] = "decode part exceeds the KV capacity"
            measurements.append(rec)
            continue
        run_point(rec, chunk=c, offset=o, batch=b, ctx=ln, kv_buffers=kv_buffers_for(b, ln))

    return write_profile(
        model_key,
        spec,
        dev_name,
        measurements,
        kv_capacity,
        out_dir,
        {
            "method": (
                "Random-weight model built from transformers.Qwen2Config (bf16) on one GPU; each step "
                "(a prefill chunk at a context offset, a decode batch over a per-sequence KV cache, or both) "
                "runs an engine-shaped forward: fused QKV and gate/up GEMMs, Triton fused add+RMSNorm and "
                "RoPE (eager PyTorch if they fail their check: see fused_norm_rope), SDPA attention over "
                "preallocated KV, logits for the last token of the chunk and each "
                "decode row, argmax. The whole step is captured as one CUDA graph and its replays are timed "
                "with CUDA events after warm-up (median of samples); steps that cannot be captured fall back "
                "to the profiler's sum of kernel times. The five constants are fitted by non-negative least "
                "squares on relative error over all measured steps; a fit on prefill and decode alone, "
                "checked against the mixed steps, tests the model's additive form."
            ),
            "quick": quick,
            "device_name": dev_name,
            "total_memory_bytes": total_mem,
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda,
            "transformers_version": mdl.transformers_version,
            "triton_version": getattr(ops.kernels[0], "__version__", None) if ops.kernels else None,
            "python_version": platform.python_version(),
            "nvidia_smi": nvidia_smi_info(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "attention": mdl.attn_info,
            "fused_norm_rope": ops.fused,
            "fused_norm_rope_error": ops.fused_error,
            "reference_check_vs_transformers": mdl.hf_check,
        },
        {
            "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
            "weights_bytes": weights,
            "activation_peak_bytes": act_peak,
            "sampler_bytes": sampler_bytes,
            "non_torch_increase_bytes": non_torch_inc,
            "kv_bytes_per_token": kvb,
        },
    )


def write_profile(
    model_key: str,
    spec: dict,
    dev_name: str,
    measurements: list[dict],
    kv_capacity: int,
    out_dir: str,
    about: dict,
    kv_memory: dict,
) -> str:
    """Fits the step model to `measurements` and writes the profile (the layout src/sim/profile.rs
    loads) with everything measured under its `calibration` key; `about` describes the run."""

    ok = [p for p in measurements if "skipped" not in p]
    by_kind = {k: [p for p in ok if p["kind"] == k] for k in ("prefill", "decode", "mixed")}
    coefs_pd = fit_step_model(by_kind["prefill"] + by_kind["decode"])
    additivity = {
        "fit_on": "prefill and decode points only",
        "coefficients": {n: round_sig(c) for n, c in zip(COEF_NAMES, coefs_pd, strict=True)},
        "mixed_held_out": error_summary(coefs_pd, by_kind["mixed"]),
    }
    coefs = fit_step_model(ok)
    # Errors are those of the rounded constants the simulator will load.
    step = {n: round_sig(c) for n, c in zip(COEF_NAMES, coefs, strict=True)}
    used = [step[n] for n in COEF_NAMES]
    for p in ok:
        p["predicted_us"] = round(predict(used, p), 2)
        p["rel_err"] = round((p["predicted_us"] - p["us"]) / p["us"], 4)
    fit_errors = {
        "all_points": error_summary(used, ok),
        "prefill": error_summary(used, by_kind["prefill"]),
        "decode": error_summary(used, by_kind["decode"]),
        "mixed": error_summary(used, by_kind["mixed"]),
    }
    methods = sorted({p["method"] for p in measurements if "method" in p})

    prefix = (
        "h100"
        if "H100" in dev_name
        else "h200"
        if "H200" in dev_name
        else ("".join(ch for ch in dev_name.lower().split()[-1] if ch.isalnum()) or "gpu")
    )
    name = f"{prefix}-qwen2.5-{model_key}"
    d = spec.get("head_dim", spec["hidden"] // spec["heads"])
    profile = {
        "name": name,
        "hardware": dev_name,
        "model": (
            f"{spec['label']} (Qwen2Config: hidden {spec['hidden']}, intermediate {spec['intermediate']}, "
            f"{spec['layers']} layers, {spec['heads']} heads, {spec['kv_heads']} KV heads, head_dim {d}, "
            f"vocab {spec['vocab']}, rope theta {spec['rope_theta']:g}, "
            f"{'tied' if spec['tie'] else 'untied'} embeddings; bf16)"
        ),
        "block_size": BLOCK_SIZE,
        "max_num_seqs": MAX_NUM_SEQS,
        "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
        "kv_capacity_tokens": kv_capacity,
        "step": step,
        "calibration": {
            **about,
            "timing": methods,
            "step_model": (
                "step_us = base_us + prefill_token_us * prefill_tokens + prefill_attn_ns * "
                "sum(chunk_tokens * context_len_at_chunk_end) / 1000 + decode_seq_us * decode_seqs + "
                "kv_read_ns * kv_tokens_read / 1000"
            ),
            "fit": {
                "objective": (
                    "non-negative least squares of (predicted - measured) / measured; exact over active sets"
                ),
                "points": "every measured prefill, decode and mixed step",
                "coefficients_unrounded": dict(zip(COEF_NAMES, coefs, strict=True)),
                "errors": fit_errors,
                "additivity_check": additivity,
            },
            "kv_capacity": {
                "formula": (
                    "(gpu_memory_utilization * total_memory - weights - max(activation_peak, sampler) "
                    "- non_torch_increase) / kv_bytes_per_token, floored to whole blocks"
                ),
                **kv_memory,
            },
            "scheduler_limits": (
                "max_num_batched_tokens 8192 is vLLM v1's OpenAI-server default on GPUs with >= 70 GiB other "
                "than A100 (H100 included); max_num_seqs 256 is the older v1 default and the largest decode "
                "batch measured here (newer vLLM defaults to 1024 on such GPUs)"
            ),
            "measurements": measurements,
        },
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(profile, f, indent=1)
        f.write("\n")
    print(f"[{model_key}] wrote {path}", flush=True)
    print(f"[{model_key}] step {json.dumps(step)} kv_capacity_tokens {kv_capacity}", flush=True)
    print(f"[{model_key}] errors {json.dumps(fit_errors)}", flush=True)
    print(f"[{model_key}] additivity check {json.dumps(additivity)}", flush=True)
    return path


def engine_layout(engine, tables_from, seqs: list[tuple[int, int]], vocab: int):
    """A StepLayout of the embedded engine: sequence ``i`` has ``seqs[i] = (new tokens, context)``
    and its pages from `tables_from` (an iterator over page ids), decode rows (one new token)
    first, as the engine's scheduler packs a step."""
    import torch

    width = max(-(-c // BLOCK_SIZE) for _, c in seqs)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    ids, pos, slots, starts = [], [], [], [0]
    for i, (n, c) in enumerate(seqs):
        pages = [next(tables_from) for _ in range(-(-c // BLOCK_SIZE))]
        tables[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        p = torch.arange(c - n, c)
        pos.append(p)
        slots.append(tables[i].long()[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
        ids.append(torch.randint(0, vocab, (n,)))
        starts.append(starts[-1] + n)
    return engine.StepLayout(
        input_ids=torch.cat(ids),
        positions=torch.cat(pos),
        query_starts=torch.tensor(starts),
        context_lens=torch.tensor([c for _, c in seqs]),
        block_tables=tables,
        slot_mapping=torch.cat(slots),
    )


def time_engine_step(torch, runner, layout, samples: int, target_ms: float) -> dict:
    """Median host time of one engine step: `runner.greedy(layout)` (the layout's copy to the device,
    the forward pass, eager or a CUDA-graph replay, argmax and the tokens back on the host), which
    is what the engine's loop waits for each step."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner.greedy(layout)
    act_peak = torch.cuda.max_memory_allocated() - before
    t0 = time.perf_counter()
    runner.greedy(layout)
    first_ms = (time.perf_counter() - t0) * 1000
    inner = max(1, min(100, int(target_ms / max(first_ms, 1e-3))))
    vals = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(inner):
            runner.greedy(layout)
        vals.append((time.perf_counter() - t0) * 1e6 / inner)
    return {
        "us": statistics.median(vals),
        "us_min": min(vals),
        "us_max": max(vals),
        "inner": inner,
        "samples": samples,
        "method": "engine_runner_step_host_clock",
        "activation_peak_bytes": act_peak,
    }


def calibrate_engine(model_key: str, quick: bool, out_dir: str, non_torch_base: int) -> str:
    """The same grid and fit as `calibrate`, timed on the embedded engine's own model runner
    (`batchagent_rs.engine.ModelRunner`: paged KV cache, the Triton kernels of
    `batchagent_rs.kernels`, decode steps replayed as CUDA graphs)."""
    import tempfile

    torch, _ = load_torch()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import engine as engine_bench  # benches/engine.py: imports the engine without the API's deps

    engine = engine_bench.import_engine()
    arch = f"qwen2.5-{model_key}"
    spec = MODELS[model_key]
    grid = QUICK_GRID if quick else FULL_GRID
    samples, target_ms = (3, 10.0) if quick else (9, 50.0)
    dev_name = torch.cuda.get_device_name(0)
    total_mem = torch.cuda.mem_get_info()[1]
    kvb = 2 * spec["layers"] * spec["kv_heads"] * (spec["hidden"] // spec["heads"]) * 2
    q_out, kv_out = spec["hidden"], spec["kv_heads"] * (spec["hidden"] // spec["heads"])
    per_layer = (
        spec["hidden"] * (q_out + 2 * kv_out)
        + q_out * spec["hidden"]
        + 3 * spec["hidden"] * spec["intermediate"]
    )
    weights_est = 2 * (
        spec["layers"] * per_layer + spec["vocab"] * spec["hidden"] * (1 if spec["tie"] else 2)
    )

    def pages_for(seqs: list[tuple[int, int]]) -> int:
        return sum(-(-c // BLOCK_SIZE) for _, c in seqs)

    steps = [[(c, o + c)] for c, o in grid["prefill"]]
    steps += [[(1, n + 1)] * b for b, n in grid["decode"]]
    steps += [[(1, n + 1)] * b + [(c, o + c)] for b, n, c, o in grid["mixed"]]
    # The cache holds the largest grid point, or what memory leaves after the weights and 10 GiB
    # for activations and CUDA graphs; points beyond it are skipped.
    room = torch.cuda.mem_get_info()[0] - weights_est - 10 * 2**30
    pages = min(max(pages_for(seqs) for seqs in steps), int(room // kvb) // BLOCK_SIZE)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = engine_bench.model_dir(arch, pathlib.Path(tmp))
        runner = engine.ModelRunner(
            path, num_pages=pages, page_size=BLOCK_SIZE, device="cuda", dtype=torch.bfloat16,
            random_weights=True,
        )  # fmt: skip
    weights = (
        sum(
            t.numel() * t.element_size()
            for w in runner.layers
            for t in (w.qkv, w.qkv_bias, w.o, w.o_bias, w.gate_up, w.down, w.ln_attn, w.ln_mlp)
            if t is not None
        )
        + runner.embed.numel() * 2
        + runner.norm.numel() * 2
        + (0 if runner.lm_head is runner.embed else runner.lm_head.numel() * 2)
    )
    for layer in range(spec["layers"]):  # attention timed over random KV, never zeros
        runner.cache.k[layer].normal_()
        runner.cache.v[layer].normal_()
    sizes = runner.capture_decode_graphs(MAX_NUM_SEQS)
    torch.cuda.synchronize()
    cache_tokens = pages * BLOCK_SIZE
    print(
        f"[{model_key}] engine runner built in {time.time() - t0:.1f}s; weights {weights / 1e9:.2f} GB; "
        f"KV cache {cache_tokens} tokens; decode graphs {sizes[0]}..{sizes[-1]}",
        flush=True,
    )
    gen = torch.Generator().manual_seed(0)
    measurements: list[dict] = []

    def run_point(rec: dict, seqs: list[tuple[int, int]]) -> None:
        if pages_for(seqs) > pages:
            rec["skipped"] = f"{pages_for(seqs)} pages exceed the runner's KV cache of {pages}"
        else:
            order = iter(torch.randperm(pages, generator=gen).tolist())
            layout = engine_layout(engine, order, seqs, spec["vocab"])
            try:
                rec.update(time_engine_step(torch, runner, layout, samples, target_ms))
                for k in ("us", "us_min", "us_max"):
                    rec[k] = round(rec[k], 2)
            except torch.cuda.OutOfMemoryError as e:
                rec["skipped"] = f"out of memory: {str(e)[:160]}"
            gc.collect()
            torch.cuda.empty_cache()
        label = " ".join(f"{k}={rec[k]}" for k in ("chunk", "offset", "batch", "ctx") if rec[k])
        if "skipped" in rec:
            print(f"[{model_key}] {rec['kind']:7s} {label:40s} SKIPPED {rec['skipped']}", flush=True)
        else:
            print(
                f"[{model_key}] {rec['kind']:7s} {label:40s} {rec['us']:10.1f} us "
                f"(min {rec['us_min']:.1f}, max {rec['us_max']:.1f}, x{rec['inner']}x{rec['samples']})",
                flush=True,
            )
        measurements.append(rec)

    for c, o in grid["prefill"]:
        run_point(point_record("prefill", chunk=c, offset=o), [(c, o + c)])
    act_peak = max([p.get("activation_peak_bytes", 0) for p in measurements if "skipped" not in p] or [0])
    sampler_bytes = 2 * MAX_NUM_SEQS * spec["vocab"] * 4
    free_now, _ = torch.cuda.mem_get_info()
    non_torch_inc = max(0, (total_mem - free_now) - torch.cuda.memory_reserved() - non_torch_base)
    kv_avail = GPU_MEMORY_UTILIZATION * total_mem - weights - max(act_peak, sampler_bytes) - non_torch_inc
    kv_capacity = int(kv_avail // kvb) // BLOCK_SIZE * BLOCK_SIZE
    print(
        f"[{model_key}] kv capacity {kv_capacity} tokens ({kv_avail / 1e9:.1f} GB at {kvb} B/token)",
        flush=True,
    )
    for b, n in grid["decode"]:
        rec = point_record("decode", batch=b, ctx=n)
        if b * (n + 1) > kv_capacity:
            rec["skipped"] = f"{b} x {n} tokens exceed the KV capacity of {kv_capacity} tokens"
            print(f"[{model_key}] decode  batch={b} ctx={n}: SKIPPED {rec['skipped']}", flush=True)
            measurements.append(rec)
            continue
        run_point(rec, [(1, n + 1)] * b)
    for b, n, c, o in grid["mixed"]:
        rec = point_record("mixed", chunk=c, offset=o, batch=b, ctx=n)
        run_point(rec, [(1, n + 1)] * b + [(c, o + c)])
    import triton

    return write_profile(
        model_key,
        spec,
        dev_name,
        measurements,
        kv_capacity,
        out_dir,
        {
            "method": (
                "The embedded engine's own model runner (batchagent_rs.engine.ModelRunner) on a "
                "random-weight model of the architecture (bf16): a paged KV cache (16-token pages in "
                "random order, filled with random values), the Triton kernels of batchagent_rs.kernels "
                "(paged prefill attention, paged decode attention, fused add+RMSNorm, RoPE with the cache "
                "write, SiLU x up), "
                "decode steps replayed as CUDA graphs padded to the captured batch sizes. Each step is "
                "runner.greedy(layout), what the engine's loop calls per step: the layout's copy to the "
                "device, the forward pass, argmax and the tokens back on the host, timed by the host "
                "clock after two warm-up steps (median of samples). The five constants are fitted by "
                "non-negative least squares on relative error over all measured steps; a fit on prefill "
                "and decode alone, checked against the mixed steps, tests the model's additive form."
            ),
            "runner": "engine",
            "quick": quick,
            "device_name": dev_name,
            "total_memory_bytes": total_mem,
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda,
            "triton_version": triton.__version__,
            "python_version": platform.python_version(),
            "nvidia_smi": nvidia_smi_info(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "kv_cache_tokens_allocated": cache_tokens,
            "decode_graph_sizes": sizes,
        },
        {
            "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
            "weights_bytes": weights,
            "activation_peak_bytes": act_peak,
            "sampler_bytes": sampler_bytes,
            "non_torch_increase_bytes": non_torch_inc,
            "kv_bytes_per_token": kvb,
        },
    )


def release_gpu_memory() -> None:
    torch, _ = load_torch()
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        action="append",
        choices=[*MODELS, "all"],
        required=True,
        help="model to calibrate (repeatable; 'all' for every model)",
    )
    ap.add_argument("--out", required=True, help="directory for the profile JSON files")
    ap.add_argument("--quick", action="store_true", help="a few points and samples, to check the set-up")
    ap.add_argument(
        "--runner",
        choices=["engine", "sdpa"],
        default="engine",
        help="time the embedded engine's model runner (default) or the SDPA forward written here",
    )
    args = ap.parse_args(argv)
    keys = list(MODELS) if "all" in args.model else list(dict.fromkeys(args.model))
    torch, _ = load_torch()
    total_mem = torch.cuda.mem_get_info()[1]
    # Memory the process holds outside PyTorch's allocator right after CUDA starts; vLLM counts only
    # what grows beyond this (cuBLAS workspaces, compiled kernels) against the KV budget.
    non_torch_base = (total_mem - torch.cuda.mem_get_info()[0]) - torch.cuda.memory_reserved()
    failed = 0
    for key in keys:
        try:
            run = calibrate_engine if args.runner == "engine" else calibrate
            run(key, args.quick, args.out, non_torch_base)
            release_gpu_memory()
        except Exception:
            failed += 1
            traceback.print_exc()
            print(f"[{key}] FAILED", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
