"""Image layouts: the original ``dataset/<category>/`` tree and the Kaggle COVID-19 Radiography
release (``COVID-19_Radiography_Dataset/<category>/images/``), found from the same annotation
CSV with the same pixels; image keys of predict and eval join with the annotation CSV."""

import json
import shutil
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlandmarks.anatomy import CATEGORIES
from cxrlandmarks.cli import evaluate, predict, train
from cxrlandmarks.config import DataConfig
from cxrlandmarks.data import (
    HEADED_COLUMNS,
    LandmarkDataset,
    image_store,
    image_tensor,
    load_records,
    read_annotations,
)
from cxrlandmarks.synthetic import render_case
from medcore.errors import ConfigError, DataError
from medcore.testing import call_main

PER_CATEGORY = 6
CSV = "coordenadas/coordenadas_maestro.csv"
KAGGLE = "COVID-19_Radiography_Dataset"
KAGGLE_LINE = "images: Kaggle COVID-19 Radiography layout ("
# The release's four classes: folder names as downloaded; Lung_Opacity has no landmark rows.
RELEASE = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")
SHEET = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
RELS = "http://schemas.openxmlformats.org/package/2006/relationships"
DOC = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml"


def _write_xlsx(path: Path, rows: list[list[str]]) -> None:
    """A one-sheet workbook in the OOXML zip layout (the release's ``<class>.metadata.xlsx``;
    no spreadsheet library is a dependency, so the parts are written here)."""

    def cells(r: int, values: list[str]) -> str:
        return "".join(
            f'<c r="{chr(65 + i)}{r}" t="inlineStr"><is><t>{escape(v)}</t></is></c>'
            for i, v in enumerate(values)
        )

    sheet = "".join(f'<row r="{r}">{cells(r, v)}</row>' for r, v in enumerate(rows, start=1))
    parts = {
        "[Content_Types].xml": (
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            f'<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            f'<Override PartName="/xl/workbook.xml" ContentType="{XLSX_TYPE}.sheet.main+xml"/>'
            f'<Override PartName="/xl/worksheets/sheet1.xml" ContentType="{XLSX_TYPE}.worksheet+xml"/>'
            "</Types>"
        ),
        "_rels/.rels": f'<Relationships xmlns="{RELS}"><Relationship Id="rId1" '
        f'Type="{DOC}/officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<workbook xmlns="{SHEET}" xmlns:r="{DOC}"><sheets>'
        '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": f'<Relationships xmlns="{RELS}"><Relationship Id="rId1" '
        f'Type="{DOC}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": f'<worksheet xmlns="{SHEET}"><sheetData>{sheet}'
        "</sheetData></worksheet>",
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, xml in parts.items():
            zf.writestr(name, '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n' + xml)


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    """Radiographs (299 x 299, as released) with their landmark rows; names ``<class>-<n>``."""
    rng = np.random.default_rng(3)
    out = []
    for category in RELEASE:
        for i in range(PER_CATEGORY if category in CATEGORIES else 2):
            render = "Normal" if category == "Lung_Opacity" else category
            img, lm = render_case(rng, render)
            out.append(
                {
                    "name": f"{category}-{i + 1}",
                    "category": category,
                    "image": img,
                    "coords": np.round(lm).astype(int),
                    "annotated": category in CATEGORIES,
                }
            )
    return out


def _write_csv(root: Path, cases: list[dict]) -> None:
    """The original headerless coordinates CSV: ``id, x1, y1, ..., x15, y15, image name``."""
    rows = [
        ",".join(map(str, [i, *c["coords"].ravel().tolist(), c["name"]]))
        for i, c in enumerate(c for c in cases if c["annotated"])
    ]
    (root / CSV).parent.mkdir(parents=True, exist_ok=True)
    (root / CSV).write_text("\n".join(rows) + "\n", encoding="utf-8")


def write_original(root: Path, cases: list[dict]) -> Path:
    """The original research layout: ``dataset/<category>/<name>.png`` beside the CSV."""
    for c in cases:
        if c["annotated"]:
            folder = root / "dataset" / c["category"]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(c["image"], mode="L").save(folder / f"{c['name']}.png")
    _write_csv(root, cases)
    return root


def write_kaggle(folder: Path, cases: list[dict]) -> Path:
    """The Kaggle release as unzipped: ``<class>/images/`` and ``<class>/masks/`` (256 x 256
    lung masks under the same names), ``<class>.metadata.xlsx`` and ``README.md.txt``."""
    for category in RELEASE:
        (folder / category / "images").mkdir(parents=True)
        (folder / category / "masks").mkdir()
        mine = [c for c in cases if c["category"] == category]
        for c in mine:
            Image.fromarray(c["image"], mode="L").save(
                folder / category / "images" / f"{c['name']}.png"
            )
            mask = np.zeros((256, 256), np.uint8)
            mask[40:220, 30:120] = mask[40:220, 136:226] = 255
            Image.fromarray(mask, mode="L").save(folder / category / "masks" / f"{c['name']}.png")
        # The Normal sheet spells its file names NORMAL-<n>, as released.
        names = [c["name"].replace("Normal-", "NORMAL-") for c in mine]
        _write_xlsx(
            folder / f"{category}.metadata.xlsx",
            [["FILE NAME", "FORMAT", "SIZE", "URL"], *[[n, "PNG", "256*256", "x"] for n in names]],
        )
    (folder / "README.md.txt").write_text("COVID-19 CHEST X-RAY DATABASE\n", encoding="utf-8")
    return folder


@pytest.fixture
def both(tmp_path: Path, cases: list[dict]) -> tuple[Path, Path]:
    """(original data dir, Kaggle data dir): the same images and the same annotation CSV; the
    Kaggle download sits in the data directory as ``kaggle datasets download --unzip`` leaves it."""
    original = write_original(tmp_path / "original", cases)
    kaggle = tmp_path / "kaggle"
    write_kaggle(kaggle / KAGGLE, cases)
    _write_csv(kaggle, cases)
    return original, kaggle


def _annotated(cases: list[dict]) -> list[dict]:
    return [c for c in cases if c["annotated"]]


@pytest.mark.parametrize("placement", ["data_dir", "images_dir", "is_images_dir"])
def test_both_layouts_find_every_row_with_the_same_pixels(
    placement: str, both: tuple[Path, Path], cases: list[dict], capsys, tmp_path
) -> None:
    original, kaggle = both
    cfg = DataConfig()
    if placement == "images_dir":  # where the research code keeps it: data/dataset/<release>
        (kaggle / "dataset").mkdir()
        shutil.move(kaggle / KAGGLE, kaggle / "dataset" / KAGGLE)
        root = kaggle / "dataset" / KAGGLE
    elif placement == "is_images_dir":  # data.images_dir names the release folder itself
        cfg = DataConfig(images_dir=KAGGLE)
        root = kaggle / KAGGLE
    else:
        root = kaggle / KAGGLE
    a = load_records(DataConfig(), original)
    assert f"images: original layout ({original / 'dataset'}/<category>/" in capsys.readouterr().out
    b = load_records(cfg, kaggle)
    out, err = capsys.readouterr()
    assert f"{KAGGLE_LINE}{root}/<category>/images/<name>.png|.jpg)" in out.splitlines()
    assert "skipped" not in err and "warning" not in err

    expected = _annotated(cases)
    for recs in (a, b):
        assert [r.name for r in recs] == [c["name"] for c in expected]
        assert [r.category for r in recs] == [c["category"] for c in expected]
        for r, c in zip(recs, expected, strict=True):
            np.testing.assert_array_equal(r.coords, c["coords"])
    assert all(r.path.parent.name == "images" and r.path.parent.parent.parent == root for r in b)
    for ra, rb, c in zip(a, b, expected, strict=True):
        assert (rb.width, rb.height) == (299, 299)
        assert np.array_equal(image_tensor(rb.path)[0].numpy(), c["image"])
        assert np.array_equal(image_tensor(ra.path).numpy(), image_tensor(rb.path).numpy())
    # The tensors training sees: through medcore's image store and through the dataset.
    store_a, store_b = image_store(a, 64), image_store(b, 64)
    for i in range(len(a)):
        assert np.array_equal(np.asarray(store_a[i]), np.asarray(store_b[i]))
    da, db = LandmarkDataset(a, 48), LandmarkDataset(b, 48)
    for i in (0, len(a) - 1):
        assert (da[i]["image"] == db[i]["image"]).all()
        assert (da[i]["target"] == db[i]["target"]).all()


def test_headed_csv_spellings_map_to_the_release_folders(both, cases, capsys) -> None:
    """``Viral_Pneumonia`` in the category column and names with ``.png``, as a later version
    of the research code writes the CSV, find ``Viral Pneumonia/images/``."""
    _, kaggle = both
    rows = [
        {
            "image_name": f"{c['name']}.png",
            "category": c["category"].replace(" ", "_"),
            **dict(zip(HEADED_COLUMNS, c["coords"].ravel().tolist(), strict=True)),
        }
        for c in _annotated(cases)
    ]
    pd.DataFrame(rows).to_csv(kaggle / "headed.csv", index=False)
    records = load_records(DataConfig(csv="headed.csv"), kaggle)
    assert len(records) == len(rows)
    assert [r.category for r in records] == [c["category"] for c in _annotated(cases)]
    assert {r.path.parent.parent.name for r in records} == set(CATEGORIES)


def test_misspelt_release_folder_is_counted_and_named(both, capsys) -> None:
    _, kaggle = both
    (kaggle / KAGGLE / "Viral Pneumonia").rename(kaggle / KAGGLE / "Viral Pnuemonia")
    n, total = PER_CATEGORY, PER_CATEGORY * len(CATEGORIES)
    with pytest.raises(DataError) as exc:
        load_records(DataConfig(), kaggle)
    share = f"{100 * n / total:.1f}%"
    assert f"{n} of {total} annotated rows ({share}) have no image file (Viral Pneumonia {n})" in (
        exc.value.why
    )
    assert "folders there that spell no category: Lung_Opacity, Viral Pnuemonia" in exc.value.why
    err = capsys.readouterr().err
    folder = kaggle / KAGGLE / "Viral Pneumonia" / "images"
    assert f"skipped Viral Pneumonia-1: no image Viral Pneumonia-1.png|.jpg in {folder}\n" in err
    records = load_records(DataConfig(allow_missing=True), kaggle)
    assert len(records) == total - n
    assert f"warning: {n} of {total} annotated rows ({share}) have no image file" in (
        capsys.readouterr().err
    )


def test_configured_pattern_is_used_as_given(both, cases, capsys) -> None:
    _, kaggle = both
    cfg = DataConfig(images_dir=".", image_pattern=f"{KAGGLE}/{{category}}/images/{{name}}.png")
    records = load_records(cfg, kaggle)
    assert len(records) == len(_annotated(cases))
    line = f"images: data.image_pattern layout ({kaggle / KAGGLE}/<category>/images/<name>.png)"
    assert line in capsys.readouterr().out
    # A flat pattern: every image in one folder, the category from the name's prefix.
    flat = kaggle / "flat"
    flat.mkdir()
    for r in records:
        shutil.copy(r.path, flat / r.path.name)
    again = load_records(DataConfig(images_dir=".", image_pattern="flat/{name}.png"), kaggle)
    assert [(r.name, r.category) for r in again] == [(r.name, r.category) for r in records]
    for bad in (
        "{category}/{name}_x.png",
        "../{name}.png",
        "{category}/{category}/{name}",
        "{cat}/{name}",
    ):
        with pytest.raises(ConfigError) as exc:
            load_records(DataConfig(image_pattern=bad), kaggle)
        assert exc.value.what == "data.image_pattern" and repr(bad) in exc.value.why


def test_two_layouts_or_none_is_one_line_error(both, cases, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _, kaggle = both
    write_original(kaggle, cases)  # dataset/<category>/ beside the release: which one?
    argv = ["--data-dir", str(kaggle), "--config", "default", "--device", "cpu"]
    code, _, err = call_main(train, [*argv, "--output-dir", str(tmp_path / "run")], capsys)
    lines = err.strip().splitlines()
    assert (
        code == 2
        and len(lines) == 1
        and lines[0].startswith(f"error: {kaggle}: images in 2 layouts")
    )
    assert f"original layout ({kaggle / 'dataset'}/<category>/" in lines[0]
    assert f"Kaggle COVID-19 Radiography layout ({kaggle / KAGGLE}/<category>/images/" in lines[0]
    assert "data.image_pattern" in lines[0]

    empty = tmp_path / "empty"
    _write_csv(empty, cases)
    with pytest.raises(DataError, match="image directory not found: looked for") as exc:
        load_records(DataConfig(), empty)
    assert f"{empty / 'dataset' / KAGGLE / '<category>' / 'images'}/" in exc.value.why
    assert f"{empty / KAGGLE / '<category>' / 'images'}/" in exc.value.why


def test_predict_and_eval_keys_join_with_the_annotation_csv(
    both, cases, tmp_path, capsys, monkeypatch, write_original_checkpoint
) -> None:
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _, kaggle = both
    ckpt = tmp_path / "original.pt"
    write_original_checkpoint(ckpt)
    argv = ["--checkpoint", str(ckpt), "--device", "cpu", "--no-overlays"]
    code, out, err = call_main(
        predict, [str(kaggle / KAGGLE), *argv, "--output-dir", str(tmp_path / "p")], capsys
    )
    assert code == 0, err
    n_masks = len(cases)  # every class folder's masks/, Lung_Opacity's included
    assert f"left out {n_masks} lung mask(s) in masks/ folders beside images/" in out
    pred = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert len(pred) == len(cases)  # the 2 Lung_Opacity images too: they have no rows
    assert all(Path(p).parent.name == "images" for p in pred["image_path"])
    # The annotation CSV, read without our reader: headerless, the image name last.
    truth = pd.read_csv(kaggle / CSV, header=None)
    joined = truth.merge(pred, left_on=truth.columns[-1], right_on="image_name", validate="1:1")
    assert sorted(joined["image_name"]) == sorted(c["name"] for c in _annotated(cases))
    # predictions.csv is itself a headed coordinates CSV: our reader takes it.
    assert list(read_annotations(tmp_path / "p" / "predictions.csv")["image_name"]) == list(
        pred["image_name"]
    )

    code, _, err = call_main(
        evaluate,
        [
            *argv[:4],
            "--data-dir",
            str(kaggle),
            "--split",
            "all",
            "--output-dir",
            str(tmp_path / "e"),
        ],
        capsys,
    )
    assert code == 0, err
    report = tmp_path / "e" / "original"
    for table in ("per_image.csv", "predictions.csv"):
        frame = pd.read_csv(report / table)
        joined = truth.merge(
            frame, left_on=truth.columns[-1], right_on="image_name", validate="1:1"
        )
        assert len(joined) == len(truth) == len(frame)
        assert all(Path(p).parent.name == "images" for p in frame["image_path"])
        assert all(
            Path(p).stem == k for p, k in zip(frame["image_path"], frame["image_name"], strict=True)
        )


def test_training_runs_on_the_release_as_downloaded(both, cases, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    _, kaggle = both
    sets = [
        "data.image_size=32",
        "eval.grid_images=2",
        "trainer.num_workers=0",
        "phases.phase1.epochs=1",
        "phases.phase1.max_steps_per_epoch=1",
    ]
    argv = ["--data-dir", str(kaggle), "--config", "default", "--device", "cpu", "--phase", "1"]
    run = tmp_path / "run"
    code, out, err = call_main(
        train, [*argv, "--output-dir", str(run), *(a for s in sets for a in ("--set", s))], capsys
    )
    assert code == 0, err
    assert f"{KAGGLE_LINE}{kaggle / KAGGLE}/<category>/images/" in out
    splits = json.loads((run / "splits.json").read_text())
    names = sorted(n for part in ("train", "val", "test") for n in splits["ids"][part])
    assert names == sorted(c["name"] for c in _annotated(cases))
