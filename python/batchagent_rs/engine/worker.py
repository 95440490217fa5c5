"""The Python half of the embedded engine: what the Rust engine loop calls once per step, and the
model directory's tokenizer and chat template.

The Rust loop (`batchagent_rs._core.Engine`, and `batchagent engine serve`) schedules each step
and calls `EngineWorker.step` with the step's layout as little-endian arrays; the worker runs the
`ModelRunner` on it and picks each sequence's next token from the logits (greedy, or sampling
with temperature, top-k, top-p and a seed). Tokenizing and detokenizing go through `transformers`'
tokenizer of the model directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ModelConfig
from .layout import StepLayout
from .model import ModelRunner

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (temperature, top_p, top_k, seed, output index) of each sequence of a step.
SamplingRow = tuple[float, float, int, int | None, int]


def _array(buf: bytearray, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(buf, dtype=dtype) if len(buf) else torch.empty(0, dtype=dtype)


def sample(
    logits: torch.Tensor, sampling: list[SamplingRow] | None, banned: list[tuple[int, list[int]]]
) -> list[int]:
    """The next token of each row of ``logits [seqs, vocab]``. A seeded row draws from a generator
    seeded by (seed, output index), so its tokens do not depend on what else ran in the step."""
    for row, ids in banned:
        logits[row, ids] = float("-inf")
    out = logits.argmax(dim=-1)
    if sampling is None:
        return [int(t) for t in out.tolist()]
    for row, (temperature, top_p, top_k, seed, index) in enumerate(sampling):
        if temperature <= 0:
            continue
        scores = logits[row] / temperature
        if 0 < top_k < scores.shape[0]:
            kth = torch.topk(scores, top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if top_p < 1.0:
            ordered, order = scores.sort(descending=True)
            probs = ordered.softmax(dim=-1)
            # Keep the smallest head whose mass reaches top_p (the first token always stays).
            ordered = ordered.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(0, order, ordered)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=scores.device)
            generator.manual_seed((seed * 1_000_003 + index) % (1 << 63))
        out[row] = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[0]
    return [int(t) for t in out.tolist()]


# A row's logprobs: the sampled token's, then the top tokens' ids and theirs (the most likely first).
LogprobsRow = tuple[float, list[int], list[float]]

# vLLM's floor for a log-probability in JSON (which has no -inf).
LOGPROB_FLOOR = -9999.0


def token_logprobs(raw: torch.Tensor, chosen: list[int], top: list[int]) -> list[LogprobsRow]:
    """Per row of ``raw [rows, vocab]`` (log-probabilities): the log-probability of the row's
    ``chosen`` token and the ``top`` most likely tokens with theirs, floored at ``LOGPROB_FLOOR``."""
    picked = raw.gather(1, torch.tensor(chosen, device=raw.device).unsqueeze(1)).squeeze(1)
    k = max(top, default=0)
    values, ids = raw.topk(k, dim=-1) if k else (raw[:, :0], raw[:, :0].long())
    # Floored once selected: a few values, not the whole vocabulary.
    picked, values = picked.clamp(min=LOGPROB_FLOOR).tolist(), values.clamp(min=LOGPROB_FLOOR).tolist()
    ids = ids.tolist()
    return [(picked[i], ids[i][: top[i]], values[i][: top[i]]) for i in range(len(chosen))]


def _weight_bytes(config: ModelConfig, elem: int) -> int:
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return elem * (embeddings + config.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h))


class EngineWorker:
    """One model on one device, with its paged KV cache of `num_pages` pages of `page_size` tokens
    (`kv_cache_tokens` tokens; by default on a GPU `gpu_memory_utilization` of its free memory less
    the weights, 8,192 tokens on the CPU). Prefix caching hits whole blocks of `block_size` tokens;
    `page_size` (a divisor of it, by default the block size) is the granularity below that at which a
    block departing partway from a cached one shares its pages (a diff). `cuda_graphs`: on a GPU,
    capture decode steps of up to that many sequences as CUDA graphs."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: str = "fp32",
        random_weights: bool = False,
        block_size: int = 16,
        page_size: int | None = None,
        kv_cache_tokens: int | None = None,
        gpu_memory_utilization: float = 0.9,
        cuda_graphs: int = 0,
        seed: int = 0,
    ):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        page_size = block_size if page_size is None else page_size
        if block_size < 1 or page_size < 1 or block_size % page_size:
            raise ConfigError(f"the KV page size ({page_size}) must divide the block size ({block_size})")
        self.model_dir = Path(model_dir)
        config = ModelConfig.from_dir(self.model_dir)
        torch_dtype = DTYPES[dtype]
        elem = torch.finfo(torch_dtype).bits // 8
        per_page = 2 * config.num_layers * page_size * config.num_kv_heads * config.head_dim * elem
        if kv_cache_tokens is not None:
            num_pages = kv_cache_tokens // page_size
        elif torch.device(device).type == "cuda":
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            num_pages = int(free * gpu_memory_utilization - _weight_bytes(config, elem)) // per_page
        else:
            num_pages = 8192 // page_size
        if num_pages < 1:
            raise ConfigError(f"the KV cache holds no page of {page_size} tokens")
        self.runner = ModelRunner(
            self.model_dir, num_pages=num_pages, page_size=page_size, device=device, dtype=torch_dtype,
            random_weights=random_weights, seed=seed,
        )  # fmt: skip
        if cuda_graphs and self.runner.device.type == "cuda":
            self.runner.capture_decode_graphs(cuda_graphs)
        self.config = config
        self.num_pages = num_pages
        self.block_size = block_size
        self.page_size = page_size
        self._tokenizer: Any = None

    def step(
        self,
        input_ids: bytearray,
        positions: bytearray,
        query_starts: bytearray,
        context_lens: bytearray,
        block_tables: bytearray,
        table_width: int,
        slot_mapping: bytearray,
        sampling: list[SamplingRow] | None,
        banned: list[tuple[int, list[int]]],
        logprobs: list[tuple[int, int]],
    ) -> list[int] | tuple[list[int], list[LogprobsRow]]:
        """Runs one step (see `StepLayout`) and returns each sequence's next token; with `logprobs`
        (rows, each with how many top tokens), also those rows' logprobs (see `token_logprobs`)."""
        tables = _array(block_tables, torch.int32)
        layout = StepLayout(
            input_ids=_array(input_ids, torch.int64),
            positions=_array(positions, torch.int64),
            query_starts=_array(query_starts, torch.int64),
            context_lens=_array(context_lens, torch.int64),
            block_tables=tables.view(-1, table_width) if table_width else tables.view(0, 0),
            slot_mapping=_array(slot_mapping, torch.int64),
        )
        with torch.inference_mode():  # the logits are an inference tensor; sampling edits them
            logits = self.runner.forward(layout)
            if not logprobs:
                return sample(logits, sampling, banned)
            # Raw logprobs, as vLLM's default: before sampling bans tokens in `logits`.
            raw = torch.log_softmax(logits[[row for row, _ in logprobs]].float(), dim=-1)
            tokens = sample(logits, sampling, banned)
            return tokens, token_logprobs(raw, [tokens[row] for row, _ in logprobs], [k for _, k in logprobs])

    # Tokenizer

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            import transformers

            try:
                self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.model_dir))
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"{self.model_dir}: no tokenizer that transformers can load: {exc}"
                ) from None
        return self._tokenizer

    def chat_template_source(self) -> str | None:
        """The tokenizer's chat template (the `tool_use` one of a named set, else its `default`), or
        None without one; the engine's server reads the form of tool calls it asks for from it."""
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("tool_use") or template.get("default")
        return template if isinstance(template, str) else None

    def eos_token_ids(self) -> list[int]:
        """The tokens that end an output: the tokenizer's EOS and generation_config.json's."""
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = self.model_dir / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else eos or [])
        return sorted(ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_chat(self, body_json: str, with_tools: bool) -> list[int]:
        """The prompt of a chat request (its JSON body): its messages, and its tools when
        `with_tools`, through the model's chat template."""
        body = json.loads(body_json)
        messages = body["messages"]
        for m in messages:
            # OpenAI sends tool-call arguments as JSON text; chat templates expect an object.
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
        tools = body.get("tools") if with_tools else None
        text = self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
        return self.encode(text)

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token's own text, as vLLM shows a token in logprobs (special tokens as written)."""
        tok = self.tokenizer
        return [tok.decode([i]) for i in ids]

    def detokenize(
        self, ids: list[int], prefix_offset: int, read_offset: int, last: bool = False
    ) -> tuple[str, int, int]:
        """The text that ``ids[read_offset:]`` adds, decoded in the context of ``ids[prefix_offset:]``
        (as vLLM does, so a token that merges with the one before it, or completes a UTF-8
        character, comes out right); returns it with the next offsets. Nothing comes out while the
        text ends in an incomplete character, unless this is the `last` call."""
        tok = self.tokenizer
        before = tok.decode(ids[prefix_offset:read_offset], skip_special_tokens=True)
        after = tok.decode(ids[prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and (last or not after.endswith("\ufffd")):
            return after[len(before) :], read_offset, len(ids)
        return "", prefix_offset, read_offset
