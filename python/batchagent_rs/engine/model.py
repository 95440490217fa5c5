"""The model runner: a Qwen2 / Llama forward pass over one packed step, with a paged KV cache.

The scheduler decides each step (which sequences, how many tokens each, which cache pages) and
hands the runner a `StepLayout`; the runner embeds the packed tokens, runs every layer on all of
them at once (no padding: the projections and the MLP see one ``[tokens, hidden]`` matrix), writes
each new token's K and V into its cache slot, attends each sequence's new tokens to its cached
context (causal, block-diagonal over the packed sequences), and returns the logits of each
sequence's last new token. The arithmetic follows `transformers`' Qwen2/Llama modelling code
(RMSNorm in float32, the default RoPE, SiLU-gated MLP, grouped-query attention), so greedy outputs
match `generate` token for token in float32.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ConfigError, ModelConfig
from .layout import StepLayout


@dataclass
class _Layer:
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    down: torch.Tensor
    ln_attn: torch.Tensor
    ln_mlp: torch.Tensor


class KVCache:
    """K and V of every layer in pages: ``[layers, pages, page_size, kv_heads, head_dim]`` each."""

    def __init__(
        self, config: ModelConfig, num_pages: int, page_size: int, device: torch.device, dtype: torch.dtype
    ):
        shape = (config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.page_size = page_size
        self.num_pages = num_pages

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        flat_k = self.k[layer].view(-1, k.shape[1], k.shape[2])
        flat_v = self.v[layer].view(-1, v.shape[1], v.shape[2])
        flat_k[slots] = k
        flat_v[slots] = v

    def gather(self, layer: int, pages: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` cached tokens of one sequence, ``[length, kv_heads, head_dim]`` each."""
        n = (length + self.page_size - 1) // self.page_size
        idx = pages[:n].long()
        k = self.k[layer][idx].flatten(0, 1)[:length]
        v = self.v[layer][idx].flatten(0, 1)[:length]
        return k, v


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors weights (use random weights to run without them)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return tensors


def _random_tensors(config: ModelConfig, seed: int, std: float) -> dict[str, torch.Tensor]:
    """Weights of `config`'s shapes drawn like `transformers` initialises them (normal, `std`;
    norms at one): what a model looks like to the engine's speed, with no download."""
    gen = torch.Generator().manual_seed(seed)
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q_out, kv_out = config.num_heads * d, config.num_kv_heads * d

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    t = {"model.embed_tokens.weight": normal(config.vocab_size, h), "model.norm.weight": torch.ones(h)}
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        t[p + "self_attn.q_proj.weight"] = normal(q_out, h)
        t[p + "self_attn.k_proj.weight"] = normal(kv_out, h)
        t[p + "self_attn.v_proj.weight"] = normal(kv_out, h)
        t[p + "self_attn.o_proj.weight"] = normal(h, q_out)
        if config.qkv_bias:
            for proj, size in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                t[p + f"self_attn.{proj}_proj.bias"] = torch.zeros(size)
        if config.o_bias:
            t[p + "self_attn.o_proj.bias"] = torch.zeros(h)
        t[p + "mlp.gate_proj.weight"] = normal(i, h)
        t[p + "mlp.up_proj.weight"] = normal(i, h)
        t[p + "mlp.down_proj.weight"] = normal(h, i)
        t[p + "input_layernorm.weight"] = torch.ones(h)
        t[p + "post_attention_layernorm.weight"] = torch.ones(h)
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = normal(config.vocab_size, h)
    return t


class ModelRunner:
    """Runs steps of one model on one device. `model_dir` holds config.json (and, unless
    `random_weights`, the safetensors weights)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        num_pages: int,
        page_size: int = 16,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        random_weights: bool = False,
        seed: int = 0,
    ):
        path = Path(model_dir)
        self.config = config = ModelConfig.from_dir(path)
        self.device = torch.device(device)
        self.dtype = dtype
        tensors = _random_tensors(config, seed, 0.02) if random_weights else _load_tensors(path)

        def take(name: str, shape: tuple[int, ...], optional: bool = False) -> torch.Tensor | None:
            t = tensors.get(name)
            if t is None:
                if optional:
                    return None
                raise ConfigError(f"{path}: weight '{name}' is missing")
            if tuple(t.shape) != shape:
                raise ConfigError(
                    f"{path}: weight '{name}' has shape {tuple(t.shape)}, config.json says {shape}"
                )
            return t.to(self.device, dtype)

        def need(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            t = take(name, shape)
            assert t is not None
            return t

        h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
        q_out, kv_out = config.num_heads * d, config.num_kv_heads * d
        self.embed = need("model.embed_tokens.weight", (config.vocab_size, h))
        self.norm = need("model.norm.weight", (h,))
        head = take("lm_head.weight", (config.vocab_size, h), optional=config.tie_word_embeddings)
        self.lm_head = self.embed if head is None else head
        self.layers: list[_Layer] = []
        for n in range(config.num_layers):
            p = f"model.layers.{n}."
            q = need(p + "self_attn.q_proj.weight", (q_out, h))
            k = need(p + "self_attn.k_proj.weight", (kv_out, h))
            v = need(p + "self_attn.v_proj.weight", (kv_out, h))
            bias = None
            if config.qkv_bias:
                bias = torch.cat([
                    need(p + "self_attn.q_proj.bias", (q_out,)),
                    need(p + "self_attn.k_proj.bias", (kv_out,)),
                    need(p + "self_attn.v_proj.bias", (kv_out,)),
                ])  # fmt: skip
            self.layers.append(
                _Layer(
                    qkv=torch.cat([q, k, v]),
                    qkv_bias=bias,
                    o=need(p + "self_attn.o_proj.weight", (h, q_out)),
                    o_bias=take(p + "self_attn.o_proj.bias", (h,), optional=not config.o_bias),
                    gate_up=torch.cat(
                        [need(p + "mlp.gate_proj.weight", (i, h)), need(p + "mlp.up_proj.weight", (i, h))]
                    ),
                    down=need(p + "mlp.down_proj.weight", (h, i)),
                    ln_attn=need(p + "input_layernorm.weight", (h,)),
                    ln_mlp=need(p + "post_attention_layernorm.weight", (h,)),
                )
            )
        tensors.clear()  # the runner's own copies are on the device now
        exponent = torch.arange(0, d, 2, dtype=torch.int64).float() / d
        self.inv_freq = (1.0 / (config.rope_theta**exponent)).to(self.device)
        self.cache = KVCache(config, num_pages, page_size, self.device, dtype)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight * x32.to(x.dtype)

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _attention(
        self, layer: int, q: torch.Tensor, layout: StepLayout, starts: list[int], ctx: list[int]
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        group = self.config.num_heads // self.config.num_kv_heads
        scale = 1.0 / math.sqrt(self.config.head_dim)
        for s in range(len(ctx)):
            a, b = starts[s], starts[s + 1]
            n, length = b - a, ctx[s]
            k, v = self.cache.gather(layer, layout.block_tables[s], length)
            k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, length, dim]
            v = v.repeat_interleave(group, dim=1).transpose(0, 1)
            qs = q[a:b].transpose(0, 1)  # [heads, n, dim]
            # New token j sits at position length - n + j and sees keys 0 ..= length - n + j.
            allowed = (
                torch.arange(length, device=q.device)[None, :]
                <= (torch.arange(length - n, length, device=q.device)[:, None])
            )
            scores = torch.matmul(qs, k.transpose(1, 2)) * scale
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out[a:b] = torch.matmul(probs, v).transpose(0, 1)
        return out

    def forward(self, layout: StepLayout) -> torch.Tensor:
        """Logits ``[seqs, vocab]`` (float32) of each sequence's last new token."""
        with torch.inference_mode():
            return self._forward(layout)

    def _forward(self, layout: StepLayout) -> torch.Tensor:
        c = self.config
        tokens = layout.input_ids.shape[0]
        starts = layout.query_starts.tolist()
        ctx = layout.context_lens.tolist()
        x = self.embed[layout.input_ids.to(self.device)]
        cos, sin = self._rope(layout.positions.to(self.device))
        slots = layout.slot_mapping.to(self.device)
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        for n, w in enumerate(self.layers):
            h = self._rms_norm(x, w.ln_attn)
            qkv = F.linear(h, w.qkv, w.qkv_bias)
            q = qkv[:, :q_size].view(tokens, c.num_heads, c.head_dim)
            k = qkv[:, q_size : q_size + kv_size].view(tokens, c.num_kv_heads, c.head_dim)
            v = qkv[:, q_size + kv_size :].view(tokens, c.num_kv_heads, c.head_dim)
            q = self._rotate(q, cos, sin)
            k = self._rotate(k, cos, sin)
            self.cache.write(n, slots, k, v)
            attn = self._attention(n, q, layout, starts, ctx)
            x = x + F.linear(attn.reshape(tokens, q_size), w.o, w.o_bias)
            h = self._rms_norm(x, w.ln_mlp)
            gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down)
        last = torch.tensor([b - 1 for b in starts[1:]], device=self.device)
        return F.linear(self._rms_norm(x[last], self.norm), self.lm_head).float()

    def greedy(self, layout: StepLayout) -> list[int]:
        """The argmax token of each sequence after this step."""
        return [int(t) for t in self.forward(layout).argmax(dim=-1).tolist()]
