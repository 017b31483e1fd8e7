"""An override changes exactly what it names (issue 24): every key of every section of every
packaged config, ``--epochs``, ``--smoke`` and the READMEs' own ``--set`` examples."""

from pathlib import Path

import pytest

from ctretrieval.cli import train
from ctretrieval.config import CTRetrievalConfig
from ctretrieval.train import SMOKE_DEMO_OVERRIDES
from medcore.cli.run_setup import SMOKE_OVERRIDES, load_run_config
from medcore.testing import (
    assert_epochs_set_only,
    assert_overrides_change_only_their_key,
    assert_readme_set_examples,
    assert_smoke_changes_only,
    config_diff,
    dry_run_config,
    package_readme_set_examples,
    packaged_configs,
)

PACKAGE = "ctretrieval"
CONFIGS = packaged_configs(PACKAGE)
# Proximity300x300 takes exactly 300 slices of 300 x 300 (ModelConfig refuses anything else):
# its name and its sizes change together or not at all.
ALONE_INVALID = {
    "default": ["model.name"],
    "microf1": ["model.name"],
    "triplet": ["model.num_slices", "model.image_size"],
}


def resolver(name: str):
    """What ``ctretrieval-train --config NAME ARGV`` resolves (the train command's own smoke list)."""

    def resolve(argv: list[str]) -> CTRetrievalConfig:
        args = train.parse_args(["--config", name, *argv])
        return load_run_config(args, CTRetrievalConfig, PACKAGE, "default", SMOKE_DEMO_OVERRIDES)

    return resolve


def test_every_packaged_config_is_covered() -> None:
    assert CONFIGS == ["default", "microf1", "triplet"]


@pytest.mark.parametrize("name", CONFIGS)
def test_each_override_changes_only_its_key(name: str) -> None:
    checked = assert_overrides_change_only_their_key(resolver(name), ALONE_INVALID[name])
    assert len(checked) > 70


@pytest.mark.parametrize("name", CONFIGS)
def test_epochs_sets_only_the_epochs(name: str, tmp_path: Path) -> None:
    changed = assert_epochs_set_only(resolver(name), CTRetrievalConfig.epochs_keys, 3)
    assert changed == ["trainer.epochs"]
    # End to end: the config.yaml a dry run writes differs in those keys only.
    base = dry_run_config(train, ["--config", name], tmp_path / "base")
    three = dry_run_config(train, ["--config", name, "--epochs", "3"], tmp_path / "three")
    assert sorted(config_diff(base, three)) == changed


@pytest.mark.parametrize("name", CONFIGS)
def test_smoke_keeps_the_research_structure(name: str) -> None:
    items = [
        *(f"{key}=1" for key in CTRetrievalConfig.epochs_keys),
        *SMOKE_OVERRIDES,
        *SMOKE_DEMO_OVERRIDES,
    ]
    changed = assert_smoke_changes_only(resolver(name), items)
    assert changed["trainer.epochs"] == 1 and changed["model.num_slices"] == 6


@pytest.mark.parametrize("name", CONFIGS)
def test_readme_set_examples_change_only_what_they_name(name: str) -> None:
    examples = package_readme_set_examples(Path(__file__).parents[1], PACKAGE)
    assert {"loss.mining=semihard", "eval.ks=[1,5,10]"} <= set(examples)
    assert_readme_set_examples(resolver(name), examples)
