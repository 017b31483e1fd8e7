from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from medcore.errors import ConfigError, DataError, UserError
from medcore.volumes.store import (
    FORMAT,
    FORMAT_VERSION,
    Shard,
    VolumeStore,
    VolumeStoreWriter,
    check_settings,
    complete_names,
    partial_path,
    shard_of,
    shard_output,
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


# -- shards and folders of parts ---------------------------------------------------------------


def test_shard_spec_and_slurm_array_variables() -> None:
    assert Shard.parse("3/10") == Shard(3, 10) and Shard.parse(" 1 / 1 ") == Shard(1, 1)
    for bad, why in (("3/2", "one of 1/2 .. 2/2"), ("0/4", "one of 1/4"), ("x", "is not I/N")):
        with pytest.raises(UserError, match=why) as err:
            Shard.parse(bad)
        assert err.value.what == "--shard" and "\n" not in err.value.why
    assert Shard.from_slurm({}) is None
    # --array=0-9 and --array=1-10 both give shards 1..10; --array=0-18:2 steps of 2
    env = {"SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_MIN": "0"}
    assert Shard.from_slurm({**env, "SLURM_ARRAY_TASK_ID": "0"}) == Shard(1, 10)
    assert Shard.from_slurm({**env, "SLURM_ARRAY_TASK_ID": "9"}) == Shard(10, 10)
    one = {"SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_ID": "10"}
    assert Shard.from_slurm(one) == Shard(10, 10)
    step = {**env, "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_ID": "18"}
    assert Shard.from_slurm(step) == Shard(10, 10)
    with pytest.raises(UserError, match="SLURM_ARRAY_TASK_ID=12"):
        Shard.from_slurm({**env, "SLURM_ARRAY_TASK_ID": "12"})


def test_shards_split_by_name_only() -> None:
    names = [f"train_{i}_a_1.nii.gz" for i in range(3000)]
    owner = {n: shard_of(n, 7) for n in names}
    assert {shard_of(n, 7) for n in reversed(names)} == set(range(1, 8))
    assert all(shard_of(n, 7) == owner[n] for n in reversed(names))  # order does not matter
    counts = np.bincount([owner[n] for n in names], minlength=8)[1:]
    assert counts.min() > 3000 / 7 * 0.85 and counts.max() < 3000 / 7 * 1.15
    shards = [Shard(i, 7) for i in range(1, 8)]
    assert all(sum(s.owns(n) for s in shards) == 1 for n in names)  # each name in one shard
    # a name's shard is a fixed function of the name: sha256, first 8 bytes, big-endian
    digest = hashlib.sha256(b"train_1_a_1.nii.gz").digest()
    assert owner["train_1_a_1.nii.gz"] == int.from_bytes(digest[:8], "big") % 7 + 1


def _part(folder: Path, shard: Shard, volumes: dict[str, int], settings=SETTINGS) -> Path:
    out = shard_output(folder, shard, "test.volumes", settings)
    with VolumeStoreWriter(out, "test.volumes", settings) as store:
        for name, value in volumes.items():
            store.write(name, vol(value))
        store.finish()
    return out


def test_folder_of_parts_reads_as_one_store(tmp_path: Path, capsys) -> None:
    parts = tmp_path / "parts"
    first = _part(parts, Shard(1, 3), {"a": 1, "b": 2})
    _part(parts, Shard(3, 3), {"c": 3})
    assert first.name == "part-00001-of-00003.h5"
    store = VolumeStore(parts, "test.volumes")
    assert sorted(store.names) == ["a", "b", "c"] and store.settings == SETTINGS
    np.testing.assert_array_equal(store.read("c"), vol(3))
    assert pickle.loads(pickle.dumps(store)).read("b")[0, 0, 0] == 2  # no handle crosses
    assert "1 of 3 parts missing (shards 2)" in capsys.readouterr().err
    assert check_settings(parts, {"target_shape": [4, 6, 6]}) == SETTINGS
    with pytest.raises(ConfigError, match="target_shape"):
        check_settings(parts, {"target_shape": [8, 6, 6]})
    partial_path(parts / "part-00002-of-00003.h5").write_bytes(b"")
    VolumeStore(parts)
    assert (
        "1 unfinished part(s) not read (part-00002-of-00003.h5.partial)" in capsys.readouterr().err
    )


def test_parts_that_disagree_are_errors_naming_them(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    _part(parts, Shard(1, 2), {"a": 1})
    second = _part(tmp_path / "other", Shard(2, 2), {"b": 2}, {**SETTINGS, "hu_window": [0, 1]})
    os.replace(second, parts / second.name)
    with pytest.raises(ConfigError) as err:
        VolumeStore(parts)
    assert err.value.what == str(parts / "part-00002-of-00002.h5")
    assert "other settings than part-00001-of-00002.h5: hu_window=[0, 1], not [-1000.0, 400.0]" in (
        err.value.why
    )
    # a shard job checks the parts already there before it starts
    with pytest.raises(ConfigError, match="written with other settings than this job"):
        shard_output(parts, Shard(1, 2), "test.volumes", SETTINGS)
    with pytest.raises(UserError, match="a part of 2 shards; this job is shard 1/3") as err:
        shard_output(parts, Shard(1, 3), "test.volumes", SETTINGS)
    (parts / "part-00002-of-00002.h5").unlink()
    twice = _part(tmp_path / "dup", Shard(2, 2), {"a": 5})
    os.replace(twice, parts / twice.name)
    with pytest.raises(DataError) as err:
        VolumeStore(parts)
    assert err.value.what == "a" and "part-00001-of-00002.h5 and part-00002-of-00002.h5" in (
        err.value.why
    )
    with pytest.raises(UserError, match="is a file; with a shard the output names a folder"):
        shard_output(parts / "part-00001-of-00002.h5", Shard(1, 2), "test.volumes", SETTINGS)
    with pytest.raises(DataError, match="no part files"):
        VolumeStore(tmp_path)
