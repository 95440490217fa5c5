"""Secrets never appear anywhere: distinctive keys are set every way a user sets them (variables,
a URL query, URL user info, the AWS files), every error path that can quote them is forced (a bad
URL, a 401 whose body echoes the key, a malformed credentials file, a dead endpoint, failed jobs),
and stdout, stderr, logs, the journal, the report, the output and every other file the runs wrote
are searched for them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchagent_rs import BackendUnavailable, Batch, SchemaError
from batchagent_rs import sim as simulator

SECRETS = {
    "OPENAI_API_KEY": "sk-openai-S3CRET-a1b2c3",
    "VLLM_API_KEY": "vllm-S3CRET-d4e5f6",
    "ANTHROPIC_API_KEY": "sk-ant-S3CRET-g7h8i9",
    "url_query": "url-S3CRET-j1k2l3",
    "url_user_info": "pw-S3CRET-m4n5o6",
    "AWS_SECRET_ACCESS_KEY": "aws-S3CRET-p7q8r9/wJalrXUtnFEMI",
    "AWS_SESSION_TOKEN": "aws-TOKEN-S3CRET-s1t2u3",
    "batch_api_key": "sk-batch-S3CRET-v4w5x6",
}
# The simulator's own key: every key above is wrong for it, and its 401 quotes what it was sent.
SERVER_KEY = "server-side-key-not-a-client-secret"


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [name for name, value in SECRETS.items() if value.encode() in data]


def files_under(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file():
            yield path


class Runs:
    """CLI runs in one directory, with every secret in the environment; collects what they print."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.printed: list[tuple[str, str]] = []
        self.env = dict(os.environ)
        for name in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "AWS_PROFILE", "AWS_ACCESS_KEY_ID"):
            self.env.pop(name, None)
        self.env.update({k: v for k, v in SECRETS.items() if k.isupper()})
        self.env["XDG_CACHE_HOME"] = str(root / "cache")
        self.env["HOME"] = str(root / "home")
        self.env.pop("BATCHAGENT_CACHE", None)
        (root / "p.txt").write_text("".join(f"Summarise item {i}.\n" for i in range(3)))

    def run(
        self, name: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "batchagent_rs.cli", "run", "p.txt", "-m", "sim-model"]
        command += ["-o", f"{name}.jsonl", "--report", f"{name}.report.json", *args]
        proc = subprocess.run(
            command,
            cwd=self.root,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        self.printed.append((f"{name} stdout", proc.stdout))
        self.printed.append((f"{name} stderr", proc.stderr))
        return proc


@pytest.fixture
def keyed_sim() -> Iterator[simulator.Simulator]:
    with simulator.start(time_scale=0, seed=2, api_key=SERVER_KEY) as server:
        yield server


def test_no_secret_reaches_any_output(
    tmp_path: Path,
    keyed_sim: simulator.Simulator,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = Runs(tmp_path)
    address = keyed_sim.url.removeprefix("http://")
    dead = "127.0.0.1:9"

    # Refused before any request: a key in the URL's query or user info, a bad base URL variable.
    for name, backend in (
        ("query", f"vllm://{address}?api_key={SECRETS['url_query']}"),
        ("query_unknown_scheme", f"gopher://{address}?token={SECRETS['url_query']}"),
        ("user_info", f"http://user:{SECRETS['url_user_info']}@{address}/v1"),
    ):
        assert runs.run(name, "--backend", backend).returncode != 0
    bad_base = {"OPENAI_BASE_URL": f"http://user:{SECRETS['url_user_info']}@{address}/v1"}
    assert runs.run("base_url", "--backend", "openai://", env=bad_base).returncode != 0

    # 401s whose bodies quote the key that was sent, on both protocols (the CLI's check stops there).
    assert runs.run("vllm_401", "--backend", f"vllm://{address}").returncode != 0
    anthropic = runs.run("anthropic_401", "--backend", f"anthropic+http://{address}")
    assert anthropic.returncode != 0
    openai_env = {"OPENAI_BASE_URL": f"http://{address}/v1"}
    assert runs.run("openai_401", "--backend", "openai://", env=openai_env).returncode != 0

    # A dead endpoint (the reachability check and the fleet's model listing both fail).
    assert runs.run("dead", "--backend", f"vllm://{dead}").returncode != 0
    runs.run("dead_fleet", "--backend", f"vllm://{dead}", "--backend", f"vllm://{address}")

    # AWS: a malformed shared credentials file whose bad line holds the secret.
    credentials = tmp_path / "aws_credentials"
    credentials.write_text(
        "[default]\naws_access_key_id = AKIDEXAMPLE\n"
        f"aws_secret_access_key {SECRETS['AWS_SECRET_ACCESS_KEY']}\n"
        f"[broken aws_session_token={SECRETS['AWS_SESSION_TOKEN']}\n"
    )
    # The endpoint override sends Bedrock's calls (and the reachability check) to a local stand-in.
    stand_in = simulator.start(time_scale=0, seed=5)
    aws_env_no_keys = {
        "AWS_SHARED_CREDENTIALS_FILE": str(credentials),
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": stand_in.url,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SESSION_TOKEN": "",
    }
    aws_file = runs.run("aws_file", "--backend", "bedrock://us-east-1", env=aws_env_no_keys)
    assert aws_file.returncode != 0 and "aws_credentials line 3" in aws_file.stderr, aws_file.stderr

    # Jobs that fail on the server (every call a 500) with a key the server accepts.
    with simulator.start(time_scale=0, seed=3, fault_500=1.0, api_key=SECRETS["VLLM_API_KEY"]) as failing:
        runs.run("job_errors", "--backend", f"vllm://{failing.url.removeprefix('http://')}")
    assert "server_error" in (tmp_path / "job_errors.jsonl").read_text()

    # In process: the key is revoked while the run goes on (the server restarts with another key),
    # so the model calls themselves get 401s that quote the key; Python's log records and the
    # objects a user would print are searched too.
    caplog.set_level(logging.DEBUG)
    with simulator.start(time_scale=0, seed=4, api_key=SECRETS["batch_api_key"]) as accepting:
        port = int(accepting.url.rsplit(":", 1)[1])
        batch = Batch(
            "Say {n}.",
            model="sim-model",
            backend=f"vllm://127.0.0.1:{port}",
            api_key=SECRETS["batch_api_key"],
            max_turns=1,
            max_attempts=1,
            journal=tmp_path / "in_process.sqlite",
        )
        assert batch.run([{"n": 0}])[0].ok
    with simulator.start(time_scale=0, seed=4, port=port, api_key=SERVER_KEY):
        results = batch.run([{"id": f"after-revoke-{i}", "n": i} for i in range(1, 4)])
    assert all(r.error is not None and r.error.kind == "auth" for r in results), results
    shown = [repr(batch), repr(batch.report()), str(batch.report().raw), *(repr(r) for r in results)]
    shown += [str(r.error) for r in results]
    dead_batch = Batch(
        "Say {n}.", model="m", backend=f"vllm://{dead}", api_key=SECRETS["batch_api_key"], max_turns=1
    )
    with pytest.raises(BackendUnavailable) as unreachable:
        dead_batch.run([{"n": 1}])
    shown.append(str(unreachable.value))

    # The credentials file read when the backend is connected (the CLI's check cannot reach AWS here).
    for name, value in aws_env_no_keys.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    with pytest.raises(SchemaError) as refused:
        Batch("Say {n}.", model="m", backend="bedrock://us-east-1", max_turns=1).run([{"n": 1}])
    stand_in.stop()
    assert "aws_credentials line 3" in str(refused.value)
    shown.append(str(refused.value))

    found = {where: leaks(text) for where, text in runs.printed if leaks(text)}
    found.update({str(p.relative_to(tmp_path)): leaks(p.read_bytes()) for p in files_under(tmp_path)})
    found["python logs"] = leaks(caplog.text)
    # Messages that name a backend given with its key in the query.
    for make in (
        lambda: Batch("Say {n}.", backend=f"vllm://{address}?api_key={SECRETS['url_query']}"),
        lambda: Batch("Say {n}.", model="m", backend=f"vllm://{address}?api_key={SECRETS['url_query']}").run(
            [{"n": 1}]
        ),
    ):
        with pytest.raises((TypeError, SchemaError, BackendUnavailable)) as named:
            make()
        shown.append(str(named.value))
    found["printed objects"] = leaks("\n".join(shown))
    # The credentials file is the user's own; everything else must be clean.
    found = {where: names for where, names in found.items() if names and where != "aws_credentials"}
    assert not found, found
    # The runs did write what is searched: journals, reports and outputs exist.
    written = {p.name for p in files_under(tmp_path)}
    assert {"job_errors.jsonl", "job_errors.report.json", "in_process.sqlite"} <= written, written
    assert any(name.endswith(".sqlite") and name != "in_process.sqlite" for name in written), written
