"""A run refused after its setup (here: data the index finds unusable) leaves ``--output-dir``
as it was: absent, or as empty as the user made it."""

import shutil
from pathlib import Path

import pytest

from histommnet.cli import train
from medcore.testing import call_main, error_line


@pytest.mark.faults
@pytest.mark.parametrize("made_by_user", [False, True], ids=["new_dir", "empty_dir"])
def test_a_broken_data_dir_leaves_no_run_behind(
    made_by_user: bool, tiny_args, tiny_tree: Path, tmp_path: Path, capsys
) -> None:
    # BreakHis without its malignant half: found when the tree is indexed, after setup.
    breast = tiny_tree / "BreaKHis_v1" / "histology_slides" / "breast"
    data = tmp_path / "benign_only"
    shutil.copytree(breast / "benign", data / "benign")
    out = tmp_path / "runs" / "histo"
    if made_by_user:
        out.mkdir(parents=True)
    argv = [*tiny_args(), "--data-dir", str(data), "--output-dir", str(out)]
    code, _, err = call_main(train, argv, capsys)
    assert code == 2, err
    assert "no malignant patient" in error_line(err)
    if made_by_user:
        assert out.is_dir() and not list(out.iterdir())
    else:
        assert not (tmp_path / "runs").exists()
