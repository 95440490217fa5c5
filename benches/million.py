"""A million single-turn prompts from a JSONL file through `batchagent run`, against the simulator
at zero latency in another process. Measures the `batchagent run` process: peak resident memory
(VmHWM, polled from /proc, and the children's maxrss from getrusage) and throughput (prompts/s).

    python benches/million.py --out bench-results/million.json
    python benches/million.py --n 100000 --out /tmp/m.json

Build the extension in release first (`pip install .`): a debug build measures the debug build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def generate(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8") as fh:
        chunk: list[str] = []
        for i in range(n):
            chunk.append(f'{{"id": "p-{i:07d}", "prompt": "Give a one-word label for record {i}."}}\n')
            if len(chunk) == 10_000:
                fh.write("".join(chunk))
                chunk.clear()
        fh.write("".join(chunk))


def start_simulator(output_tokens: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchagent_rs.cli", "sim", "serve", "--port", "0", "--time-scale", "0",
         "--output-tokens", output_tokens],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if match is None:
        proc.kill()
        raise SystemExit(f"the simulator did not start: {line!r}")
    return proc, match.group(1)


def vm_hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def sim_requests(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(url + "/sim/stats", timeout=10) as resp:
        return int(json.load(resp)["requests"]["total"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="prompts (default 1,000,000)")
    parser.add_argument("--out", default="bench-results/million.json", help="JSON results file")
    parser.add_argument("-c", "--max-inflight", type=int, default=256)
    parser.add_argument("--output-tokens", default="fixed:4", help="simulated answer length")
    parser.add_argument("--cache", action="store_true", help="leave the response cache on (the CLI default)")
    parser.add_argument("--workdir", help="keep the input, output and journal here instead of a temp folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="batchagent-million-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        inputs = work / "prompts.jsonl"
        t0 = time.perf_counter()
        generate(inputs, args.n)
        size_mib = inputs.stat().st_size >> 20
        print(f"generated {args.n:,} prompts in {time.perf_counter() - t0:.1f} s ({size_mib} MiB)")
        for stale in ("results.jsonl", "results.jsonl.journal.sqlite", "report.json"):
            (work / stale).unlink(missing_ok=True)

        sim, url = start_simulator(args.output_tokens)
        try:
            backend = "vllm://" + url.removeprefix("http://")
            command = [
                sys.executable, "-m", "batchagent_rs.cli", "run", str(inputs),
                "-o", str(work / "results.jsonl"), "-m", "sim-model", "-c", str(args.max_inflight),
                "--backend", backend, "--quiet", "--report", str(work / "report.json"),
            ]  # fmt: skip
            if not args.cache:
                command.append("--no-cache")
            env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"))
            started = time.perf_counter()
            run = subprocess.Popen(command, env=env)
            peak_kb = 0
            samples: list[tuple[float, int]] = []
            while run.poll() is None:
                hwm = vm_hwm_kb(run.pid)
                if hwm is not None:
                    peak_kb = max(peak_kb, hwm)
                    samples.append((round(time.perf_counter() - started, 2), hwm))
                time.sleep(0.1)
            wall = time.perf_counter() - started
            # The simulator is still running, so the children's figures are the run's alone.
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            children_maxrss_kb = usage.ru_maxrss
            cpu_seconds = usage.ru_utime + usage.ru_stime
            requests = sim_requests(url)
        finally:
            sim.terminate()
            sim.wait(10)
        if run.returncode != 0:
            raise SystemExit(f"batchagent run failed with exit code {run.returncode}")

        results = sum(1 for _ in (work / "results.jsonl").open("rb"))
        report: dict[str, Any] = json.loads((work / "report.json").read_text())
        peak_mb = max(peak_kb, children_maxrss_kb) / 1024
        summary = {
            "benchmark": "million",
            "prompts": args.n,
            "results": results,
            "model_requests": requests,
            "ok": report["ok"],
            "failed": report["failed"],
            "wall_seconds": round(wall, 2),
            "prompts_per_second": round(args.n / wall, 1),
            "run_agents_per_second": round(report["agents_per_second"], 1),
            "peak_rss_mb": round(peak_mb, 1),
            "run_cpu_seconds": round(cpu_seconds, 1),
            "run_cpu_us_per_prompt": round(cpu_seconds / args.n * 1e6, 1),
            "vmhwm_polled_mb": round(peak_kb / 1024, 1),
            "children_maxrss_mb": round(children_maxrss_kb / 1024, 1),
            "max_inflight": args.max_inflight,
            "response_cache": args.cache,
            "targets": {"peak_rss_mb": 300, "prompts_per_second": 10_000},
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "rss_samples_kb": samples[:: max(len(samples) // 50, 1)],
        }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    print(
        f"{args.n:,} prompts in {wall:.1f} s: {args.n / wall:,.0f} prompts/s, peak RSS {peak_mb:.0f} MB "
        f"({results:,} results, {requests:,} model requests) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
