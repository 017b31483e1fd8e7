"""An override changes exactly what it names (issue 24): every key of every section of every
packaged config, ``--epochs`` (every phase's), ``--smoke`` (every phase runs, each a few steps,
the 4-phase chain intact) and the READMEs' own ``--set`` examples."""

import json
from pathlib import Path

import pytest

from cxrlandmarks.cli import train
from cxrlandmarks.config import PHASES, CxrConfig
from cxrlandmarks.train import SMOKE
from medcore.cli.run_setup import SMOKE_OVERRIDES, load_run_config
from medcore.testing import (
    assert_epochs_set_only,
    assert_overrides_change_only_their_key,
    assert_readme_set_examples,
    assert_smoke_changes_only,
    call_main,
    config_diff,
    dry_run_config,
    error_line,
    package_readme_set_examples,
    packaged_configs,
)
from medcore.weights.checkpoint import load_checkpoint

PACKAGE = "cxrlandmarks"
CONFIGS = packaged_configs(PACKAGE)
EPOCHS = [f"phases.{p}.epochs" for p in PHASES]
CHAIN = [  # (phase, loss, frozen trunk, best checkpoint, starts from)
    ("phase1", "wing", True, "phase1_best.pt", None),
    ("phase2", "wing", False, "phase2_best.pt", "phase1"),
    ("phase3", "symmetry", False, "geometric_symmetry.pt", "phase2"),
    ("phase4", "complete", False, "geometric_complete.pt", "phase3"),
]


def resolver(name: str):
    """What ``cxrlandmarks-train --config NAME ARGV`` resolves (the train command's smoke list)."""

    def resolve(argv: list[str]) -> CxrConfig:
        args = train.parse_args(["--config", name, *argv])
        return load_run_config(args, CxrConfig, PACKAGE, "default", SMOKE)

    return resolve


def chain(cfg: CxrConfig) -> list[tuple]:
    phases = [(p, getattr(cfg.phases, p)) for p in PHASES]
    return [(p, x.loss, x.freeze_trunk, x.checkpoint, x.init_from) for p, x in phases]


def test_every_packaged_config_is_covered() -> None:
    assert CONFIGS == ["default", "paper"]
    assert CxrConfig.epochs_keys == tuple(EPOCHS)


@pytest.mark.parametrize("name", CONFIGS)
def test_each_override_changes_only_its_key(name: str) -> None:
    # trainer.epochs is the one key no value of which is taken: the phases have their own.
    checked = assert_overrides_change_only_their_key(resolver(name), ["trainer.epochs"])
    assert len(checked) > 90 and "phases.phase3.loss" in checked


def test_phase_overrides_keep_the_chain() -> None:
    """The issue's own cases: one phase's epochs, --epochs, and both on top of a YAML layer."""
    resolve = resolver("paper")
    cfg = resolve(["--set", "phases.phase3.epochs=7", "--epochs", "3"])
    assert chain(cfg) == CHAIN and [getattr(cfg.phases, p).epochs for p in PHASES] == [3] * 4
    cfg = resolve(["--set", "phases.phase2.epochs=30"])
    assert chain(cfg) == CHAIN
    assert [getattr(cfg.phases, p).epochs for p in PHASES] == [15, 30, 50, 40]


@pytest.mark.parametrize("name", CONFIGS)
def test_epochs_sets_every_phase_and_nothing_else(name: str, tmp_path: Path) -> None:
    changed = assert_epochs_set_only(resolver(name), EPOCHS, 3)
    assert changed == EPOCHS
    # End to end: the config.yaml a dry run writes differs in those keys only.
    base = dry_run_config(train, ["--config", name], tmp_path / "base")
    three = dry_run_config(train, ["--config", name, "--epochs", "3"], tmp_path / "three")
    assert sorted(config_diff(base, three)) == changed


def test_a_changed_trainer_epochs_is_refused(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    argv = ["--config", "paper", "--dry-run", "--output-dir", str(run)]
    code, _, err = call_main(train, [*argv, "--set", "trainer.epochs=5"], capsys)
    assert code == 2 and not run.exists()
    assert error_line(err) == (
        "error: trainer.epochs: not used here: the epochs are phases.phase1.epochs, "
        "phases.phase2.epochs, phases.phase3.epochs, phases.phase4.epochs; --epochs N sets "
        "them all, --set phases.phase1.epochs=N one"
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_keeps_the_four_phase_chain(name: str) -> None:
    items = [*(f"{key}=1" for key in EPOCHS), *SMOKE_OVERRIDES, *SMOKE]
    changed = assert_smoke_changes_only(resolver(name), items)
    cfg = resolver(name)(["--smoke"])
    assert chain(cfg) == CHAIN == chain(resolver(name)([]))
    for p in PHASES:
        assert (getattr(cfg.phases, p).epochs, getattr(cfg.phases, p).max_steps_per_epoch) == (1, 2)
    assert changed["data.demo_images_per_category"] == 20


@pytest.mark.slow
def test_paper_smoke_runs_every_phase_of_the_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``--config paper --smoke``: four phases, their own losses, trunk frozen in phase 1 only,
    each starting from the previous phase's best checkpoint; four different result rows."""
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    argv = ["--config", "paper", "--smoke", "--from-scratch", "--device", "cpu"]
    argv += ["--set", "data.image_size=32", "--output-dir", str(run)]  # size only: 32 px
    code, out, err = call_main(train, argv, capsys)
    assert code == 0, err
    for phase, loss, frozen, checkpoint, init_from in CHAIN:
        trunk = "frozen" if frozen else "2e-05"
        assert f"[{phase}] loss={loss} epochs=1 trunk_lr={trunk} head_lr=0.0002" in out
        state = load_checkpoint(run / "checkpoints" / checkpoint)
        assert (state["phase"], state["loss"], state["global_step"]) == (phase, loss, 2)
        previous = dict((p, c) for p, _, _, c, _ in CHAIN).get(init_from)
        expected = str((run / "checkpoints" / previous).resolve()) if previous else None
        assert state["init_from"] == expected
    rows = json.loads((run / "eval" / "phase_comparison.json").read_text())
    assert [r["model"] for r in rows] == [f"{p} ({c})" for p, _, _, c, _ in CHAIN]
    assert len({r["mean_px"] for r in rows}) == 4


@pytest.mark.parametrize("name", CONFIGS)
def test_readme_set_examples_change_only_what_they_name(name: str) -> None:
    examples = package_readme_set_examples(Path(__file__).parents[1], PACKAGE)
    assert {"phases.phase2.epochs=30", "data.split_ratios.train=0.8"} <= set(examples)
    assert_readme_set_examples(resolver(name), examples)
