"""Staged runs: finished stages skipped on resume, the unfinished one resumed, one --resume rule."""

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medcore.cli.flags import add_common_args
from medcore.cli.stages import STAGE_FILE, finished_result, run_stage
from medcore.config import RunConfig
from medcore.errors import UserError
from medcore.weights.checkpoint import finish_releasing


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


@pytest.fixture
def run_mod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from medcore.cli import run_setup as run

    packaged = tmp_path / "default.yaml"
    packaged.write_text("seed: 3\n")
    monkeypatch.setattr(run, "packaged_config_path", lambda package, name: packaged)
    monkeypatch.chdir(tmp_path)
    return run


def _setup(run_mod, *argv: str):
    parser = add_common_args(argparse.ArgumentParser())
    request = run_mod.resolve_run(parser.parse_args(list(argv)), Cfg, "pkg", staged=True)
    with run_mod.start_run(request) as ctx:
        return ctx


def test_resumed_run_skips_finished_stages_and_resumes_the_unfinished(run_mod) -> None:
    calls: list[tuple[str, Path | None]] = []

    def stage_fn(stage):
        calls.append((stage.name, stage.resume))
        if stage.name == "fold2" and len(calls) == 2:
            (stage.dir / "checkpoints").mkdir(parents=True)
            (stage.dir / "checkpoints/latest.pt").write_bytes(b"x")
            raise KeyboardInterrupt  # interrupted inside the second stage
        return {"score": len(stage.name)}

    first = _setup(run_mod, "--seed", "9")
    assert not first.resuming
    assert run_stage(first, "fold1", stage_fn) == {"score": 5}
    with pytest.raises(KeyboardInterrupt):
        run_stage(first, "fold2", stage_fn)
    assert finished_result(first.run_dir, "fold2") is None

    calls.clear()
    again = _setup(run_mod, "--resume", "latest")
    assert again.run_dir == first.run_dir and again.resuming and again.cfg.seed == 9
    results = [run_stage(again, name, stage_fn) for name in ("fold1", "fold2", "cv/fold3")]
    assert results == [{"score": 5}, {"score": 5}, {"score": 8}]
    latest = first.run_dir / "fold2/checkpoints/latest.pt"
    assert calls == [("fold2", latest), ("cv/fold3", None)]  # fold1 skipped
    record = json.loads((first.run_dir / "cv/fold3" / STAGE_FILE).read_text())
    assert record == {"stage": "cv/fold3", "finished": True, "result": {"score": 8}}


def test_resume_path_names_the_run_or_a_checkpoint_inside_it(run_mod, tmp_path: Path) -> None:
    first = _setup(run_mod, "--seed", "5")
    ck = first.run_dir / "phase2/checkpoints/latest.pt"
    ck.parent.mkdir(parents=True)
    ck.write_bytes(b"x")
    for target in (ck, first.run_dir):
        ctx = _setup(run_mod, "--resume", str(target))
        assert ctx.run_dir.resolve() == first.run_dir.resolve() and ctx.cfg.seed == 5
        assert ctx.resuming and ctx.resume is None
    stray = tmp_path / "elsewhere.pt"
    stray.write_bytes(b"x")
    with pytest.raises(UserError, match="not inside a pkg run directory"):
        _setup(run_mod, "--resume", str(stray))


def test_a_rerun_stage_is_unfinished_until_it_returns(run_mod) -> None:
    ctx = _setup(run_mod)
    run_stage(ctx, "phase1", lambda s: {"ok": 1})
    assert finished_result(ctx.run_dir, "phase1") == {"ok": 1}

    def broken(stage):
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        run_stage(ctx, "phase1", broken)  # not resuming: the stage runs again
    assert finished_result(ctx.run_dir, "phase1") is None


def test_resolving_a_run_writes_nothing(run_mod, tmp_path: Path) -> None:
    parser = add_common_args(argparse.ArgumentParser())
    out = tmp_path / "never"
    request = run_mod.resolve_run(parser.parse_args(["--output-dir", str(out)]), Cfg, "pkg")
    assert request.cfg.output_dir == str(out) and not request.resuming
    assert not out.exists()


def test_a_finished_stage_keeps_no_resume_checkpoint(run_mod) -> None:
    """latest.pt (optimizer and RNG states) only resumes a stage; a finished one is skipped."""

    def stage_fn(stage):
        ckpts = stage.dir / "checkpoints"
        ckpts.mkdir(parents=True)
        for name in ("latest.pt", ".latest.pt.spare", "final.pt", "best.pt"):
            (ckpts / name).write_bytes(b"x")
        return {}

    ctx = _setup(run_mod)
    run_stage(ctx, "fold0", stage_fn)
    finish_releasing()
    assert sorted(p.name for p in (ctx.run_dir / "fold0/checkpoints").iterdir()) == [
        "best.pt",
        "final.pt",
    ]
