"""`batchagent engine serve` end to end over HTTP: a tiny random Qwen2 with a tokenizer and a chat
template of its own, in float32 on the CPU. Greedy completions over a ragged batch (different
prompt lengths, requests arriving while another decodes, shared prefixes, a KV cache small enough
to force preemption) equal per-prompt `transformers` `generate`, token for token; the chat API with
tools through the official openai SDK; usage with cached tokens; streaming; /v1/models; /metrics."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("BATCHAGENT_REQUIRE_ENGINE_TESTS") != "1":
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
import openai
import tokenizers
import torch
import transformers

from batchagent_rs.engine import serve

VOCAB = 384
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """A tiny random Qwen2 and a byte-level BPE tokenizer trained here (nothing can be downloaded)."""
    path = tmp_path_factory.mktemp("engine") / "tiny-qwen2"
    torch.manual_seed(3)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3, eos_token_id=2,
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    corpus = ["the engine serves the model to every agent and tool call, a batch at a time"] * 20
    bpe.train_from_iterator(corpus, trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2
    return model, tok, path


def reference(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        result: dict[str, Any] = json.load(r)
        return result


def sse_texts(url: str, body: dict[str, Any], first: threading.Event) -> Iterator[str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                if choice["text"]:
                    first.set()
                    yield choice["text"]


def test_greedy_completions_over_a_ragged_batch_equal_generate(model_dir: tuple[Any, Any, Path]) -> None:
    model, tok, path = model_dir
    rng = random.Random(11)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    stem = tokens(37)
    early = tokens(45)
    batch = [tokens(4), stem, stem[:32] + tokens(6), tokens(1), stem + tokens(3), tokens(20)]
    n = 24
    # 160 tokens of KV in pages of 16: far less than the batch needs at once (preemption); a
    # 24-token budget splits the longer prompts into chunks.
    server = serve.start(
        str(path), device="cpu", port=0, kv_cache_tokens=160, max_num_seqs=8, max_num_batched_tokens=24
    )
    try:
        url = server.url + "/v1/completions"
        common = {"model": str(path), "max_tokens": n, "temperature": 0, "ignore_eos": True}
        first = threading.Event()
        streamed: list[str] = []
        stream = threading.Thread(
            target=lambda: streamed.extend(sse_texts(url, {**common, "prompt": early, "stream": True}, first))
        )
        stream.start()
        # The rest arrive once the first request is decoding.
        assert first.wait(120)
        answer = post(url, {**common, "prompt": batch})
        stream.join(120)
        metrics = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    finally:
        server.stop()
    texts = [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
    for prompt, text in zip(batch, texts, strict=True):
        assert text == tok.decode(reference(model, prompt, n), skip_special_tokens=True), prompt
    assert "".join(streamed) == tok.decode(reference(model, early, n), skip_special_tokens=True)
    assert answer["usage"]["completion_tokens"] == n * len(batch)

    def counter(name: str) -> float:
        lines = [line for line in metrics.splitlines() if line.startswith(name + "{")]
        assert lines, metrics
        return float(lines[0].split()[-1])

    assert counter("vllm:num_preemptions_total") > 0
    assert counter("vllm:prefix_cache_hits_total") >= 32


@pytest.fixture(scope="module")
def cli_server(model_dir: tuple[Any, Any, Path]) -> Iterator[str]:
    _, _, path = model_dir
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchagent_rs.cli", "engine", "serve", "--model", str(path),
         "--device", "cpu", "--port", "0", "--served-model-name", "tiny", "--kv-cache-tokens", "2048"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "engine listening on " in line, line
        yield line.split("engine listening on ")[1].split()[0]
    finally:
        proc.terminate()
        proc.wait(60)
        if proc.stdout is not None:
            proc.stdout.close()


def test_openai_sdk_chat_with_tools_streaming_and_usage(
    model_dir: tuple[Any, Any, Path], cli_server: str
) -> None:
    model, tok, _ = model_dir
    client = openai.OpenAI(base_url=cli_server + "/v1", api_key="unused")
    listed = client.models.list().data
    assert [m.id for m in listed] == ["tiny"]
    assert listed[0].model_extra is not None and listed[0].model_extra["max_model_len"] == 512
    tools: list[Any] = [
        {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
    ]
    messages: list[Any] = [
        {"role": "system", "content": "the engine serves every agent"},
        {"role": "user", "content": "a tool call, a batch at a time"},
    ]
    prompt = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    want = reference(model, prompt_ids, 10)
    first = client.chat.completions.create(
        model="tiny", messages=messages, tools=tools, max_tokens=10, temperature=0,
        extra_body={"ignore_eos": True, "top_k": 5},
    )  # fmt: skip
    assert first.choices[0].message.content == tok.decode(want, skip_special_tokens=True).strip()
    assert first.choices[0].finish_reason == "length"
    assert first.usage is not None and first.usage.prompt_tokens == len(prompt_ids)
    assert first.usage.completion_tokens == 10
    second = client.chat.completions.create(
        model="tiny",
        messages=messages,
        tools=tools,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == (len(prompt_ids) - 1) // 16 * 16 > 0
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"min_tokens": 6},
        )
    )  # fmt: skip
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert chunks[-2].choices[0].finish_reason == "length"
    # A stop token: the model's EOS, suppressed by min_tokens, ends the output once allowed.
    eos = client.completions.create(
        model="tiny", prompt=["the engine", "a batch"], max_tokens=4, temperature=0,
        extra_body={"stop_token_ids": [want[0]], "min_tokens": 0},
    )  # fmt: skip
    assert len(eos.choices) == 2
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=messages, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=10_000)


def test_a_local_backend_starts_the_engine_for_a_batch(model_dir: tuple[Any, Any, Path]) -> None:
    from batchagent_rs import Batch

    _, _, path = model_dir
    batch = Batch(
        "Say {word}.", backend=f"local://{path}?device=cpu&kv_cache_tokens=2048", max_tokens=6, temperature=0
    )
    try:
        results = batch.run([{"word": w} for w in ("engine", "agent", "batch")])
    finally:
        for server in batch._engines:
            server.stop()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert all(0 < r.usage.completion_tokens <= 6 for r in results), [r.usage for r in results]
