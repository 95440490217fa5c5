"""The embedded engine's model runner against `transformers`: greedy outputs equal per-prompt
`generate`, token for token, for a tiny random Qwen2 (and Llama) model in float32 on the CPU, over
ragged steps: prompts of different lengths packed together, chunked prefill under a token budget,
requests arriving mid-decode, prefix pages shared between sequences by block hash, and a
preempted sequence recomputed from scratch.

The steps are laid out by a small page allocator written here for the test (the engine's own
scheduler is the simulator's, in Rust); what is under test is that the runner computes the same
function as `transformers` for any valid layout.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("BATCHAGENT_REQUIRE_ENGINE_TESTS") != "1":
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
import torch
import transformers

from batchagent_rs.engine import ConfigError, ModelConfig, ModelRunner, StepLayout

PAGE = 4
NEW_TOKENS = 12


def tiny_model(tmp_path: Path, arch: str) -> tuple[Any, Path]:
    common: dict[str, Any] = dict(
        vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
    )  # fmt: skip
    torch.manual_seed(1234)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, attention_bias=True))
    with torch.no_grad():  # non-zero biases and norms, so a dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(tmp_path / arch)
    return model, tmp_path / arch


def reference(model: Any, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@dataclass
class Seq:
    name: str
    tokens: list[int]
    prompt_len: int
    computed: int = 0
    pages: list[int] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class Driver:
    """Pages handed out in random order, full computed blocks shared by their token content."""

    def __init__(self, runner: ModelRunner, budget: int, seed: int):
        self.runner = runner
        self.budget = budget
        self.free = list(range(runner.cache.num_pages))
        random.Random(seed).shuffle(self.free)
        self.cached: dict[tuple[int, ...], int] = {}  # block content from the start -> page
        self.running: list[Seq] = []
        self.shared_hits = 0

    def admit(self, seq: Seq) -> None:
        # As vLLM: at least one token is computed, so the hit stops before the last token's block.
        for b in range((len(seq.tokens) - 1) // PAGE):
            page = self.cached.get(tuple(seq.tokens[: (b + 1) * PAGE]))
            if page is None:
                break
            seq.pages.append(page)
            seq.computed += PAGE
            self.shared_hits += 1
        self.running.append(seq)

    def preempt(self, seq: Seq) -> None:
        """Drops the sequence's cache (pages owned by the prefix cache stay there) to recompute later."""
        owned = set(self.cached.values())
        self.free.extend(p for p in seq.pages if p not in owned)
        seq.pages, seq.computed = [], 0
        self.running.remove(seq)

    def step(self) -> None:
        ids, pos, starts, ctx, slots, rows = [], [], [0], [], [], []
        budget = self.budget
        for seq in self.running:
            if budget == 0:
                break
            n = min(len(seq.tokens) - seq.computed, budget)
            end = seq.computed + n
            while len(seq.pages) * PAGE < end:
                seq.pages.append(self.free.pop())
            for t in range(seq.computed, end):
                ids.append(seq.tokens[t])
                pos.append(t)
                slots.append(seq.pages[t // PAGE] * PAGE + t % PAGE)
            starts.append(starts[-1] + n)
            ctx.append(end)
            rows.append(seq)
            budget -= n
        width = max(len(s.pages) for s in rows)
        layout = StepLayout(
            input_ids=torch.tensor(ids),
            positions=torch.tensor(pos),
            query_starts=torch.tensor(starts),
            context_lens=torch.tensor(ctx),
            block_tables=torch.tensor(
                [s.pages + [0] * (width - len(s.pages)) for s in rows], dtype=torch.int32
            ),
            slot_mapping=torch.tensor(slots),
        )
        layout.validate(PAGE, self.runner.cache.num_pages)
        next_tokens = self.runner.greedy(layout)
        for seq, n_ctx, token in zip(rows, ctx, next_tokens, strict=True):
            seq.computed = n_ctx
            for b in range(n_ctx // PAGE):
                self.cached.setdefault(tuple(seq.tokens[: (b + 1) * PAGE]), seq.pages[b])
            if seq.computed == len(seq.tokens):  # the chunk reached the end: a token comes out
                seq.tokens.append(token)
        self.running = [s for s in self.running if len(s.generated) < NEW_TOKENS]


# The Triton kernels' path on the CPU needs the interpreter (slow): run with TRITON_INTERPRET=1.
ATTENTION = ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_greedy_outputs_equal_transformers_generate(tmp_path: Path, arch: str, attention: str) -> None:
    model, path = tiny_model(tmp_path, arch)
    rng = random.Random(7)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(384) for _ in range(n)]

    p1 = tokens(23)
    p4 = tokens(40)
    prompts = {
        "short": tokens(5),
        "long": p1,
        "shares-long": p1[:16] + tokens(9),  # four full pages of "long", then its own
        "one-token": tokens(1),
        "late": p4,  # arrives mid-decode
        "late-sibling": p4[:20] + tokens(3),  # arrives later still, sharing five pages of "late"
        "page-exact": tokens(8),
    }
    arrivals = {
        0: ["short", "long", "one-token"],
        2: ["shares-long", "page-exact"],
        6: ["late"],
        10: ["late-sibling"],
    }
    # The kernels' path runs decode steps whose sequences share pages through the cascade kernel.
    cascade = True if attention == "triton" else None
    runner = ModelRunner(path, num_pages=256, page_size=PAGE, attention=attention, cascade=cascade)
    driver = Driver(runner, budget=12, seed=3)
    seqs = {name: Seq(name, list(p), len(p)) for name, p in prompts.items()}
    step = 0
    preempted = False
    while step < 200:
        for name in arrivals.get(step, []):
            driver.admit(seqs[name])
        if step == 8 and not preempted:  # "long" is decoding by now: drop its cache, recompute it
            assert seqs["long"].computed > len(p1)
            driver.preempt(seqs["long"])
            driver.admit(seqs["long"])
            preempted = True
        if not driver.running and step > max(arrivals):
            break
        if driver.running:
            driver.step()
        step += 1
    assert preempted and driver.shared_hits >= 9, "the layout did not exercise prefix sharing"
    if attention == "triton":
        assert runner.cascade_steps > 0, "no decode step went through the cascade kernel"
    for name, prompt in prompts.items():
        assert seqs[name].generated == reference(model, prompt), name


def test_random_weights_and_config_errors(tmp_path: Path) -> None:
    _, path = tiny_model(tmp_path, "qwen2")
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ConfigError, match=r"no \*\.safetensors"):
        ModelRunner(path, num_pages=8)
    runner = ModelRunner(path, num_pages=8, page_size=PAGE, random_weights=True)
    layout = StepLayout(
        input_ids=torch.tensor([1, 2, 3]), positions=torch.tensor([0, 1, 2]),
        query_starts=torch.tensor([0, 3]), context_lens=torch.tensor([3]),
        block_tables=torch.tensor([[5]], dtype=torch.int32), slot_mapping=torch.tensor([20, 21, 22]),
    )  # fmt: skip
    layout.validate(PAGE, 8)
    logits = runner.forward(layout)
    assert logits.shape == (1, 384) and torch.isfinite(logits).all()
    bad = StepLayout(
        input_ids=torch.tensor([1, 2]), positions=torch.tensor([0, 1]), query_starts=torch.tensor([0, 2]),
        context_lens=torch.tensor([2]), block_tables=torch.tensor([[5]], dtype=torch.int32),
        slot_mapping=torch.tensor([20, 22]),
    )  # fmt: skip
    with pytest.raises(ValueError, match="slot_mapping"):
        bad.validate(PAGE, 8)
    with pytest.raises(ConfigError, match="rope scaling 'yarn' is not supported"):
        ModelConfig.from_dict(
            {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
             "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"type": "yarn"}},
            source="x/config.json",
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"x/config\.json: architecture 'GPT2LMHeadModel' is not supported"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"]}, source="x/config.json")


# Run in a fresh interpreter where any import of Triton fails, as on a machine without it.
WITHOUT_TRITON = """
import sys

sys.modules["triton"] = None
import torch

from batchagent_rs.engine import ModelRunner, StepLayout

path = sys.argv[1]
runner = ModelRunner(path, num_pages=8, page_size=4, random_weights=True)
layout = StepLayout(
    input_ids=torch.tensor([1, 2, 3]), positions=torch.tensor([0, 1, 2]),
    query_starts=torch.tensor([0, 3]), context_lens=torch.tensor([3]),
    block_tables=torch.tensor([[5]], dtype=torch.int32), slot_mapping=torch.tensor([20, 21, 22]),
)
print("torch attention:", bool(torch.isfinite(runner.forward(layout)).all()))
try:
    ModelRunner(path, num_pages=8, page_size=4, random_weights=True, attention="triton")
except ImportError as e:
    print("triton attention:", e)
"""


def test_the_engine_needs_triton_only_for_its_kernels_and_says_what_to_install(tmp_path: Path) -> None:
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 384, "hidden_size": 64,
        "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRITON, str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "torch attention: True", done.stdout
    assert lines[1].startswith("triton attention: the embedded engine's CUDA kernels need Triton")
    assert "`pip install triton`" in lines[1], done.stdout
