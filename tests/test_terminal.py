"""What a person sees on a real terminal: `batchagent run` and `batchagent run --dashboard` driven
in a tmux pane, the rendered screen read back with `capture-pane`."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

WIDTH, HEIGHT = 140, 45
# A few seconds of simulated latency: long enough to see the run in flight.
SLOW_SIM = "sim://?time_scale=0.05&seed=9&output_tokens=uniform:20:40"
FAST_SIM = "sim://?time_scale=0&seed=9"


class Pane:
    def __init__(self, socket: str, name: str) -> None:
        self.socket = socket
        self.name = name

    def tmux(self, *args: str) -> str:
        proc = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10, check=False
        )
        return proc.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.name)

    def flag(self, name: str) -> str:
        return self.tmux("display-message", "-p", "-t", self.name, f"#{{{name}}}").strip()

    def wait_for(self, what: Callable[[str], bool], timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if what(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never matched; last screen:\n{text}")
            time.sleep(0.05)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Callable[[str], Pane]]:
    socket = f"batchagent-test-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(tmp_path / ".cache")

    def start(args: str) -> Pane:
        name = "run"
        python = shlex.quote(sys.executable)
        # Keep the pane open after the command so its last screen can be read.
        folder = shlex.quote(str(tmp_path))
        script = f"cd {folder} && {python} -m batchagent_rs.cli run {args}; echo EXIT=$?; sleep 600"
        subprocess.run(
            ["tmux", "-L", socket, "-f", "/dev/null", "new-session", "-d", "-s", name,
             "-x", str(WIDTH), "-y", str(HEIGHT), "bash", "--norc", "--noprofile", "-c", script],
            env=env,
            check=True,
            timeout=10,
        )  # fmt: skip
        return Pane(socket, name)

    yield start
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, timeout=10, check=False)


def write_prompts(path: Path, n: int) -> None:
    path.write_text("".join(f"Describe item {i}.\n" for i in range(n)))


def test_progress_bar_then_report(tmp_path: Path, terminal: Callable[[str], Pane]) -> None:
    write_prompts(tmp_path / "p.txt", 3000)
    pane = terminal(f"p.txt -o out.jsonl -c 64 --backend '{SLOW_SIM}'")
    mid = pane.wait_for(lambda s: "/3000" in s and "in flight" in s and "EXIT=" not in s)
    bar = next(line for line in mid.splitlines() if "/3000" in line)
    assert (
        "[" in bar and "ok " in bar and "failed " in bar and "/s" in bar and "tok/s" in bar and "ETA" in bar
    )
    assert "prefix cache" in bar
    end = pane.wait_for(lambda s: "EXIT=" in s, timeout=60)
    assert "EXIT=0" in end
    lines = end.splitlines()
    # The bar was redrawn in place: one bar line left on the screen, at 100%.
    bars = [line for line in lines if "/3000" in line]
    assert len(bars) == 1 and "3000/3000" in bars[0] and "100%" in bars[0], end
    assert any(line.startswith("jobs") and "3000 ok" in line for line in lines), end
    assert any(line.startswith("estimated cost") for line in lines), end
    assert any(line.startswith("TTFT p50") for line in lines), end


def test_log_records_do_not_tear_the_bar(tmp_path: Path, terminal: Callable[[str], Pane]) -> None:
    (tmp_path / "noisy.py").write_text(
        textwrap.dedent(
            """
            import logging
            from batchagent_rs import tool

            @tool
            def lookup(topic: str) -> str:
                \"\"\"Look up a topic.\"\"\"
                logging.getLogger("noisy").warning("looked up %s", topic)
                return "notes"
            """
        )
    )
    write_prompts(tmp_path / "p.txt", 400)
    pane = terminal(
        f"p.txt -o out.jsonl -c 16 --tools noisy:lookup --backend '{SLOW_SIM}&tool_rounds=1&distinct_args=6'"
    )
    end = pane.wait_for(lambda s: "EXIT=" in s, timeout=60)
    assert "EXIT=0" in end, end
    lines = end.splitlines()
    warnings = [line for line in lines if "WARNING noisy: looked up" in line]
    assert warnings, end
    # Each record on a line of its own: never glued to a piece of the bar.
    assert not any("/400" in line for line in warnings), warnings
    assert any("400/400" in line for line in lines), end


def test_dashboard_panels_and_terminal_restored(tmp_path: Path, terminal: Callable[[str], Pane]) -> None:
    write_prompts(tmp_path / "p.txt", 3000)
    pane = terminal(f"p.txt -o out.jsonl -c 64 --dashboard --backend '{SLOW_SIM}'")
    # The engine's own figures (scraped from its /metrics) arrive after the first poll.
    live = pane.wait_for(lambda s: "recent results" in s and "ok   " in s and "running" in s)
    assert pane.flag("alternate_on") == "1"
    assert "queue" in live and "KV" in live and "prefix hits" in live
    for panel in (
        "batchagent run -> out.jsonl",
        "engine",
        "timings",
        "recent results",
        "TTFT",
        "model calls",
    ):
        assert panel in live, live
    assert "/3000" in live and "jobs/s" in live and "tok/s" in live
    end = pane.wait_for(lambda s: "EXIT=" in s, timeout=60)
    assert "EXIT=0" in end, end
    assert pane.flag("alternate_on") == "0"
    assert pane.flag("cursor_flag") == "1"
    # Back on the normal screen: the report, and no panel left behind.
    assert "agents/s" in end and "estimated cost" in end
    assert "recent results" not in end


def test_ctrl_c_in_the_dashboard_restores_the_terminal(
    tmp_path: Path, terminal: Callable[[str], Pane]
) -> None:
    write_prompts(tmp_path / "p.txt", 20000)
    pane = terminal(f"p.txt -o out.jsonl -c 16 --dashboard --backend '{SLOW_SIM}'")
    pane.wait_for(lambda s: "recent results" in s and "ok   " in s)
    pane.tmux("send-keys", "-t", pane.name, "C-c")
    end = pane.wait_for(lambda s: "EXIT=" in s, timeout=30)
    assert "EXIT=130" in end, end
    assert "--resume" in end
    assert pane.flag("alternate_on") == "0"
    assert pane.flag("cursor_flag") == "1"
    assert "Traceback" not in end


def test_quick_run_on_a_terminal(tmp_path: Path, terminal: Callable[[str], Pane]) -> None:
    write_prompts(tmp_path / "p.txt", 50)
    pane = terminal(f"p.txt -o out.jsonl --backend '{FAST_SIM}'")
    end = pane.wait_for(lambda s: "EXIT=" in s, timeout=60)
    assert "EXIT=0" in end and "50/50" in end and "agents/s" in end, end
