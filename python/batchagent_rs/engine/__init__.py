"""The model runner of the embedded engine: a Qwen2 / Llama forward pass in PyTorch over packed
steps with a paged KV cache (see `model`). Needs the `engine` extra (torch, safetensors)."""

from .config import ConfigError, ModelConfig
from .layout import StepLayout
from .model import KVCache, ModelRunner
from .worker import EngineWorker

__all__ = ["ConfigError", "EngineWorker", "KVCache", "ModelConfig", "ModelRunner", "StepLayout"]
