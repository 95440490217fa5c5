"""`pip install batchagent` from a built wheel needs no Rust toolchain: the wheel goes into a fresh
virtual environment (no system packages, no cargo on PATH) and `batchagent demo` runs from there."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import batchagent_rs

ROOT = Path(__file__).resolve().parent.parent
# Set by .ci/run to the wheel it built and installed; otherwise one is built here, once per session
# (the `ci` profile, reusing what an earlier build of it left in target/).
WHEEL_ENV = "BATCHAGENT_TEST_WHEEL"
# The embedded engine's CUDA kernels: `local://` on a GPU imports them from the installed package.
KERNEL_MODULES = ("__init__", "paged_attention", "prefill_attention", "cascade", "fused", "reference")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get(WHEEL_ENV)
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "maturin", "build", "--profile", "ci", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3000,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-4000:]
    (path,) = out.glob("batchagent-*.whl")
    return path


@pytest.mark.timeout(3600)
def test_the_wheel_installs_and_runs_the_demo_without_a_rust_toolchain(wheel: Path, tmp_path: Path) -> None:
    assert "-cp310-abi3-" in wheel.name, wheel.name
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=900)
    bin_dir = venv / "bin"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV", "CARGO_HOME", "RUSTUP_HOME", "PYTHONHOME")
    }
    env["PATH"] = os.pathsep.join([str(bin_dir), "/usr/local/bin", "/usr/bin", "/bin"])
    env["XDG_CACHE_HOME"] = str(tmp_path / ".cache")
    for tool in ("cargo", "rustc", "maturin"):
        assert shutil.which(tool, path=env["PATH"]) is None, f"{tool} is on PATH"
    installed = subprocess.run(
        [
            str(bin_dir / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-compile",
            str(wheel),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-4000:]
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import batchagent_rs; print(batchagent_rs.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    # A short demo: both sides (BatchAgent and the naive openai SDK loop, a dependency), one run each.
    demo = subprocess.run(
        [
            str(bin_dir / "batchagent"),
            "demo",
            "--agents",
            "24",
            "--repeat",
            "1",
            "--time-scale",
            "0.02",
            "--report",
            str(tmp_path / "demo.json"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr[-4000:]
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["batchagent"]["ok"] == 24 and report["batchagent"]["failed"] == 0, report["batchagent"]
    assert report["naive"]["ok"] == 24, report["naive"]
    assert "BatchAgent was" in demo.stdout


def test_the_release_build_script_is_valid_and_refuses_what_it_does_not_build() -> None:
    # The release build itself (scripts/build-wheels, about half an hour on two cores) is not run
    # here; its syntax and its arguments are checked before it installs or builds anything.
    script = ROOT / "scripts" / "build-wheels"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=60)
    shown = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert "manylinux" in shown.stdout and "--arch" in shown.stdout and "set -e" not in shown.stdout
    for wrong in (["--arch", "riscv64"], ["--profile", "dev"], ["--sign"]):
        refused = subprocess.run(
            [str(script), *wrong], capture_output=True, text=True, timeout=60, check=False
        )
        assert refused.returncode == 2, (wrong, refused.stderr)
        assert refused.stderr.startswith("build-wheels:"), refused.stderr


def test_the_wheel_ships_the_engines_cuda_kernels(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    missing = [m for m in KERNEL_MODULES if f"batchagent_rs/kernels/{m}.py" not in names]
    assert not missing, (missing, sorted(n for n in names if n.startswith("batchagent_rs/")))


def test_the_installed_package_holds_the_engines_cuda_kernels() -> None:
    # Found without importing them (that needs torch and Triton): the files beside the package's own.
    spec = importlib.util.find_spec("batchagent_rs.kernels")
    assert spec is not None and spec.submodule_search_locations, "batchagent_rs.kernels is not installed"
    (folder,) = (Path(p) for p in spec.submodule_search_locations)
    assert folder == Path(batchagent_rs.__file__).parent / "kernels", folder
    missing = [m for m in KERNEL_MODULES if not (folder / f"{m}.py").is_file()]
    assert not missing, (missing, folder)
