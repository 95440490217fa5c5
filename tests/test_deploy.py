"""deploy/: every YAML file parses and has the fields its kind requires, and every command it runs
(compose, Kubernetes, the Dockerfile, the guide's examples) is a `batchagent` subcommand with flags
that subcommand takes. No Docker or Kubernetes here: this is what can be checked without them."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchagent_rs.cli import build_parser
from batchagent_rs.fleet import JOBS_GROUP, jobs_stream
from batchagent_rs.runfile import SETTINGS, load_run_file

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# The fleet's commands as issue 13 spells them (flags taking a value map to True). A subcommand the
# parser has is also parsed by it; these are checked either way.
FLEET_SPELLING: dict[str, dict[str, bool]] = {
    "submit": {"--redis": True},
    "worker": {"--redis": True, "-c": True, "--tools-from": True, "--lease-seconds": True},
    "status": {"--redis": True, "--json": False},
    "collect": {"--redis": True, "-o": True},
}
FLEET_POSITIONALS = {"submit": 1, "worker": 0, "status": 1, "collect": 1}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the CLI has no subcommands")


def check_command(argv: list[str]) -> None:
    """Fails unless `batchagent ARGV` is a real subcommand with flags it takes."""
    if not argv:
        pytest.fail("an empty command")
    command, rest = argv[0], argv[1:]
    known = subcommands()
    if command not in known and command not in FLEET_SPELLING:
        pytest.fail(f"batchagent {command}: no such subcommand")
    if command in FLEET_SPELLING:
        spelling, positionals = FLEET_SPELLING[command], 0
        i = 0
        while i < len(rest):
            arg = rest[i]
            if arg.startswith("-"):
                if arg not in spelling:
                    pytest.fail(f"batchagent {command}: {arg} is not one of {sorted(spelling)}")
                i += 2 if spelling[arg] else 1
            else:
                positionals += 1
                i += 1
        if positionals != FLEET_POSITIONALS[command]:
            pytest.fail(f"batchagent {shlex.join(argv)}: {positionals} positional arguments")
    if command in known:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                build_parser().parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"batchagent {shlex.join(argv)}: {stderr.getvalue().strip() or exc}")


def yaml_documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), path
    return docs


def test_check_command_refuses_what_the_cli_does_not_take() -> None:
    check_command(["worker", "--redis", "redis://r:6379/0", "-c", "64", "--tools-from", "mymod"])
    check_command(["run", "job.toml", "--backend", "vllm://h:8000", "-m", "m"])
    for bad in (
        ["serve", "--redis", "x"],
        ["worker", "--redis", "x", "--concurrency", "3"],
        ["status", "--redis", "x"],
        ["run", "job.toml", "--no-such-flag"],
    ):
        with pytest.raises(pytest.fail.Exception):
            check_command(bad)


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert {p.name for p in files} >= {"compose.yaml", "redis.yaml", "worker.yaml", "keda-scaledobject.yaml"}
    for path in files:
        yaml_documents(path)


def test_compose_runs_redis_workers_and_gpu_engines() -> None:
    (compose,) = yaml_documents(DEPLOY / "compose.yaml")
    services = compose["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    assert "--appendonly" in redis["command"] and "everysec" in redis["command"]
    worker = services["worker"]
    # Compose resolves the context against the compose file's folder, the Dockerfile against the context.
    context = (DEPLOY / worker["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / worker["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    check_command(worker["command"])
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["deploy"]["replicas"] >= 1
    for volume in worker.get("volumes", []):
        host = volume.split(":")[0]
        assert (DEPLOY / host).exists(), f"worker mounts {host}, which deploy/ lacks"
    engines = {name: s for name, s in services.items() if "vllm" in s["image"] or "ollama" in s["image"]}
    assert any("vllm" in s["image"] for s in engines.values())
    assert any("ollama" in s["image"] for s in engines.values())
    for name, service in engines.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
    gpus = [
        d.get("device_ids")
        for s in engines.values()
        for d in s["deploy"]["resources"]["reservations"]["devices"]
    ]
    vllm_gpus = [tuple(g) for g in gpus if g is not None]
    assert len(vllm_gpus) == len(set(vllm_gpus)), "two vLLM engines on one GPU"


def test_run_file_names_the_compose_engines_and_real_tools() -> None:
    (compose,) = yaml_documents(DEPLOY / "compose.yaml")
    settings = load_run_file(str(DEPLOY / "job.toml"))
    assert set(settings) <= set(SETTINGS)
    for url in settings["backend"]:
        host = re.match(r"\w+://([^:/]+)", url)
        assert host is not None and host.group(1) in compose["services"], url
    assert Path(settings["input"]).is_file()
    spec = importlib.util.spec_from_file_location("deploy_tools", DEPLOY / "tools" / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in settings["tools"]:
        module_name, _, attr = name.partition(":")
        assert module_name == "tools" and callable(getattr(module, attr)), name


def test_dockerfile_installs_the_wheel_as_a_non_root_user() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) == 2, "a build stage and a run stage"
    run_stage = lines[lines.index(stages[1]) :]
    assert any("maturin build" in line for line in lines)
    assert any(re.search(r"pip install .*\.whl", line) for line in run_stage)
    users = [line.split()[1] for line in run_stage if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which the repository lacks"
    entry = next(line for line in run_stage if line.startswith("ENTRYPOINT "))
    assert yaml.safe_load(entry.removeprefix("ENTRYPOINT ")) == ["batchagent"]
    cmd = next(line for line in run_stage if line.startswith("CMD "))
    check_command(yaml.safe_load(cmd.removeprefix("CMD ")))


def kubernetes() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml_documents(path):
            for key in ("apiVersion", "kind", "metadata", "spec"):
                assert key in doc, f"{path.name}: a {doc.get('kind')} without {key}"
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def test_kubernetes_workloads_are_complete() -> None:
    objects = kubernetes()
    kinds = {kind for kind, _ in objects}
    assert {"Deployment", "StatefulSet", "Service", "ScaledObject"} <= kinds
    labels_of_workloads = []
    for (kind, name), doc in objects.items():
        if kind not in ("Deployment", "StatefulSet"):
            continue
        spec = doc["spec"]
        template_labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= template_labels.items(), name
        labels_of_workloads.append(template_labels)
        containers = spec["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers), name
        if kind == "StatefulSet":
            assert ("Service", spec["serviceName"]) in objects, f"{name}: no Service {spec['serviceName']}"
    for (kind, name), doc in objects.items():
        if kind == "Service":
            selector = doc["spec"]["selector"]
            assert any(selector.items() <= labels.items() for labels in labels_of_workloads), name


def test_kubernetes_worker_runs_the_worker_as_non_root_against_the_redis_service() -> None:
    objects = kubernetes()
    worker = objects[("Deployment", "batchagent-worker")]["spec"]["template"]["spec"]
    assert worker["securityContext"]["runAsNonRoot"] is True
    (container,) = worker["containers"]
    check_command(container["args"])
    redis_url = container["args"][container["args"].index("--redis") + 1]
    host = re.match(r"redis://([^:/]+)", redis_url)
    assert host is not None and ("Service", host.group(1)) in objects
    redis = objects[("StatefulSet", "batchagent-redis")]["spec"]["template"]["spec"]["containers"][0]
    assert "everysec" in redis["args"]


def test_keda_scales_the_worker_on_the_job_stream() -> None:
    objects = kubernetes()
    (scaled,) = [doc for (kind, _), doc in objects.items() if kind == "ScaledObject"]
    assert scaled["apiVersion"].startswith("keda.sh/")
    assert ("Deployment", scaled["spec"]["scaleTargetRef"]["name"]) in objects
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis-streams"
    meta = trigger["metadata"]
    # The names the fleet's code uses, not a copy of them.
    assert meta["consumerGroup"] == JOBS_GROUP
    assert meta["stream"] == jobs_stream("RUN_ID")
    assert int(meta["lagCount"]) > 0
    assert ("Service", meta["address"].split(".")[0]) in objects


def test_the_guide_shows_only_real_commands() -> None:
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    commands += re.findall(r"`(batchagent [^`]+)`", text)
    batchagent = [c for c in commands if c.startswith("batchagent ")]
    assert {shlex.split(c)[1] for c in batchagent} >= {"run", "submit", "status", "collect", "worker"}
    for command in batchagent:
        argv = shlex.split(command)[1:]
        # Optional parts written as [--flag value] in prose.
        argv = [a.strip("[]") for a in argv]
        check_command(argv)
    for path in re.findall(r"`(deploy/[\w./-]+)`", text):
        assert (ROOT / path).exists(), path
