#!/usr/bin/env python3
"""The embedded engine's model runner on a GPU: workload W of the engine issue, its variants, the
`transformers` baselines, and the bf16 agreement with per-prompt `generate`, in one run (JSON out).

Workload W: 256 requests, each a 1,024-token shared prefix + 128 unique tokens, 128 greedy output
tokens, a random-weight model of the Qwen2.5-7B architecture in bf16. The clock runs from the
first request in to the last token out. Variants: prefix sharing off, 512 output tokens, the
Qwen2.5-0.5B architecture.

The steps are laid out by `Planner` below: continuous batching with chunked prefill under a token
budget (decode tokens first, then prompt chunks), pages from a free list, full 16-token blocks
shared by their content (a chained block hash, as the engine's prefix cache does), the first
request's prompt computed alone before the others are admitted (the client's prefix warm-up), and
decode steps replayed as CUDA graphs. It is a scheduler written for this benchmark: the figures
measure the model runner and its kernels, not the engine's own scheduler and server, and the
JSON says so ("scope").

Baselines (same GPU, same run, same random-weight architecture): `transformers` static batching
(`generate` on batches of 64), one request at a time, and `generate_batch` (its continuous
batching) where the installed version has it; each reported with its ratio to the runner.

Usage: python benches/engine.py --out benches/results/engine-h200.json [--quick]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGE = 16

ARCHS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
        "use_sliding_window": False,
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
        "use_sliding_window": False,
    },
}  # fmt: skip


def import_subpackage(name: str) -> Any:
    """`batchagent_rs.<name>`; where the package cannot be imported whole (a GPU machine with
    PyTorch but without the API's dependencies or the native core) the subpackage is loaded on its
    own, from the installed package or from this checkout, which needs nothing else."""
    try:
        return importlib.import_module(f"batchagent_rs.{name}")
    except ImportError:
        for loaded in [m for m in sys.modules if m == "batchagent_rs" or m.startswith("batchagent_rs.")]:
            del sys.modules[loaded]
        spec = importlib.util.find_spec("batchagent_rs")
        paths = list(spec.submodule_search_locations or []) if spec else []
        pkg = types.ModuleType("batchagent_rs")
        pkg.__path__ = [*paths, str(ROOT / "python" / "batchagent_rs")]
        sys.modules["batchagent_rs"] = pkg
        return importlib.import_module(f"batchagent_rs.{name}")


def import_engine() -> Any:
    """`batchagent_rs.engine` (its CUDA kernels, `batchagent_rs.kernels`, come from the same place)."""
    return import_subpackage("engine")


def import_core() -> Any:
    """The native core with the engine's Rust scheduler, or None where it is not built."""
    try:
        import batchagent_rs._core as core
    except ImportError:
        return None
    return core if hasattr(core, "Engine") else None


def model_dir(arch: str, root: Path) -> Path:
    path = root / arch
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(ARCHS[arch]))
    return path


class Planner:
    """Lays out the steps of a batch of requests that all arrive at once (see the module doc) and
    runs them through the runner; greedy decoding of exactly `out_len` tokens per request."""

    def __init__(
        self,
        runner: Any,
        prompts: list[list[int]],
        out_len: int,
        budget: int,
        share: bool,
        max_seqs: int = 256,
        warmup_first: bool = True,
    ):
        self.runner, self.out_len, self.budget, self.share = runner, out_len, budget, share
        self.max_seqs, self.warmup_first = max_seqs, warmup_first
        n = len(prompts)
        self.prompt_len = np.array([len(p) for p in prompts], dtype=np.int64)
        longest = int(self.prompt_len.max()) + out_len
        self.tokens = np.zeros((n, longest), dtype=np.int64)
        for i, p in enumerate(prompts):
            self.tokens[i, : len(p)] = p
        self.length = self.prompt_len.copy()  # tokens known (prompt + generated)
        self.computed = np.zeros(n, dtype=np.int64)  # tokens whose KV is in the cache
        self.pages_per_seq = (longest + PAGE - 1) // PAGE
        self.table = np.zeros((n, self.pages_per_seq), dtype=np.int32)
        self.npages = np.zeros(n, dtype=np.int64)
        self.free = list(range(runner.cache.num_pages - 1, -1, -1))
        self.block_hash: dict[int, int] = {}  # chained hash of a full block's tokens -> page
        self.hashes = [self._hashes(p) for p in prompts]
        self.waiting = list(range(n))
        self.running: list[int] = []
        self.prefill_computed = 0
        self.cached_tokens = 0
        self.steps: list[tuple[str, int, int, float]] = []  # kind, tokens, seqs, seconds
        self.step_log: list[list[float]] = []

    @staticmethod
    def _hashes(prompt: list[int]) -> list[int]:
        out, h = [], 0
        for b in range(len(prompt) // PAGE):
            h = hash((h, tuple(prompt[b * PAGE : (b + 1) * PAGE])))
            out.append(h)
        return out

    def _admit(self, i: int) -> None:
        # The whole request's pages up front (the benchmark never runs short of memory); full
        # prompt blocks already computed are taken from the prefix cache, stopping before the last
        # prompt token so that at least one token is computed.
        pages = []
        if self.share:
            for b, h in enumerate(self.hashes[i]):
                if (b + 1) * PAGE >= self.prompt_len[i] or h not in self.block_hash:
                    break
                pages.append(self.block_hash[h])
        self.computed[i] = len(pages) * PAGE
        self.cached_tokens += len(pages) * PAGE
        total = (int(self.prompt_len[i]) + self.out_len + PAGE - 1) // PAGE
        pages += [self.free.pop() for _ in range(total - len(pages))]
        self.table[i, : len(pages)] = pages
        self.npages[i] = len(pages)
        self.running.append(i)

    def _step(self) -> bool:
        engine = self.engine
        if self.waiting and len(self.running) < self.max_seqs:
            if self.warmup_first and self.share and not self.running and self.prefill_computed == 0:
                self._admit(self.waiting.pop(0))  # the prefix warm-up: the first request alone
            elif not (self.warmup_first and self.share and self.prefill_computed == 0):
                while self.waiting and len(self.running) < self.max_seqs:
                    self._admit(self.waiting.pop(0))
        if not self.running:
            return False
        run = np.array(self.running, dtype=np.int64)
        decoding = run[self.computed[run] == self.length[run] - 1]
        decoding = decoding[self.computed[decoding] >= self.prompt_len[decoding]]
        budget = self.budget - len(decoding)
        chunks: list[tuple[int, int]] = []
        for i in self.running:
            if budget <= 0:
                break
            if self.computed[i] < self.prompt_len[i]:
                n = min(int(self.prompt_len[i] - self.computed[i]), budget)
                chunks.append((i, n))
                budget -= n
        seqs = np.concatenate([decoding, np.array([i for i, _ in chunks], dtype=np.int64)])
        n_new = np.concatenate(
            [np.ones(len(decoding), dtype=np.int64), np.array([n for _, n in chunks], dtype=np.int64)]
        )
        first = self.computed[seqs]
        ctx = first + n_new
        starts = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(n_new, out=starts[1:])
        total = int(starts[-1])
        # Token t of the step: sequence s, position first[s] + (t - starts[s]).
        owner = np.repeat(np.arange(len(seqs)), n_new)
        pos = first[owner] + (np.arange(total) - starts[owner])
        rows = seqs[owner]
        ids = self.tokens[rows, pos]
        slots = self.table[rows, pos // PAGE].astype(np.int64) * PAGE + pos % PAGE
        width = int(((ctx + PAGE - 1) // PAGE).max())
        layout = engine.StepLayout(
            input_ids=torch.from_numpy(ids), positions=torch.from_numpy(pos),
            query_starts=torch.from_numpy(starts), context_lens=torch.from_numpy(ctx),
            block_tables=torch.from_numpy(np.ascontiguousarray(self.table[seqs, :width])),
            slot_mapping=torch.from_numpy(slots),
        )  # fmt: skip
        t0 = time.perf_counter()
        out = np.array(self.runner.greedy(layout), dtype=np.int64)
        took = time.perf_counter() - t0
        nd = len(decoding)
        self.steps.append(("decode" if not chunks else "mixed", total, len(seqs), took))
        # For fitting the simulator's step model: prefill tokens, sum of chunk x context at its end,
        # decode sequences, KV tokens the decode tokens read, milliseconds (host clock, step to step).
        self.step_log.append(
            [total - nd, int((n_new[nd:] * ctx[nd:]).sum()), nd, int(ctx[:nd].sum()), round(took * 1000, 4)]
        )
        self.prefill_computed += total - len(decoding)
        self.computed[seqs] = ctx
        done = ctx == self.length[seqs]  # the step reached the end of what is known: a token comes out
        emit = seqs[done]
        self.tokens[emit, self.length[emit]] = out[done]
        self.length[emit] += 1
        if self.share:
            for i, _ in chunks:
                end = int(self.computed[i])
                for b in range(end // PAGE):
                    if b < len(self.hashes[i]):
                        self.block_hash.setdefault(self.hashes[i][b], int(self.table[i, b]))
        finished = set((seqs[self.length[seqs] - self.prompt_len[seqs] >= self.out_len]).tolist())
        if finished:
            self.running = [i for i in self.running if i not in finished]
        return True

    def run(self, engine: Any) -> dict[str, Any]:
        self.engine = engine
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        while self._step():
            pass
        wall = time.perf_counter() - t0
        n = len(self.prompt_len)
        out_tokens = n * self.out_len
        decode = [s for s in self.steps if s[0] == "decode" and s[2] == max(x[2] for x in self.steps)]
        mixed = [s for s in self.steps if s[0] == "mixed"]
        return {
            "requests": n,
            "output_tokens": out_tokens,
            "seconds": wall,
            "output_tok_per_s": out_tokens / wall,
            "prompt_tokens": int(self.prompt_len.sum()),
            "prompt_tokens_computed": int(self.prefill_computed),
            "prompt_tokens_from_cache": int(self.cached_tokens),
            "steps": len(self.steps),
            "decode_steps": sum(1 for s in self.steps if s[0] == "decode"),
            "mixed_steps": len(mixed),
            "seconds_in_mixed_steps": sum(s[3] for s in mixed),
            "prefill_tok_per_s_in_mixed_steps": sum(s[1] for s in mixed)
            / max(1e-9, sum(s[3] for s in mixed)),
            "full_batch_decode_step_ms_median": 1000 * statistics.median(s[3] for s in decode)
            if decode
            else None,
            "step_log_columns": [
                "prefill_tokens",
                "prefill_attn_work",
                "decode_seqs",
                "kv_tokens_read",
                "ms",
            ],
            "step_log": self.step_log,
        }

    def generated(self) -> list[list[int]]:
        return [
            self.tokens[i, self.prompt_len[i] : self.length[i]].tolist() for i in range(len(self.prompt_len))
        ]


def w_prompts(n: int, prefix: int, unique: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, vocab, (prefix,), generator=gen).tolist()
    return [shared + torch.randint(0, vocab, (unique,), generator=gen).tolist() for _ in range(n)]


FUSED = True


def make_runner(
    engine: Any, path: Path, pages: int, dtype: torch.dtype, max_batch: int, **kw: Any
) -> tuple[Any, float]:
    t0 = time.perf_counter()
    kw.setdefault("fused", FUSED)
    runner = engine.ModelRunner(
        path, num_pages=pages, page_size=PAGE, device="cuda", dtype=dtype, max_model_len=2048, **kw
    )
    runner.capture_decode_graphs(max_batch)
    torch.cuda.synchronize()
    return runner, time.perf_counter() - t0


def runner_workload(
    engine: Any,
    path: Path,
    arch: str,
    n: int,
    out_len: int,
    share: bool,
    budget: int,
    runner: Any | None = None,
) -> tuple[dict[str, Any], Any]:
    vocab = ARCHS[arch]["vocab_size"]
    prompts = w_prompts(n, 1024, 128, vocab, seed=11)
    # Pages for the longest variant run on the same runner (512 output tokens, no sharing).
    pages = n * ((1152 + max(out_len, 512) + PAGE - 1) // PAGE) + 8
    setup = None
    if runner is None:
        runner, setup = make_runner(engine, path, pages, torch.bfloat16, 256, random_weights=True)
    # A warm-up of the same step shapes (a few output tokens) compiles the kernels' variants
    # outside the clock; without prefix sharing a shorter one (its prefill alone takes seconds).
    warm = Planner(runner, w_prompts(n if share else 32, 1024, 128, vocab, seed=5), 3, budget, share)
    warm.run(engine)
    planner = Planner(runner, prompts, out_len, budget, share)
    res = planner.run(engine)
    res.update(arch=arch, prefix_sharing=share, token_budget=budget, setup_seconds=setup)
    return res, runner


def engine_workload(
    core: Any,
    engine: Any,
    path: Path,
    n: int,
    out_len: int,
    budget: int,
    device: str = "cuda",
    dtype: str = "bf16",
    prefix: int = 1024,
    unique: int = 128,
    prefix_caching: bool = True,
    page_size: int = PAGE,
) -> dict[str, Any]:
    """W end to end through the engine: the Rust scheduler and block manager (`_core.Engine`)
    calling the Python worker once per step. The first request goes alone (the client's prefix
    warm-up), then all of them; the clock covers both. `prefix_caching=False` turns the engine's
    prefix cache off (every prompt token computed). `page_size`: tokens per KV page (the engine's
    `--kv-page-size`; blocks stay 16 tokens), which W's block-aligned prompts never use for diffs:
    what smaller pages cost."""
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    t0 = time.perf_counter()
    worker = engine.EngineWorker(
        path, device=device, dtype=dtype, random_weights=True, page_size=page_size,
        kv_cache_tokens=n * (prefix + unique + out_len) + 4096, cuda_graphs=256 if device == "cuda" else 0,
    )  # fmt: skip
    eng = core.Engine(
        worker, max_num_seqs=256, max_num_batched_tokens=budget, enable_prefix_caching=prefix_caching
    )
    setup = time.perf_counter() - t0
    try:
        warm = w_prompts(n, prefix, unique, vocab, seed=5)  # the same step shapes, outside the clock
        eng.generate(warm[:1], 1, min_tokens=1)
        # Without prefix caching a shorter warm-up (its prefill alone takes seconds).
        eng.generate(warm if prefix_caching else warm[:32], 3, min_tokens=3)
        prompts = w_prompts(n, prefix, unique, vocab, seed=11)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        first = eng.generate(prompts[:1], 1, min_tokens=1)
        outs = eng.generate(prompts, out_len, min_tokens=out_len)
        wall = time.perf_counter() - t0
        metrics = eng.metrics()
    finally:
        eng.shutdown()
    tokens = sum(len(o) for o in outs) + len(first[0])
    return {
        "scope": "end to end: the engine's Rust scheduler and block manager, one crossing into Python "
        "per step",
        "requests": n + 1,
        "output_tokens": tokens,
        "seconds": wall,
        "output_tok_per_s": tokens / wall,
        "setup_seconds": setup,
        "token_budget": budget,
        "prefix_caching": prefix_caching,
        "kv_page_size": page_size,
        "output_len": out_len,
        "engine_metrics": metrics,
    }


def cascade_comparison(engine: Any, runner: Any, n: int, ctx_len: int) -> dict[str, Any]:
    """One decode step of W's shape (all sequences share the 1,024-token prefix) timed as a graph
    replay (paged kernel), eagerly with the paged kernel and eagerly with the cascade kernel."""
    per_seq = (ctx_len + PAGE - 1) // PAGE
    shared = list(range(1024 // PAGE))
    nxt = len(shared)
    tables = []
    for _ in range(n):
        own = list(range(nxt, nxt + per_seq - len(shared)))
        nxt += len(own)
        tables.append(shared + own)
    assert nxt <= runner.cache.num_pages
    bt = torch.tensor(tables, dtype=torch.int32)
    pos = torch.full((n,), ctx_len - 1, dtype=torch.int64)
    layout = engine.StepLayout(
        input_ids=torch.randint(0, 1000, (n,)), positions=pos, query_starts=torch.arange(n + 1),
        context_lens=pos + 1, block_tables=bt, slot_mapping=bt[:, -1].long() * PAGE + (ctx_len - 1) % PAGE,
    )  # fmt: skip
    out: dict[str, Any] = {"seqs": n, "context": ctx_len}
    graphs = runner.graphs
    for name, cascade, use_graphs in (
        ("graph_paged", False, True),
        ("eager_paged", False, False),
        ("eager_cascade", True, False),
    ):
        runner.cascade = cascade
        runner.graphs = graphs if use_graphs else {}
        times = []
        for _ in range(12):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.greedy(layout)
            times.append(time.perf_counter() - t0)
        out[name + "_ms"] = 1000 * statistics.median(times[2:])
    runner.cascade, runner.graphs = None, graphs
    return out


def hf_model(arch: str, dtype: torch.dtype, seed: int) -> Any:
    import transformers

    cfg = transformers.Qwen2Config(
        **{k: v for k, v in ARCHS[arch].items() if k not in ("architectures", "model_type")}
    )
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = transformers.Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_generate(model: Any, prompts: list[list[int]], out_len: int) -> list[list[int]]:
    ids = torch.tensor(prompts, device="cuda")
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len, min_new_tokens=out_len,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return out[:, ids.shape[1] :].tolist()


def baselines(arch: str, n: int, out_len: int, quick: bool) -> dict[str, Any]:
    import transformers

    vocab = ARCHS[arch]["vocab_size"]
    prompts = w_prompts(n, 1024, 128, vocab, seed=11)
    model = hf_model(arch, torch.bfloat16, 0)
    res: dict[str, Any] = {"transformers": transformers.__version__}
    hf_generate(model, prompts[:2], 4)  # warm-up
    batches = 1 if quick else n // 64
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in range(batches):
        hf_generate(model, prompts[b * 64 : (b + 1) * 64], out_len)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    res["static_batch64"] = {
        "requests": 64 * batches,
        "seconds": wall,
        "output_tok_per_s": 64 * batches * out_len / wall,
    }
    k = 3
    t0 = time.perf_counter()
    for p in prompts[:k]:
        hf_generate(model, [p], out_len)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    res["one_at_a_time"] = {"requests": k, "seconds": wall, "output_tok_per_s": k * out_len / wall}
    if hasattr(model, "generate_batch"):
        cb_n = 64
        try:
            cfg = transformers.GenerationConfig(
                max_new_tokens=out_len,
                min_new_tokens=out_len,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = model.generate_batch(inputs=prompts[:cb_n], generation_config=cfg)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            got = sum(len(o.generated_tokens) for o in outs.values())
            res["generate_batch"] = {
                "requests": cb_n,
                "seconds": wall,
                "output_tokens": got,
                "output_tok_per_s": got / wall,
            }
        except Exception as exc:  # the API moves between releases: record what happened
            res["generate_batch"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    else:
        res["generate_batch"] = {"error": "not in this transformers version"}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def agreement(engine: Any, dtype: torch.dtype, n: int, out_len: int, tmp: Path) -> dict[str, Any]:
    """Greedy outputs of the runner (prefix sharing, chunked prefill, CUDA graphs) against
    per-prompt `generate` on the same random-weight Qwen2.5-0.5B architecture, in `dtype`."""
    arch = "qwen2.5-0.5b"
    model = hf_model(arch, dtype, 1)
    path = tmp / f"agree-{str(dtype).split('.')[-1]}"
    model.save_pretrained(path)
    gen = torch.Generator().manual_seed(3)
    vocab = ARCHS[arch]["vocab_size"]
    shared = torch.randint(0, vocab, (200,), generator=gen).tolist()
    prompts = []
    for i in range(n):
        own = torch.randint(
            0, vocab, (int(torch.randint(1, 300, (1,), generator=gen)),), generator=gen
        ).tolist()
        prompts.append(shared[: 37 + 5 * i] + own if i % 2 == 0 else own)
    want = [hf_generate(model, [p], out_len)[0] for p in prompts]
    del model
    torch.cuda.empty_cache()
    pages = sum((len(p) + out_len) // PAGE + 1 for p in prompts) + 8
    runner, _ = make_runner(engine, path, pages, dtype, 32)
    planner = Planner(runner, prompts, out_len, budget=512, share=True)
    planner.run(engine)
    got = planner.generated()
    firsts = []
    for a, b in zip(got, want, strict=True):
        diff = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        firsts.append(diff)
    same = sum(1 for f in firsts if f is None)
    diverged = [f for f in firsts if f is not None]
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "dtype": str(dtype).split(".")[-1],
        "arch": arch,
        "sequences": n,
        "new_tokens": out_len,
        "identical": same,
        "identical_share": same / n,
        "first_divergence_positions": sorted(diverged),
        "first_divergence_median": statistics.median(diverged) if diverged else None,
        "prompt_tokens_from_cache": planner.cached_tokens,
    }


def profile_check(result: dict[str, Any]) -> dict[str, Any]:
    """The simulator's H200 step model (benches/calibration) against the steps the runner took:
    its prediction over each logged step, summed, against the measured time."""
    out: dict[str, Any] = {}
    sections = {"W": "7b", "W_no_prefix_sharing": "7b", "W_512_output": "7b", "W_0.5b": "0.5b"}
    for name, model in sections.items():
        res = result.get(name, {})
        res = res.get("second", res)
        rows = res.get("step_log")
        if not rows:
            continue
        prof = json.loads((ROOT / "benches" / "calibration" / f"h200-qwen2.5-{model}.json").read_text())[
            "step"
        ]

        def predict(row: list[float], p: dict[str, float] = prof) -> float:
            pf, attn, seqs, kv, _ = row
            us = p["base_us"] + p["prefill_token_us"] * pf + p["prefill_attn_ns"] * attn / 1000
            return (us + p["decode_seq_us"] * seqs + p["kv_read_ns"] * kv / 1000) / 1000

        dec = [r for r in rows if r[0] == 0]
        pre = [r for r in rows if r[0] > 0]
        out[name] = {
            "profile": f"h200-qwen2.5-{model}",
            "measured_ms": sum(r[4] for r in rows),
            "predicted_ms": sum(predict(r) for r in rows),
            "decode_steps_measured_ms": sum(r[4] for r in dec),
            "decode_steps_predicted_ms": sum(predict(r) for r in dec),
            "prefill_steps_measured_ms": sum(r[4] for r in pre),
            "prefill_steps_predicted_ms": sum(predict(r) for r in pre),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=int, default=16384, help="token budget per step")
    ap.add_argument("--quick", action="store_true", help="fewer baseline batches")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    ap.add_argument("--no-fused", action="store_true", help="the runner's element-wise work unfused")
    ap.add_argument(
        "--check-profiles", action="store_true",
        help="add the simulator profiles' predictions of the logged steps to an existing --out file",
    )  # fmt: skip
    args = ap.parse_args()
    if args.check_profiles:
        done = json.loads(Path(args.out).read_text())
        done["sim_profile_check"] = profile_check(done)
        Path(args.out).write_text(json.dumps(done, indent=2))
        print(json.dumps(done["sim_profile_check"], indent=1))
        return
    engine = import_engine()
    global FUSED
    FUSED = not args.no_fused
    import transformers
    import triton

    only = set(filter(None, args.only.split(",")))
    want = lambda s: not only or s in only  # noqa: E731
    result: dict[str, Any] = {
        "scope": "runner only, not end to end: steps laid out by benches/engine.py's Planner, "
        "not the engine's scheduler and server",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "fused_elementwise_kernels": FUSED,
        "workload": "W: 256 requests, 1,024-token shared prefix + 128 unique tokens, greedy output, "
        "random weights, bf16",
    }
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2))

    def section(name: str, fn: Any) -> None:
        if not want(name):
            return
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception:
            result[name] = {"error": traceback.format_exc()[-3000:]}
        print(f"{name}: {time.perf_counter() - t0:.1f} s: {json.dumps(result[name])[:600]}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        save()

    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        path7 = model_dir("qwen2.5-7b", tmp)
        path05 = model_dir("qwen2.5-0.5b", tmp)
        holder: dict[str, Any] = {}

        def w() -> dict[str, Any]:
            res, runner = runner_workload(engine, path7, "qwen2.5-7b", 256, 128, True, args.budget)
            holder["runner"] = runner
            again, _ = runner_workload(engine, path7, "qwen2.5-7b", 256, 128, True, args.budget, runner)
            return {"first": res, "second": again}

        core = import_core()
        if core is not None:
            section("W_engine", lambda: engine_workload(core, engine, path7, 256, 128, args.budget))
            section(
                "W_engine_no_prefix_sharing",
                lambda: engine_workload(core, engine, path7, 256, 128, args.budget, prefix_caching=False),
            )
            section(
                "W_engine_512_output", lambda: engine_workload(core, engine, path7, 256, 512, args.budget)
            )
            section("W_engine_0.5b", lambda: engine_workload(core, engine, path05, 256, 128, args.budget))
            for page in (4, 1):
                section(
                    f"W_engine_kv_page_{page}",
                    lambda page=page: engine_workload(
                        core, engine, path7, 256, 128, args.budget, page_size=page
                    ),
                )
        section("W", w)
        section("W_cascade_step", lambda: cascade_comparison(engine, holder["runner"], 256, 1216))
        section(
            "W_no_prefix_sharing",
            lambda: runner_workload(
                engine, path7, "qwen2.5-7b", 256, 128, False, args.budget, holder["runner"]
            )[0],
        )
        section(
            "W_512_output",
            lambda: runner_workload(
                engine, path7, "qwen2.5-7b", 256, 512, True, args.budget, holder["runner"]
            )[0],
        )
        holder.clear()
        gc.collect()
        torch.cuda.empty_cache()
        section(
            "W_0.5b", lambda: runner_workload(engine, path05, "qwen2.5-0.5b", 256, 128, True, args.budget)[0]
        )
        gc.collect()
        torch.cuda.empty_cache()
        section("baselines_7b", lambda: baselines("qwen2.5-7b", 256, 128, args.quick))
        section("agreement_bf16", lambda: agreement(engine, torch.bfloat16, 32, 32, tmp))
        section("agreement_fp32", lambda: agreement(engine, torch.float32, 32, 32, tmp))

    w_res = result.get("W", {}).get("second", {})
    base = result.get("baselines_7b", {})
    if "output_tok_per_s" in w_res:
        ratios = {}
        for name in ("static_batch64", "one_at_a_time", "generate_batch"):
            b = base.get(name, {})
            if "output_tok_per_s" in b:
                ratios[name] = w_res["output_tok_per_s"] / b["output_tok_per_s"]
        result["W_vs_transformers"] = ratios
    save()
    print(json.dumps({k: v for k, v in result.items() if k.startswith("W")}, indent=1)[:4000])


if __name__ == "__main__":
    main()
