"""Run files: `batchagent run job.toml` reads the same settings as the flags, keys spelled with `_`
or `-` (`max_inflight = 30`, `skip-bad-lines = true`). Paths in a run file are relative to the file, so a
job directory can be run from anywhere."""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, as a package before 3.11
    import tomli as tomllib

__all__ = ["SETTINGS", "RunFileError", "load_run_file"]

Kind = Literal["str", "path", "int", "seconds", "bool", "list", "table", "headers"]

SETTINGS: dict[str, Kind] = {
    "input": "path",
    "output": "path",
    "task": "str",
    "task_file": "path",
    "system": "str",
    "system_file": "path",
    "schema": "str",
    "tools": "list",
    "backend": "list",
    "model": "str",
    "max_inflight": "int",
    "max_turns": "int",
    "rpm": "int",
    "tpm": "int",
    "call_timeout": "seconds",
    "idle_timeout": "seconds",
    "agent_timeout": "seconds",
    "max_response_bytes": "int",
    "lookahead": "int",
    "kv_capacity_tokens": "int",
    "journal": "path",
    "resume": "bool",
    "retry_failed": "bool",
    "max_tokens": "int",
    "accept_truncated": "bool",
    "max_context_tokens": "int",
    "no_compaction": "bool",
    "compaction_model": "str",
    "compaction_backend": "str",
    "reduce_task": "str",
    "reduce_schema": "str",
    "reduce_model": "str",
    "reduce_backend": "str",
    "reduce_fan_in": "int",
    "no_cache": "bool",
    "dashboard": "bool",
    "quiet": "bool",
    "report": "path",
    "skip_bad_lines": "bool",
    "dedupe": "bool",
    "prices": "path",
    "engine_hints": "bool",
    # `[extra_body]`: fields merged into every request body; `[extra_headers]`: name = "value".
    "extra_body": "table",
    "extra_headers": "headers",
    "provider_batch": "bool",
    "batch_retry": "str",
    "batch_poll_interval": "seconds",
    "batch_max_poll_interval": "seconds",
    "batch_linger": "seconds",
    "trace": "bool",
    "metrics_port": "int",
    "metrics_host": "str",
    "auto_deadline": "seconds",
    "batch_turnaround": "seconds",
    "redis": "str",
}


class RunFileError(ValueError):
    """A run file cannot be used; the message names the file and the setting."""


def _resolve(base: str, value: str) -> str:
    expanded = os.path.expanduser(value)
    return expanded if os.path.isabs(expanded) else os.path.normpath(os.path.join(base, expanded))


def _check(path: str, base: str, key: str, kind: Kind, value: Any) -> Any:
    if kind == "bool":
        if not isinstance(value, bool):
            raise RunFileError(f"{path}: {key} must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RunFileError(f"{path}: {key} must be a whole number >= 1, got {value!r}")
        return value
    if kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise RunFileError(f"{path}: {key} must be a positive number of seconds, got {value!r}")
        return float(value)
    if kind == "table":
        if not isinstance(value, dict):
            raise RunFileError(f"{path}: {key} must be a table ([{key}] with its fields), got {value!r}")
        return value
    if kind == "headers":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            # The values are not shown: a header may carry a credential.
            raise RunFileError(f"{path}: {key} must be a table of header names to string values")
        return dict(value)
    if kind == "list":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
            raise RunFileError(f"{path}: {key} must be a string or a list of strings, got {value!r}")
        return list(items)
    if not isinstance(value, str) or not value:
        raise RunFileError(f"{path}: {key} must be a non-empty string, got {value!r}")
    if kind == "path":
        return _resolve(base, value)
    if key == "schema" and value.endswith(".json"):
        return _resolve(base, value)
    return value


def load_run_file(path: str) -> dict[str, Any]:
    """The settings of a run file, checked and with paths made absolute."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise RunFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RunFileError(f"{path}: invalid TOML: {exc}") from exc
    base = os.path.dirname(os.path.abspath(path))
    settings: dict[str, Any] = {}
    for given, value in data.items():
        # `max-inflight` (the flag's spelling) and `max_inflight` are the same key.
        key = given.replace("-", "_")
        kind = SETTINGS.get(key)
        if kind is None:
            raise RunFileError(f"{path}: unknown setting {given!r}; known: {', '.join(SETTINGS)}")
        if key in settings:
            raise RunFileError(f"{path}: {key} is set twice (as '{key}' and '{key.replace('_', '-')}')")
        settings[key] = _check(path, base, key, kind, value)
    for a, b in (("task", "task_file"), ("system", "system_file")):
        if a in settings and b in settings:
            raise RunFileError(f"{path}: set {a} or {b}, not both")
    return settings
