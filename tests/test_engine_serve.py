"""`batchagent engine serve` end to end over HTTP: a tiny random Qwen2 with a tokenizer and a chat
template of its own, in float32 on the CPU. Greedy completions over a ragged batch (different
prompt lengths, requests arriving while another decodes, shared prefixes, a KV cache small enough
to force preemption) equal per-prompt `transformers` `generate`, token for token; the chat API with
tools through the official openai SDK; usage with cached tokens; streaming; logprobs equal to the
model's own; /v1/models; /metrics."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import urllib.error
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
        answer = post(url, {**common, "prompt": batch, "return_token_ids": True})
        stream.join(120)
        metrics = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    finally:
        server.stop()
    texts = [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
    for prompt, text in zip(batch, texts, strict=True):
        assert text == tok.decode(reference(model, prompt, n), skip_special_tokens=True), prompt
    # vLLM's return_token_ids: each choice's prompt and output as token ids.
    for prompt, choice in zip(batch, sorted(answer["choices"], key=lambda c: c["index"]), strict=True):
        assert choice["prompt_token_ids"] == prompt
        assert choice["token_ids"] == reference(model, prompt, n)
    assert "".join(streamed) == tok.decode(reference(model, early, n), skip_special_tokens=True)
    assert answer["usage"]["completion_tokens"] == n * len(batch)

    def counter(name: str) -> float:
        lines = [line for line in metrics.splitlines() if line.startswith(name + "{")]
        assert lines, metrics
        return float(lines[0].split()[-1])

    assert counter("vllm:num_preemptions_total") > 0
    assert counter("vllm:prefix_cache_hits_total") >= 32
    # The engine's own series are `batchagent:`; the simulator's `sim:` names are not the engine's.
    assert "sim:" not in metrics
    assert counter("batchagent:engine_steps_total") > 0
    busy = counter("batchagent:engine_busy_seconds_total")
    assert 0 < counter("batchagent:engine_scheduler_seconds_total") < busy
    # Every prompt token the cache did not hold was computed.
    prompts = sum(map(len, batch)) + len(early)
    assert counter("batchagent:engine_step_prefill_tokens_total") >= prompts - counter(
        "vllm:prefix_cache_hits_total"
    )


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


@pytest.fixture
def client(cli_server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=cli_server + "/v1", api_key="unused") as sdk:
        yield sdk


def stop_at(tok: Any, ids: list[int]) -> tuple[str, int, str]:
    """A stop string for the output `ids`, the first found where a token ends: the text of a whole
    printable ASCII token with the last character before it, also printable ASCII (a string across
    two tokens), or failing that the token's text alone. Returns it, the number of tokens up to the
    one that completes it and the text before it."""
    for spanning in (True, False):
        for k in range(2, len(ids) + 1):
            before = tok.decode(ids[: k - 1], skip_special_tokens=True)
            upto = tok.decode(ids[:k], skip_special_tokens=True)
            piece, last = upto[len(before) :], before[-1:]
            if not upto.startswith(before) or not (piece.isascii() and piece.isprintable() and piece.strip()):
                continue
            if spanning and not (last.isascii() and last.isprintable() and last):
                continue
            stop = last + piece if spanning else piece
            if upto.find(stop) == len(upto) - len(stop):
                return stop, k, upto[: len(upto) - len(stop)]
    raise AssertionError(f"no printable ASCII token in {tok.decode(ids)!r}")


def counter(url: str, name: str) -> float:
    metrics = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    lines = [line for line in metrics.splitlines() if line.startswith(name + "{")]
    assert lines, metrics
    return float(lines[0].split()[-1])


def test_a_stop_string_cuts_the_completion_and_ends_its_sequence(
    model_dir: tuple[Any, Any, Path], cli_server: str, client: openai.OpenAI
) -> None:
    _, tok, _ = model_dir
    common: dict[str, Any] = {"model": "tiny", "prompt": "the engine serves", "temperature": 0}
    free = client.completions.create(
        **common, max_tokens=32, extra_body={"ignore_eos": True, "return_token_ids": True}
    )
    assert free.choices[0].model_extra is not None
    ids = free.choices[0].model_extra["token_ids"]
    assert free.choices[0].finish_reason == "length" and free.choices[0].model_extra["stop_reason"] is None
    stop, k, cut = stop_at(tok, ids)
    assert 2 <= k < 32 and len(cut) > 0, (stop, k, cut)
    generated = counter(cli_server, "vllm:generation_tokens_total")
    stopped = client.completions.create(
        **common, max_tokens=500, stop=["not in the text", stop],
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    choice = stopped.choices[0]
    assert (choice.text, choice.finish_reason) == (cut, "stop")
    assert choice.model_extra is not None and choice.model_extra["stop_reason"] == stop
    # The tokens up to the one that completed the string, and usage counts those.
    assert choice.model_extra["token_ids"] == ids[:k]
    assert stopped.usage is not None and stopped.usage.completion_tokens == k
    # The engine ended the sequence when the string came out, far short of its 500 tokens (it
    # runs on while the server detokenizes, a few steps). The steps before the end are counted
    # once a request sent after it is answered.
    client.completions.create(**common, max_tokens=1)
    assert k <= counter(cli_server, "vllm:generation_tokens_total") - generated < 250
    # Ended by a stop string, as by a stop token: a tool-wait hint pins its blocks for the agent.
    made = pin_counts(cli_server).get("made", 0)
    client.completions.create(
        **common, max_tokens=300, stop=[stop],
        extra_body={"ignore_eos": True, "batchagent": {"agent": "stopped", "tool_wait_s": 5}},
    )  # fmt: skip
    client.completions.create(**common, max_tokens=1)
    assert pin_counts(cli_server).get("made", 0) == made + 1
    included = client.completions.create(
        **common, max_tokens=300, stop=stop,
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    )  # fmt: skip
    assert (included.choices[0].text, included.choices[0].finish_reason) == (cut + stop, "stop")
    chunks = list(
        client.completions.create(
            **common, max_tokens=300, stop=[stop], stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
    )  # fmt: skip
    # Streamed, the text is the same: what could have begun the stop string was held back.
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut
    # vLLM's return_token_ids streamed: the prompt's ids on the first chunk, and each chunk's new
    # output ids, which add up to the unstreamed answer's.
    extras = [c.choices[0].model_extra or {} for c in chunks if c.choices]
    assert extras[0]["prompt_token_ids"] == free.choices[0].model_extra["prompt_token_ids"]
    assert all("prompt_token_ids" not in e for e in extras[1:])
    assert [t for e in extras for t in e["token_ids"]] == ids[:k]
    ends = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(ends) == 1 and ends[0].finish_reason == "stop"
    assert ends[0].model_extra is not None and ends[0].model_extra["stop_reason"] == stop
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == k
    # A stop token: its text is not output, and `stop_reason` is its id.
    first = ids.index(ids[k - 1])
    by_token = client.completions.create(
        **common, max_tokens=300, extra_body={"ignore_eos": True, "stop_token_ids": [ids[k - 1]]}
    )  # fmt: skip
    assert by_token.choices[0].text == tok.decode(ids[:first], skip_special_tokens=True)
    assert by_token.choices[0].model_extra is not None
    assert by_token.choices[0].model_extra["stop_reason"] == ids[k - 1]
    assert by_token.usage is not None and by_token.usage.completion_tokens == first + 1
    # As vLLM: when it is the last token max_tokens allow, the output ends by length, text and all.
    capped = client.completions.create(
        **common, max_tokens=first + 1, extra_body={"ignore_eos": True, "stop_token_ids": [ids[k - 1]]}
    )  # fmt: skip
    assert (capped.choices[0].text, capped.choices[0].finish_reason) == (
        tok.decode(ids[: first + 1], skip_special_tokens=True), "length"
    )  # fmt: skip
    assert capped.choices[0].model_extra is not None and capped.choices[0].model_extra["stop_reason"] is None
    for bad, field in (({"stop": ["a", ""]}, "stop"), ({"stop": 3}, "stop")):
        with pytest.raises(openai.BadRequestError, match=field):
            client.completions.create(**common, max_tokens=4, extra_body=bad)


def user_prompt(tok: Any, content: str) -> tuple[list[Any], list[int]]:
    """One user message and its prompt's token ids through the chat template."""
    messages: list[Any] = [{"role": "user", "content": content}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return messages, tok.encode(prompt, add_special_tokens=False)


def test_a_stop_string_cuts_a_chat_answer_streamed_or_not(
    model_dir: tuple[Any, Any, Path], client: openai.OpenAI
) -> None:
    model, tok, _ = model_dir
    messages, prompt_ids = user_prompt(tok, "the engine serves every agent")
    ids = reference(model, prompt_ids, 32)
    stop, k, cut = stop_at(tok, ids)
    common: dict[str, Any] = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 300,
                              "stop": stop, "extra_body": {"ignore_eos": True}}  # fmt: skip
    answer = client.chat.completions.create(**common)
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (cut, "stop")
    assert answer.choices[0].model_extra is not None and answer.choices[0].model_extra["stop_reason"] == stop
    assert answer.usage is not None and answer.usage.completion_tokens == k
    chunks = list(
        client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    ends = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(ends) == 1 and ends[0].finish_reason == "stop"
    assert ends[0].model_extra is not None and ends[0].model_extra["stop_reason"] == stop
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == k


def test_n_choices_per_prompt_share_its_cached_blocks(cli_server: str, client: openai.OpenAI) -> None:
    rng = random.Random(5)
    # Prompts no other test sends: 40 tokens, two full blocks each.
    first, second = ([rng.randrange(3, VOCAB) for _ in range(40)] for _ in range(2))
    common: dict[str, Any] = {
        "model": "tiny",
        "max_tokens": 4,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    alone = client.completions.create(**common, prompt=second).choices[0].text
    # A long stream keeps the engine stepping, so the choices' requests reach it together, while
    # it is in a step: only waiting for the first one's prompt lets the others find it cached.
    busy, started = [rng.randrange(3, VOCAB) for _ in range(8)], threading.Event()
    body = {"model": "tiny", "prompt": busy, "max_tokens": 400, "ignore_eos": True, "stream": True}
    stream = threading.Thread(target=lambda: list(sse_texts(cli_server + "/v1/completions", body, started)))
    stream.start()
    assert started.wait(120)
    hits = counter(cli_server, "vllm:prefix_cache_hits_total")
    answer = client.completions.create(**common, prompt=[first, second], n=3)
    # vLLM's order: the first prompt's three choices, then the second's; greedy choices agree.
    assert [c.index for c in answer.choices] == list(range(6))
    texts = [c.text for c in answer.choices]
    assert texts[3:] == [alone] * 3 and texts[:3] == [texts[0]] * 3
    # Each prompt counts once; every choice's tokens count.
    assert answer.usage is not None and answer.usage.prompt_tokens == 80
    assert answer.usage.completion_tokens == 24
    # The second prompt was cached by its run alone: all three of its choices hit its 32 tokens of
    # full blocks, and the first page of its partial third block (pages of 4, the default: the
    # partial block stays cached; its 8 tokens but the last one computed, whole pages: 4). The
    # first prompt was new: its later two choices waited for its first one's prompt and took its
    # two blocks from the cache (its partial block is not kept before that request ends).
    assert counter(cli_server, "vllm:prefix_cache_hits_total") - hits == 3 * 36 + 2 * 32
    stream.join(120)
    chunks = list(
        client.completions.create(
            **common, prompt=[first, second], n=3, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = [
        "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(6)
    ]
    assert streamed == texts
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == list(
        range(6)
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == 80
    # Sampled, each choice has a seed of its own (vLLM's seed + i): they differ, and repeat.
    sampled = {"model": "tiny", "prompt": second, "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 2}
    once = [c.text for c in client.completions.create(**sampled, extra_body={"ignore_eos": True}).choices]
    again = [c.text for c in client.completions.create(**sampled, extra_body={"ignore_eos": True}).choices]
    assert once == again and once[0] != once[1]
    for n in (0, 129, "2"):
        with pytest.raises(openai.BadRequestError, match="`n`"):
            client.completions.create(model="tiny", prompt="the engine", max_tokens=2, extra_body={"n": n})
    hint = {"batchagent": {"agent": "a", "tool_wait_s": 1}}
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        client.completions.create(model="tiny", prompt="the engine", max_tokens=2, n=2, extra_body=hint)


def test_n_chat_choices_streamed_and_not(model_dir: tuple[Any, Any, Path], client: openai.OpenAI) -> None:
    model, tok, _ = model_dir
    messages, prompt_ids = user_prompt(tok, "every agent and tool call")
    want = tok.decode(reference(model, prompt_ids, 6), skip_special_tokens=True)
    common: dict[str, Any] = {
        "model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0, "n": 2,
        "extra_body": {"ignore_eos": True},
    }  # fmt: skip
    answer = client.chat.completions.create(**common)
    assert [(c.index, c.message.content, c.finish_reason) for c in answer.choices] == [
        (0, want, "length"), (1, want, "length")
    ]  # fmt: skip
    assert answer.usage is not None and answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == 12
    chunks = list(
        client.chat.completions.create(**common, stream=True, stream_options={"include_usage": True})
    )
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == want
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_echo_starts_each_choice_with_its_prompt(
    model_dir: tuple[Any, Any, Path], client: openai.OpenAI
) -> None:
    _, tok, _ = model_dir
    common: dict[str, Any] = {
        "model": "tiny",
        "max_tokens": 5,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    texts = ["the engine serves", "every agent"]
    plain = [c.text for c in client.completions.create(**common, prompt=texts).choices]
    want = [texts[0] + plain[0]] * 2 + [texts[1] + plain[1]] * 2
    echoed = client.completions.create(**common, prompt=texts, echo=True, n=2)
    assert [c.text for c in echoed.choices] == want
    assert echoed.usage is not None and echoed.usage.completion_tokens == 20
    chunks = list(client.completions.create(**common, prompt=texts, echo=True, n=2, stream=True))
    assert ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(4)] == want
    # Token ids are decoded.
    ids = tok.encode("a batch at a time", add_special_tokens=False)
    plain_ids = client.completions.create(**common, prompt=ids).choices[0].text
    echoed_ids = client.completions.create(**common, prompt=ids, echo=True).choices[0].text
    assert echoed_ids == tok.decode(ids, skip_special_tokens=True) + plain_ids
    # No prompt logprobs are computed: `logprobs` with `echo` (which would cover the prompt) is refused.
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(**common, prompt=texts, echo=True, logprobs=1)
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "the engine"}], max_tokens=2,
            extra_body={"echo": True},
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "the engine"}], max_tokens=2, top_logprobs=2
        )


def reference_logprobs(model: Any, prompt: list[int], out: list[int]) -> torch.Tensor:
    """The log-softmax of `model`'s logits at each of `out`'s positions after `prompt`."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : len(prompt) + len(out) - 1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_logprobs_are_the_model_s_own_in_chat_and_completions_streamed_or_not(
    model_dir: tuple[Any, Any, Path], client: openai.OpenAI
) -> None:
    model, tok, _ = model_dir
    messages, prompt_ids = user_prompt(tok, "every agent and tool call")
    want = reference(model, prompt_ids, 8)
    ref = reference_logprobs(model, prompt_ids, want)
    ask: dict[str, Any] = {
        "model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True,
        "top_logprobs": 3, "extra_body": {"ignore_eos": True},
    }  # fmt: skip
    chat = client.chat.completions.create(**ask)
    content = chat.choices[0].logprobs.content if chat.choices[0].logprobs else None
    assert content is not None and len(content) == 8
    for j, entry in enumerate(content):
        assert entry.token == tok.decode([want[j]]) and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(ref[j, want[j]].item(), abs=1e-4)
        values, ids = ref[j].topk(3)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in ids.tolist()]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        # Greedy: the sampled token is the most likely.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [
        e
        for c in chunks
        for ch in c.choices
        if ch.logprobs and ch.logprobs.content
        for e in ch.logprobs.content
    ]
    # The same tokens; the values up to rounding (the second request computes from the cached prefix).
    assert [(e.token, [t.token for t in e.top_logprobs]) for e in streamed] == [
        (e.token, [t.token for t in e.top_logprobs]) for e in content
    ]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None

    # Completions: sampled at temperature 0.7, the logprobs are still the model's raw distribution's.
    common: dict[str, Any] = {
        "model": "tiny", "prompt": prompt_ids, "max_tokens": 6, "temperature": 0.7, "seed": 5, "logprobs": 2,
        "extra_body": {"ignore_eos": True, "return_token_ids": True},
    }  # fmt: skip
    whole = client.completions.create(**common).choices[0]
    out = (whole.model_extra or {})["token_ids"]
    ref = reference_logprobs(model, prompt_ids, out)
    lp = whole.logprobs
    assert lp is not None and lp.tokens == [tok.decode([i]) for i in out]
    assert lp.token_logprobs == pytest.approx([ref[j, i].item() for j, i in enumerate(out)], abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(out))]
    assert lp.top_logprobs is not None
    for j, top in enumerate(lp.top_logprobs):
        values, best = ref[j].topk(2)
        expected = {tok.decode([out[j]]): ref[j, out[j]].item()}
        for i, v in zip(best.tolist(), values.tolist(), strict=True):
            expected.setdefault(tok.decode([i]), v)
        assert top == pytest.approx(expected, abs=1e-4)
    parts = [c.choices[0].logprobs for c in client.completions.create(**common, stream=True)]
    assert [t for p in parts if p for t in p.tokens or []] == lp.tokens
    assert [v for p in parts if p for v in p.token_logprobs or []] == pytest.approx(
        lp.token_logprobs, abs=1e-4
    )
    assert [o for p in parts if p for o in p.text_offset or []] == lp.text_offset
    # A stop string cuts the logprobs with the tokens.
    stops = [t for t in lp.tokens[:-1] if t.strip() and t.isascii() and t.isprintable()]
    assert stops, lp.tokens
    cut = client.completions.create(**common, stop=[stops[0]]).choices[0]
    kept = len((cut.model_extra or {})["token_ids"])
    assert cut.finish_reason == "stop" and kept < len(out)
    assert cut.logprobs is not None and cut.logprobs.tokens == lp.tokens[:kept]
    for bad in ({"logprobs": 21}, {"logprobs": -1}):
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            client.completions.create(**{**common, **bad})
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(**{**common, "extra_body": {"prompt_logprobs": 1}})


def test_a_local_backend_starts_the_engine_for_a_batch(model_dir: tuple[Any, Any, Path]) -> None:
    from batchagent_rs import Batch

    _, _, path = model_dir
    # Pages of 4 tokens: blocks that depart partway from a cached one are stored as diffs of it.
    backend = f"local://{path}?device=cpu&kv_cache_tokens=2048&kv_page_size=4"
    batch = Batch("Say {word}.", backend=backend, max_tokens=6, temperature=0)
    try:
        results = batch.run([{"word": w} for w in ("engine", "agent", "batch")])
    finally:
        for server in batch._engines:
            server.stop()
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert all(0 < r.usage.completion_tokens <= 6 for r in results), [r.usage for r in results]
    with pytest.raises(ValueError, match=r"KV page size \(3\) must divide the block size \(16\)"):
        serve.start(str(path), device="cpu", port=0, kv_cache_tokens=512, kv_page_size=3)


CALL = '<tool_call>{"name": "lookup", "arguments": {}}</tool_call>'
LOOKUP: list[Any] = [
    {"type": "function", "function": {"name": "lookup", "description": "Look something up.",
                                      "parameters": {"type": "object", "properties": {}}}},
]  # fmt: skip


def rewired_to_call(src: Path, path: Path, call: str, chat_template: str | None = None) -> Path:
    """The tiny Qwen2 at `src` rewired to answer every turn with one token whose text is `call`:
    its layers add nothing to the residual stream (zero output projections), every embedding is
    the same vector, and only that token's row of the LM head is not zero."""
    tok = transformers.AutoTokenizer.from_pretrained(src)
    tok.add_tokens([call])
    call_id = tok.convert_tokens_to_ids(call)
    assert call_id < VOCAB
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(path)
    model = transformers.Qwen2ForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[call_id, 0] = 10.0
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tool_model_dir(model_dir: tuple[Any, Any, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 answering every turn with a Hermes call of `lookup`."""
    return rewired_to_call(model_dir[2], tmp_path_factory.mktemp("engine") / "tool-caller", CALL)


def calls_whole_and_streamed(
    path: Path, common: dict[str, Any], **serve_kw: Any
) -> tuple[Any, list[Any], list[Any]]:
    """One chat answer unstreamed and streamed: the whole choice, its calls as (name, arguments),
    and the stream's deltas."""
    server = serve.start(str(path), device="cpu", port=0, kv_cache_tokens=512, **serve_kw)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        whole = client.chat.completions.create(**common).choices[0]
        chunks = list(client.chat.completions.create(**common, stream=True))
    finally:
        server.stop()
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    return whole, calls, [c.choices[0].delta for c in chunks if c.choices]


def streamed_calls(deltas: list[Any]) -> list[tuple[str, str]]:
    return [(t.function.name, t.function.arguments) for d in deltas for t in d.tool_calls or [] if t.function]


# A Llama 3.1-style template (tool results as `ipython` messages, calls as bare JSON).
LLAMA_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ 'ipython' if m.role == 'tool' else m.role }}\n"
    "{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
    '{{ {"name": c.function.name, "parameters": c.function.arguments} | tojson }}{% endfor %}'
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_llama_template_s_json_calls_are_read_streamed_or_not(
    model_dir: tuple[Any, Any, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    call = '{"name": "lookup", "parameters": {"q": 1}}'
    path = rewired_to_call(
        model_dir[2], tmp_path_factory.mktemp("engine") / "llama-caller", call, LLAMA_TEMPLATE
    )
    common: dict[str, Any] = dict(
        model=str(path), messages=[{"role": "user", "content": "Research it."}], tools=LOOKUP, max_tokens=2,
        temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    # The parser follows the template: two calls, the same streamed.
    whole, want, deltas = calls_whole_and_streamed(path, common)
    assert whole.finish_reason == "tool_calls"
    assert want == [("lookup", '{"q": 1}')] * 2
    assert streamed_calls(deltas) == want
    assert not "".join(d.content or "" for d in deltas)
    # Told to read Hermes blocks, the same answer is content; an unknown parser is refused.
    plain, calls, deltas = calls_whole_and_streamed(path, common, tool_call_parser="hermes")
    assert plain.finish_reason == "length" and plain.message.content == call * 2 and not calls
    assert "".join(d.content or "" for d in deltas) == call * 2
    with pytest.raises(ValueError, match="hermes or llama3_json"):
        serve.start(str(path), device="cpu", port=0, kv_cache_tokens=512, tool_call_parser="pythonic")


def pin_counts(url: str) -> dict[str, int]:
    metrics = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    counts = {}
    for line in metrics.splitlines():
        if line.startswith("batchagent:kv_pins_total{"):
            counts[line.split('event="')[1].split('"')[0]] = int(float(line.split()[-1]))
    return counts


def next_turn_cached(path: Path, hint: bool) -> tuple[int, int, dict[str, int]]:
    """An agent's tool-calling turn, eight other requests while it waits for its tool (far more
    than the rest of a 512-token KV cache holds), then its next turn over its whole history:
    returns the first turn's prompt tokens, the next turn's cached prompt tokens and the pin counts."""

    def words(seed: int, n: int) -> str:
        return " ".join(f"w{(seed * 7919 + i * 31) % 997}" for i in range(n))

    # The hinted wait (twice it) and the TTL are far longer than the test runs.
    server = serve.start(str(path), device="cpu", port=0, kv_cache_tokens=512, kv_pin_ttl=3600)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        extra = {"batchagent": {"agent": "agent-1", "tool_wait_s": 3600}} if hint else None
        messages: list[Any] = [
            {"role": "system", "content": words(1, 15)},
            {"role": "user", "content": "Research topic 1."},
        ]
        first = client.chat.completions.create(
            model=str(path), messages=messages, tools=LOOKUP, max_tokens=1, temperature=0, extra_body=extra
        )
        call = first.choices[0].message
        assert call.tool_calls and first.choices[0].finish_reason == "tool_calls", call
        for other in range(8):
            client.chat.completions.create(
                model=str(path),
                messages=[{"role": "user", "content": words(10 + other, 15)}],
                max_tokens=1,
                temperature=0,
            )
        messages.append(call.model_dump(exclude_none=True))
        messages += [
            {"role": "tool", "tool_call_id": c.id, "content": "about topic 1"} for c in call.tool_calls
        ]
        second = client.chat.completions.create(
            model=str(path), messages=messages, tools=LOOKUP, max_tokens=1, temperature=0, extra_body=extra
        )
        # A request after it: its step's counters are out once this one is answered.
        client.completions.create(model=str(path), prompt="the engine", max_tokens=1)
        counts = pin_counts(server.url)
    finally:
        server.stop()
    assert first.usage is not None and second.usage is not None
    details = second.usage.prompt_tokens_details
    cached = details.cached_tokens if details is not None and details.cached_tokens is not None else 0
    return first.usage.prompt_tokens, cached, counts


def test_a_tool_wait_hint_keeps_the_agents_history_cached_under_memory_pressure(tool_model_dir: Path) -> None:
    prompt, cached, counts = next_turn_cached(tool_model_dir, hint=True)
    assert 128 <= prompt <= 400, prompt
    # Its whole first prompt (its full blocks; the last is always computed) comes from the cache.
    assert cached >= prompt - 16, (prompt, cached)
    # The next turn takes the pin over, and calls the tool again: pinned again.
    assert counts == {"made": 2, "returned": 1, "dropped": 0, "expired": 0}, counts
    prompt, cached, counts = next_turn_cached(tool_model_dir, hint=False)
    # Without it, the other requests evicted its blocks, least recently used first.
    assert cached < prompt // 4, (prompt, cached)
    assert counts == {"made": 0, "returned": 0, "dropped": 0, "expired": 0}, counts


def test_a_hinted_reply_without_tool_calls_keeps_nothing_and_a_malformed_hint_is_refused(
    model_dir: tuple[Any, Any, Path],
) -> None:
    _, _, path = model_dir
    server = serve.start(str(path), device="cpu", port=0, kv_cache_tokens=512)
    try:
        url = server.url + "/v1/chat/completions"
        body = {"model": str(path), "messages": [{"role": "user", "content": "the engine"}], "max_tokens": 4,
                "ignore_eos": True, "temperature": 0}  # fmt: skip
        answer = post(url, {**body, "batchagent": {"agent": "a", "tool_wait_s": 5}})
        assert answer["choices"][0]["finish_reason"] == "length"
        # A request after it: the release was taken in before its steps.
        post(url, body)
        counts = pin_counts(server.url)
        for bad_hint in ({"agent": "a", "tool_wait_s": -1}, {"agent": "", "tool_wait_s": 1}, {"agent": "a"}):
            with pytest.raises(urllib.error.HTTPError) as refused:
                post(url, {**body, "batchagent": bad_hint})
            assert refused.value.code == 400
            assert "tool_wait_s" in refused.value.read().decode()
    finally:
        server.stop()
    # The reply called no tool: the pin made at its end is released at once.
    assert counts == {"made": 1, "returned": 0, "dropped": 0, "expired": 1}, counts


def test_a_hinted_completion_is_pinned_and_a_hinted_prompt_list_is_refused(
    model_dir: tuple[Any, Any, Path],
) -> None:
    _, _, path = model_dir
    server = serve.start(str(path), device="cpu", port=0, kv_cache_tokens=512, kv_eviction="lru")
    try:
        url = server.url + "/v1/completions"
        body = {"model": str(path), "prompt": "the engine", "max_tokens": 4, "ignore_eos": True,
                "temperature": 0}  # fmt: skip
        post(url, {**body, "batchagent": {"agent": "a", "tool_wait_s": 5, "next_call_s": 1}})
        # A request after it: its step's counters are out once this one is answered.
        post(url, body)
        counts = pin_counts(server.url)
        # The client says the agent is done: the pin is released before the next request's steps.
        done = server.url + "/v1/batchagent/done"
        assert post(done, {"agent": "a"}) == {"object": "batchagent.agent_done", "agent": "a"}
        post(url, body)
        released = pin_counts(server.url)
        for bad_done in ({}, {"agent": ""}, {"agent": 7}):
            with pytest.raises(urllib.error.HTTPError) as refused:
                post(done, bad_done)
            assert refused.value.code == 400
            assert "agent" in refused.value.read().decode()
        metrics = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
        hint = {"agent": "a", "tool_wait_s": 5}
        for bad in (
            {**body, "prompt": ["the engine", "a cache"], "batchagent": hint},
            {**body, "batchagent": {**hint, "next_call_s": -1}},
        ):
            with pytest.raises(urllib.error.HTTPError) as refused:
                post(url, bad)
            assert refused.value.code == 400
            assert "batchagent" in refused.value.read().decode()
    finally:
        server.stop()
    # A completion shows no tool calls: the hint is taken at its word and the blocks stay pinned.
    assert counts == {"made": 1, "returned": 0, "dropped": 0, "expired": 0}, counts
    assert released == {"made": 1, "returned": 0, "dropped": 0, "expired": 1}, released
    assert 'batchagent:kv_tokens{kind="held"' in metrics and "batchagent:kv_evictions_total{" in metrics
    with pytest.raises(ValueError, match="kv_eviction"):
        serve.start(str(path), device="cpu", port=0, kv_cache_tokens=512, kv_eviction="mru")


def test_streamed_chat_carries_the_tool_calls_of_the_unstreamed_answer(tool_model_dir: Path) -> None:
    common: dict[str, Any] = dict(
        model=str(tool_model_dir), messages=[{"role": "user", "content": "Research it."}], tools=LOOKUP,
        max_tokens=3, temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    whole, want, deltas = calls_whole_and_streamed(tool_model_dir, common)
    # Three tokens, each a whole call of `lookup`.
    assert whole.finish_reason == "tool_calls"
    assert want == [("lookup", "{}")] * 3
    assert streamed_calls(deltas) == want
    assert [t.index for d in deltas for t in d.tool_calls or []] == [0, 1, 2]
    # Each call goes out once its block closes: three chunks of calls, and no markup as content.
    assert sum(1 for d in deltas if d.tool_calls) == 3
    assert "".join(d.content or "" for d in deltas) == (whole.message.content or "")
    assert "<tool_call>" not in "".join(d.content or "" for d in deltas)


def test_a_local_backend_sends_the_tool_wait_hint(tool_model_dir: Path) -> None:
    from batchagent_rs import Batch, tool

    @tool(cache=False)
    def lookup() -> str:
        """Look something up."""
        return "about it"

    batch = Batch(
        "Research {topic}.", tools=[lookup], backend=f"local://{tool_model_dir}?device=cpu&kv_cache_tokens=2048",
        engine_hints=True, max_turns=4, max_tokens=1, temperature=0,
        # Agents with tools stream by default: the streamed chat carries the calls.
    )  # fmt: skip
    try:
        results = batch.run([{"topic": f"topic {i}"} for i in range(2)])
        counts = pin_counts(batch._engines[0].url)
    finally:
        for server in batch._engines:
            server.stop()
    # The agents call the tool until they run out of turns.
    assert all(r.tool_calls >= 2 for r in results), [(r.tool_calls, r.error) for r in results]
    # Each agent's turns after its first tool round carry the hint; each ends in a tool call, so
    # its blocks are pinned (for twice the run's tool wait, which is short).
    assert counts["made"] >= 2, counts
