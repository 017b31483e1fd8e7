"""What a run leaves on disk: result files with the permissions of a plain ``open()`` under the
user's umask, ``--epochs`` / ``--smoke`` on a config whose epochs are its phases', and nothing at
all from a run refused before its first checkpoint."""

import argparse
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from medcore.cli.flags import add_common_args
from medcore.config import RunConfig, TrainerConfig, save_config
from medcore.data.splits import save_splits
from medcore.errors import ConfigError, DataError, TrainingDiverged
from medcore.io import atomic_write_csv, atomic_write_json, atomic_write_text
from medcore.report.plots import plot_training_curves
from medcore.weights.checkpoint import copy_checkpoint, export_safetensors, save_checkpoint


@dataclass
class Data:
    data_dir: str | None = None


@dataclass
class Model:
    pretrained_weights: str | None = None


@dataclass
class Phase:
    loss: str = "wing"
    epochs: int = 15
    checkpoint: str = "phase1_best.pt"


@dataclass
class Phases:
    one: Phase = field(default_factory=lambda: Phase("wing", 15, "one.pt"))
    two: Phase = field(default_factory=lambda: Phase("symmetry", 50, "two.pt"))


@dataclass
class Cfg(RunConfig):
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)


@dataclass
class PhasedCfg(Cfg):
    epochs_keys: ClassVar[tuple[str, ...]] = ("phases.one.epochs", "phases.two.epochs")

    phases: Phases = field(default_factory=Phases)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(grad_clip=5.0))


@pytest.fixture
def run_mod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``medcore.cli.run_setup`` with an empty packaged default config, working in ``tmp_path``."""
    from medcore.cli import run_setup as run

    packaged = tmp_path / "default.yaml"
    packaged.write_text("{}\n")
    monkeypatch.setattr(run, "packaged_config_path", lambda package, name: packaged)
    monkeypatch.chdir(tmp_path)
    return run


def parse(*argv: str) -> argparse.Namespace:
    return add_common_args(argparse.ArgumentParser()).parse_args(list(argv))


# -- umask -----------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_written_files_honour_the_umask(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask  # what open() gives a new file: 0644 under 022, 0640 under 027
    model = torch.nn.Linear(2, 2)
    written = [
        atomic_write_text(tmp_path / "notes.txt", "x"),
        atomic_write_json(tmp_path / "result.json", {"auc": 0.9}),
        atomic_write_csv(tmp_path / "predictions.csv", pd.DataFrame({"id": [1], "p": [0.5]})),
        save_config(Cfg(), tmp_path / "config.yaml"),
        save_checkpoint({"model": model.state_dict()}, tmp_path / "ckpt" / "latest.pt"),
        copy_checkpoint(tmp_path / "ckpt" / "latest.pt", tmp_path / "best.pt"),
        export_safetensors(model.state_dict(), tmp_path / "model.safetensors"),
        plot_training_curves([{"epoch": 1, "val/loss": 1.0}], ["val/loss"], tmp_path / "c.png"),
    ]
    save_splits(tmp_path / "splits.json", {"train": np.arange(3), "val": np.arange(3, 5)})
    written.append(tmp_path / "splits.json")
    atomic_write_text(tmp_path / "notes.txt", "rewritten")  # replacing keeps the mode too
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert modes == {p.name: oct(expected) for p in written}
    assert not [p for p in tmp_path.rglob(".*") if p.suffix == ".tmp"]


# -- --epochs and --smoke --------------------------------------------------------------------


def test_epochs_sets_every_phase_and_a_changed_trainer_epochs_is_refused(run_mod) -> None:
    declared = run_mod.load_run_config(parse(), PhasedCfg, "pkg")
    cfg = run_mod.load_run_config(parse("--epochs", "3"), PhasedCfg, "pkg")
    assert (cfg.phases.one.epochs, cfg.phases.two.epochs) == (3, 3)
    assert cfg.phases.two == Phase("symmetry", 3, "two.pt") and cfg.trainer == declared.trainer
    smoke = run_mod.load_run_config(parse("--smoke"), PhasedCfg, "pkg")
    assert (smoke.phases.one.epochs, smoke.phases.two.epochs) == (1, 1)
    assert smoke.phases.two.loss == "symmetry" and smoke.trainer.grad_clip == 5.0
    assert (smoke.trainer.max_steps_per_epoch, smoke.trainer.epochs) == (2, 10)
    with pytest.raises(ConfigError) as info:
        run_mod.load_run_config(parse("--set", "trainer.epochs=5"), PhasedCfg, "pkg")
    assert str(info.value) == (
        "trainer.epochs: not used here: the epochs are phases.one.epochs, phases.two.epochs; "
        "--epochs N sets them all, --set phases.one.epochs=N one"
    )
    # a config file that sets it is refused too; a saved run config (the declared value) is not
    Path("mine.yaml").write_text("trainer: {epochs: 4}\n")
    with pytest.raises(ConfigError, match=r"trainer\.epochs: not used here"):
        run_mod.load_run_config(parse("--config", "mine.yaml"), PhasedCfg, "pkg")
    save_config(cfg, "saved.yaml")
    assert run_mod.load_run_config(parse("--config", "saved.yaml"), PhasedCfg, "pkg") == cfg
    # a one-training config: --epochs is trainer.epochs, the rest of the section untouched
    one = run_mod.load_run_config(parse("--epochs", "3", "--smoke"), Cfg, "pkg")
    assert (one.trainer.epochs, one.trainer.max_steps_per_epoch) == (3, 2)


# -- a refused run leaves nothing ------------------------------------------------------------


def refused_run(run_mod, argv: list[str], error: Exception, write=None) -> None:
    """Start a run with ``argv``, write what ``write(run_dir)`` writes, then fail with
    ``error``."""
    request = run_mod.resolve_run(parse(*argv), Cfg, "pkg")
    with pytest.raises(type(error)), run_mod.start_run(request) as ctx:
        (ctx.run_dir / "splits.json").write_text("{}")
        if write is not None:
            write(ctx.run_dir)
        raise error


def test_a_refused_new_run_directory_is_removed_with_the_parents_it_made(run_mod) -> None:
    refused_run(run_mod, ["--output-dir", "out/a/run"], DataError("data", "broken"))
    assert not Path("out").exists()
    # the default run directory: runs/pkg/<stamp> goes, a sibling run made meanwhile stays
    sibling = Path("runs/pkg/other/keep.txt")
    refused_run(
        run_mod,
        [],
        ConfigError("model.x", "bad"),
        write=lambda _: (sibling.parent.mkdir(parents=True), sibling.write_text("mine")),
    )
    assert sorted(p.name for p in Path("runs/pkg").iterdir()) == ["other"]


def test_a_refused_run_leaves_a_users_directory_as_it_was(run_mod) -> None:
    Path("empty").mkdir()
    refused_run(run_mod, ["--output-dir", "empty"], DataError("w.pt", "another architecture"))
    assert Path("empty").is_dir() and not list(Path("empty").iterdir())
    Path("full/notes").mkdir(parents=True)
    Path("full/notes/a.txt").write_text("mine")
    Path("full/config.yaml.bak").write_text("mine")
    Path("full/weights.pt").write_bytes(b"mine")  # the user's checkpoint is not the run's
    refused_run(run_mod, ["--output-dir", "full"], DataError("data", "broken"))
    assert sorted(p.name for p in Path("full").iterdir()) == [
        "config.yaml.bak",
        "notes",
        "weights.pt",
    ]
    assert Path("full/notes/a.txt").read_text() == "mine"


def test_runs_with_results_and_resumed_runs_are_kept(run_mod) -> None:
    def checkpoint(run_dir: Path) -> None:
        save_checkpoint({"step": 1}, run_dir / "checkpoints" / "latest.pt")

    refused_run(run_mod, ["--output-dir", "a"], DataError("test.csv", "bad"), write=checkpoint)
    assert (Path("a") / "checkpoints" / "latest.pt").is_file()
    refused_run(run_mod, ["--output-dir", "b"], TrainingDiverged("loss", "not finite"))
    assert (Path("b") / "config.yaml").is_file()  # its logs say why it diverged
    # --resume latest continues "a": a refusal there never removes it, nor what it holds
    refused_run(run_mod, ["--resume", "latest", "--output-dir", "a"], DataError("d", "broken"))
    assert (Path("a") / "config.yaml").is_file() and (Path("a") / "splits.json").is_file()
    # an error after the run ended (its block) removes nothing
    with pytest.raises(DataError):
        with run_mod.start_run(run_mod.resolve_run(parse("--output-dir", "c"), Cfg, "pkg")):
            pass
        raise DataError("report", "broken")
    assert yaml.safe_load((Path("c") / "config.yaml").read_text())["output_dir"] == "c"
