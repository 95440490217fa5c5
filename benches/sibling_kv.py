#!/usr/bin/env python3
"""What sibling agents' KV caches have in common beyond a shared prefix: the measurement behind the
block-hash sharing the engine does, and behind how far its diffs go.

    python benches/sibling_kv.py --out benches/results/sibling-kv.json

Sibling agents share a system prompt and a task template that differs in a few tokens (the file to
review, the paper to read), then go their own way. Blocks up to the first differing token are
shared by hash (`src/engine/blocks.rs`). A diff encoder would store a later block as the base
agent's block plus the rows that differ. This script computes every agent's KV cache with
`transformers` (per agent, one sequence at a time, float32 on the CPU, a random-weight model of the
Qwen2.5-0.5B architecture: whether two rows are equal depends on the architecture, not the
weights), compares each sibling's K and V rows with the base agent's, layer by layer, and reports
KV bytes per agent: every block its own, blocks shared by hash (the engine with one page per block,
its default), blocks shared by hash plus every other (layer, token) row that is bitwise equal to the
base's (the most an exact diff against the base could save), and what the engine stores with
smaller pages (`--kv-page-size`), where the block holding the divergence is a diff of the base's:
its pages up to the last whole page before the first differing token are the base's.

A token's K and V in layer l > 0 depend on every token before it, so after the first differing
token no row of those layers can equal the base's; only layer 0 (the token's embedding and its
position) repeats where the same token sits at the same position, and the leading rows of the block
holding the divergence equal the base's. The run measures both.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine import ARCHS

BLOCK = 16


def kv_rows(model: Any, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, K and V as [tokens, kv_heads * head_dim]."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
    # `cache` in recent transformers, `past_key_values` before.
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    layers = []
    for layer in range(len(cache.layers) if hasattr(cache, "layers") else len(cache)):
        if hasattr(cache, "layers"):
            k, v = cache.layers[layer].keys, cache.layers[layer].values
        else:
            k, v = cache[layer]
        # [1, kv_heads, tokens, head_dim] -> [tokens, kv_heads * head_dim]
        layers.append(tuple(t[0].transpose(0, 1).reshape(t.shape[2], -1) for t in (k, v)))
    return layers  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--slot-tokens", type=int, default=3, help="the task template's agent-specific tokens")
    ap.add_argument("--template-tokens", type=int, default=48, help="shared template tokens after the slot")
    ap.add_argument("--own-tokens", type=int, default=256, help="each agent's own history after the task")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the architecture's (0: all)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import transformers

    arch = dict(ARCHS["qwen2.5-0.5b"])
    if args.layers:
        arch["num_hidden_layers"] = args.layers
    hf_keys = {k: v for k, v in arch.items() if k not in ("architectures", "model_type")}
    cfg = transformers.Qwen2Config(**hf_keys)
    torch.manual_seed(args.seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(args.seed)
    vocab = cfg.vocab_size

    def rand(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    # The system prompt ends mid-block, so the slot falls inside a block, as it does in practice.
    system = rand(args.system_tokens + 5)
    template_head = rand(4)
    template_tail = rand(args.template_tokens)
    prompts = [system + template_head + rand(args.slot_tokens) + template_tail + rand(args.own_tokens)
               for _ in range(args.agents)]  # fmt: skip
    diverge = len(system) + len(template_head)
    t0 = time.perf_counter()
    kv = [kv_rows(model, p) for p in prompts]
    compute_s = time.perf_counter() - t0

    n_layers = len(kv[0])
    tokens = len(prompts[0])
    row_bytes = kv[0][0][0].shape[1] * 2 * 2  # K and V, bf16 as the engine stores them
    # Rows after the divergence whose token and position equal the base's: the template's tail.
    same_token_rows = range(diverge + args.slot_tokens, diverge + args.slot_tokens + args.template_tokens)
    per_layer = []
    for layer in range(n_layers):
        equal_after, equal_same_token, rel = 0, 0, []
        for a in range(1, args.agents):
            kb, vb = kv[0][layer]
            ka, va = kv[a][layer]
            for pos in range(diverge, tokens):
                eq = torch.equal(ka[pos], kb[pos]) and torch.equal(va[pos], vb[pos])
                equal_after += eq
                if pos in same_token_rows:
                    equal_same_token += eq
                    rel.append(float((ka[pos] - kb[pos]).norm() / kb[pos].norm().clamp_min(1e-12)))
        siblings = args.agents - 1
        per_layer.append({
            "layer": layer,
            "rows_after_divergence_equal_share": equal_after / (siblings * (tokens - diverge)),
            "same_token_rows_equal_share": equal_same_token / (siblings * args.template_tokens),
            "same_token_rows_relative_k_difference_median": sorted(rel)[len(rel) // 2] if rel else None,
        })  # fmt: skip
    # Leading rows of the block holding the divergence, equal in every layer.
    prefix_equal = all(
        torch.equal(kv[a][layer][0][:diverge], kv[0][layer][0][:diverge])
        and torch.equal(kv[a][layer][1][:diverge], kv[0][layer][1][:diverge])
        for a in range(1, args.agents)
        for layer in range(n_layers)
    )

    # KV bytes per sibling (the base agent's blocks are counted once for all, as shared).
    full_blocks_shared = diverge // BLOCK
    own_blocks = -(-tokens // BLOCK) - full_blocks_shared
    every_block = -(-tokens // BLOCK) * BLOCK * row_bytes * n_layers
    hash_shared = own_blocks * BLOCK * row_bytes * n_layers
    equal_rows = 0
    for a in range(1, args.agents):
        for layer in range(n_layers):
            kb, vb = kv[0][layer]
            ka, va = kv[a][layer]
            for pos in range(full_blocks_shared * BLOCK, tokens):
                equal_rows += torch.equal(ka[pos], kb[pos]) and torch.equal(va[pos], vb[pos])
    diff_saved = equal_rows / (args.agents - 1) * row_bytes
    with_diff = hash_shared - diff_saved
    # The engine's diff block shares whole pages, in every layer: the leading rows of the divergent
    # block, which the run found equal in every layer (`rows_before_divergence_equal_in_every_layer`).
    lead = diverge - full_blocks_shared * BLOCK
    engine_pages = {
        f"engine_kv_page_{page}": hash_shared - (lead // page * page) * row_bytes * n_layers
        for page in (16, 4, 1)
    }
    out = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "arch": "qwen2.5-0.5b" + (f" ({args.layers} layers)" if args.layers else ""),
        "dtype_computed": "float32 (rows compared bitwise); bytes counted as the engine's bf16",
        "agents": args.agents,
        "tokens_per_agent": tokens,
        "first_differing_token": diverge,
        "layers": n_layers,
        "compute_seconds": compute_s,
        "rows_before_divergence_equal_in_every_layer": prefix_equal,
        "per_layer": per_layer,
        "kv_bytes_per_sibling": {
            "every_block_its_own": every_block,
            "blocks_shared_by_hash": hash_shared,
            "plus_exact_row_diff_against_the_base": with_diff,
            "row_diff_saves_share_of_hash_shared": diff_saved / hash_shared,
            **engine_pages,
            "engine_kv_page_1_saves_share_of_hash_shared": 1 - engine_pages["engine_kv_page_1"] / hash_shared,
        },
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    summary = {k: out[k] for k in ("first_differing_token", "rows_before_divergence_equal_in_every_layer")}
    summary["layer_0_same_token_equal"] = per_layer[0]["same_token_rows_equal_share"]
    if n_layers > 1:
        summary["layer_1_same_token_equal"] = per_layer[1]["same_token_rows_equal_share"]
    summary["kv_bytes_per_sibling"] = out["kv_bytes_per_sibling"]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
