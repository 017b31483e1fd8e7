from __future__ import annotations

from pathlib import Path

import pytest

from histommnet.breakhis import draws_per_patient, parse_name, parse_path, scan_breakhis
from medcore.errors import DataError


def test_parse_real_names() -> None:
    p = parse_name("SOB_B_A-14-22549AB-40-001.png")
    assert (p.label, p.subtype, p.magnification, p.seq) == (0, 0, "40X", 1)
    assert p.patient_folder == "SOB_B_A_14-22549AB"
    assert p.patient_id == "14-22549"  # letter suffixes are slides of one patient
    q = parse_name("SOB_M_DC-14-2523-400-013.png")
    assert (q.label, q.subtype, q.magnification, q.seq) == (1, 4, "400X", 13)
    assert q.patient_folder == "SOB_M_DC_14-2523"
    assert parse_name("SOB_M_PC-15-190EF-100-002.png").subtype == 7


@pytest.mark.parametrize(
    "name",
    [
        "SOB_X_A-14-22549AB-40-001.png",  # no such class letter
        "SOB_B_ZZ-14-22549AB-40-001.png",  # no such tumour type
        "SOB_B_DC-14-22549AB-40-001.png",  # ductal carcinoma is not benign
        "image_001.png",
        "SOB_B_A-14-22549AB-40.png",
    ],
)
def test_parse_rejects_bad_names(name: str) -> None:
    with pytest.raises(DataError):
        parse_name(name)


def test_parse_path_reports_folder_disagreement(tmp_path: Path) -> None:
    ok = tmp_path / "benign/SOB/adenosis/SOB_B_A_14-1/40X/SOB_B_A-14-1-40-001.png"
    rec = parse_path(ok)
    assert (rec.label, rec.subtype, rec.magnification, rec.patient_folder) == (
        0,
        0,
        "40X",
        "SOB_B_A_14-1",
    )
    wrong_class = tmp_path / "benign/SOB/adenosis/SOB_B_A_14-1/40X/SOB_M_DC-14-1-40-001.png"
    with pytest.raises(DataError, match="folder says benign"):
        parse_path(wrong_class)
    wrong_mag = tmp_path / "benign/SOB/adenosis/SOB_B_A_14-1/100X/SOB_B_A-14-1-40-001.png"
    with pytest.raises(DataError, match="folder says 100X"):
        parse_path(wrong_mag)
    wrong_patient = tmp_path / "benign/SOB/adenosis/SOB_B_A_14-2/40X/SOB_B_A-14-1-40-001.png"
    with pytest.raises(DataError, match="patient"):
        parse_path(wrong_patient)


def _patient(
    write_tile,
    root: Path,
    cls: str,
    folder: str,
    code: str,
    slide: str,
    mags=("40X", "100X", "200X", "400X"),
    n=2,
):
    letter = "B" if cls == "benign" else "M"
    for mag in mags:
        for s in range(1, n + 1):
            write_tile(
                root,
                cls,
                folder,
                f"SOB_{letter}_{code}_14-{slide}",
                mag,
                f"SOB_{letter}_{code}-14-{slide}-{mag[:-1]}-{s:03d}.png",
            )


def test_scan_skips_bad_files_by_name(
    write_tile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _patient(write_tile, tmp_path, "benign", "adenosis", "A", "1")
    _patient(write_tile, tmp_path, "malignant", "ductal_carcinoma", "DC", "2")
    bad_dir = tmp_path / "malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2/40X"
    (bad_dir / "SOB_M_DC-14-2-40-009.png").write_bytes(b"")  # empty
    (bad_dir / "SOB_M_DC-14-2-40-010.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    good = (bad_dir / "SOB_M_DC-14-2-40-001.png").read_bytes()
    (bad_dir / "SOB_M_DC-14-2-40-011.png").write_bytes(good[: len(good) // 2])  # truncated
    (bad_dir / "notes.png").write_bytes(good)  # name does not parse
    (bad_dir / "SOB_B_A-14-2-40-001.png").write_bytes(good)  # disagrees with its folders
    index = scan_breakhis(tmp_path)
    err = capsys.readouterr().err
    assert len(index.skipped) == 5
    for name in ("40-009", "40-010", "40-011", "notes.png", "SOB_B_A-14-2-40-001"):
        assert name in err
    assert "skipped 5 item(s)" in err
    assert [p.key for p in index.patients] == ["SOB_B_A_14-1", "SOB_M_DC_14-2"]
    assert all(len(p.images[m]) == 2 for p in index.patients for m in p.images)


def test_missing_magnification_nearest_and_skip(
    write_tile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _patient(write_tile, tmp_path, "benign", "adenosis", "A", "1")
    _patient(write_tile, tmp_path, "benign", "fibroadenoma", "F", "3", mags=("40X", "200X"))
    _patient(write_tile, tmp_path, "malignant", "ductal_carcinoma", "DC", "2")
    index = scan_breakhis(tmp_path, missing="nearest")
    p = next(p for p in index.patients if p.key == "SOB_B_F_14-3")
    # 100X is equally far from 40X and 200X: the lower wins; 400X's nearest is 200X.
    assert p.filled_from == {"100X": "40X", "400X": "200X"}
    assert p.images["100X"] == p.images["40X"] and p.images["400X"] == p.images["200X"]
    assert "SOB_B_F_14-3" in capsys.readouterr().err
    skipped = scan_breakhis(tmp_path, missing="skip")
    assert "SOB_B_F_14-3" not in [q.key for q in skipped.patients]
    assert any(what == "SOB_B_F_14-3" for what, _ in skipped.skipped)
    assert "patient SOB_B_F_14-3" in capsys.readouterr().err


def test_empty_class_and_empty_tree(write_tile, tmp_path: Path) -> None:
    _patient(write_tile, tmp_path, "benign", "adenosis", "A", "1")
    with pytest.raises(DataError, match="no malignant patient"):
        scan_breakhis(tmp_path)
    with pytest.raises(DataError, match="data directory not found"):
        scan_breakhis(tmp_path / "does_not_exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no usable BreakHis images"):
        scan_breakhis(tmp_path / "empty")


@pytest.mark.parametrize(
    ("count", "expected"), [(2, 3), (5, 3), (10, 6), (15, 9), (16, 7), (30, 12), (31, 8), (100, 25)]
)
def test_adaptive_draw_rule(count: int, expected: int) -> None:
    # <=15: ceil(60%), 16..30: ceil(40%), >30: ceil(25%), never fewer than the 3 base images
    assert draws_per_patient(count) == expected
    assert draws_per_patient(count, cap=4) == min(expected, 4)
