"""Exported models: the folder, its card, every source read back, refusals, the hub upload."""

import http.server
import json
import os
import re
import stat
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import timm
import torch
import yaml

from medcore.cli.export import export_command, export_main
from medcore.data.splits import save_splits
from medcore.engine.inference import load_model
from medcore.errors import CheckpointError, UserError
from medcore.io import atomic_write_json
from medcore.metrics.classification import metrics_with_ci
from medcore.report.model_card import (
    ModelCard,
    metric_rows,
    read_metrics,
    render_card,
    split_sizes,
)
from medcore.testing import hub_snapshot_of
from medcore.weights.checkpoint import save_checkpoint
from medcore.weights.export import (
    FORMAT_VERSION,
    ModelExport,
    push_to_hub,
    write_export,
)
from medcore.weights.normalization import data_config
from medcore.weights.pretrained import hub_cache_dir
from medcore.weights.sources import (
    ModelSource,
    ModelSourceError,
    checkpoint_in_run,
    model_export,
    read_model_source,
)

KIND = "medtest.Classifier"
LABELS = ["benign", "malignant", "normal"]
REPO = "medtest-org/tiny-classifier"
REV = "89abcdef0123456789abcdef0123456789abcdef"
BEST = "model_20250101_epoch=002_metric=0.8125.pt"


def build(state: dict) -> torch.nn.Module:
    cfg = state["model_config"]
    return timm.create_model(cfg["arch"], pretrained=False, num_classes=cfg["num_classes"])


def find_in_run(run_dir: Path) -> Path | None:
    return checkpoint_in_run(run_dir, ["checkpoints/model_*.pt", "checkpoints/final.pt"])


def describe(source: ModelSource) -> ModelExport:
    """The test package's export function, as a task package writes it."""
    model = build(source.config)
    card = ModelCard(
        title="medtest tiny classifier",
        description="A timm test_resnet with a 3-class head.",
        training_data="Synthetic 32x32 images in three classes.",
        license="apache-2.0",
        pipeline_tag="image-classification",
        usage='probabilities = model.predict("image.png")',
        command="medtest-predict --checkpoint {source} images/",
    )
    if source.run_dir is not None:
        card.splits = split_sizes(source.run_dir / "splits.json")
        card.metrics = metric_rows(read_metrics(source.run_dir / "metrics.json"))
        card.metrics_note = "On the test split, 95% bootstrap intervals over 200 resamples."
    return ModelExport(
        kind=source.kind,
        package="medtest",
        package_version="1.2.3",
        model_config=source.model_config,
        tensors=source.tensors,
        preprocessing=data_config(model=model),
        labels=list(source.config["labels"]),
        thresholds={"malignant": 0.35},
        extras={"gallery_labels": ["benign", "normal"]},
        extra_tensors={"gallery": source.config["gallery"]},
        card=card,
    )


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    model.train()
    with torch.no_grad():  # running statistics of their own, not BatchNorm's 0/1 defaults
        model(torch.randn(4, 3, 32, 32) * 3 + 1)
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory as the trainer leaves it: config, splits, metrics, best and final."""
    run_dir = tmp_path_factory.mktemp("run") / "medtest-run"
    model = _model()
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model:\n  arch: test_resnet\n", encoding="utf-8")
    rng = np.random.default_rng(0)
    save_splits(
        run_dir / "splits.json",
        {"train": np.arange(0, 30), "val": np.arange(30, 38), "test": np.arange(38, 50)},
    )
    y = rng.integers(0, 2, 12)
    score = np.clip(y * 0.4 + rng.random(12) * 0.6, 0, 1)
    test = metrics_with_ci(y, score, n_boot=200, seed=0)
    metrics = {
        "test": {**test, "n": 12},
        "macro_f1": 0.61, "macro_f1_ci_low": 0.42, "macro_f1_ci_high": 0.79,
        "labels": LABELS,
    }  # fmt: skip
    atomic_write_json(run_dir / "metrics.json", metrics)
    state = {
        "model": model.state_dict(),
        "model_config": {"arch": "test_resnet", "num_classes": 3},
        "labels": LABELS,
        "gallery": torch.randn(2, 8, generator=torch.Generator().manual_seed(1)),
        "precision": "32-true",
        "epoch": 2,
        "global_step": 24,
        "history": [{"epoch": 2, "val/auc": 0.8125}],
    }
    save_checkpoint(state, run_dir / "checkpoints" / BEST, kind=KIND)
    final = {**state, "model": {k: v + 1 for k, v in model.state_dict().items()}}
    save_checkpoint(final, run_dir / "checkpoints" / "final.pt", kind=KIND)
    return run_dir


def _export_cli(argv: list[str], kind: str = KIND) -> int:
    """``medtest-export ARGV`` through medcore's Command, as a package declares it."""
    module = types.ModuleType("medtest_export")
    module.main = export_main(kind, describe, find_in_run)
    sys.modules["medtest_export"] = module
    try:
        return export_command("medtest-export", "medtest_export:main")(argv)
    finally:
        del sys.modules["medtest_export"]


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "tiny"
    assert _export_cli([str(run), "--output", str(out)]) == 0
    return out


@pytest.fixture
def offline_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def test_export_command_writes_the_folder(run, tmp_path, capsys) -> None:
    out = tmp_path / "tiny"
    assert _export_cli([str(run), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    total = sum(sizes.values())
    assert f"exported {KIND} from {run / 'checkpoints' / BEST} to {out}" in printed
    assert re.search(rf"total\s+{total / 1e6:.1f} MB", printed), printed
    assert sizes["config.json"] < 1000 < sizes["README.md"]
    assert re.search(rf"config.json\s+{sizes['config.json']} B\n", printed), printed
    assert re.search(rf"README.md\s+{sizes['README.md'] / 1e3:.1f} kB\n", printed), printed
    # No staging folder or lock left beside the export.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]

    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    best = torch.load(run / "checkpoints" / BEST, weights_only=True)
    assert config["kind"] == KIND and config["package"] == "medtest"
    assert config["package_version"] == "1.2.3" and config["format_version"] == FORMAT_VERSION
    assert config["model_config"] == {"arch": "test_resnet", "num_classes": 3}
    assert config["labels"] == LABELS and config["thresholds"] == {"malignant": 0.35}
    assert config["extras"] == {"gallery_labels": ["benign", "normal"]}
    assert config["extra_tensors"] == ["gallery"] and config["exported_from"] == BEST
    pretrained_cfg = timm.create_model("test_resnet").pretrained_cfg
    assert config["preprocessing"]["mean"] == list(pretrained_cfg["mean"])
    assert config["preprocessing"]["input_size"] == list(pretrained_cfg["input_size"])

    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
        assert torch.equal(f.get_tensor("extras/gallery"), best["gallery"])
    assert meta == {"format": "pt", "kind": KIND, "package": "medtest", "format_version": "1"}
    assert names == {*best["model"], "extras/gallery"}


def _card_sections(text: str) -> tuple[dict, dict[str, str]]:
    _, front, body = text.split("---\n", 2)
    sections = dict(re.findall(r"^## (.+?)\n\n(.*?)(?=^## |\Z)", body, flags=re.S | re.M))
    return yaml.safe_load(front), sections


def _table(section: str) -> list[list[str]]:
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_card_metrics_splits_and_front_matter(run, exported) -> None:
    front, sections = _card_sections((exported / "README.md").read_text(encoding="utf-8"))
    assert front == {
        "library_name": "medtest",
        "tags": ["medical-imaging", "medtest"],
        "license": "apache-2.0",
        "pipeline_tag": "image-classification",
    }
    assert list(sections) == [
        "Model description",
        "Training data and splits",
        "Metrics",
        "Intended use and limitations",
        "How to load",
        "Files",
    ]
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    expected = {f"test.{k}": v for k, v in metrics["test"].items() if k != "n"}
    expected["macro_f1"] = {
        "value": metrics["macro_f1"],
        "ci_low": metrics["macro_f1_ci_low"],
        "ci_high": metrics["macro_f1_ci_high"],
    }
    rows = {name: (value, ci) for name, value, ci in _table(sections["Metrics"])}
    assert set(rows) == {*expected, "test.n"}  # the list of label names is not a metric
    assert rows["test.n"] == ("12", "")
    for name, m in expected.items():
        value, ci = rows[name]
        low, high = (float(x) for x in ci.strip("[]").split(","))
        assert float(value) == round(m["value"], 4), name
        assert (low, high) == (round(m["ci_low"], 4), round(m["ci_high"], 4)), name
    assert "95% CI" in sections["Metrics"].splitlines()[2]
    splits = {name: int(n) for name, n in _table(sections["Training data and splits"])}
    assert splits == {"train": 30, "val": 8, "test": 12}
    assert "not a medical device" in sections["Intended use and limitations"]
    load = sections["How to load"]
    assert 'model = medtest.load("hf-hub:ORG/NAME")' in load
    assert 'probabilities = model.predict("image.png")' in load
    assert "medtest-predict --checkpoint hf-hub:ORG/NAME images/" in load
    files = {row[0].strip("`"): row[1] for row in _table(sections["Files"])}
    size = {p.name: p.stat().st_size for p in exported.iterdir()}
    assert files == {
        "model.safetensors": f"{size['model.safetensors'] / 1e6:.1f} MB",
        "config.json": f"{size['config.json']} B",
        "README.md": "",
    }
    best = torch.load(run / "checkpoints" / BEST, weights_only=True)["model"]
    numbers = sum(t.numel() for t in best.values())
    assert _table(sections["Files"])[0][2] == (
        f"weights: {len(best)} tensors, {numbers:,} numbers, and 1 extra array"
    )


def test_metric_rows_read_both_interval_layouts() -> None:
    rows = metric_rows(
        {
            "auc": {"value": 0.9, "ci_low": 0.8, "ci_high": 0.95},
            "val": {"f1": 0.5, "f1_ci_low": 0.4, "f1_ci_high": 0.6, "loss": 1.25},
            "acc_ci_low": 0.1,  # an interval without its metric stays a number of its own
            "names": ["a"],
            "ok": True,
        }
    )
    assert [(r.name, r.value, r.ci_low, r.ci_high) for r in rows] == [
        ("auc", 0.9, 0.8, 0.95),
        ("val.f1", 0.5, 0.4, 0.6),
        ("val.loss", 1.25, None, None),
        ("acc_ci_low", 0.1, None, None),
    ]
    assert [r.name for r in metric_rows({"a": 1, "b": {"c": 2}}, keys=["b.c", "a"])] == ["b.c", "a"]
    with pytest.raises(KeyError, match="missing"):
        metric_rows({"a": 1}, keys=["missing"])
    card = render_card(ModelCard("t", "d"), package="p", kind="p.M", repo_id="org/m")
    assert "No metrics" in card and 'p.load("hf-hub:org/m")' in card


def _outputs(state: dict, x: torch.Tensor) -> torch.Tensor:
    model, _ = load_model("source", KIND, build, state=state)
    with torch.no_grad():
        return model(x)


def test_every_source_reads_the_same_model(run, exported, tmp_path, offline_home) -> None:
    best = torch.load(run / "checkpoints" / BEST, weights_only=True)
    snap = hub_snapshot_of(offline_home, REPO, exported, REV)
    # A folder and its model.safetensors named alone read the same export.
    sources = {
        "run": read_model_source(run, KIND, find_in_run=find_in_run),
        "checkpoint": read_model_source(run / "checkpoints" / BEST, "medtest."),
        "folder": read_model_source(exported, KIND),
        "safetensors": read_model_source(exported / "model.safetensors", [KIND, "other.M"]),
        "hub": read_model_source(f"hf-hub:{REPO}", KIND),
        "hub@rev": read_model_source(f"hf-hub:{REPO}@{REV}", KIND),
    }
    assert {k: s.origin for k, s in sources.items()} == {
        "run": "run",
        "checkpoint": "checkpoint",
        "folder": "export",
        "safetensors": "export",
        "hub": "hub",
        "hub@rev": "hub",
    }
    assert sources["run"].run_dir == run and sources["checkpoint"].run_dir == run
    assert sources["run"].path == run / "checkpoints" / BEST
    assert sources["hub"].path.resolve() == (snap / "model.safetensors").resolve()
    assert sources["hub"].run_dir is None
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reference = _outputs({**best, "kind": KIND}, x)
    exports = {}
    for name, source in sources.items():
        assert source.kind == KIND and source.model_config == best["model_config"], name
        assert source.tensors.keys() == best["model"].keys(), name
        for key, tensor in best["model"].items():
            got = source.tensors[key]
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), (name, key)
        exports[name] = export = model_export(source, describe)
        assert torch.equal(export.extra_tensors["gallery"], best["gallery"]), name
        assert torch.equal(_outputs(export.checkpoint(), x), reference), name
        assert torch.equal(_outputs(source.checkpoint(), x), reference), name
    for name, export in exports.items():
        assert export.config() == exports["run"].config() | {
            "exported_from": export.exported_from
        }, name
    assert exports["hub"].card is None and exports["run"].card is not None


def test_huggingface_hub_finds_the_export_in_the_cache(exported, offline_home) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache

    hub_snapshot_of(offline_home, REPO, exported, REV)
    cache = hub_cache_dir()
    assert cache == offline_home / "hub"
    folder = Path(snapshot_download(REPO, cache_dir=cache, local_files_only=True))
    assert folder.name == REV
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (folder / name).read_bytes() == (exported / name).read_bytes()
    config = hf_hub_download(REPO, "config.json", cache_dir=cache, local_files_only=True)
    assert json.loads(Path(config).read_text())["kind"] == KIND
    assert try_to_load_from_cache(REPO, "README.md", cache_dir=cache) == str(folder / "README.md")


def _copy(src: Path, dst: Path, names=("model.safetensors", "config.json", "README.md")) -> Path:
    dst.mkdir(parents=True)
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _landmarks_export(tmp_path: Path) -> Path:
    """Another package's export (a cxrlandmarks-like model of another kind)."""
    net = torch.nn.Linear(4, 2)
    export = ModelExport(
        "cxrlandmarks.ResNetLandmarkRegressor", "cxrlandmarks", {"w": 4}, net.state_dict()
    )
    return write_export(export, tmp_path / "landmarks")


def test_refused_sources_are_one_line(run, exported, tmp_path, offline_home) -> None:
    landmarks = _landmarks_export(tmp_path)
    hub_snapshot_of(offline_home, "cxr-org/landmarks", landmarks, REV)
    cases = {  # another package's export (folder, file, hub name), checkpoint and run
        landmarks: "this is a cxrlandmarks.ResNetLandmarkRegressor export, not medtest",
        landmarks
        / "model.safetensors": "this is a cxrlandmarks.ResNetLandmarkRegressor export, not medtest",
        "hf-hub:cxr-org/landmarks": "this is a cxrlandmarks.ResNetLandmarkRegressor export, not medtest",
        exported: "this is a medtest.Classifier export, not ctclip",
        run / "checkpoints" / BEST: "this is a medtest.Classifier checkpoint, not ctclip",
        run: "this is a medtest.Classifier checkpoint, not ctclip",
    }
    for source, message in cases.items():
        kind = "ctclip." if "medtest" in message.split(",")[0] else "medtest."
        with pytest.raises(ModelSourceError) as info:
            read_model_source(source, kind, find_in_run=find_in_run)
        assert (info.value.what, info.value.why) == (str(source), message)

    # A bare weights file: alone, with another package's identity, in a folder.
    bare = tmp_path / "bare"
    _copy(exported, bare, ["model.safetensors"])
    (bare / "weights.safetensors").write_bytes((landmarks / "model.safetensors").read_bytes())
    (bare / "plain.safetensors").write_bytes(_plain_safetensors(tmp_path))
    for source, why in {
        bare / "model.safetensors": "a weights file without its config.json: not loadable as a "
        "medtest model (pass the run directory or its .pt checkpoint, or an exported folder: "
        "medtest-export)",
        bare / "plain.safetensors": "a weights file without its config.json",
        bare: "a weights file without its config.json",
        bare
        / "weights.safetensors": "this is a cxrlandmarks.ResNetLandmarkRegressor export, not medtest",
    }.items():
        with pytest.raises(ModelSourceError) as info:
            read_model_source(source, "medtest.")
        assert info.value.why.startswith(why), info.value.why

    # timm's files: a config.json that is not ours.
    timm_dir = _copy(exported, tmp_path / "timm", ["model.safetensors"])
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "test_resnet"}))
    with pytest.raises(
        ModelSourceError,
        match=r"config.json is not a medtest-export config .* "
        r"it names architecture test_resnet: weights of another library\)$",
    ):
        read_model_source(timm_dir, KIND)
    # Files of two exports mixed in one folder.
    mixed = _copy(exported, tmp_path / "mixed", ["README.md", "config.json"])
    (mixed / "model.safetensors").write_bytes((landmarks / "model.safetensors").read_bytes())
    with pytest.raises(
        ModelSourceError,
        match=re.escape(
            "model.safetensors holds a cxrlandmarks.ResNetLandmarkRegressor export but "
            "config.json describes medtest.Classifier"
        ),
    ):
        read_model_source(mixed, KIND)
    empty = tmp_path / "empty-run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(
        ModelSourceError,
        match=r"neither an exported model folder \(config.json "
        r"\+ model.safetensors\) nor a run directory with a checkpoint$",
    ):
        read_model_source(empty, KIND, find_in_run=find_in_run)

    # A newer format; an export without its weights.
    config = json.loads((exported / "config.json").read_text())
    newer = _copy(exported, tmp_path / "newer", ["model.safetensors"])
    atomic_write_json(
        newer / "config.json", {**config, "format_version": 2, "package_version": "9.0"}
    )
    with pytest.raises(
        ModelSourceError,
        match=r"exported in format version 2 by medtest 9.0; "
        r"this medcore reads versions up to 1: upgrade medcore and medtest$",
    ):
        read_model_source(newer, KIND)
    (newer / "model.safetensors").unlink()
    atomic_write_json(newer / "config.json", config)
    with pytest.raises(
        ModelSourceError, match=re.escape("config.json without the model.safetensors beside it")
    ):
        read_model_source(newer, KIND)

    with pytest.raises(CheckpointError, match="not found"):
        read_model_source(tmp_path / "absent", KIND)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        read_model_source("hf-hub:medtest-org/absent", KIND)
    (run / "checkpoints" / "model_copy.pt").write_bytes((run / "checkpoints" / BEST).read_bytes())
    try:
        with pytest.raises(
            CheckpointError, match=r"several checkpoints match checkpoints/model_\*.pt"
        ):
            read_model_source(run, KIND, find_in_run=find_in_run)
    finally:
        (run / "checkpoints" / "model_copy.pt").unlink()


def _plain_safetensors(tmp_path: Path) -> bytes:
    from safetensors.torch import save_file

    save_file(_model().state_dict(), str(tmp_path / "plain.safetensors"))
    return (tmp_path / "plain.safetensors").read_bytes()


def test_output_targets_refused_or_replaced(run, exported, tmp_path, capsys) -> None:
    def export(out: Path, *flags: str) -> int:
        return _export_cli([str(run), "--output", str(out), *flags])

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    err = _one_line_error(capsys, export(busy, "--overwrite"))
    assert (
        err
        == f"error: {busy}: not empty and not a previous export: choose another or an empty --output"
    )
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]

    target = _copy(exported, tmp_path / "previous")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    err = _one_line_error(capsys, export(target))
    assert err.endswith(f"already holds a {KIND} export: pass --overwrite to replace it")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    (target / ".git").mkdir()  # a clone of the hub repository: never deleted
    err = _one_line_error(capsys, export(target, "--overwrite"))
    assert "holds files that are not part of an export (.git)" in err
    (target / ".git").rmdir()
    err = _one_line_error(capsys, export(_landmarks_export(tmp_path), "--overwrite"))
    assert err.endswith(
        f"holds a cxrlandmarks.ResNetLandmarkRegressor export, not {KIND}: choose another --output"
    )

    # --overwrite replaces the previous export of the same model, here with the final weights.
    assert (
        _export_cli([str(run / "checkpoints" / "final.pt"), "--output", str(target), "--overwrite"])
        == 0
    )
    final = torch.load(run / "checkpoints" / "final.pt", weights_only=True)["model"]
    source = read_model_source(target, KIND)
    assert all(torch.equal(source.tensors[k], v) for k, v in final.items())
    assert source.config["exported_from"] == "final.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "landmarks", "previous"]

    file = tmp_path / "file"
    file.write_text("x")
    assert "exists and is not a folder" in _one_line_error(capsys, export(file))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(empty) == 0 and (empty / "model.safetensors").is_file()


def test_a_failed_export_leaves_nothing(run, exported, tmp_path, monkeypatch) -> None:
    import errno

    import medcore.weights.export as export_module

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(export_module, "atomic_write_text", disk_full)
    export = model_export(read_model_source(run, KIND, find_in_run=find_in_run), describe)
    with pytest.raises(OSError, match="No space left"):
        write_export(export, tmp_path / "new")
    target = _copy(exported, tmp_path / "old")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(OSError, match="No space left"):
        write_export(export, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_honour_the_umask(run, tmp_path, umask) -> None:
    export = model_export(read_model_source(run, KIND, find_in_run=find_in_run), describe)
    old = os.umask(umask)
    try:
        folder = write_export(export, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


_REAL_HF_API = __import__("huggingface_hub").HfApi


class _FakeApi:
    """HfApi as upload code sees it; records the calls instead of reaching the network."""

    calls: ClassVar[list] = []
    fail: ClassVar[Exception | None] = None

    def __init__(self, token=None) -> None:
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        if self.fail is not None:
            raise self.fail
        self.calls.append(("upload_folder", kwargs))
        return types.SimpleNamespace(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"
        )


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    _FakeApi.calls, _FakeApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    return _FakeApi


def test_push_to_hub_makes_the_right_calls(exported, fake_hub) -> None:
    url = push_to_hub(exported, REPO, private=True, revision="v1")
    assert url == f"https://huggingface.co/{REPO}/commit/abc"
    assert fake_hub.calls == [
        ("init", "hf_test_token"),
        ("create_repo", REPO, {"private": True, "repo_type": "model", "exist_ok": True}),
        ("create_branch", REPO, {"branch": "v1", "repo_type": "model", "exist_ok": True}),
        (
            "upload_folder",
            {
                "repo_id": REPO,
                "folder_path": str(exported),
                "repo_type": "model",
                "revision": "v1",
                "allow_patterns": ["model.safetensors", "config.json", "README.md"],
                "commit_message": f"Upload {KIND} (1.2.3)",
            },
        ),
    ]
    fake_hub.calls.clear()
    push_to_hub(exported, REPO)
    assert [c[0] for c in fake_hub.calls] == ["init", "create_repo", "upload_folder"]
    assert fake_hub.calls[1][2]["private"] is False and fake_hub.calls[2][1]["revision"] is None


class _RefusingHub(http.server.BaseHTTPRequestHandler):
    """A hub that answers every request with the status and error of its ``answer``."""

    answer: ClassVar[tuple[int, str]] = (403, "")

    def do_POST(self) -> None:
        status, error = self.answer
        body = json.dumps({"error": error}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_push_refusals_are_one_line(exported, fake_hub, monkeypatch, tmp_path) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    # The real client against a local server and a closed port: the hub's own error types.
    # (Its offline switch, read at import from the test environment, is lifted: nothing here
    # leaves this machine.)
    monkeypatch.setattr(huggingface_hub, "HfApi", _REAL_HF_API)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        rights = 'You don\'t have the rights to create a model under the namespace "medtest-org"'
        for status, error, why in [
            (403, rights, f"the hub refused the upload (HTTP 403: {rights})"),
            (
                401,
                "Invalid credentials in Authorization header",
                "the hub refused the upload (HTTP 401: Invalid credentials in Authorization "
                "header); log in with `hf auth login`",
            ),
        ]:
            _RefusingHub.answer = (status, error)
            with pytest.raises(UserError) as info:
                push_to_hub(exported, REPO)
            assert info.value.what == REPO and info.value.why.startswith(why), info.value.why
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(
        UserError,
        match=r"^medtest-org/tiny-classifier: cannot reach the hub \(.*Connection refused\)$",
    ):
        push_to_hub(exported, REPO)

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    with pytest.raises(CheckpointError, match="not an exported model folder"):
        push_to_hub(tmp_path, REPO)
    with pytest.raises(UserError, match="expected ORG/NAME, got 'hf-hub:a/b'"):
        push_to_hub(exported, "hf-hub:a/b")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UserError, match=r"no Hugging Face token: log in with `hf auth login`"):
        push_to_hub(exported, REPO)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set: unset it to upload"):
        push_to_hub(exported, REPO)
    assert fake_hub.calls == []


def test_export_command_pushes_only_when_it_can(
    run, tmp_path, fake_hub, monkeypatch, capsys
) -> None:
    out = tmp_path / "pushed"
    assert _export_cli([str(run), "--output", str(out), "--push-to-hub", REPO, "--private"]) == 0
    printed = capsys.readouterr().out
    assert f"uploaded to {REPO}: https://huggingface.co/{REPO}/commit/abc" in printed
    assert [c[0] for c in fake_hub.calls] == ["init", "create_repo", "upload_folder"]
    assert fake_hub.calls[1][2]["private"] is True
    assert f'medtest.load("hf-hub:{REPO}")' in (out / "README.md").read_text()

    fake_hub.calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # refused before anything is written
    err = _one_line_error(
        capsys, _export_cli([str(run), "--output", str(tmp_path / "a"), "--push-to-hub", REPO])
    )
    assert err == "error: --push-to-hub: HF_HUB_OFFLINE is set: unset it to upload"
    err = _one_line_error(
        capsys, _export_cli([str(run), "--output", str(tmp_path / "b"), "--private"])
    )
    assert err.startswith("error: --private: applies to the hub repository")
    err = _one_line_error(
        capsys, _export_cli([str(run), "--output", str(tmp_path / "c")], kind="ctclip.")
    )
    assert err == f"error: {run}: this is a medtest.Classifier checkpoint, not ctclip"
    err = _one_line_error(capsys, _export_cli([str(out), "--output", str(tmp_path / "d")]))
    assert err.startswith(f"error: {out}: already an exported model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pushed"]
    assert fake_hub.calls == []


def test_checkpoint_outside_its_run_exports_without_metrics(run, tmp_path, capsys) -> None:
    lone = tmp_path / "lone.pt"
    lone.write_bytes((run / "checkpoints" / BEST).read_bytes())
    assert _export_cli([str(lone), "--output", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err.strip() == (
        f"note: the model card has no metrics ({lone} is not inside its run directory)"
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "No metrics: the model was exported from a checkpoint without its run directory." in card


def test_the_readme_lazy_load_idiom_keeps_import_light(tmp_path) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    init = re.search(r"```python\n(# <pkg>/__init__\.py\n.*?)```", readme, flags=re.S).group(1)
    package = tmp_path / "lazypkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        '__version__ = "0.1"\n' + init.replace("<pkg>", "lazypkg"), encoding="utf-8"
    )
    (package / "api.py").write_text(
        "from medcore.engine.trainer import Trainer\n\n\ndef load(source, device='auto'):\n"
        "    return source, Trainer\n",
        encoding="utf-8",
    )
    probe = (
        "import sys, lazypkg\n"
        "heavy = ('lazypkg.api', 'medcore.engine.trainer', 'lightning_fabric', 'torch')\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "from lazypkg import load\n"
        "assert load('x')[0] == 'x' and 'medcore.engine.trainer' in sys.modules\n"
        "try:\n    lazypkg.missing\nexcept AttributeError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'lazypkg' has no attribute 'missing'"
