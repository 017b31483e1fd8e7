"""The package skeleton check, on a package written here: one that keeps the shape, and the
same package with each kind of departure."""

import sys
import textwrap
from pathlib import Path

import pytest

from medcore.testing.skeleton import ROLES, skeleton_problems

GOOD = {
    "cli": """
        from medcore.cli.command import Command
        train = Command("toypkg-train", "train", "toypkg.train:main", common=True)
        evaluate = Command("toypkg-eval", "evaluate", "toypkg.evaluate:main", common=False)
    """,
    "model": """
        KIND = "toypkg.Toy"
        def build_model(cfg, *, device=None):
            return None
    """,
    "train": """
        def main(args): return 0
        def make_step_fn(cfg): return None
        def make_evaluate_fn(cfg): return None
    """,
    "evaluate": "def main(args): return 0\n",
}
SCRIPTS = {"toypkg-train": "toypkg.cli:train", "toypkg-eval": "toypkg.cli:evaluate"}


def write_package(root: Path, name: str, changes: dict[str, str | None] | None = None) -> None:
    files = {role: "" for role in ROLES} | GOOD | (changes or {})
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    for role, text in files.items():
        if text is not None:
            (folder / f"{role}.py").write_text(textwrap.dedent(text).replace("toypkg", name))


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("toypkg")]:
        del sys.modules[name]


def test_a_package_that_keeps_the_shape_has_no_problems(on_path: Path) -> None:
    write_package(on_path, "toypkg")
    assert skeleton_problems("toypkg", SCRIPTS) == []


@pytest.mark.parametrize(
    ("name", "changes", "scripts", "expected"),
    [
        ("toypkg_a", {"predict": None}, None, ["toypkg_a.predict: no such module"]),
        (
            "toypkg_b",
            {"model": "KIND = 'Toy'\ndef build_model(cfg, size): pass\n"},
            None,
            [
                "toypkg_b.model.KIND: expected a string 'toypkg_b.<Name>', got 'Toy'",
                "toypkg_b.model.build_model: expected one argument (the config), got (cfg, size)",
            ],
        ),
        (
            "toypkg_c",
            {"train": "def run(args): pass\ndef make_step_fn(cfg): pass\n"},
            None,
            [
                "toypkg_c.train.main: missing",
                "toypkg_c.train.make_evaluate_fn: missing",
                "toypkg_c.cli.train: toypkg_c.train has no main",
            ],
        ),
        (
            "toypkg_d",
            {
                "cli": """
                    from medcore.cli.command import Command
                    train = Command("toypkg-train", "t", "toypkg.crossval:run", common=True)
                """
            },
            {"toypkg_d-train": "toypkg_d.cli:train", "toypkg_d-x": "toypkg_d.other:main"},
            [
                "toypkg_d.cli.train: runs toypkg_d.crossval:run, not toypkg_d.<module>:main",
                "toypkg_d.cli: no command runs toypkg_d.train:main",
                "console script toypkg_d-x: toypkg_d.other:main is not a command of toypkg_d.cli",
            ],
        ),
    ],
)
def test_each_departure_is_named(on_path, name, changes, scripts, expected) -> None:
    write_package(on_path, name, changes)
    default = {k.replace("toypkg", name): v.replace("toypkg", name) for k, v in SCRIPTS.items()}
    problems = skeleton_problems(name, default if scripts is None else scripts)
    assert problems == expected
