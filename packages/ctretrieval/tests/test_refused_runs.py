"""A run refused after its setup (here: a weights file of another architecture, found when the
trunk loads it) leaves ``--output-dir`` as it was: absent, or as empty as the user made it."""

from pathlib import Path

import pytest
import torch
import torchvision

from ctretrieval.cli import train
from medcore.testing import call_main, error_line


@pytest.fixture
def other_architecture(tmp_path: Path) -> Path:
    """torchvision's MobileNetV3-Small state dict, saved the way torchvision users save it."""
    path = tmp_path / "mobilenet_v3_small.pth"
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    return path


@pytest.mark.faults
@pytest.mark.parametrize("made_by_user", [False, True], ids=["new_dir", "empty_dir"])
def test_weights_of_another_architecture_leave_no_run_behind(
    made_by_user: bool, small_dataset: Path, other_architecture: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "runs" / "ct"
    if made_by_user:
        out.mkdir(parents=True)
    argv = ["--data-dir", str(small_dataset), "--output-dir", str(out), "--device", "cpu"]
    argv += ["--pretrained-weights", str(other_architecture)]
    argv += ["--set", "model.num_slices=6", "--set", "model.image_size=[32,32]"]
    code, _, err = call_main(train, argv, capsys)
    assert code == 2, err
    line = error_line(err)
    assert line.startswith(f"error: {other_architecture}: ") and "wrong architecture" in line
    if made_by_user:
        assert out.is_dir() and not list(out.iterdir())
    else:
        assert not (tmp_path / "runs").exists()
