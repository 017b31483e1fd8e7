"""The store's recorded settings against the config: a mismatch stops training in one line."""

from __future__ import annotations

import shutil

import h5py
import pytest

from ctclip.cli import train
from ctclip.config import DataConfig
from ctclip.data import check_store
from medcore.errors import ConfigError
from medcore.testing import call_main, error_line


@pytest.mark.parametrize(
    "setting, message",
    [
        ("data.target_shape=[8,32,32]", "target_shape=[8, 28, 28], not [8, 32, 32]"),
        ("data.slide_b2u=false", "slide_b2u=True, not False"),
    ],
)
def test_training_refuses_a_store_written_with_other_settings(
    setting, message, tiny_demo, tiny_sets, tmp_path, capsys
) -> None:
    argv = ["--data-dir", str(tiny_demo), "--output-dir", str(tmp_path / "run"), *tiny_sets]
    code, _, err = call_main(train, [*argv, "--set", setting, "--set", "device=cpu"], capsys)
    assert code == 2, err
    assert "written with other settings: " + message in error_line(err)
    assert "Traceback" not in err


def test_matching_settings_pass_and_a_changed_hu_range_is_refused(tiny_demo, tmp_path) -> None:
    recorded = check_store(tiny_demo / "ct_volumes.h5", DataConfig(target_shape=[8, 28, 28]))
    assert recorded["target_shape"] == [8, 28, 28] and recorded["orientation"] == "SPL"
    h5 = tmp_path / "other.h5"
    shutil.copy(tiny_demo / "ct_volumes.h5", h5)
    with h5py.File(h5, "a") as f:
        f.attrs["settings"] = f.attrs["settings"].replace("-1000.0, 1000.0", "-1000.0, 400.0")
    with pytest.raises(ConfigError, match=r"hu_range=\[-1000.0, 400.0\], not \[-1000.0, 1000.0\]"):
        check_store(h5)
