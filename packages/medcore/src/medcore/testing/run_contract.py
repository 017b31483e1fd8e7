"""The run contract every ``<pkg>-train`` keeps, as one test suite each package runs on its own
command and demo data.

A package subclasses :class:`RunContract` in ``tests/test_run_contract.py``: a :class:`RunSpec`
says how to run its command on tiny data, and a class-scoped ``data_dir`` fixture gives the data::

    class TestRunContract(RunContract):
        spec = RunSpec(entry="pkg.cli:train", kind="pkg.Model", argv=tiny_argv, poison=nan_in)

        @pytest.fixture(scope="class")
        def data_dir(self, tiny_data: Path) -> Path:
            return tiny_data

Every case uses the public command contract only: the console script's ``main(argv)`` (or the
script in a subprocess), files on disk, exit codes and stderr lines. The cases:

- ``kill -9`` in the middle of an epoch; a second job into the same run refused while the first
  one runs; ``--resume latest`` (the newest run under ``runs/<package>/``) then ends with the
  files of an uninterrupted run, bit for bit, and finished stages are not run again;
- a checkpoint write that fails (the disk full) is one ``error:`` line, exit 2, and the
  previous checkpoint stays whole;
- a checkpoint that would run code (pickled objects) or belongs to another package is refused
  by every command that reads one, before anything is written;
- a broken data directory is one ``error:`` line, exit 2, and leaves no run directory;
- ``--resume latest`` with no run to continue, or with a broken ``config.yaml``, is one line;
- a NaN batch is skipped with a warning and training goes on; NaN in every step stops the run
  with one line, keeping the last good checkpoint.

All cases are marked ``faults``. One uninterrupted run per class (``reference``) serves as the
run to compare with and as the source of a run's ``config.yaml``.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from medcore.testing import (
    PauseAt,
    assert_refused_while_running,
    call_main,
    checkpoint_differences,
    disk_full_on,
    error_line,
    wait_until,
    write_unsafe_checkpoint,
)
from medcore.weights.checkpoint import load_checkpoint, save_checkpoint

Main = Callable[[list[str]], int]


@dataclass(frozen=True)
class Where:
    """What a case's command line is built from: the data, the uninterrupted run, and the
    case's own directories (``run``: a run directory, ``out``: any other output), all unmade."""

    data: Path
    reference: Path
    run: Path
    out: Path
    tmp: Path
    spec: RunSpec

    def train_argv(self, data: Path | None = None) -> list[str]:
        """The tiny run's command line into ``run`` (on ``data``, by default the good data)."""
        return self.spec.argv(self.data if data is None else data, self.run)


@dataclass(frozen=True)
class CheckpointUse:
    """A command that reads a checkpoint the user names.

    ``argv(checkpoint, where)``: its command line. ``command``: its console script
    (``"module:function"``; by default the train command). ``in_run``: the checkpoint is the
    ``latest.pt`` of the stage in a run directory ``where.run`` (made with the uninterrupted
    run's config). ``foreign``: a checkpoint of another package is refused too (a weights file
    of another kind may be a plain state dict the command inspects by its keys instead).
    """

    argv: Callable[[Path, Where], list[str]]
    command: str | None = None
    in_run: bool = False
    foreign: bool = True


# What every train command reads a checkpoint from.
TRAIN_CHECKPOINT_USES: dict[str, CheckpointUse] = {
    "train --resume latest": CheckpointUse(
        lambda ckpt, w: ["--resume", "latest", "--output-dir", str(w.run)], in_run=True
    ),
    "train --resume PATH": CheckpointUse(lambda ckpt, w: ["--resume", str(ckpt)], in_run=True),
    "train --pretrained-weights": CheckpointUse(
        lambda ckpt, w: [*w.train_argv(), "--pretrained-weights", str(ckpt)], foreign=False
    ),
}

# Broken data directories every package refuses alike: (make the data path, the error says).
DataError = tuple[Callable[[Path, Path], Path], str]
COMMON_DATA_ERRORS: dict[str, DataError] = {
    "data_dir_missing": (lambda good, root: root / "nowhere", "data directory not found"),
}


@dataclass(frozen=True)
class RunSpec:
    """How a package's train command runs a tiny job, for :class:`RunContract`.

    ``entry``: the train console script's ``"module:function"``. ``kind``: the kind its
    checkpoints carry. ``argv(data_dir, output_dir)``: the command line of a tiny run whose
    stage ``stage`` trains 2 epochs of 2 steps, saving ``latest.pt`` at epoch ends only
    (``--set`` items the cases add go after it). ``poison(monkeypatch, steps)``: make the
    training steps whose number (from 1, counted over the process) ``steps`` accepts see NaN
    inputs.

    ``stage``: the sub-directory of the run that trains (``"."``: the run directory itself).
    ``kill_stage``: the stage killed in its first epoch (its epochs have 2 steps or more);
    ``finished_before``: the stages finished by then. ``compare``: the files (relative to the
    run) that must be the same after a kill and ``--resume latest`` as in the uninterrupted
    run. ``outputs``: what only a finished run writes (relative to the run). ``summary``: text
    a finished run prints. ``nan_notice``: a stderr line a NaN batch is named by (once).

    ``checkpoint_uses``: the package's commands that read a checkpoint, besides
    :data:`TRAIN_CHECKPOINT_USES`. ``data_errors``: broken data directories ``make(good_data,
    root) -> data_dir`` (``root`` not yet made) and what the error line says, besides
    :data:`COMMON_DATA_ERRORS`.
    """

    entry: str
    kind: str
    argv: Callable[[Path, Path], list[str]]
    poison: Callable[[pytest.MonkeyPatch, Callable[[int], bool]], None]
    stage: str = "."
    kill_stage: str | None = None
    finished_before: tuple[str, ...] = ()
    compare: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    summary: str = ""
    nan_notice: str | None = None
    checkpoint_uses: Mapping[str, CheckpointUse] = field(default_factory=dict)
    data_errors: Mapping[str, DataError] = field(default_factory=dict)

    @property
    def package(self) -> str:
        return self.entry.split(".")[0]

    @property
    def train(self) -> Main:
        module, function = self.entry.split(":")
        return getattr(import_module(module), function)

    def command(self, entry: str | None) -> Main:
        module, function = (entry or self.entry).split(":")
        return getattr(import_module(module), function)

    def checkpoints(self, run: Path, stage: str | None = None) -> Path:
        return run / (stage or self.stage) / "checkpoints"

    def uses(self) -> dict[str, CheckpointUse]:
        return {**TRAIN_CHECKPOINT_USES, **self.checkpoint_uses}


def pause_after_write(path: str | Path, n: int, marker: str | Path) -> None:
    """Make this process pause right after the ``n``-th atomic write of ``path`` lands (the
    ``os.replace`` of a temporary file onto it: a checkpoint saved), writing its PID to
    ``marker`` first, so that a test can kill it there (``kill -9``) knowing what is on disk."""
    real = os.replace
    target = os.path.abspath(path)
    pause = PauseAt(marker, n)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        real(src, dst, **kwargs)
        if os.path.abspath(dst) == target:
            pause()

    os.replace = replace


def paused_command(
    entry: str, path: str | Path, n: int, marker: str | Path, argv: list[str]
) -> list[str]:
    """The command line that runs ``entry`` (a console script's ``"module:function"``) with
    ``argv`` under :func:`pause_after_write`: a fault test's victim process."""
    module, function = entry.split(":")
    code = (
        "import sys; from medcore.testing.run_contract import pause_after_write; "
        f"pause_after_write({str(path)!r}, {int(n)}, {str(marker)!r}); "
        f"from {module} import {function}; sys.exit({function}(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *argv]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# Makes latest.pt after every step, not only at epoch ends (the default saves at most every 30 s).
EVERY_STEP = "trainer.save_every_steps=1"
EVERY_EPOCH = "trainer.save_interval_s=0"


def _run_quietly(main: Main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time: what a command wrote."""
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in root.rglob("*")
    }


def _changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """The paths a command made, changed or removed, given :func:`_tree` before and after."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def _stale_lock(run: Path) -> bool:
    """Whether ``run`` holds a lock of another process once a command returned (its own lock
    may live until this process exits, as :func:`~medcore.cli.run_setup.start_run`'s does)."""
    lock = run / ".lock"
    return lock.exists() and lock.read_text().strip() != str(os.getpid())


def _float_tensors(obj: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _float_tensors(v, f"{where}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _float_tensors(v, f"{where}/{i}")


def non_finite(state: Any) -> list[str]:
    """Where a checkpoint (weights, buffers, optimizer state, anything) holds NaN or inf."""
    return [where for where, t in _float_tensors(state) if not bool(torch.isfinite(t).all())]


def _same_file(a: Path, b: Path) -> list[str]:
    """Where two finished runs' files differ: a checkpoint's weights and step bit for bit, any
    other file byte for byte."""
    if a.suffix not in (".pt", ".pth"):
        return [] if a.read_bytes() == b.read_bytes() else [str(a.name)]
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    keys = [k for k in ("model", "global_step", "knn", "gallery") if k in sa or k in sb]
    return [d for k in keys for d in checkpoint_differences(sa.get(k), sb.get(k), f"{a.name}/{k}")]


class RunContract:
    """The run-contract cases; a package's subclass sets ``spec`` and the ``data_dir`` fixture."""

    spec: RunSpec

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        spec = self.spec
        if "checkpoint_use" in metafunc.fixturenames:
            rows = [
                (name, content)
                for name, use in spec.uses().items()
                for content in ("pickle", "foreign")
                if content == "pickle" or use.foreign
            ]
            metafunc.parametrize(
                ("checkpoint_use", "content"), rows, ids=[f"{n}: {c}" for n, c in rows]
            )
        if "data_error" in metafunc.fixturenames:
            metafunc.parametrize("data_error", [*COMMON_DATA_ERRORS, *spec.data_errors])

    @pytest.fixture(autouse=True)
    def _isolated(
        self,
        tmp_path_factory: pytest.TempPathFactory,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> Iterator[None]:
        monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        monkeypatch.chdir(tmp_path)  # a default runs/ folder lands here, where a case sees it
        threads = torch.get_num_threads()
        yield
        torch.set_num_threads(threads)  # a run sets its num_threads; others keep theirs

    @pytest.fixture(scope="class")
    def reference(self, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """An uninterrupted tiny run: what the cases compare with."""
        run = tmp_path_factory.mktemp("uninterrupted") / "run"
        threads = torch.get_num_threads()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
            code, out, err = _run_quietly(self.spec.train, self.spec.argv(data_dir, run))
        torch.set_num_threads(threads)
        assert code == 0, err
        assert self.spec.summary in out, out
        return run

    def _where(self, data_dir: Path, reference: Path, tmp_path: Path) -> Where:
        return Where(data_dir, reference, tmp_path / "run", tmp_path / "out", tmp_path, self.spec)

    def _run_like_reference(self, reference: Path, run: Path) -> None:
        """``run``: a run directory with the uninterrupted run's config and nothing else."""
        cfg = yaml.safe_load((reference / "config.yaml").read_text(encoding="utf-8"))
        cfg["output_dir"] = str(run)
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")

    # -- kill -9, a second job refused, --resume latest --------------------------------------

    @pytest.mark.faults
    def test_kill_9_mid_epoch_second_job_refused_then_resume_latest(
        self, data_dir: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
    ) -> None:
        spec = self.spec
        stage = spec.kill_stage or spec.stage
        run = tmp_path / "runs" / spec.package / "killed"
        latest = spec.checkpoints(run, stage) / "latest.pt"
        argv = [*spec.argv(data_dir, run), *_sets(EVERY_STEP)]
        marker, log = tmp_path / "paused", tmp_path / "victim.err"
        # Paused once the stage's first step is saved: killed in the middle of its first epoch.
        with log.open("w") as err_file:
            victim = subprocess.Popen(
                paused_command(spec.entry, latest, 1, marker, argv),
                stdout=subprocess.DEVNULL,
                stderr=err_file,
            )
        try:
            wait_until(marker.exists, victim, log)
            # a second job into the running job's directory is refused and changes nothing
            config = (run / "config.yaml").read_bytes()
            code, _, err = call_main(spec.train, [*argv, "--seed", "7"], capsys)
            assert_refused_while_running(code, err, run, victim.pid)
            assert (run / "config.yaml").read_bytes() == config
        finally:
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
        state = load_checkpoint(latest, kind=spec.kind)  # whole, though killed after writing it
        assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (0, 1, 1)
        assert not (latest.parent / "final.pt").exists()
        assert (run / ".lock").is_file()  # left by the killed job; the resumed run takes it over
        finished = {s: _tree(run / s) for s in spec.finished_before}
        assert all((run / s / "stage.json").is_file() for s in finished)

        # `--resume latest` alone: the newest run under runs/<package>/, with its own config.
        code, out, err = call_main(spec.train, ["--resume", "latest"], capsys)
        assert code == 0, err
        assert spec.summary in out, out
        assert not _stale_lock(run)  # the killed job's lock was taken over
        assert {s: _tree(run / s) for s in finished} == finished  # not run again
        compare = spec.compare or (f"{spec.stage}/checkpoints/final.pt",)
        assert [d for rel in compare for d in _same_file(reference / rel, run / rel)] == []

    # -- a checkpoint write that fails --------------------------------------------------------

    @pytest.mark.faults
    def test_failed_checkpoint_write_keeps_previous(
        self, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
    ) -> None:
        spec = self.spec
        run = tmp_path / "run"
        with disk_full_on("latest.pt", nth=2):  # the second step's save: the disk is full
            code, _, err = call_main(
                spec.train, [*spec.argv(data_dir, run), *_sets(EVERY_STEP)], capsys
            )
        assert code == 2, err
        ckpts = spec.checkpoints(run)
        line = error_line(err)
        assert "No space left on device" in line and str(ckpts / "latest.pt") in line
        state = load_checkpoint(ckpts / "latest.pt", kind=spec.kind)
        assert state["global_step"] == 1 and non_finite(state) == []  # step 1's, whole
        names = [p.name for p in ckpts.iterdir()]
        assert "final.pt" not in names and not [n for n in names if n.startswith(".")], names
        assert not [rel for rel in spec.outputs if (run / rel).exists()]
        assert not (run / spec.stage / "stage.json").exists() and not _stale_lock(run)

    # -- checkpoints that would run code, checkpoints of another package ---------------------

    @pytest.mark.faults
    def test_unsafe_or_foreign_checkpoint_is_refused(
        self,
        checkpoint_use: str,
        content: str,
        data_dir: Path,
        reference: Path,
        tmp_path: Path,
        capsys: pytest.CaptureFixture,
    ) -> None:
        spec = self.spec
        use = spec.uses()[checkpoint_use]
        where = self._where(data_dir, reference, tmp_path)
        marker = tmp_path / "code_ran"
        if use.in_run:
            self._run_like_reference(reference, where.run)
            ckpt = spec.checkpoints(where.run) / "latest.pt"
        else:
            ckpt = tmp_path / "model.pt"
        foreign = "ctretrieval.Proximity100x100" if spec.package == "ctclip" else "ctclip.CTCLIP"
        if content == "pickle":
            write_unsafe_checkpoint(ckpt, marker, kind=spec.kind)
        else:
            save_checkpoint({"model": {"w": torch.zeros(2)}}, ckpt, kind=foreign)
        argv = use.argv(ckpt, where)
        before = _tree(tmp_path)
        code, _, err = call_main(spec.command(use.command), argv, capsys)
        assert code == 2, err
        line = error_line(err)
        assert str(ckpt) in line, line
        changed = _changes(before, _tree(tmp_path))
        # The code never ran and nothing was written: a train command may have set up the run
        # it resumes (its lock, config and splits) before reading the checkpoint, nothing more.
        if use.in_run:
            changed = [p for p in changed if p != "run" and p.rpartition("/")[0] != "run"]
        assert changed == [], changed
        assert not _stale_lock(where.run)
        if content == "foreign":
            assert f"{foreign} checkpoint, not {spec.package}" in line, line
            return
        assert "refused: contains pickled objects that could run code" in line, line
        torch.load(ckpt, weights_only=False)  # and the payload is real: an unsafe load runs it
        assert marker.is_dir()

    # -- broken data directories, nothing to resume -------------------------------------------

    @pytest.mark.faults
    def test_broken_data_dir_is_one_line_error(
        self, data_error: str, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
    ) -> None:
        make, expected = {**COMMON_DATA_ERRORS, **self.spec.data_errors}[data_error]
        data = make(data_dir, tmp_path / "data")
        run = tmp_path / "run"
        code, _, err = call_main(self.spec.train, self.spec.argv(data, run), capsys)
        assert code == 2, err
        assert expected in error_line(err)
        assert not run.exists()  # refused before the run directory is made, or it is undone

    @pytest.mark.faults
    @pytest.mark.parametrize(
        "case", ["no run under runs/", "empty output dir", "broken config.yaml", "unknown key"]
    )
    def test_resume_latest_without_a_run_is_one_line_error(
        self, case: str, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
    ) -> None:
        spec = self.spec
        run = tmp_path / "run"
        argv = ["--resume", "latest", "--output-dir", str(run)]
        if case == "no run under runs/":
            argv = argv[:2]
        elif case == "empty output dir":
            run.mkdir()
        else:  # a run with a checkpoint to continue from, and a config.yaml that cannot be read
            self._run_like_reference(reference, run)
            latest = spec.checkpoints(run) / "latest.pt"
            latest.parent.mkdir(parents=True)
            latest.write_bytes((spec.checkpoints(reference) / "final.pt").read_bytes())
            config = run / "config.yaml"
            text = config.read_text(encoding="utf-8")
            broken = "data: [unclosed\n" if case == "broken config.yaml" else f"{text}nope: 1\n"
            config.write_text(broken, encoding="utf-8")
        before = _tree(tmp_path)
        code, _, err = call_main(spec.train, argv, capsys)
        assert code == 2, err
        line = error_line(err)
        if case == "no run under runs/":
            assert line.startswith("error: --resume latest: no earlier run"), line
            assert f"runs/{spec.package}/" in line
        elif case == "empty output dir":
            assert line.startswith("error: --resume latest: no ") and str(run) in line, line
        elif case == "broken config.yaml":
            assert "config.yaml" in line, line
        else:
            assert "nope" in line, line
        assert _changes(before, _tree(tmp_path)) == []

    # -- NaN batches ----------------------------------------------------------------------------

    @pytest.mark.faults
    def test_nan_batch_is_skipped_with_a_warning(
        self,
        data_dir: Path,
        reference: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture,
    ) -> None:
        spec = self.spec
        spec.poison(monkeypatch, lambda step: step == 2)
        run = tmp_path / "run"
        with pytest.warns(RuntimeWarning, match="non-finite loss at step 1; step skipped"):
            code, _, err = call_main(spec.train, spec.argv(data_dir, run), capsys)
        assert code == 0, err
        if spec.nan_notice is not None:
            assert err.count(spec.nan_notice) == 1, err
        log = (run / spec.stage / "metrics.jsonl").read_text(encoding="utf-8")
        assert log.count('"event": "nonfinite_loss"') == 1, log
        final = load_checkpoint(spec.checkpoints(run) / "final.pt", kind=spec.kind)
        full = load_checkpoint(spec.checkpoints(reference) / "final.pt", kind=spec.kind)
        assert final["global_step"] == full["global_step"] - 1  # one step skipped, others taken
        # BatchNorm statistics and optimizer state included, in every checkpoint of the run
        saved = [p for p in run.rglob("*") if p.suffix in (".pt", ".pth")]
        assert saved and {p.name: non_finite(load_checkpoint(p)) for p in saved} == {
            p.name: [] for p in saved
        }

    @pytest.mark.faults
    def test_nan_every_step_stops_cleanly_keeping_the_last_good_checkpoint(
        self,
        data_dir: Path,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture,
    ) -> None:
        spec = self.spec
        spec.poison(monkeypatch, lambda step: step > 2)  # the first epoch is fine, then NaN only
        run = tmp_path / "run"
        argv = [*spec.argv(data_dir, run), *_sets("trainer.max_nonfinite_steps=2", EVERY_EPOCH)]
        with pytest.warns(RuntimeWarning, match="non-finite loss"):
            code, _, err = call_main(spec.train, argv, capsys)
        assert code == 2, err
        line = error_line(err)
        latest = spec.checkpoints(run) / "latest.pt"
        assert "NaN/inf for 2 consecutive steps" in line and str(latest) in line, line
        state = load_checkpoint(latest, kind=spec.kind)
        assert (state["epoch"], state["global_step"]) == (1, 2) and non_finite(state) == []
        saved = [p for p in run.rglob("*") if p.suffix in (".pt", ".pth")]
        assert {p.name: non_finite(load_checkpoint(p)) for p in saved} == {
            p.name: [] for p in saved
        }
        assert not (latest.parent / "final.pt").exists()
        assert not [rel for rel in spec.outputs if (run / rel).exists()]
        assert not (run / spec.stage / "stage.json").exists() and not _stale_lock(run)
