import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlandmarks.config import DataConfig
from cxrlandmarks.data import (
    HEADED_COLUMNS,
    LandmarkDataset,
    load_records,
    read_annotations,
    split_records,
)
from medcore.errors import DataError


def test_headerless_original_layout(small_dataset):
    root, meta = small_dataset
    records = load_records(DataConfig(), root)
    assert [r.name for r in records] == [m["name"] for m in meta]
    assert [r.category for r in records] == [m["category"] for m in meta]
    np.testing.assert_array_equal(records[0].coords, meta[0]["coords"])
    assert (records[0].width, records[0].height) == (299, 299)
    np.testing.assert_allclose(records[0].normalised, meta[0]["coords"] / 299)


def test_headed_layout_with_jpg_and_category_column(small_dataset):
    root, meta = small_dataset
    # Move one image to .jpg without a category prefix in its name: the category column finds it.
    src = root / "dataset" / "Normal" / "Normal-1.png"
    Image.open(src).convert("L").save(root / "dataset" / "Normal" / "patient7.jpg", quality=95)
    frame = pd.DataFrame(
        [
            {
                "image_name": "patient7",
                "category": "Normal",
                **dict(zip(HEADED_COLUMNS, meta[2]["coords"].ravel().tolist(), strict=True)),
            }
        ]
    )
    frame.to_csv(root / "headed.csv", index=False)
    records = load_records(DataConfig(csv="headed.csv"), root)
    assert (
        len(records) == 1 and records[0].path.suffix == ".jpg" and records[0].category == "Normal"
    )


def test_bad_rows_are_named_and_skipped(small_dataset, write_headerless, capsys):
    root, meta = small_dataset
    rows = [[i, *m["coords"].ravel().tolist(), m["name"]] for i, m in enumerate(meta)]
    rows[0][5] = ""  # missing coordinate
    rows[1][1] = 400  # x outside the 299-px image
    rows[2][-1] = "Normal-99"  # no such image
    write_headerless(root / "bad.csv", rows)
    # One of six rows without an image is over the 2% bar: accepted only with allow_missing.
    records = load_records(DataConfig(csv="bad.csv", allow_missing=True), root)
    err = capsys.readouterr().err
    assert len(records) == 3
    assert f"skipped {meta[0]['name']}: missing or non-numeric coordinates" in err
    assert f"skipped {meta[1]['name']}: coordinates outside the 299x299 image" in err
    assert "skipped Normal-99: no image" in err
    assert "skipped 3 of 6 rows" in err


def test_wrong_column_count_is_one_clear_error(small_dataset, write_headerless):
    root, meta = small_dataset
    write_headerless(
        root / "short.csv", [[0, *meta[0]["coords"].ravel().tolist()[:-2], meta[0]["name"]]]
    )
    with pytest.raises(DataError, match="expected 32 columns"):
        read_annotations(root / "short.csv")


def test_path_escape_in_name_is_skipped(small_dataset, write_headerless, capsys):
    root, meta = small_dataset
    write_headerless(
        root / "evil.csv",
        [
            [0, *meta[0]["coords"].ravel().tolist(), "../../etc/passwd"],
            [1, *meta[1]["coords"].ravel().tolist(), meta[1]["name"]],
        ],
    )
    records = load_records(DataConfig(csv="evil.csv"), root)
    assert len(records) == 1
    assert "skipped ../../etc/passwd" in capsys.readouterr().err


def test_grayscale_rgba_and_16bit_images_are_converted(small_dataset):
    root, _ = small_dataset
    p0 = root / "dataset" / "COVID" / "COVID-1.png"
    gray = np.asarray(Image.open(p0))
    Image.fromarray(np.stack([gray] * 3 + [np.full_like(gray, 255)], -1), mode="RGBA").save(p0)
    p1 = root / "dataset" / "COVID" / "COVID-2.png"
    Image.fromarray(np.asarray(Image.open(p1)).astype(np.uint16) * 257).save(p1)
    records = load_records(DataConfig(), root)
    ds = LandmarkDataset(records, 32)
    for i in (0, 1):
        sample = ds[i]
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
        assert torch.isfinite(sample["image"]).all()
        np.testing.assert_allclose(
            sample["target"].numpy(), records[i].normalised.ravel(), atol=1e-6
        )


def test_split_is_stratified_and_deterministic():
    from cxrlandmarks.data import LandmarkRecord

    recs = [
        LandmarkRecord(f"{c}-{i}", c, None, np.zeros((15, 2)), 299, 299)
        for c in ("COVID", "Normal", "Viral Pneumonia")
        for i in range(40)
    ]
    a = split_records(recs, {"train": 0.7, "val": 0.15, "test": 0.15}, 42)
    b = split_records(recs, {"train": 0.7, "val": 0.15, "test": 0.15}, 42)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(120))
    for k, n in (("val", 6), ("test", 6)):
        cats = pd.Series([recs[i].category for i in a[k]]).value_counts()
        assert (cats == n).all(), cats


def test_missing_images_dir_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="image directory not found"):
        load_records(DataConfig(), tmp_path)


def test_image_cache_gives_the_same_samples(small_dataset):
    root, _ = small_dataset
    records = load_records(DataConfig(), root)
    plain, cached = LandmarkDataset(records, 48), LandmarkDataset(records, 48, cache=True)
    for _ in range(2):  # second pass is served from the cache
        for i in range(len(records)):
            a, b = plain[i], cached[i]
            assert torch.equal(a["image"], b["image"]) and torch.allclose(a["target"], b["target"])
    assert len(cached._cache) == len(records)


def test_category_folder_and_name_spellings_match_tolerantly(small_dataset, write_headerless):
    """``Viral_Pneumonia`` in the CSV, ``viral pneumonia/`` on disk, other case: all found."""
    root, meta = small_dataset
    (root / "dataset" / "Viral Pneumonia").rename(root / "dataset" / "viral_pneumonia")
    (root / "dataset" / "Normal").rename(root / "dataset" / "NORMAL")
    rows = [
        [i, *m["coords"].ravel().tolist(), m["name"].replace("Viral Pneumonia", "Viral_Pneumonia")]
        for i, m in enumerate(meta)
    ]
    write_headerless(root / "spelled.csv", rows)
    records = load_records(DataConfig(csv="spelled.csv"), root)
    assert len(records) == 6
    # Categories are the canonical ones of data.categories, whatever the spelling on disk.
    assert [r.category for r in records] == [m["category"] for m in meta]
    assert {r.path.parent.name for r in records} == {"COVID", "NORMAL", "viral_pneumonia"}


def test_more_than_two_percent_missing_images_is_an_error_with_counts(small_dataset, capsys):
    root, _ = small_dataset
    for p in (root / "dataset" / "Normal").iterdir():
        p.unlink()
    with pytest.raises(
        DataError, match=r"2 of 6 annotated rows \(33.3%\) have no image file \(Normal 2\)"
    ) as exc:
        load_records(DataConfig(), root)
    assert "--allow-missing" in exc.value.why
    records = load_records(DataConfig(allow_missing=True), root)
    assert len(records) == 4
    assert "warning: 2 of 6 annotated rows (33.3%) have no image file (Normal 2)" in (
        capsys.readouterr().err
    )


def test_missing_share_at_most_two_percent_is_accepted(tmp_path, write_headerless):
    """51 rows, one without an image (1.96%): a loud line, not an error."""
    from cxrlandmarks.synthetic import render_case

    rng = np.random.default_rng(1)
    img, lm = render_case(rng, "Normal")
    folder = tmp_path / "dataset" / "Normal"
    folder.mkdir(parents=True)
    rows = []
    for i in range(51):
        if i:
            Image.fromarray(img, mode="L").save(folder / f"Normal-{i}.png")
        rows.append([i, *np.round(lm).astype(int).ravel().tolist(), f"Normal-{i}"])
    write_headerless(tmp_path / "coordenadas" / "coordenadas_maestro.csv", rows)
    assert len(load_records(DataConfig(), tmp_path)) == 50
