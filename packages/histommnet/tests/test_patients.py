"""Every BreakHis spelling of a patient names the same folders (one normaliser)."""

from __future__ import annotations

from pathlib import Path

import pytest

from histommnet.breakhis import (
    Patient,
    find_patients,
    parse_name,
    parse_path,
    parse_patient,
    scan_breakhis,
)
from medcore.errors import DataError


def _patients(*keys: str) -> list[Patient]:
    """Patient folders as scan_breakhis makes them (labels read from the folder name)."""
    out = []
    for key in keys:
        name = parse_patient(key)
        out.append(Patient(key, name.patient_id, name.label, name.subtype, images={}))
    return out


# Folders as the BreakHis download names them: one patient with three slides under adenosis,
# another patient whose slide number recurs in another year, and an unrelated carcinoma.
REAL = _patients(
    "SOB_B_A_14-22549AB",
    "SOB_B_A_14-22549CD",
    "SOB_B_A_14-22549G",
    "SOB_M_DC_13-22549",
    "SOB_M_DC_14-2523",
)


@pytest.mark.parametrize(
    "spelling",
    [
        "14-22549AB",
        "22549AB",
        "SOB_B_A_14-22549AB",
        "SOB_B_A-14-22549AB",
        "sob_b_a-14-22549ab",  # case-insensitive
        " 14-22549ab ",
        "SOB_B_A-14-22549AB-40-001.png",  # an image of the patient names it too
    ],
)
def test_every_spelling_names_the_folder(spelling: str) -> None:
    assert [p.key for p in find_patients(spelling, REAL)] == ["SOB_B_A_14-22549AB"]


def test_a_patient_number_names_all_its_slides() -> None:
    keys = [p.key for p in find_patients("14-22549", REAL)]
    assert keys == ["SOB_B_A_14-22549AB", "SOB_B_A_14-22549CD", "SOB_B_A_14-22549G"]
    assert [p.key for p in find_patients("sob_m_dc_13-22549", REAL)] == ["SOB_M_DC_13-22549"]
    assert [p.key for p in find_patients("2523", REAL)] == ["SOB_M_DC_14-2523"]


def test_ambiguous_and_unknown_spellings_name_the_candidates() -> None:
    with pytest.raises(LookupError) as caught:
        find_patients("22549", REAL)  # patient 14-22549 and patient 13-22549
    why = str(caught.value)
    assert why.startswith("ambiguous: names 2 patients")
    assert "SOB_B_A_14-22549AB" in why and "SOB_M_DC_13-22549" in why
    with pytest.raises(LookupError) as caught:
        find_patients("14-22549EF", REAL)  # no such slide: the patient's slides are close
    why = str(caught.value)
    assert why.startswith("no such patient in the data; close: ")
    assert "SOB_B_A_14-22549AB" in why and "SOB_B_A_14-22549G" in why
    assert "2523" not in why
    with pytest.raises(LookupError, match="close: SOB_M_DC_14-2523"):
        find_patients("SOB_M_DC_14-2532", REAL)  # transposed digits
    with pytest.raises(LookupError, match="tumour type DC is not benign"):
        find_patients("SOB_B_DC_14-2523", REAL)
    with pytest.raises(LookupError, match="not a BreakHis patient"):
        find_patients("patient 7", REAL)


def test_one_normaliser_for_names_folders_and_users(tmp_path: Path) -> None:
    from_file = parse_name("SOB_B_A-14-22549AB-40-001.png").patient
    assert from_file == parse_patient("SOB_B_A_14-22549AB") == parse_patient("sob_b_a-14-22549ab")
    assert from_file.folder == "SOB_B_A_14-22549AB" and from_file.patient_id == "14-22549"
    assert parse_patient("22549AB").year is None and parse_patient("22549AB").label is None
    with pytest.raises(DataError):
        parse_patient("SOB_X_A_14-1")
    # a folder spelled in lower case is the same patient as its files say
    path = tmp_path / "benign/SOB/adenosis/sob_b_a_14-22549ab/40X/SOB_B_A-14-22549AB-40-001.png"
    assert parse_path(path).patient_id == "14-22549"
    # a folder that names another slide of the same patient is a disagreement
    other = tmp_path / "benign/SOB/adenosis/SOB_B_A_14-22549CD/40X/SOB_B_A-14-22549AB-40-001.png"
    with pytest.raises(DataError, match="folder says SOB_B_A_14-22549CD"):
        parse_path(other)


def test_the_scanned_tree_answers_the_spellings(tiny_tree: Path) -> None:
    patients = scan_breakhis(tiny_tree, verbose=False).patients
    pair = ["SOB_B_A_14-1001AB", "SOB_B_A_14-1001CD"]
    assert [p.key for p in find_patients("14-1001", patients)] == pair
    for spelling in ("14-1001cd", "1001CD", "SOB_B_A-14-1001CD", "SOB_B_A_14-1001CD"):
        assert [p.key for p in find_patients(spelling, patients)] == [pair[1]]
