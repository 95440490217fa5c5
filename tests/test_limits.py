"""Limits a user sets on what a server may cost a run: response size and timeouts, from `Batch`,
the CLI and a run file; each error names the limit that was hit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from batchagent_rs import Batch


def test_max_response_bytes_fails_the_job_with_a_protocol_error_naming_the_limit() -> None:
    batch = Batch(
        "Say {x}", backend="sim://?time_scale=0", stream=True, max_response_bytes=1024, max_attempts=1
    )
    [result] = batch.run([{"x": "hi"}])
    assert not result.ok and result.error is not None
    assert result.error.kind == "protocol"
    assert "max_response_bytes (1024 bytes)" in result.error.message
    # The same run within the default limit succeeds.
    [fine] = Batch("Say {x}", backend="sim://?time_scale=0", stream=True).run([{"x": "hi"}])
    assert fine.ok


def test_agent_timeout_says_it_was_the_agent_timeout() -> None:
    # Simulated real time: the answer takes far longer than 50 ms to generate.
    [result] = Batch("Say {x}", backend="sim://?time_scale=1", agent_timeout=0.05).run([{"x": "hi"}])
    assert result.error is not None and result.error.kind == "timeout"
    assert result.error.message.startswith("agent_timeout (50ms) fired"), result.error.message


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, XDG_CACHE_HOME=str(cwd / ".cache"))
    return subprocess.run(
        [sys.executable, "-m", "batchagent_rs.cli", "run", *args, "--quiet", "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_flag_and_run_file_set_the_limits(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("Say hello.\n")
    sim = "sim://?time_scale=0"
    run_cli("in.txt", "-o", "flag.jsonl", "--backend", sim, "--max-response-bytes", "100", cwd=tmp_path)
    [line] = (tmp_path / "flag.jsonl").read_text().splitlines()
    assert "max_response_bytes (100 bytes)" in json.loads(line)["error"]["message"]

    (tmp_path / "job.toml").write_text(
        textwrap.dedent(
            """
            input = "in.txt"
            output = "file.jsonl"
            backend = "sim://?time_scale=1"
            agent_timeout = 0.05
            """
        )
    )
    run_cli("job.toml", cwd=tmp_path)
    [line] = (tmp_path / "file.jsonl").read_text().splitlines()
    assert json.loads(line)["error"]["message"].startswith("agent_timeout (50ms) fired")

    # Without the flag, the same run succeeds.
    run_cli("in.txt", "-o", "plain.jsonl", "--backend", sim, cwd=tmp_path)
    [line] = (tmp_path / "plain.jsonl").read_text().splitlines()
    assert json.loads(line)["ok"]

    bad = run_cli("in.txt", "--idle-timeout", "0", cwd=tmp_path)
    assert bad.returncode == 2 and "idle-timeout" in bad.stderr
