"""The architecture of a Hugging Face checkpoint, read from its `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `architectures[0]` of the checkpoints the runner implements, and whether their q/k/v projections
# carry a bias by default (Qwen2 does; Llama's `attention_bias` says).
ARCHITECTURES = {"Qwen2ForCausalLM": True, "LlamaForCausalLM": False}


class ConfigError(ValueError):
    """A checkpoint's config.json that the runner cannot serve; the message names the file and field."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    o_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        try:
            raw = json.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{file}: not found (a model directory holds config.json and *.safetensors)"
            ) from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: expected a JSON object")
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        def field(name: str, kind: type, default: Any = None) -> Any:
            value = raw.get(name, default)
            if value is None:
                raise ConfigError(f"{source}: field '{name}' is missing")
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise ConfigError(f"{source}: field '{name}' must be {kind.__name__}, got {value!r}")
            return value

        archs = raw.get("architectures") or []
        arch = archs[0] if isinstance(archs, list) and archs else None
        if arch is None:
            model_type = raw.get("model_type")
            arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}.get(str(model_type))
        if arch not in ARCHITECTURES:
            raise ConfigError(
                f"{source}: architecture {arch or raw.get('model_type')!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        heads = field("num_attention_heads", int)
        hidden = field("hidden_size", int)
        kv_heads = field("num_key_value_heads", int, heads)
        head_dim = raw.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )
        # transformers 5 writes `rope_parameters`; earlier releases `rope_theta` and `rope_scaling`.
        rope = raw.get("rope_parameters") or {}
        scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling:
            kind = scaling.get("rope_type") or scaling.get("type")
            raise ConfigError(f"{source}: rope scaling {kind!r} is not supported (only the default RoPE)")
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        if arch == "Qwen2ForCausalLM" and raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window is not supported")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only silu)")
        if raw.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias is not supported")
        qkv_bias = bool(raw.get("attention_bias", ARCHITECTURES[arch]))
        return cls(
            architecture=arch,
            vocab_size=field("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=field("intermediate_size", int),
            num_layers=field("num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=field("rms_norm_eps", float, 1e-6),
            rope_theta=float(theta),
            qkv_bias=qkv_bias,
            # Llama's `attention_bias` covers o_proj too; Qwen2's o_proj never has one.
            o_bias=arch == "LlamaForCausalLM" and qkv_bias,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_embeddings=field("max_position_embeddings", int, 32768),
        )
