"""The embedded engine end to end below HTTP: the Rust scheduler and block manager driving the
Python model runner once per step (`_core.Engine` over `EngineWorker`). Greedy outputs equal
per-prompt `transformers` `generate` for a tiny random Qwen2 in float32 on the CPU, over a ragged
batch with shared prefixes and a KV cache too small for all of it (preemption); sampling is
reproducible under a seed; stop tokens and min_tokens behave as vLLM's."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("BATCHAGENT_REQUIRE_ENGINE_TESTS") != "1":
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
import torch
import transformers

from batchagent_rs._core import Engine
from batchagent_rs.engine import EngineWorker

VOCAB = 384


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    path = tmp_path_factory.mktemp("model") / "qwen2"
    torch.manual_seed(99)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    return model, path


def reference(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def test_greedy_batch_equals_generate_with_shared_prefixes_and_preemption(tiny: tuple[Any, Path]) -> None:
    model, path = tiny
    rng = random.Random(5)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(n)]

    stem = tokens(21)
    prompts = [tokens(3), stem, stem[:16] + tokens(7), tokens(1), tokens(30), stem + tokens(2), tokens(9)]
    # 24 pages of 4 tokens: less than the batch needs at once, so some sequences are preempted
    # and recomputed; a 10-token budget chunks the longer prompts.
    worker = EngineWorker(path, block_size=4, kv_cache_tokens=96)
    engine = Engine(worker, max_num_seqs=8, max_num_batched_tokens=10)
    try:
        outputs = engine.generate(prompts, 14)
    finally:
        engine.shutdown()
    # Read once the loop has ended: the counters of its last step are final.
    m = engine.metrics()
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out == reference(model, prompt, 14), prompt
    assert m["num_preemptions"] > 0, m
    assert m["prefix_cache_hits"] >= 16, m
    assert m["generation_tokens"] == 14 * len(prompts)
    assert m["kv_cache_usage_perc"] == 0


def test_sampling_is_reproducible_under_a_seed_and_top_k_1_is_greedy(tiny: tuple[Any, Path]) -> None:
    model, path = tiny
    prompt = list(range(10, 30))
    engine = Engine(EngineWorker(path, block_size=4, kv_cache_tokens=512))
    try:
        alone = engine.generate([prompt], 12, temperature=1.0, seed=7)[0]
        # Beside other sequences the seeded draws are the same.
        together = engine.generate([list(range(50, 61)), prompt, [3, 4]], 12, temperature=1.0, seed=7)[1]
        other_seed = engine.generate([prompt], 12, temperature=1.0, seed=8)[0]
        top1 = engine.generate([prompt], 12, temperature=0.8, top_k=1, seed=1)[0]
        nucleus = engine.generate([prompt], 12, temperature=0.8, top_p=1e-6, seed=1)[0]
    finally:
        engine.shutdown()
    assert alone == together
    assert alone != other_seed
    greedy = reference(model, prompt, 12)
    assert top1 == greedy
    assert nucleus == greedy


def test_stop_tokens_end_the_output_and_min_tokens_holds_them_back(tiny: tuple[Any, Path]) -> None:
    model, path = tiny
    prompt = [7, 8, 9, 10, 11]
    greedy = reference(model, prompt, 6)
    engine = Engine(EngineWorker(path, block_size=4, kv_cache_tokens=512))
    try:
        stopped = engine.generate([prompt], 6, stop_token_ids=[greedy[1]])[0]
        held = engine.generate([prompt], 6, stop_token_ids=[greedy[0]], min_tokens=3)[0]
    finally:
        engine.shutdown()
    assert stopped == greedy[: greedy.index(greedy[1]) + 1]
    assert len(held) >= 4 and greedy[0] not in held[:3]


@pytest.mark.parametrize(("page_size", "hit"), [(16, 32), (4, 36), (1, 38)])
def test_siblings_departing_mid_block_share_pages_up_to_there_and_equal_generate(
    tiny: tuple[Any, Path], page_size: int, hit: int
) -> None:
    model, path = tiny
    rng = random.Random(11)
    stem = [rng.randrange(VOCAB) for _ in range(38)]
    first = stem + [rng.randrange(VOCAB) for _ in range(20)]
    siblings = [stem + [rng.randrange(VOCAB) for _ in range(5 + i)] for i in range(3)]
    engine = Engine(EngineWorker(path, page_size=page_size, kv_cache_tokens=1024))
    try:
        outputs = engine.generate([first], 10)
        before = engine.metrics()["prefix_cache_hits"]
        outputs += engine.generate(siblings, 10)
        hits = engine.metrics()["prefix_cache_hits"] - before
    finally:
        engine.shutdown()
    # Each sibling finds the 2 whole blocks of the stem, then the whole pages of block 2 that it
    # shares with the first prompt's (a diff of it): 4 of its 6 stem tokens with pages of 4.
    # Siblings admitted together reuse the first prompt's block, not each other's, still computing.
    assert hits == hit * len(siblings)
    for prompt, out in zip([first, *siblings], outputs, strict=True):
        assert out == reference(model, prompt, 10), prompt
