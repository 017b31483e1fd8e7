from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from medcore.config import load_config, overrides_to_dict, save_config, to_dict
from medcore.errors import ConfigError
from medcore.trainer import TrainerConfig


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
