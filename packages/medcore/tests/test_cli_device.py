import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from medcore.cli.command import Command, run_cli
from medcore.cli.flags import Flag, add_common_args, flag_overrides
from medcore.cli.run_setup import find_run
from medcore.config import RunConfig, load_config
from medcore.data.demo_cache import ensure_demo_data
from medcore.errors import DataError, UserError
from medcore.report.tables import format_table
from medcore.runtime.device import amp_policy, device_defaults, resolve_device


@dataclass
class Data:
    data_dir: str | None = None


@dataclass
class Model:
    pretrained_weights: str | None = None


@dataclass
class Cfg(RunConfig):
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)


def test_run_cli_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> int:
        raise DataError("scans/a.nii.gz", "truncated gzip stream")

    assert run_cli(broken) == 2
    err = capsys.readouterr().err
    assert err == "error: scans/a.nii.gz: truncated gzip stream\n"
    assert run_cli(lambda: None) == 0
    assert run_cli(lambda: 3) == 3


def test_run_cli_turns_ctrl_c_into_130(capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_cli(interrupted, prog="x-train") == 130
    assert "--resume latest" in capsys.readouterr().err


def test_command_parses_its_flags_then_imports_and_runs_its_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "late_cmd.py").write_text(
        "from medcore.errors import DataError\n"
        "seen = []\n"
        "def run(args):\n"
        "    seen.append(args)\n"
        "    if args.bad:\n"
        "        raise DataError(str(args.inputs[0]), 'not an image')\n"
        "    return 7\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    flags = [
        ("inputs", {"type": Path, "nargs": "+"}),
        (("--bad", "-b"), {"action": "store_true"}),
    ]
    command = Command("x-predict", "predict", "late_cmd:run", flags, common=False)
    assert "late_cmd" not in sys.modules  # declaring a command imports nothing
    assert command(["a.png", "b.png", "--set", "trainer.lr=1"]) == 7
    args = sys.modules["late_cmd"].seen[-1]
    assert args.inputs == [Path("a.png"), Path("b.png")]
    assert args.overrides == ["trainer.lr=1"] and not args.bad
    assert command(["c.png", "-b"]) == 2
    assert capsys.readouterr().err == "error: c.png: not an image\n"
    # common=False leaves out the training flags, common=True has them, None has no common flags.
    options = {a.dest for a in command.parser()._actions}
    assert "overrides" in options and "epochs" not in options
    train = Command("x-train", "train", "late_cmd:run", common=True)
    assert "epochs" in {a.dest for a in train.parser()._actions}
    bare = Command("x-vote", "vote", "late_cmd:run", flags)
    assert "overrides" not in {a.dest for a in bare.parser()._actions}
    with pytest.raises(SystemExit) as exc:
        bare(["--no-such-flag"])
    assert exc.value.code == 2


def test_common_flags_map_onto_config(tmp_path: Path) -> None:
    parser = add_common_args(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--epochs",
            "3",
            "--seed",
            "9",
            "--device",
            "cpu",
            "--data-dir",
            str(tmp_path),
            "--pretrained-weights",
            "w.pt",
            "--set",
            "trainer.lr=0.5",
        ]
    )
    cfg = load_config(Cfg, overrides=[*args.overrides, *flag_overrides(args)])
    assert (cfg.trainer.epochs, cfg.seed, cfg.device, cfg.trainer.lr) == (3, 9, "cpu", 0.5)
    assert cfg.data.data_dir == str(tmp_path) and cfg.model.pretrained_weights == "w.pt"


def test_a_commands_flags_set_the_keys_they_declare() -> None:
    flags = [
        Flag("--width", {"type": int}, "model.width"),
        Flag("--frozen", {"action": "store_true"}, "model.frozen"),
        Flag("--no-weights", {"action": "store_true"}, "model.pretrained", False),
        Flag("--note", {"help": "sets nothing"}),
    ]
    command = Command("x-train", "train", "late_cmd:run", flags, common=True)
    args = command.parse_args(["--width", "5", "--no-weights", "--epochs", "2", "--set", "a=1"])
    assert args.invocation.prog == "x-train"
    assert args.invocation.argv == ("--width", "5", "--no-weights", "--epochs", "2", "--set", "a=1")
    # in declaration order; only the flags given; --epochs sets every epochs key
    assert flag_overrides(args, ("phases.a.epochs", "phases.b.epochs")) == [
        ("model.width", 5),
        ("model.pretrained", False),
        ("phases.a.epochs", 2),
        ("phases.b.epochs", 2),
    ]
    assert flag_overrides(command.parse_args(["--frozen", "--data-dir", "d"])) == [
        ("model.frozen", True),
        ("data.data_dir", "d"),
    ]
    with pytest.raises(ValueError, match="has no default of its own"):
        Command("y", "", "m:f", [Flag("--k", {"type": int, "default": 3}, "a.k")]).parser()


def test_resume_latest_finds_newest_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no earlier run"):
        find_run("pkg", None)[1]
    for i, name in enumerate(["20260101-000000", "20260102-000000"]):
        ck = tmp_path / "runs/pkg" / name / "checkpoints/latest.pt"
        ck.parent.mkdir(parents=True)
        ck.write_bytes(b"x")
        os.utime(ck, (time.time() + i, time.time() + i))
    assert find_run("pkg", None)[1].parts[-3] == "20260102-000000"


def test_format_table() -> None:
    text = format_table(
        [{"finding": "Emphysema", "auc": 0.91234}, {"finding": "Nodule", "auc": 0.5}]
    )
    lines = text.splitlines()
    assert lines[0].split() == ["finding", "auc"] and lines[2].split() == ["Emphysema", "0.9123"]


def test_device_policy_on_cpu() -> None:
    cpu = resolve_device("cpu")
    assert cpu.type == "cpu"
    assert not amp_policy(cpu).enabled  # CPU autocast is opt-in
    assert amp_policy(cpu, dtype="bf16").dtype == torch.bfloat16
    assert device_defaults(cpu).batch_size == 4 and device_defaults(cpu).num_workers == 2
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")


def test_demo_cache_generates_once_and_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path))
    calls = []

    def failing(d: Path) -> None:
        (d / "half.txt").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        ensure_demo_data("pkg", failing)
    assert not (tmp_path / "pkg/demo-v1").exists()

    def generate(d: Path) -> None:
        calls.append(d)
        (d / "a.txt").write_text("data")

    first = ensure_demo_data("pkg", generate)
    second = ensure_demo_data("pkg", generate)
    assert first == second and (first / "a.txt").read_text() == "data" and len(calls) == 1


def test_environment_oserrors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    def disk_full() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/latest.pt")

    assert run_cli(disk_full) == 2
    assert (
        capsys.readouterr().err == "error: /runs/x/checkpoints/latest.pt: No space left on device\n"
    )

    def bug() -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError):
        run_cli(bug)


@pytest.fixture
def cli_mod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``medcore.cli.run_setup`` with a packaged default config of ``seed: 3`` for any package."""
    from medcore.cli import run_setup as run

    packaged = tmp_path / "default.yaml"
    packaged.write_text("seed: 3\n")
    monkeypatch.setattr(run, "packaged_config_path", lambda package, name: packaged)
    return run


def _started(cli_mod, args: argparse.Namespace, **kwargs):
    """The context of a run started and ended again (its lock released)."""
    with cli_mod.start_run(cli_mod.resolve_run(args, Cfg, "pkg", **kwargs)) as ctx:
        return ctx


def test_start_run_locks_the_run_dir_before_writing(tmp_path: Path, cli_mod) -> None:
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = add_common_args(argparse.ArgumentParser()).parse_args(["--output-dir", str(run_dir)])
    request = cli_mod.resolve_run(args, Cfg, "pkg")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (run_dir / ".lock").write_text(str(other.pid))
        with pytest.raises(UserError, match="in use by another running job"):
            cli_mod.start_run(request).__enter__()
        assert not (run_dir / "config.yaml").exists()
        assert (run_dir / ".lock").read_text() == str(other.pid)  # the other job's, kept
    finally:
        other.kill()
        other.wait()
    with cli_mod.start_run(request) as ctx:  # the owner died: stale lock taken over
        assert ctx.cfg.seed == 3 and (run_dir / "config.yaml").is_file()
        assert (run_dir / ".lock").read_text() == str(os.getpid())
        with cli_mod.start_run(request):  # same process: re-entrant, not refused
            pass
        assert (run_dir / ".lock").is_file()
    assert not (run_dir / ".lock").exists()


def test_find_run_for_staged_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    layout = ("checkpoints/latest.pt", "*/checkpoints/latest.pt")
    older = Path("runs/pkg/a/checkpoints/latest.pt")  # a one-stage run
    newer = Path("runs/pkg/b/fold_1/checkpoints/latest.pt")  # a run of stages
    for i, ck in enumerate([older, newer]):
        ck.parent.mkdir(parents=True)
        ck.write_bytes(b"x")
        os.utime(ck, (time.time() + i, time.time() + i))
    assert find_run("pkg", None, layout) == (Path("runs/pkg/b"), newer)
    os.utime(older, (time.time() + 5, time.time() + 5))
    assert find_run("pkg", None, layout) == (Path("runs/pkg/a"), older)
    run_b = Path("runs/pkg/b")
    assert find_run("pkg", run_b, "fold_*/checkpoints/latest.pt") == (run_b, newer)
    with pytest.raises(UserError, match=r"no phase\*/checkpoints/latest\.pt in"):
        find_run("pkg", run_b, "phase*/checkpoints/latest.pt")


def test_resume_continues_with_the_runs_own_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_mod
) -> None:
    monkeypatch.chdir(tmp_path)
    parser = add_common_args(argparse.ArgumentParser())
    first = _started(cli_mod, parser.parse_args(["--seed", "7", "--set", "trainer.lr=0.25"]))
    (first.run_dir / "checkpoints").mkdir()
    (first.run_dir / "checkpoints/latest.pt").write_bytes(b"x")

    # --resume latest alone: the interrupted run's seed and lr, not the packaged defaults.
    args = parser.parse_args(["--resume", "latest"])
    request = cli_mod.resolve_run(args, Cfg, "pkg")
    assert args == parser.parse_args(["--resume", "latest"])  # read, not changed
    assert request.continues == first.run_dir and request.resuming
    ctx = _started(cli_mod, args)
    assert ctx.run_dir == first.run_dir and ctx.resume == first.run_dir / "checkpoints/latest.pt"
    assert (ctx.cfg.seed, ctx.cfg.trainer.lr) == (7, 0.25)

    # A checkpoint path: its run, its settings; --set on top still wins.
    argv = ["--resume", str(ctx.resume), "--set", "trainer.lr=0.5"]
    ctx = _started(cli_mod, parser.parse_args(argv))
    assert ctx.run_dir == first.run_dir and (ctx.cfg.seed, ctx.cfg.trainer.lr) == (7, 0.5)

    # A checkpoint from outside any run starts a new run from the defaults.
    outside = tmp_path / "weights.pt"
    outside.write_bytes(b"x")
    ctx = _started(cli_mod, parser.parse_args(["--resume", str(outside)]))
    assert ctx.run_dir != first.run_dir and ctx.cfg.seed == 3  # a new run, even in the same second
    assert ctx.run_dir.parent == first.run_dir.parent
