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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

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
    """K and V of every layer in pages: ``[layers, pages, page_size, kv_heads, head_dim]`` each.
    `spare_pages` more pages than `num_pages` are allocated for the runner's own use (the padded
    rows of a CUDA graph write their K and V there); layouts use pages ``0 .. num_pages - 1``."""

    def __init__(
        self,
        config: ModelConfig,
        num_pages: int,
        page_size: int,
        device: torch.device,
        dtype: torch.dtype,
        spare_pages: int = 0,
    ):
        shape = (config.num_layers, num_pages + spare_pages, page_size, config.num_kv_heads, config.head_dim)
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


def _random_tensors(
    config: ModelConfig, seed: int, std: float, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Weights of `config`'s shapes drawn like `transformers` initialises them (normal, `std`;
    norms at one): what a model looks like to the engine's speed, with no download. Drawn on
    `device` (a 7B model's 7.6 billion draws take minutes on a CPU, milliseconds on a GPU)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q_out, kv_out = config.num_heads * d, config.num_kv_heads * d

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, device=device, dtype=dtype)

    t = {"model.embed_tokens.weight": normal(config.vocab_size, h), "model.norm.weight": ones(h)}
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        t[p + "self_attn.q_proj.weight"] = normal(q_out, h)
        t[p + "self_attn.k_proj.weight"] = normal(kv_out, h)
        t[p + "self_attn.v_proj.weight"] = normal(kv_out, h)
        t[p + "self_attn.o_proj.weight"] = normal(h, q_out)
        if config.qkv_bias:
            for proj, size in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                t[p + f"self_attn.{proj}_proj.bias"] = zeros(size)
        if config.o_bias:
            t[p + "self_attn.o_proj.bias"] = zeros(h)
        t[p + "mlp.gate_proj.weight"] = normal(i, h)
        t[p + "mlp.up_proj.weight"] = normal(i, h)
        t[p + "mlp.down_proj.weight"] = normal(h, i)
        t[p + "input_layernorm.weight"] = ones(h)
        t[p + "post_attention_layernorm.weight"] = ones(h)
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = normal(config.vocab_size, h)
    return t


@dataclass
class _Step:
    """One step's tensors on the device, copied from the host layout in two transfers."""

    ids: torch.Tensor  # [tokens] int64
    positions: torch.Tensor  # [tokens] int64
    slots: torch.Tensor  # [tokens] int64
    last: torch.Tensor  # [seqs] int64: each sequence's last new token
    block_tables: torch.Tensor  # [seqs, width] int32
    context_lens: torch.Tensor  # [seqs] int32
    query_starts: torch.Tensor  # [seqs + 1] int32
    tiles: torch.Tensor | None  # prefill tiles (sequences with more than one new token)
    dec_rows: torch.Tensor | None  # tokens of the one-token sequences in a mixed step
    dec_seqs: torch.Tensor | None  # and their sequences
    cascade: tuple[torch.Tensor, ...] | None  # prefix tables, prefix lens, group starts, suffix tables, lens
    cascade_sizes: tuple[int, int] = (0, 0)  # largest group, longest prefix


@dataclass
class _Graph:
    """A decode step of `size` sequences captured as a CUDA graph over static buffers."""

    size: int
    width: int  # pages per block table row
    graph: torch.cuda.CUDAGraph
    host64: torch.Tensor  # pinned [3, size]: ids, positions, slots
    host32: torch.Tensor  # pinned [size + size * width]: context lengths, then the block tables
    dev64: torch.Tensor
    dev32: torch.Tensor
    logits: torch.Tensor  # [size, vocab] float32
    copied: torch.cuda.Event


def _import_kernels() -> ModuleType:
    """`batchagent_rs.kernels`, imported when a runner first needs it, so that the engine imports
    (and runs on PyTorch's attention) where Triton is not installed."""
    try:
        from .. import kernels
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] != "triton":
            raise
        raise ImportError(
            "the embedded engine's CUDA kernels need Triton, which is not installed: `pip install triton` "
            "(PyTorch's CUDA wheels for Linux x86-64 install the version they were built with)"
        ) from e
    return kernels


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t


def _pack(parts: list[torch.Tensor], words: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`parts` (one dtype) in one tensor, each starting on a multiple of `words` elements (16 bytes),
    and each part's (length, padded length). Triton specializes a launch on its pointers' 16-byte
    alignment: packed back to back, a step whose sizes moved a part off 16 bytes would compile a new
    kernel variant in the middle of a run."""
    out: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    for p in parts:
        pad = -p.numel() % words
        out += [p, p.new_zeros(pad)] if pad else [p]
        sizes.append((p.numel(), p.numel() + pad))
    return torch.cat(out), sizes


def _unpack(packed: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    chunks = packed.split([padded for _, padded in sizes])
    return [c[:n] for c, (n, _) in zip(chunks, sizes, strict=True)]


class ModelRunner:
    """Runs steps of one model on one device. `model_dir` holds config.json (and, unless
    `random_weights`, the safetensors weights).

    On the CPU the attention is plain PyTorch, one sequence at a time, and float32 greedy outputs
    equal `transformers` token for token. On a CUDA device it goes through the Triton kernels of
    `batchagent_rs.kernels`: the paged decode kernel for one-token sequences, the paged prefill
    kernel for chunks, the cascade kernel for decode steps whose sequences share a long prefix (`cascade`);
    a step's layout reaches the device in two host-to-device copies from pinned memory and the
    forward pass waits on nothing from the device. `capture_decode_graphs` captures decode steps as
    CUDA graphs, one per padded batch size; decode steps up to the largest size replay them (with
    the paged kernel; ``cascade=True`` keeps decode steps eager, on the cascade kernel), prefill
    and mixed steps run eagerly. Layout tensors are expected on the host (they come from the
    scheduler). `attention` ("torch" or "triton") overrides the choice (the kernels run on the CPU
    only under ``TRITON_INTERPRET=1``, for tests); with the kernels, the layers' element-wise work
    (residual add + RMSNorm, RoPE + the cache write, SiLU x up) runs in fused kernels unless
    ``fused=False``."""

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
        max_model_len: int | None = None,
        cascade: bool | None = None,
        attention: str | None = None,
        fused: bool = True,
    ):
        path = Path(model_dir)
        self.config = config = ModelConfig.from_dir(path)
        self.device = torch.device(device)
        self.dtype = dtype
        if attention not in (None, "torch", "triton"):
            raise ValueError(f"attention must be 'torch' or 'triton', got {attention!r}")
        self.use_kernels = attention == "triton" or (attention is None and self.device.type == "cuda")
        self.page_size = page_size
        self.fused = fused
        self.max_model_len = min(max_model_len or config.max_position_embeddings, num_pages * page_size)
        # None: cascade decode attention where a shared prefix's KV no longer fits in half the L2
        # (below that the paged kernel reads it from L2 anyway and is faster: ../kernels/README.md).
        self.cascade = cascade
        tensors = (
            _random_tensors(config, seed, 0.02, self.device, dtype) if random_weights else _load_tensors(path)
        )

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
        # On CUDA one spare page takes the K and V of a CUDA graph's padded rows.
        self.cache = KVCache(
            config, num_pages, page_size, self.device, dtype, spare_pages=int(self.use_kernels)
        )
        self.scratch_slot = num_pages * page_size
        self.graphs: dict[int, _Graph] = {}
        self.cascade_steps = 0  # decode steps run through the cascade kernel
        self._graph_pool: object | None = None
        if self.use_kernels:
            self._kernels = _import_kernels()
            props = torch.cuda.get_device_properties(self.device) if self.device.type == "cuda" else None
            self.l2_bytes = int(getattr(props, "L2_cache_size", 0))

    # ---- the layers ----------------------------------------------------------------------------

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

    def _body(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        last: torch.Tensor | None,
        attend: Callable[[int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The forward pass over packed tokens; `attend(layer, q)` is the attention (the new K and
        V are in the cache by then); logits of the rows `last` (all rows when None)."""
        if self.use_kernels and self.fused:
            return self._fused_body(ids, positions, slots, last, attend)
        c = self.config
        tokens = ids.shape[0]
        x = self.embed[ids]
        cos, sin = self._rope(positions)
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
            attn = attend(n, q)
            x = x + F.linear(attn.reshape(tokens, q_size), w.o, w.o_bias)
            h = self._rms_norm(x, w.ln_mlp)
            gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down)
        if last is not None:
            x = x[last]
        return F.linear(self._rms_norm(x, self.norm), self.lm_head).float()

    def _fused_body(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        last: torch.Tensor | None,
        attend: Callable[[int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """`_body` with the element-wise work in fused kernels: the residual add with the next
        RMSNorm, RoPE with the cache write, SiLU with the gate-up product."""
        c, kn = self.config, self._kernels
        tokens = ids.shape[0]
        eps = c.rms_norm_eps
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        x = self.embed[ids]
        h, x = kn.add_rms_norm(x, self.layers[0].ln_attn, eps)
        for n, w in enumerate(self.layers):
            qkv = F.linear(h, w.qkv, w.qkv_bias)
            q = kn.rope_and_cache(
                qkv, cos, sin, slots, self.cache.k[n], self.cache.v[n], c.num_heads, c.num_kv_heads
            )
            attn = attend(n, q)
            h, x = kn.add_rms_norm(x, w.ln_mlp, eps, F.linear(attn.reshape(tokens, -1), w.o, w.o_bias))
            act = kn.silu_and_mul(F.linear(h, w.gate_up))
            after = self.layers[n + 1].ln_attn if n + 1 < len(self.layers) else self.norm
            h, x = kn.add_rms_norm(x, after, eps, F.linear(act, w.down))
        if last is not None:
            h = h[last]
        return F.linear(h, self.lm_head).float()

    # ---- attention -----------------------------------------------------------------------------

    def _torch_attention(
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

    def _kernel_attention(self, layer: int, q: torch.Tensor, step: _Step) -> torch.Tensor:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kn = self._kernels
        if step.cascade is not None:
            ptab, plens, gstarts, stab, slens = step.cascade
            out = torch.empty_like(q)
            max_group, max_prefix = step.cascade_sizes
            return kn.cascade_decode_attention(
                q, kc, vc, ptab, plens, gstarts, stab, slens, max_group_size=max_group,
                max_prefix_len=max_prefix, out=out,
            )  # fmt: skip
        if step.tiles is None:  # every sequence has one new token
            return kn.paged_decode_attention(q, kc, vc, step.block_tables, step.context_lens)[0]
        out = kn.paged_prefill_attention(
            q, kc, vc, step.block_tables, step.query_starts, step.context_lens, tiles=step.tiles
        )
        if step.dec_rows is not None and step.dec_seqs is not None:
            dec, _ = kn.paged_decode_attention(
                q[step.dec_rows], kc, vc, step.block_tables[step.dec_seqs], step.context_lens[step.dec_seqs]
            )
            out[step.dec_rows] = dec
        return out

    # ---- steps ---------------------------------------------------------------------------------

    def _cascade_groups(
        self, tables: torch.Tensor, ctx: torch.Tensor
    ) -> tuple[list[tuple[int, int, int]], int] | None:
        """Runs of consecutive sequences whose block tables start with the same pages: (first row,
        end row, shared whole pages), when running them as cascade attention pays (see __init__)."""
        if self.cascade is False or tables.shape[0] < 2:
            return None
        full = (ctx // self.page_size).tolist()
        first = tables[:, 0].tolist()
        groups, shared_tokens, a = [], 0, 0
        for b in range(1, len(first) + 1):
            if b < len(first) and first[b] == first[a]:
                continue
            pages = 0
            if b - a > 1:
                width = min(full[a:b])
                same = (tables[a:b, :width] == tables[a, :width]).all(0).int()
                pages = int(same.cumprod(0).sum())
            groups.append((a, b, pages))
            shared_tokens = max(shared_tokens, pages * self.page_size)
            a = b
        if not any(p for _, _, p in groups):
            return None
        if self.cascade is None:
            c = self.config
            kv_bytes = shared_tokens * 2 * c.num_kv_heads * c.head_dim * self.cache.k.element_size()
            if kv_bytes * 2 < self.l2_bytes:
                return None
        return groups, shared_tokens

    def _prepare(self, layout: StepLayout) -> _Step:
        """The step's layout on the device: two host-to-device copies from pinned memory."""
        starts = layout.query_starts.to("cpu", torch.int64)
        ctx = layout.context_lens.to("cpu", torch.int64)
        tables = layout.block_tables.to("cpu", torch.int32)
        seqs = ctx.shape[0]
        qlens = starts[1:] - starts[:-1]
        decode = bool((qlens == 1).all())
        words64 = [
            layout.input_ids.to("cpu", torch.int64),
            layout.positions.to("cpu", torch.int64),
            layout.slot_mapping.to("cpu", torch.int64),
            starts[1:] - 1,
        ]
        words32 = [tables.flatten(), ctx.int(), starts.int()]
        tiles_len = dec_len = 0
        cascade_meta = None
        if not decode:
            prefill_lens = torch.where(qlens > 1, qlens, 0)
            tiles = self._kernels.prefill_tiles(
                torch.cat([torch.zeros(1, dtype=torch.int64), prefill_lens.cumsum(0)])
            )
            tiles_len = tiles.shape[1]
            words32.append(tiles.flatten())
            dec_seqs = torch.nonzero(qlens == 1).flatten()
            dec_len = dec_seqs.shape[0]
            words32 += [starts[dec_seqs].int(), dec_seqs.int()]
        else:
            found = self._cascade_groups(tables, ctx)
            if found is not None:
                groups, shared = found
                plens = torch.tensor([p * self.page_size for _, _, p in groups], dtype=torch.int32)
                gstarts = torch.tensor([0, *[b for _, b, _ in groups]], dtype=torch.int32)
                shift = torch.repeat_interleave(
                    torch.tensor([p for _, _, p in groups]), torch.tensor([b - a for a, b, _ in groups])
                )
                width = tables.shape[1]
                idx = (torch.arange(width)[None, :] + shift[:, None]).clamp(max=width - 1)
                suffix = torch.gather(tables, 1, idx)
                ptab = tables[torch.tensor([a for a, _, _ in groups])]
                words32 += [
                    ptab.flatten(),
                    plens,
                    gstarts,
                    suffix.flatten(),
                    (ctx - shift * self.page_size).int(),
                ]
                self.cascade_steps += 1
                cascade_meta = (len(groups), max(b - a for a, b, _ in groups), shared)
        packed64, sizes64 = _pack(words64, 2)
        packed32, sizes32 = _pack(words32, 4)
        dev64 = _pinned(packed64).to(self.device, non_blocking=True)
        dev32 = _pinned(packed32).to(self.device, non_blocking=True)
        ids, pos, slots, last = _unpack(dev64, sizes64)
        parts32 = _unpack(dev32, sizes32)  # in the order of words32
        width = tables.shape[1]
        if not decode:
            bt, c32, s32, tl_, drows, dseqs = parts32
            return _Step(
                ids, pos, slots, last, bt.view(seqs, width), c32, s32, tl_.view(2, tiles_len),
                drows.long() if dec_len else None, dseqs.long() if dec_len else None, None,
            )  # fmt: skip
        if cascade_meta is None:
            bt, c32, s32 = parts32
            return _Step(ids, pos, slots, last, bt.view(seqs, width), c32, s32, None, None, None, None)
        n_groups, max_group, shared = cascade_meta
        bt, c32, s32, ptab, plens, gstarts, suffix, slens = parts32
        return _Step(
            ids, pos, slots, last, bt.view(seqs, width), c32, s32, None, None, None,
            (ptab.view(n_groups, width), plens, gstarts, suffix.view(seqs, width), slens),
            (max_group, shared),
        )  # fmt: skip

    def forward(self, layout: StepLayout) -> torch.Tensor:
        """Logits ``[seqs, vocab]`` (float32) of each sequence's last new token."""
        with torch.inference_mode():
            return self._forward(layout, copy=True)

    def _forward(self, layout: StepLayout, copy: bool) -> torch.Tensor:
        if not self.use_kernels:
            starts = layout.query_starts.tolist()
            ctx = layout.context_lens.tolist()
            last = torch.tensor([b - 1 for b in starts[1:]], device=self.device)

            def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
                return self._torch_attention(layer, q, layout, starts, ctx)

            return self._body(
                layout.input_ids.to(self.device), layout.positions.to(self.device),
                layout.slot_mapping.to(self.device), last, attend,
            )  # fmt: skip
        seqs = layout.num_seqs
        if seqs and int(layout.input_ids.shape[0]) == seqs and self.graphs and self.cascade is not True:
            size = next((s for s in sorted(self.graphs) if s >= seqs), None)
            if size is not None and layout.block_tables.shape[1] <= self.graphs[size].width:
                return self._replay(self.graphs[size], layout, copy)
        step = self._prepare(layout)
        return self._body(
            step.ids, step.positions, step.slots, step.last, lambda n, q: self._kernel_attention(n, q, step)
        )

    def greedy(self, layout: StepLayout) -> list[int]:
        """The argmax token of each sequence after this step."""
        with torch.inference_mode():
            return [int(t) for t in self._forward(layout, copy=False).argmax(dim=-1).tolist()]

    # ---- CUDA graphs ---------------------------------------------------------------------------

    def capture_decode_graphs(self, max_batch: int, sizes: list[int] | None = None) -> list[int]:
        """Captures decode steps of up to `max_batch` sequences as CUDA graphs, one per padded batch
        size (1, 2, 4, 8, then multiples of 16 by default), each over block tables as wide as
        `max_model_len` allows; returns the sizes. Needs a CUDA device."""
        if not self.use_kernels:
            raise RuntimeError("CUDA graphs need a CUDA device")
        if sizes is None:
            sizes = [s for s in (1, 2, 4, 8) if s < max_batch] + list(range(16, max_batch + 16, 16))
            sizes = sorted({min(s, max_batch) for s in sizes})
        width = (self.max_model_len + self.page_size - 1) // self.page_size
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for size in sorted(sizes, reverse=True):  # the largest first: the others reuse its memory
                self.graphs[size] = self._capture(size, width)
        return sorted(self.graphs)

    def _capture(self, size: int, width: int) -> _Graph:
        host64 = _pinned(torch.zeros(3, size, dtype=torch.int64))
        host64[2] = self.scratch_slot
        host32 = _pinned(torch.zeros(size * (1 + width), dtype=torch.int32))
        dev64 = host64.to(self.device)
        dev32 = host32.to(self.device)
        ids, pos, slots = dev64[0], dev64[1], dev64[2]
        ctx, tables = dev32[:size], dev32[size:].view(size, width)
        kn = self._kernels

        def run() -> torch.Tensor:
            def attend(layer: int, q: torch.Tensor) -> torch.Tensor:
                kc, vc = self.cache.k[layer], self.cache.v[layer]
                return kn.paged_decode_attention(q, kc, vc, tables, ctx)[0]

            return self._body(ids, pos, slots, None, attend)

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            run()  # compiles the kernels and warms cuBLAS outside the capture
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = run()
        copied = torch.cuda.Event()
        copied.record()
        return _Graph(size, width, graph, host64, host32, dev64, dev32, logits, copied)

    def _replay(self, g: _Graph, layout: StepLayout, copy: bool) -> torch.Tensor:
        n = layout.num_seqs
        tables = layout.block_tables
        g.copied.synchronize()  # the previous replay's copy out of the pinned buffers is done
        g.host64[0, :n] = layout.input_ids
        g.host64[1, :n] = layout.positions
        g.host64[2, :n] = layout.slot_mapping
        g.host64[2, n:] = self.scratch_slot
        g.host32[:n] = layout.context_lens
        g.host32[n : g.size] = 0
        g.host32[g.size :].view(g.size, g.width)[:n, : tables.shape[1]] = tables
        g.dev64.copy_(g.host64, non_blocking=True)
        g.dev32.copy_(g.host32, non_blocking=True)
        g.copied.record()
        g.graph.replay()
        return g.logits[:n].clone() if copy else g.logits[:n]
