"""A million single-turn prompts from a JSONL file through `batchagent run`, against the simulator
at zero latency in another process. Measures the `batchagent run` process: peak resident memory
(VmHWM, polled from /proc, and the children's maxrss from getrusage) and throughput (prompts/s).

    python benches/million.py --out bench-results/million.json
    python benches/million.py --n 100000 --out /tmp/m.json
    python benches/million.py --n 100000 --compare-cache --out /tmp/cache.json

`--compare-cache` runs the same prompts twice in one invocation, without and with the response
cache (a fresh, empty one: every lookup misses and every answer is stored), and reports both and
their ratios.

Build the extension in release first (`pip install .`): a debug build measures the debug build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
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


def run_once(work: Path, inputs: Path, url: str, max_inflight: int, cache: bool) -> dict[str, Any]:
    """One `batchagent run` over `inputs`: wall time, peak memory and CPU of that process alone."""
    for stale in ("results.jsonl", "results.jsonl.journal.sqlite", "report.json"):
        (work / stale).unlink(missing_ok=True)
    cache_dir = work / "cache"
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    backend = "vllm://" + url.removeprefix("http://")
    command = [
        sys.executable, "-m", "batchagent_rs.cli", "run", str(inputs),
        "-o", str(work / "results.jsonl"), "-m", "sim-model", "-c", str(max_inflight),
        "--backend", backend, "--quiet", "--report", str(work / "report.json"),
    ]  # fmt: skip
    if not cache:
        command.append("--no-cache")
    env = dict(os.environ, XDG_CACHE_HOME=str(cache_dir))
    before = sim_requests(url)
    started = time.perf_counter()
    run = subprocess.Popen(command, env=env)
    peak_kb = 0
    samples: list[tuple[float, int]] = []
    while True:
        # wait4: this child's own rusage (RUSAGE_CHILDREN would mix in earlier runs).
        pid, status, usage = os.wait4(run.pid, os.WNOHANG)
        if pid != 0:
            break
        hwm = vm_hwm_kb(run.pid)
        if hwm is not None:
            peak_kb = max(peak_kb, hwm)
            samples.append((round(time.perf_counter() - started, 2), hwm))
        time.sleep(0.1)
    wall = time.perf_counter() - started
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise SystemExit(f"batchagent run failed with exit code {returncode}")
    requests = sim_requests(url) - before
    n = sum(1 for _ in inputs.open("rb"))
    results = sum(1 for _ in (work / "results.jsonl").open("rb"))
    report: dict[str, Any] = json.loads((work / "report.json").read_text())
    cpu_seconds = usage.ru_utime + usage.ru_stime
    peak_mb = max(peak_kb, usage.ru_maxrss) / 1024
    return {
        "prompts": n,
        "results": results,
        "model_requests": requests,
        "ok": report["ok"],
        "failed": report["failed"],
        "wall_seconds": round(wall, 2),
        "prompts_per_second": round(n / wall, 1),
        "run_agents_per_second": round(report["agents_per_second"], 1),
        "peak_rss_mb": round(peak_mb, 1),
        "run_cpu_seconds": round(cpu_seconds, 1),
        "run_cpu_us_per_prompt": round(cpu_seconds / n * 1e6, 1),
        "vmhwm_polled_mb": round(peak_kb / 1024, 1),
        "children_maxrss_mb": round(usage.ru_maxrss / 1024, 1),
        "response_cache": cache,
        "rss_samples_kb": samples[:: max(len(samples) // 50, 1)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="prompts (default 1,000,000)")
    parser.add_argument("--out", default="bench-results/million.json", help="JSON results file")
    parser.add_argument("-c", "--max-inflight", type=int, default=256)
    parser.add_argument("--output-tokens", default="fixed:4", help="simulated answer length")
    parser.add_argument("--cache", action="store_true", help="leave the response cache on (the CLI default)")
    parser.add_argument(
        "--compare-cache", action="store_true", help="run without, then with, the response cache; report both"
    )
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
        sim, url = start_simulator(args.output_tokens)
        try:
            modes = [False, True] if args.compare_cache else [args.cache]
            runs = [run_once(work, inputs, url, args.max_inflight, cache) for cache in modes]
        finally:
            sim.terminate()
            sim.wait(10)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    if args.compare_cache:
        off, on = runs
        summary: dict[str, Any] = {
            "benchmark": "million-cache",
            "prompts": args.n,
            "max_inflight": args.max_inflight,
            "without_cache": off,
            "with_cache": on,
            "cache_wall_ratio": round(on["wall_seconds"] / off["wall_seconds"], 3),
            "cache_cpu_ratio": round(on["run_cpu_seconds"] / max(off["run_cpu_seconds"], 1e-9), 3),
            "cache_peak_rss_ratio": round(on["peak_rss_mb"] / off["peak_rss_mb"], 3),
            "machine": machine,
        }
    else:
        summary = {
            "benchmark": "million",
            **runs[0],
            "max_inflight": args.max_inflight,
            "targets": {"peak_rss_mb": 300, "prompts_per_second": 10_000},
            "machine": machine,
        }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    for run in runs:
        mode = "cache on " if run["response_cache"] else "cache off"
        print(
            f"{mode}: {run['prompts']:,} prompts in {run['wall_seconds']:.1f} s "
            f"({run['prompts_per_second']:,.0f}/s), peak RSS {run['peak_rss_mb']:.0f} MB, "
            f"CPU {run['run_cpu_seconds']:.1f} s ({run['results']:,} results, "
            f"{run['model_requests']:,} requests)"
        )
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
