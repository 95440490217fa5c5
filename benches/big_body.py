"""Client memory for one large model answer: a loopback server (its own process) answers one chat
completion whose content is `--mb` MB of text, non-streamed (one Content-Length body) and streamed
(SSE deltas); a fresh client process runs `Batch.run` on one input and reports how far its peak
resident memory rose during the run (VmHWM after resetting it, minus VmRSS before), as a multiple
of the body size.

    python benches/big_body.py --mb 50 --out benches/results/big_body.json

Build the extension in release first (`maturin develop --release`): a debug build measures the
debug build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
from typing import Any

SERVER = textwrap.dedent(
    """
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    SIZE = int(sys.argv[1])
    CONTENT = "a" * SIZE
    WHOLE = json.dumps({
        "id": "c", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": CONTENT}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }).encode()
    PIECE = 64 * 1024

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not request.get("stream"):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(WHOLE)))
                self.end_headers()
                self.wfile.write(WHOLE)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for start in range(0, SIZE, PIECE):
                delta = {"choices": [{"index": 0, "delta": {"content": CONTENT[start:start + PIECE]}}]}
                self.wfile.write(b"data: " + json.dumps(delta).encode() + b"\\n\\n")
            end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
            self.wfile.write(b"data: " + json.dumps(end).encode() + b"\\n\\ndata: [DONE]\\n\\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
    """
)

CLIENT = textwrap.dedent(
    """
    import json, sys, time
    from batchagent_rs import Batch

    def status(field):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise SystemExit(field + " missing")

    port, stream, size = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
    batch = Batch("Say {x}.", backend=f"vllm://127.0.0.1:{port}", model="m", stream=stream,
                  max_response_bytes=2 * size + (1 << 20))
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    started = time.perf_counter()
    [result] = batch.run([{"x": "hi"}])
    seconds = time.perf_counter() - started
    peak = status("VmHWM")
    assert result.ok, result.error
    assert isinstance(result.output, str) and len(result.output) == size, len(result.output or "")
    print(json.dumps({"rss_before_mb": before / 1e6, "peak_mb": peak / 1e6,
                      "rise_mb": (peak - before) / 1e6, "seconds": seconds}))
    """
)


def measure(port: int, stream: bool, size: int) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, "-c", CLIENT, str(port), "1" if stream else "0", str(size)],
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        raise SystemExit(f"client failed:\n{run.stderr}")
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    out["rise_per_body_byte"] = round(out["rise_mb"] * 1e6 / size, 2)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="answer content size in MB (10^6 bytes)")
    parser.add_argument("--repeat", type=int, default=3, help="client runs per mode (the lowest is kept)")
    parser.add_argument("--out", default="bench-results/big_body.json", help="JSON results file")
    args = parser.parse_args()
    size = int(args.mb * 1e6)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(size)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        modes: dict[str, Any] = {}
        for name, stream in (("whole_body", False), ("streamed", True)):
            runs = [measure(port, stream, size) for _ in range(args.repeat)]
            modes[name] = {"best": min(runs, key=lambda r: r["rise_mb"]), "runs": runs}
            best = modes[name]["best"]
            print(f"{name}: peak rose {best['rise_mb']:.0f} MB for a {size / 1e6:.0f} MB answer "
                  f"({best['rise_per_body_byte']:.2f}x)")  # fmt: skip
    finally:
        server.terminate()
        server.wait(10)
    summary = {
        "benchmark": "big_body",
        "answer_bytes": size,
        **modes,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
