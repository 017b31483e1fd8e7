from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from medcore.config import TrainerConfig, load_config, overrides_to_dict, save_config, to_dict
from medcore.errors import ConfigError


@dataclass
class Model:
    name: str = "resnet18"
    depth: int = 2
    dropout: float = 0.1
    pretrained_weights: str | None = None
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    extra: dict[str, Any] = field(default_factory=dict)
    mode: Literal["a", "b"] = "a"
    pool: Literal["avg", "max"] | None = "avg"


@dataclass
class Cfg:
    seed: int = 0
    model: Model = field(default_factory=Model)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def test_yaml_layers_and_overrides_are_typed(tmp_path: Path) -> None:
    base = tmp_path / "a.yaml"
    base.write_text("model:\n  depth: 4\ntrainer:\n  lr: 1e-3\n")
    cfg = load_config(
        Cfg, base, overrides=["model.dropout=0.5", "trainer.epochs=3", "model.sizes=[3,4,5]"]
    )
    assert cfg.model.depth == 4
    assert cfg.trainer.lr == pytest.approx(1e-3)  # "1e-3" is a YAML string; coerced to float
    assert cfg.model.dropout == 0.5 and cfg.trainer.epochs == 3 and cfg.model.sizes == [3, 4, 5]
    assert cfg.model.name == "resnet18"  # untouched default


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.depht=3", "model.depht"),
        ("model.depth=abc", "expected an integer"),
        ("trainer.amp=maybe", "expected true or false"),
        ("trainer.scheduler=linear", "expected one of"),
        ("nonsense", "expected key.sub=value"),
    ],
)
def test_bad_overrides_are_named(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Cfg, overrides=[override])
    assert fragment in str(info.value)


def test_unknown_key_in_yaml_lists_valid_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(Cfg, path)
    assert info.value.what == "model.widht" and "depth" in info.value.why


def test_broken_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Cfg, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")


def test_save_round_trip(tmp_path: Path) -> None:
    cfg = load_config(Cfg, overrides=["model.pretrained_weights=/x/w.pt", "seed=7"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(Cfg, tmp_path / "c.yaml")
    assert again == cfg
    assert (
        yaml.safe_load((tmp_path / "c.yaml").read_text())["model"]["pretrained_weights"]
        == "/x/w.pt"
    )
    assert to_dict(cfg)["trainer"]["monitor"] == ["val/loss"]


def test_overrides_nest() -> None:
    assert overrides_to_dict(["a.b=1", "a.c=x", "d=[1, 2]"]) == {
        "a": {"b": 1, "c": "x"},
        "d": [1, 2],
    }


def test_set_empties_a_mapping_and_nulls_an_optional(tmp_path: Path) -> None:
    path = tmp_path / "research.yaml"
    path.write_text("model:\n  extra: {depth: 2, width: 64}\n  pretrained_weights: w.pt\n")
    assert load_config(Cfg, path).model.extra == {"depth": 2, "width": 64}
    cfg = load_config(
        Cfg, path, overrides=["model.extra={}", "model.pretrained_weights=null", "model.pool=null"]
    )
    assert cfg.model.extra == {} and cfg.model.pretrained_weights is None and cfg.model.pool is None
    # a dotted path still merges into the mapping; a whole value replaces it
    cfg = load_config(Cfg, path, overrides=["model.extra.depth=3"])
    assert cfg.model.extra == {"depth": 3, "width": 64}
    cfg = load_config(Cfg, path, overrides=["model.extra={depth: 5}"])
    assert cfg.model.extra == {"depth": 5}
    assert load_config(Cfg, path).model.extra == {"depth": 2, "width": 64}  # file untouched
    with pytest.raises(ConfigError, match=r"model\.depth: expected an integer, got None"):
        load_config(Cfg, overrides=["model.depth=null"])
    with pytest.raises(ConfigError, match=r"model\.extra: expected a mapping"):
        load_config(Cfg, overrides=["model.extra=[]"])
    with pytest.raises(ConfigError, match="depth is a value here, not a section"):
        load_config(Cfg, overrides=["model.depth=2", "model.depth.x=1"])


def test_literal_fields_refuse_other_values_at_load_time(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  mode: c\n")
    with pytest.raises(ConfigError) as info:
        load_config(Cfg, path)
    assert str(info.value) == "model.mode: expected one of 'a', 'b', got 'c'"
    with pytest.raises(ConfigError, match=r"model\.pool: expected .*got 'min'"):
        load_config(Cfg, overrides=["model.pool=min"])
    assert load_config(Cfg, overrides=["model.mode=b"]).model.mode == "b"


# -- an override changes exactly what it names (issue 24) ----------------------------------------


@dataclass
class Head:
    width: int = 8
    act: str = "relu"


@dataclass
class Stage:
    loss: str = "wing"
    epochs: int = 15
    freeze: bool = False
    head: Head = field(default_factory=Head)


@dataclass
class Stages:
    first: Stage = field(default_factory=lambda: Stage("wing", 15, True, Head(16, "gelu")))
    second: Stage = field(default_factory=lambda: Stage("symmetry", 50))


@dataclass
class Research:
    seed: int = 0
    stages: Stages = field(default_factory=Stages)
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(lr=5e-5, scheduler="plateau", grad_clip=1.0)
    )
    by_name: dict[str, Stage] = field(
        default_factory=lambda: {"a": Stage("complete", 40, head=Head(4)), "b": Stage()}
    )
    ratios: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.3})
    optional: Head | None = None


def test_an_override_keeps_the_research_values_of_its_section_at_any_depth(tmp_path: Path) -> None:
    from medcore.testing import config_diff

    declared = Research()
    for item, old in (
        ("trainer.epochs=2", 10),
        ("stages.second.epochs=7", 50),
        ("stages.first.head.width=32", 16),
    ):
        key, value = item.split("=")
        changed = load_config(Research, overrides=[item])
        assert config_diff(declared, changed) == {key: (old, int(value))}
    # the old behaviour rebuilt the section from its class: no clipping, cosine, wing everywhere
    cfg = load_config(Research, overrides=["trainer.epochs=2", "stages.second.epochs=7"])
    assert (cfg.trainer.lr, cfg.trainer.scheduler, cfg.trainer.grad_clip) == (5e-5, "plateau", 1.0)
    assert (cfg.stages.first.loss, cfg.stages.first.freeze) == ("wing", True)
    assert cfg.stages.first.head == Head(16, "gelu") and cfg.stages.second.loss == "symmetry"
    # a partial YAML layer merges the same way, and --set on top of it too
    path = tmp_path / "r.yaml"
    path.write_text("trainer:\n  lr: 1e-3\nstages:\n  first:\n    head: {act: tanh}\n")
    cfg = load_config(Research, path, overrides=["stages.first.epochs=3"])
    assert (cfg.trainer.lr, cfg.trainer.scheduler, cfg.trainer.grad_clip) == (1e-3, "plateau", 1.0)
    assert cfg.stages.first == Stage("wing", 3, True, Head(16, "tanh"))


def test_dict_fields_change_the_entry_named_and_whole_mappings_replace() -> None:
    cfg = load_config(Research, overrides=["ratios.train=0.8", "by_name.a.epochs=5"])
    assert cfg.ratios == {"train": 0.8, "val": 0.3}
    assert cfg.by_name == {"a": Stage("complete", 5, head=Head(4)), "b": Stage()}
    cfg = load_config(Research, overrides=["ratios={train: 1.0}", "by_name={a: {epochs: 6}}"])
    assert cfg.ratios == {"train": 1.0}
    assert cfg.by_name == {"a": Stage("complete", 6, head=Head(4))}  # a section entry merges
    cfg = load_config(Research, overrides=["ratios.test=0.1", "by_name.c.loss=mse"])
    assert cfg.ratios == {"train": 0.7, "val": 0.3, "test": 0.1}
    assert cfg.by_name["c"] == Stage("mse") and cfg.by_name["a"].epochs == 40
    # a section without a declared value starts from its class
    assert load_config(Research, overrides=["optional.width=2"]).optional == Head(2)


def test_a_section_still_validates_the_merged_values() -> None:
    with pytest.raises(ConfigError, match="grad_accum_steps must be >= 1"):
        load_config(Research, overrides=["trainer.grad_accum_steps=0"])
    with pytest.raises(ConfigError, match=r"stages\.second\.head\.widht: unknown config key"):
        load_config(Research, overrides=["stages.second.head.widht=1"])


def test_the_override_check_finds_a_section_rebuilt_from_its_class() -> None:
    """The shared check of every package's tests fails on the bug it guards against."""
    import dataclasses

    from medcore.testing import assert_overrides_change_only_their_key, override_probes

    def resolve(argv: list[str]) -> Research:
        items = [argv[i + 1] for i in range(0, len(argv), 2)]
        return load_config(Research, overrides=items)

    checked = assert_overrides_change_only_their_key(resolve)
    assert set(checked) == set(override_probes(Research()))
    assert {"trainer.lr", "stages.first.head.act", "by_name.a.head.width", "ratios.train"} <= set(
        checked
    )

    def rebuilt(argv: list[str]) -> Research:  # the old _build: a section from its class
        cfg = resolve(argv)
        if argv and argv[1].startswith("trainer."):
            key, value = argv[1].split("=")
            return dataclasses.replace(
                cfg, trainer=load_config(TrainerConfig, overrides=[f"{key[8:]}={value}"])
            )
        return cfg

    with pytest.raises(AssertionError, match=r"--set trainer\.\w+=\S+ also changed"):
        assert_overrides_change_only_their_key(rebuilt)
