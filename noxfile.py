"""Test matrix, GPU smoke runs, lint, wheel checks and benchmarks for the workspace.

Each package's tests run in a venv synced with only that package (``uv sync --package``), so
an import of something the package does not declare fails here rather than for a user.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
PACKAGES = ["medcore", "ctretrieval", "ctclip", "cxrlandmarks", "histommnet", "binensemble"]
TASK_PACKAGES = PACKAGES[1:]
# The package whose README "Python API" section runs in the venv holding only its wheel and
# medcore's (the wheels session).
README_SNIPPET_PACKAGE = "cxrlandmarks"


def _sync(session: nox.Session, package: str) -> None:
    """Sync the session venv with exactly ``package``, its dependencies and its test group."""
    session.run_install(
        "uv",
        "sync",
        "--locked",
        "--package",
        package,
        "--group",
        "test",
        "--no-dev",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
        external=True,
    )


def _has_cuda() -> bool:
    return _gpu_count() > 0


def _gpu_count() -> int:
    """NVIDIA GPUs that ``nvidia-smi -L`` lists (0 without a driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    proc = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return 0
    return sum(1 for line in proc.stdout.splitlines() if line.startswith("GPU "))


@nox.session
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """CPU tests of one package in its own venv; fault injection is ``nox -s faults``."""
    _sync(session, package)
    session.chdir(ROOT / "packages" / package)
    session.run(
        "python",
        "-m",
        "pytest",
        "-m",
        "not gpu and not faults",
        "-q",
        *session.posargs,
        env={"MEDCORE_CACHE_DIR": str(Path(session.create_tmp()) / "cache")},
    )


@nox.session
@nox.parametrize("package", PACKAGES)
def gpu_smoke(session: nox.Session, package: str) -> None:
    """GPU tests and a --smoke training run on CUDA with AMP (skipped without CUDA)."""
    if not _has_cuda():
        session.skip(
            "CUDA is not available on this machine: gpu_smoke needs an NVIDIA GPU and driver"
        )
    _sync(session, package)
    session.chdir(ROOT / "packages" / package)
    session.run("python", "-m", "pytest", "-m", "gpu", "-q", success_codes=[0, 5])
    if package in TASK_PACKAGES:
        out = Path(session.create_tmp()) / f"{package}-gpu-smoke"
        session.run(
            f"{package}-train",
            "--smoke",
            "--device",
            "cuda",
            "--set",
            "trainer.amp=true",
            "--output-dir",
            str(out),
        )
        _multi_gpu_smoke(session, package, Path(session.create_tmp()))


def _multi_gpu_smoke(session: nox.Session, package: str, tmp: Path) -> None:
    """2-GPU DDP and FSDP --smoke runs (the command starts its two ranks itself, NCCL)."""
    gpus = _gpu_count()
    if gpus < 2:
        session.log(f"{package}: 2-GPU DDP and FSDP smokes skipped: {gpus} GPU(s), 2 needed")
        return
    for strategy in ("ddp", "fsdp"):
        session.run(
            f"{package}-train",
            "--smoke",
            "--device",
            "cuda",
            "--devices",
            "2",
            "--set",
            f"trainer.strategy={strategy}",
            "--set",
            "trainer.amp=true",
            "--output-dir",
            str(tmp / f"{package}-{strategy}-smoke"),
        )


@nox.session
def faults(session: nox.Session) -> None:
    """Only the fault-injection and bad-input tests (marker ``faults``) of every package."""
    for package in PACKAGES:
        _sync(session, package)
        session.run(
            "python",
            "-m",
            "pytest",
            str(ROOT / "packages" / package),
            "-m",
            "faults and not gpu",
            "-q",
            "--rootdir",
            str(ROOT / "packages" / package),
            success_codes=[0, 5],
        )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check over the whole workspace."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def wheels(session: nox.Session) -> None:
    """Build every wheel without workspace sources; install each task package alone in a fresh
    venv (with medcore's wheel) and run it; run cxrlandmarks' README Python API snippet there."""
    dist = Path(session.create_tmp()).resolve() / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for package in PACKAGES:
        session.run(
            "uv",
            "build",
            "--package",
            package,
            "--no-sources",
            "--wheel",
            "--out-dir",
            str(dist),
            external=True,
        )
    medcore_wheel = next(dist.glob("medcore-*.whl"))
    for package in TASK_PACKAGES:
        venv = Path(session.create_tmp()).resolve() / f"plain-{package}"
        shutil.rmtree(venv, ignore_errors=True)
        session.run("uv", "venv", "--quiet", str(venv), external=True)
        wheel = next(dist.glob(f"{package}-*.whl"))
        session.run(
            "uv",
            "pip",
            "install",
            "--quiet",
            "--python",
            str(venv),
            str(wheel),
            str(medcore_wheel),
            external=True,
        )
        exe = venv / ("Scripts" if sys.platform == "win32" else "bin") / f"{package}-train"
        work = Path(session.create_tmp()).resolve() / f"run-{package}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        env = {"MEDCORE_CACHE_DIR": str(work / "cache")}
        session.run(str(exe), "--help", external=True, silent=True)
        with session.chdir(work):
            session.run(
                str(exe), "--smoke", "--output-dir", str(work / "run"), external=True, env=env
            )
        if package == README_SNIPPET_PACKAGE:
            _run_readme_snippet(session, package, venv, env)
        # A passed package's venv and run go at once: five venvs and runs outgrow a CI disk.
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(venv, ignore_errors=True)


def _readme_python_api(package: str) -> tuple[list[list[str]], str]:
    """The ``## Python API`` section of a package's README: the commands of its ``bash`` block
    (comments dropped) and its ``python`` block, as the README has them."""
    text = (ROOT / "packages" / package / "README.md").read_text(encoding="utf-8")
    if "\n## Python API\n" not in text:
        raise ValueError(f"{package}/README.md has no '## Python API' section")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    bash = re.search(r"```bash\n(.*?)```", section, re.S)
    python = re.search(r"```python\n(.*?)```", section, re.S)
    if python is None:
        raise ValueError(f"{package}/README.md: its Python API section has no python block")
    lines = bash.group(1).splitlines() if bash else []
    commands = [shlex.split(line, comments=True) for line in lines]
    return [c for c in commands if c], python.group(1)


def _run_readme_snippet(
    session: nox.Session, package: str, venv: Path, env: dict[str, str]
) -> None:
    """Run the README's Python API commands and snippet in ``venv`` (only the package's wheel
    and medcore's), in an empty folder outside the workspace, offline."""
    commands, snippet = _readme_python_api(package)
    bin_dir = venv / ("Scripts" if sys.platform == "win32" else "bin")
    python = bin_dir / ("python.exe" if sys.platform == "win32" else "python")
    env = {**env, "HF_HUB_OFFLINE": "1"}
    check = (
        f"import {package}, medcore; "
        f"assert 'site-packages' in {package}.__file__ and 'site-packages' in medcore.__file__"
    )
    session.run(str(python), "-c", check, external=True, env=env)
    folder = Path(tempfile.mkdtemp(prefix=f"{package}-readme-"))
    try:
        with session.chdir(folder):
            for command in commands:
                exe = bin_dir / command[0]
                if not exe.is_file():
                    session.error(f"{package}/README.md runs {command[0]}: not in the wheel")
                session.run(str(exe), *command[1:], external=True, env=env)
            (folder / "snippet.py").write_text(snippet, encoding="utf-8")
            session.run(str(python), "snippet.py", external=True, env=env)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Speed and memory benchmarks (not part of the default sessions): nox -s bench -- --quick."""
    if not (ROOT / "benchmarks" / "run.py").is_file():
        session.skip("benchmarks/run.py is not in this checkout yet")
    session.run_install(
        "uv",
        "sync",
        "--locked",
        "--all-packages",
        "--no-dev",
        "--group",
        "bench",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
        external=True,
    )
    session.run("python", str(ROOT / "benchmarks" / "run.py"), *session.posargs)
