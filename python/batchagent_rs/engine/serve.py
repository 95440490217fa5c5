"""`batchagent engine serve`: a model directory served over the OpenAI-compatible API by the
embedded engine (the Rust scheduler, HTTP and metrics; the model runner and tokenizer in Python)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch

from .._core import EngineServer, serve_engine
from .worker import EngineWorker


def start(
    model: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    random_weights: bool = False,
    kv_cache_tokens: int | None = None,
    kv_page_size: int = 4,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192,
    enable_prefix_caching: bool = True,
    gpu_memory_utilization: float = 0.9,
    seed: int = 0,
    kv_pin_ttl: float = 30.0,
    kv_eviction: str = "next_use",
    tool_call_parser: str | None = None,
) -> EngineServer:
    """Loads the model in `model` (a Hugging Face checkpoint directory) and serves it; returns once
    it listens. The served name defaults to `model` as given, as vLLM's does. `device` defaults to
    CUDA where there is one, `dtype` to bf16 there and fp32 on the CPU. `kv_pin_ttl`: the longest a
    tool-wait hint keeps an agent's KV blocks, in seconds. `kv_eviction`: `next_use` (the cached
    blocks of agents due back furthest away, or done, go first) or `lru`. `tool_call_parser`:
    vLLM's `hermes` (`<tool_call>` blocks, Qwen2.5) or `llama3_json` (Llama 3.1 / 3.2); by default
    the form the model's chat template asks for. `kv_page_size`: tokens per KV page, a divisor of
    the 16-token block (default 4): a block that departs partway from a cached one (a sibling
    agent's task after the shared text) shares that block's pages up to the last whole page before
    they differ, and an agent's last partial block stays cached for its next turn (16: neither)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("fp32" if device == "cpu" else "bf16")
    worker = EngineWorker(
        Path(model), device=device, dtype=dtype, random_weights=random_weights,
        kv_cache_tokens=kv_cache_tokens, page_size=kv_page_size,
        gpu_memory_utilization=gpu_memory_utilization,
        cuda_graphs=max_num_seqs if device.startswith("cuda") else 0, seed=seed,
    )  # fmt: skip
    return serve_engine(
        worker, model=served_model_name or model, max_model_len=worker.runner.max_model_len,
        eos_token_ids=worker.eos_token_ids(), host=host, port=port, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
        kv_pin_ttl=kv_pin_ttl, kv_eviction=kv_eviction, tool_call_parser=tool_call_parser,
        chat_template=worker.chat_template_source() if tool_call_parser is None else None,
    )  # fmt: skip


_LOCAL_OPTIONS = {
    "device": str, "devices": str, "dtype": str, "random_weights": bool, "kv_cache_tokens": int,
    "kv_page_size": int,
    "max_num_seqs": int, "max_num_batched_tokens": int, "prefix_caching": bool, "seed": int,
    "tool_call_parser": str,
}  # fmt: skip


def _parse_local(url: str) -> tuple[str, dict[str, Any]]:
    """``local://DIR?device=cuda&dtype=bf16...``: the model directory and the engine's options."""
    rest = url.strip()[len("local://") :]
    path, _, query = rest.partition("?")
    if not path:
        raise ValueError(f"{url}: local:// needs a model directory (local:///abs/dir or local://rel/dir)")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        kind = _LOCAL_OPTIONS.get(key)
        if kind is None:
            raise ValueError(f"local:// option {key!r} is not one of {', '.join(_LOCAL_OPTIONS)}")
        if kind is bool:
            if value.lower() not in ("1", "0", "true", "false", ""):
                raise ValueError(f"local:// option {key}={value!r}: expected true or false")
            options[key] = value.lower() in ("1", "true", "")
        elif kind is int:
            try:
                options[key] = int(value)
            except ValueError:
                raise ValueError(f"local:// option {key}={value!r}: expected an integer") from None
        else:
            options[key] = value
    return path, options


def start_local(backends: list[str], model: str | None) -> tuple[list[str], str, list[EngineServer]]:
    """Starts an engine for each ``local://`` backend (one per device of ``devices=0,1``) on a
    loopback port; returns the backends with each replaced by its servers' ``vllm://`` URLs (marked
    ``engine=batchagent``, so the client sends the tool-wait hint, which vLLM does not read), the
    model name they serve (`model`, or the first directory as given), and the servers."""
    servers: list[EngineServer] = []
    out: list[str] = []
    try:
        for backend in backends:
            if not backend.strip().lower().startswith("local://"):
                out.append(backend)
                continue
            path, options = _parse_local(backend)
            model = model or path
            devices = options.pop("devices", None)
            targets = (
                [f"cuda:{d.strip()}" for d in devices.split(",")]
                if devices
                else [options.pop("device", None)]
            )
            options.pop("device", None)
            caching = options.pop("prefix_caching", True)
            for device in targets:
                server = start(
                    path,
                    device=device,
                    port=0,
                    served_model_name=model,
                    enable_prefix_caching=caching,
                    **options,
                )
                servers.append(server)
                out.append("vllm://" + server.url.removeprefix("http://") + "?engine=batchagent")
    except BaseException:
        for server in servers:
            server.stop()
        raise
    assert model is not None
    return out, model, servers
