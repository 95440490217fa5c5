"""`batchagent run`: flags, run files, the one-liner, and the errors a person can act on."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from batchagent_rs import cli, sim
from batchagent_rs.pricing import PRICES, Price, PriceError, estimate, find_price, load_prices
from batchagent_rs.runfile import RunFileError, load_run_file

FAST_SIM = "sim://?time_scale=0&seed=5"


def run_cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(cwd / ".cache")
    env.pop("BATCHAGENT_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", "batchagent_rs.cli", "run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def answer(result: dict[str, Any]) -> Any:
    """A result line's answer: the validated output, or the text when there is no schema."""
    return result["output"] if result.get("output") is not None else result.get("text")


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(f"Summarise item number {i} in one sentence.\n" for i in range(n)))
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The command failed the way a person should see it: exit 2, one line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- end to end ---------------------------------------------------------------------------------


def test_the_one_liner_writes_one_result_per_prompt(tmp_path: Path) -> None:
    write_prompts(tmp_path / "prompts.txt", 40)
    proc = run_cli(
        "prompts.txt",
        "-o",
        "results.jsonl",
        "-m",
        "sim-model",
        "-c",
        "30",
        "--backend",
        FAST_SIM,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path / "results.jsonl")
    assert sorted(r["index"] for r in results) == list(range(40))
    assert all(r["ok"] and isinstance(answer(r), str) and answer(r) for r in results)
    assert len({r["id"] for r in results}) == 40
    # Off a terminal: the final progress line on stderr, the report table on stdout.
    assert "ok 40 failed 0" in proc.stderr
    assert "agents/s" in proc.stdout and "estimated cost" in proc.stdout


def test_the_one_liner_against_an_ollama_url(tmp_path: Path) -> None:
    write_prompts(tmp_path / "prompts.txt", 12)
    with sim.start(time_scale=0, seed=2, model="mistral:7b") as server:
        host = server.url.removeprefix("http://")
        proc = run_cli(
            "prompts.txt",
            "-o",
            "results.jsonl",
            "-m",
            "mistral:7b",
            "-c",
            "30",
            "--backend",
            f"ollama://{host}",
            cwd=tmp_path,
        )
        stats = server.stats()
    assert proc.returncode == 0, proc.stderr
    assert len(read_results(tmp_path / "results.jsonl")) == 12
    assert stats["routes"]["/api/chat"]["total"] >= 12


def test_run_file_settings_with_flags_overriding(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    write_jsonl(job / "items.jsonl", [{"id": f"item-{i}", "topic": f"topic {i}"} for i in range(15)])
    (job / "task.txt").write_text("Write one line about {topic}.")
    (job / "jobtools.py").write_text("def lookup(topic: str) -> str:\n    return 'notes on ' + topic\n")
    (job / "job.toml").write_text(
        textwrap.dedent(
            f"""
            input = "items.jsonl"
            output = "out/results.jsonl"
            task_file = "task.txt"
            system = "Be brief."
            backend = "{FAST_SIM}&tool_rounds=1"
            tools = ["jobtools:lookup"]
            max_inflight = 8
            report = "report.json"
            """
        )
    )
    (job / "out").mkdir()
    # Run from elsewhere: paths in the run file are relative to it; -o overrides its output.
    proc = run_cli(str(job / "job.toml"), "-o", str(tmp_path / "elsewhere.jsonl"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path / "elsewhere.jsonl")
    assert sorted(r["id"] for r in results) == sorted(f"item-{i}" for i in range(15))
    # The tool module was found next to the run file.
    assert all(r["ok"] and r["tool_calls"] == 1 for r in results)
    assert not (job / "out" / "results.jsonl").exists()
    report = json.loads((job / "report.json").read_text())
    assert report["ok"] == 15 and report["failed"] == 0
    assert report["output"] == str(tmp_path / "elsewhere.jsonl")


def test_schema_and_tools_from_modules(tmp_path: Path) -> None:
    (tmp_path / "jobdefs.py").write_text(
        textwrap.dedent(
            """
            import pydantic
            from batchagent_rs import tool

            class Finding(pydantic.BaseModel):
                topic: str
                score: int

            @tool(cache=True)
            def lookup(topic: str) -> str:
                \"\"\"Look up notes on a topic.\"\"\"
                return "notes on " + topic

            def count_words(text: str) -> int:
                \"\"\"Count the words of a text.\"\"\"
                return len(text.split())
            """
        )
    )
    write_jsonl(tmp_path / "in.jsonl", [{"topic": f"t{i}"} for i in range(10)])
    proc = run_cli(
        "--input", "in.jsonl", "-o", "out.jsonl", "--task", "Research {topic}.",
        "--schema", "jobdefs:Finding", "--tools", "jobdefs:lookup,count_words",
        "--backend", FAST_SIM + "&tool_rounds=1", "--max-turns", "4", "--report", "r.json",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = read_results(tmp_path / "out.jsonl")
    assert len(results) == 10
    assert all(r["ok"] and set(r["output"]) == {"topic", "score"} for r in results), results[0]
    assert all(r["tool_calls"] == 1 and r["turns"] == 2 for r in results)
    assert json.loads((tmp_path / "r.json").read_text())["tool_requests"] == 10


def test_response_cache_is_on_by_default(tmp_path: Path) -> None:
    write_prompts(tmp_path / "p.txt", 25)
    with sim.start(time_scale=0, seed=3) as server:
        backend = "vllm://" + server.url.removeprefix("http://")

        def run(name: str, *extra: str) -> int:
            before = int(server.stats()["requests"]["total"])
            proc = run_cli(
                "p.txt", "-o", f"{name}.jsonl", "-m", "sim-model", "--backend", backend, *extra, cwd=tmp_path
            )
            assert proc.returncode == 0, proc.stderr
            assert len(read_results(tmp_path / f"{name}.jsonl")) == 25
            return int(server.stats()["requests"]["total"]) - before

        assert run("first") == 25
        # A new run of the same prompts (another output and journal) is answered from the cache.
        assert run("second") == 0
        assert run("third", "--no-cache") == 25
        assert (tmp_path / ".cache" / "batchagent" / "responses.sqlite").exists()


def test_json_schema_file(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    write_prompts(tmp_path / "p.txt", 5)
    proc = run_cli("p.txt", "-o", "o.jsonl", "--schema", "schema.json", "--backend", FAST_SIM, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(r["ok"] and "label" in r["output"] for r in read_results(tmp_path / "o.jsonl"))


def test_report_json_with_price_override(tmp_path: Path) -> None:
    write_prompts(tmp_path / "p.txt", 20)
    (tmp_path / "prices.json").write_text(json.dumps({"sim-model": {"input": 1000.0, "output": 2000.0}}))
    proc = run_cli(
        "p.txt",
        "-o",
        "o.jsonl",
        "--backend",
        FAST_SIM,
        "--prices",
        "prices.json",
        "--report",
        "r.json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["jobs"] == 20 and report["ok"] == 20
    assert report["prompt_tokens"] > 0 and report["completion_tokens"] > 0
    # Single-turn jobs without tools are not streamed by default, so TTFT is unknown; latency is.
    assert set(report["ttft"]) >= {"p50", "p95", "p99"}
    assert report["latency"]["p50"] is not None
    expected = (
        (report["prompt_tokens"] - report["cached_tokens"]) * 1000.0
        + report["cached_tokens"] * 1000.0
        + report["completion_tokens"] * 2000.0
    ) / 1e6
    assert report["estimated_cost"]["usd"] == pytest.approx(expected, rel=1e-6)
    assert "your price" in report["estimated_cost"]["note"]


def test_self_hosted_cost_is_zero_with_a_note(tmp_path: Path) -> None:
    write_prompts(tmp_path / "p.txt", 3)
    proc = run_cli("p.txt", "-o", "o.jsonl", "--backend", FAST_SIM, "--report", "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cost = json.loads((tmp_path / "r.json").read_text())["estimated_cost"]
    assert cost["usd"] == 0 and "self-hosted" in cost["note"]
    assert "$0.00 (self-hosted" in proc.stdout


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    write_prompts(tmp_path / "p.txt", 5)
    proc = run_cli("p.txt", "-o", "o.jsonl", "--backend", FAST_SIM, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert len(read_results(tmp_path / "o.jsonl")) == 5


def test_bad_line_names_the_line_or_becomes_a_failed_result(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text(
        '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n{"prompt": "d"}\n'
    )
    line = one_line_error(run_cli("in.jsonl", "-o", "o.jsonl", "--backend", FAST_SIM, cwd=tmp_path))
    assert "in.jsonl" in line and "line 3" in line, line

    proc = run_cli(
        "in.jsonl",
        "-o",
        "o2.jsonl",
        "--journal",
        "j2.sqlite",
        "--backend",
        FAST_SIM,
        "--skip-bad-lines",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    results = sorted(read_results(tmp_path / "o2.jsonl"), key=lambda r: r["index"])
    assert [r["ok"] for r in results] == [True, True, False, True]
    assert results[2]["error"]["kind"] == "bad_input"


def test_missing_template_variable_names_input_and_variable(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"topic": "a"}, {"topic": "b"}, {"subject": "c"}])
    proc = run_cli(
        "in.jsonl", "-o", "o.jsonl", "--task", "About {topic}.", "--backend", FAST_SIM, cwd=tmp_path
    )
    line = one_line_error(proc)
    assert "topic" in line and "3" in line, line


def test_unimportable_schema_and_tools(tmp_path: Path) -> None:
    write_prompts(tmp_path / "p.txt", 2)
    line = one_line_error(
        run_cli("p.txt", "--schema", "nosuchmod:Model", "--backend", FAST_SIM, cwd=tmp_path)
    )
    assert "cannot import 'nosuchmod'" in line, line
    (tmp_path / "broken.py").write_text("def f(:\n")
    line = one_line_error(run_cli("p.txt", "--tools", "broken:f", "--backend", FAST_SIM, cwd=tmp_path))
    assert "cannot import 'broken'" in line and "SyntaxError" in line, line
    (tmp_path / "defs.py").write_text("def untyped(x):\n    return x\nVALUE = 3\n")
    line = one_line_error(run_cli("p.txt", "--tools", "defs:missing", "--backend", FAST_SIM, cwd=tmp_path))
    assert "no attribute 'missing'" in line, line
    line = one_line_error(run_cli("p.txt", "--tools", "defs:untyped", "--backend", FAST_SIM, cwd=tmp_path))
    assert "'x'" in line and "annotation" in line, line
    line = one_line_error(run_cli("p.txt", "--schema", "defs:VALUE", "--backend", FAST_SIM, cwd=tmp_path))
    assert "not a pydantic model" in line, line
    line = one_line_error(run_cli("p.txt", "--schema", "nofile.json", "--backend", FAST_SIM, cwd=tmp_path))
    assert "nofile.json" in line, line


def test_unreachable_backend_is_reported_before_the_run(tmp_path: Path) -> None:
    write_prompts(tmp_path / "p.txt", 2)
    port = closed_port()
    line = one_line_error(
        run_cli("p.txt", "-o", "o.jsonl", "-m", "m", "--backend", f"vllm://127.0.0.1:{port}", cwd=tmp_path)
    )
    assert f"vllm://127.0.0.1:{port}" in line and "unreachable" in line and "/v1/models" in line, line
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def test_a_model_the_backend_does_not_serve_is_refused_before_the_run(tmp_path: Path) -> None:
    write_prompts(tmp_path / "p.txt", 2)
    with sim.start(time_scale=0, model="qwen2.5-7b") as server:
        host = server.url.removeprefix("http://")
        line = one_line_error(
            run_cli("p.txt", "-o", "o.jsonl", "-m", "qwen-typo", "--backend", f"vllm://{host}", cwd=tmp_path)
        )
        stats = server.stats()
    assert "qwen-typo" in line and "serves qwen2.5-7b" in line, line
    assert stats["routes"].get("/v1/chat/completions", {}).get("total", 0) == 0
    assert not (tmp_path / "o.jsonl.journal.sqlite").exists()


def test_journal_and_resume_rules(tmp_path: Path) -> None:
    write_prompts(tmp_path / "p.txt", 6)
    line = one_line_error(run_cli("p.txt", "-o", "o.jsonl", "--resume", "--backend", FAST_SIM, cwd=tmp_path))
    assert "--resume" in line and "o.jsonl.journal.sqlite" in line, line
    assert run_cli("p.txt", "-o", "o.jsonl", "--backend", FAST_SIM, cwd=tmp_path).returncode == 0
    line = one_line_error(run_cli("p.txt", "-o", "o.jsonl", "--backend", FAST_SIM, cwd=tmp_path))
    assert "--resume" in line and "journal" in line, line
    proc = run_cli(
        "p.txt", "-o", "o.jsonl", "--resume", "--backend", FAST_SIM, "--report", "r.json", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert len(read_results(tmp_path / "o.jsonl")) == 6


def test_usage_errors(tmp_path: Path) -> None:
    write_prompts(tmp_path / "p.txt", 2)
    assert "no backend" in one_line_error(run_cli("p.txt", cwd=tmp_path))
    assert "no model" in one_line_error(run_cli("p.txt", "--backend", "vllm://localhost:1", cwd=tmp_path))
    assert "no such file" in one_line_error(run_cli("missing.txt", "--backend", FAST_SIM, cwd=tmp_path))
    (tmp_path / "bad.toml").write_text("max_inflight = 'many'\n")
    assert "max_inflight" in one_line_error(run_cli("bad.toml", cwd=tmp_path))
    proc = run_cli("p.txt", "-c", "0", "--backend", FAST_SIM, cwd=tmp_path)
    assert proc.returncode == 2 and "at least 1" in proc.stderr


# -- pieces -------------------------------------------------------------------------------------


def test_run_file_checks_keys_types_and_resolves_paths(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        'input = "data/in.jsonl"\nbackend = ["sim://", "vllm://h:1"]\ndashboard = true\nschema = "s.json"\n'
    )
    settings = load_run_file(str(path))
    assert settings["input"] == str(tmp_path / "data" / "in.jsonl")
    assert settings["backend"] == ["sim://", "vllm://h:1"]
    assert settings["dashboard"] is True
    assert settings["schema"] == str(tmp_path / "s.json")
    for text, needle in [
        ("max-inflite = 3\n", "unknown setting 'max-inflite'"),
        ("quiet = 1\n", "quiet must be true or false"),
        ("max_turns = 0\n", "max_turns"),
        ("task = 'a'\ntask_file = 'b'\n", "not both"),
        ("input = \n", "invalid TOML"),
    ]:
        path.write_text(text)
        with pytest.raises(RunFileError, match=needle):
            load_run_file(str(path))


def test_flags_override_run_file(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('input = "a.txt"\ntask = "T {prompt}"\nmax_inflight = 4\nbackend = "sim://"\n')
    args = cli.build_parser().parse_args(["run", str(path), "--task-file", "t.txt", "-c", "9"])
    settings, base = cli._merged_settings(args)
    assert base == str(tmp_path)
    assert settings["max_inflight"] == 9 and settings["task_file"] == "t.txt" and "task" not in settings
    assert settings["backend"] == ["sim://"]


def test_price_lookup_prefers_the_longest_name_at_a_boundary() -> None:
    assert find_price("gpt-4o-mini-2024-07-18", PRICES) == ("gpt-4o-mini", PRICES["gpt-4o-mini"])
    assert find_price("gpt-4o-2024-08-06", PRICES) == ("gpt-4o", PRICES["gpt-4o"])
    found = find_price("us.anthropic.claude-3-5-sonnet-20241022-v2:0", PRICES)
    assert found is not None and found[0] == "claude-3-5-sonnet"
    assert find_price("qwen2.5-7b-instruct", PRICES) is None
    assert find_price("foo3", PRICES) is None


def test_cost_estimates() -> None:
    cost = estimate(
        model="gpt-4o-mini",
        backends=["openai://"],
        prompt_tokens=2_000_000,
        cached_tokens=1_000_000,
        completion_tokens=1_000_000,
    )
    assert cost.dollars == pytest.approx(0.15 + 0.075 + 0.60)
    unknown = estimate(
        model="my-model", backends=["openai://"], prompt_tokens=10, cached_tokens=0, completion_tokens=1
    )
    assert unknown.dollars == 0 and "no price known" in unknown.note
    local = estimate(
        model="gpt-4o", backends=["vllm://gpu"], prompt_tokens=10, cached_tokens=0, completion_tokens=1
    )
    assert local.dollars == 0 and "self-hosted" in local.note
    mine = estimate(
        model="gpt-4o",
        backends=["openai://"],
        prompt_tokens=1_000_000,
        cached_tokens=0,
        completion_tokens=0,
        overrides={"gpt-4o": Price(1.0, 0.5, 2.0)},
    )
    assert mine.dollars == pytest.approx(1.0)


def test_price_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text('{"m": {"input": 1, "output": 2}}')
    assert load_prices(str(path)) == {"m": Price(1.0, 1.0, 2.0)}
    for text, needle in [
        ('{"m": {"input": -1, "output": 2}}', "'m'.input"),
        ('{"m": {"input": 1}}', "needs 'output'"),
        ('{"m": {"input": 1, "output": 2, "cache": 1}}', "unknown key"),
        ('{"m": 3}', "must be an object"),
        ("{", "line 1"),
    ]:
        path.write_text(text)
        with pytest.raises(PriceError, match=needle):
            load_prices(str(path))


def run_command(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`batchagent ARGS...` (any subcommand)."""
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(cwd / ".cache")
    return subprocess.run(
        [sys.executable, "-m", "batchagent_rs.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_user_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    write_prompts(tmp_path / "p.txt", 2)
    (tmp_path / "bad.toml").write_text('input = "p.txt"\nbackend = "sim://"\nmax_inflite = 4\n')
    cases = [
        (("demo", "--profile", "nope"), "nope"),
        (("demo", "--agents", "0"), "--agents"),
        (("run", "missing.txt", "--backend", FAST_SIM), "missing.txt"),
        (("run", "p.txt", "--schema", "nosuchmodule:Model", "--backend", FAST_SIM), "nosuchmodule"),
        (("run", "p.txt", "-m", "m", "--backend", "nope://host"), "nope"),
        (("run", "p.txt", "-m", "m", "--backend", "vllm://host:notaport"), "notaport"),
        (("run", "bad.toml"), "max_inflite"),
        (("run", "p.txt", "--max-inflight", "zero"), "zero"),
    ]
    for args, named in cases:
        line = one_line_error(run_command(*args, cwd=tmp_path))
        assert line.startswith("batchagent") and named in line, (args, line)


def test_run_file_keys_take_either_spelling(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('input = "a.txt"\nmax-inflight = 4\nskip_bad_lines = true\n')
    settings = load_run_file(str(path))
    assert settings["max_inflight"] == 4 and settings["skip_bad_lines"] is True
    path.write_text("max-inflight = 4\nmax_inflight = 5\n")
    with pytest.raises(RunFileError, match="twice"):
        load_run_file(str(path))


def test_a_run_where_every_job_fails_exits_1_with_the_common_error(tmp_path: Path) -> None:
    write_prompts(tmp_path / "p.txt", 3)
    (tmp_path / "s.json").write_text(
        json.dumps({"type": "object", "properties": {"score": {"type": "integer"}}})
    )
    backend = f"{FAST_SIM}&invalid_json_rate=1"
    proc = run_cli(
        "p.txt", "-o", "o.jsonl", "--schema", "s.json", "--quiet", "--backend", backend, cwd=tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    assert "every job of this run failed (3)" in proc.stderr and "validation" in proc.stderr, proc.stderr
    assert "/score" in proc.stderr, proc.stderr
    assert len(read_results(tmp_path / "o.jsonl")) == 3
