from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from medcore.errors import ConfigError, DataError
from medcore.volumes.store import (
    FORMAT,
    FORMAT_VERSION,
    VolumeStoreWriter,
    check_settings,
    complete_names,
    partial_path,
)

SETTINGS = {"target_shape": [4, 6, 6], "hu_window": [-1000.0, 400.0], "target_spacing": None}


def vol(i: int) -> np.ndarray:
    return np.full((4, 6, 6), i, dtype=np.uint8)


def test_write_records_format_settings_and_complete_marks(tmp_path: Path) -> None:
    out = tmp_path / "v.h5"
    with VolumeStoreWriter(out, "test.volumes", SETTINGS) as store:
        store.write("a", vol(1), {"source": "a.nii"})
        store.write("b", vol(2))
        assert not out.exists()  # staged until the job finishes
        assert store.finish() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.h5"]
    with h5py.File(out) as f:
        assert f.attrs["format"] == FORMAT and f.attrs["format_version"] == FORMAT_VERSION
        assert f.attrs["kind"] == "test.volumes"
        assert json.loads(f.attrs["settings"]) == SETTINGS
        assert list(f.attrs["target_shape"]) == [4, 6, 6]
        assert complete_names(f) == {"a", "b"}
        assert f["volumes/a"].attrs["source"] == "a.nii"
        np.testing.assert_array_equal(f["volumes/b"][()], vol(2))


def test_unmarked_volume_is_dropped_and_finished_ones_kept(tmp_path: Path) -> None:
    out = tmp_path / "v.h5"
    with VolumeStoreWriter(out, "test.volumes", SETTINGS) as store:
        store.write("a", vol(1))
        # What a kill between the data and its mark leaves: a dataset without `complete`.
        store._h5["volumes"].create_dataset("half", data=vol(9))
    with VolumeStoreWriter(out, "test.volumes", SETTINGS) as store:
        assert store.done == {"a"}
        with h5py.File(partial_path(out)) as f:
            assert "half" not in f["volumes"]
        store.write("b", vol(2))
        assert store.finish() == 2


def test_append_goes_into_the_existing_file_in_place(tmp_path: Path) -> None:
    out = tmp_path / "v.h5"
    with VolumeStoreWriter(out, "test.volumes", SETTINGS) as store:
        for i in range(3):
            store.write(f"old{i}", np.random.default_rng(i).integers(0, 255, (4, 6, 6), np.uint8))
        store.finish()
    inode, size = os.stat(out).st_ino, os.stat(out).st_size
    with h5py.File(out) as f:
        old = {k: f["volumes"][k][()] for k in f["volumes"]}
    with VolumeStoreWriter(out, "test.volumes", SETTINGS) as store:
        assert store.existing == set(old) and store.staged == set()
        store.write("new", vol(7))
        assert store.finish() == 4
    assert os.stat(out).st_ino == inode  # the same file, appended to, not replaced by a copy
    assert os.stat(out).st_size < 2 * size
    with h5py.File(out) as f:
        assert complete_names(f) == {*old, "new"}
        assert all(np.array_equal(f["volumes"][k][()], v) for k, v in old.items())


def test_other_settings_or_kind_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "v.h5"
    with VolumeStoreWriter(out, "test.volumes", SETTINGS) as store:
        store.write("a", vol(1))
        store.finish()
    with (
        pytest.raises(ConfigError, match=r"target_shape=\[4, 6, 6\], not \[8, 6, 6\]"),
        VolumeStoreWriter(out, "test.volumes", {**SETTINGS, "target_shape": [8, 6, 6]}),
    ):
        pass
    with (
        pytest.raises(DataError, match=r"not a other\.volumes volume store"),
        VolumeStoreWriter(out, "other.volumes", SETTINGS),
    ):
        pass
    assert not partial_path(out).exists() and not out.with_name("v.h5.lock").exists()


def test_check_settings_for_downstream_commands(tmp_path: Path, capsys) -> None:
    out = tmp_path / "v.h5"
    with VolumeStoreWriter(out, "test.volumes", SETTINGS) as store:
        store.write("a", vol(1))
        store.finish()
    assert check_settings(out, {"target_shape": (4, 6, 6), "target_spacing": None}) == SETTINGS
    with pytest.raises(ConfigError) as err:
        check_settings(out, {"target_shape": (4, 6, 6), "hu_window": (-1000, 1000)}, hint="fix it")
    assert err.value.why == (
        "written with other settings: hu_window=[-1000.0, 400.0], not [-1000, 1000] (fix it)"
    )
    with pytest.raises(ConfigError, match=r"target_spacing=None, not \[1.0, 1.0, 1.0\]"):
        check_settings(out, {"target_spacing": [1.0, 1.0, 1.0]})
    with h5py.File(tmp_path / "hand.h5", "w") as f:
        f.create_dataset("volumes/a", data=vol(1))
    assert check_settings(tmp_path / "hand.h5", SETTINGS) is None
    assert "records no preprocessing settings" in capsys.readouterr().err
