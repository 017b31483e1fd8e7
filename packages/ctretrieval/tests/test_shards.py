"""Sharded preprocessing: part files read back as one store by training's data and the index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ctretrieval.cli import index, preprocess, train
from ctretrieval.data import CTVolumeDataset, volume_ids
from medcore.testing import call_main
from medcore.volumes.store import shard_of


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(the demo's raw DICOM studies, a smoke run's checkpoint, its preprocess settings)."""
    cache = tmp_path_factory.mktemp("cache")
    run = tmp_path_factory.mktemp("runs") / "smoke"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(cache))
        assert train(["--smoke", "--output-dir", str(run), "--device", "cpu"]) == 0
    ckpt = run / "checkpoints" / "final.pt"
    prep = torch.load(ckpt, weights_only=True)["preprocess_config"]
    (raw,) = cache.rglob("dicom")
    return raw, ckpt, prep


def _flags(prep: dict) -> list[str]:
    lo, hi = prep["hu_window"]
    shape = [str(v) for v in prep["target_shape"]]
    return ["--shape", *shape, "--hu-window", str(lo), str(hi), "--workers", "1"]


def test_shards_index_as_one_store(smoke, tmp_path: Path, capsys) -> None:
    raw, ckpt, prep = smoke
    single, parts = tmp_path / "one.h5", tmp_path / "parts"
    base = [
        "--input",
        str(raw),
        *_flags(prep),
        "--set",
        f"preprocess.min_slices={prep['min_slices']}",
    ]
    assert preprocess([*base, "--output", str(single)]) == 0
    for i in (1, 2, 3):
        assert preprocess([*base, "--output", str(parts), "--shard", f"{i}/3"]) == 0
    ids = volume_ids(single)
    assert len(ids) > 3 and volume_ids(parts) == ids
    owner = {k: shard_of(k, 3) for k in ids}
    assert len(set(owner.values())) > 1  # the studies really are spread over the parts
    for i in (1, 2, 3):
        assert volume_ids(parts / f"part-0000{i}-of-00003.h5") == [k for k in ids if owner[k] == i]
    zeros = np.zeros((len(ids), 1))
    a = CTVolumeDataset(single, ids, zeros, np.zeros(len(ids), dtype=np.int64))
    b = CTVolumeDataset(parts, ids, zeros, np.zeros(len(ids), dtype=np.int64))
    for k in range(len(ids)):
        assert torch.equal(a[k]["volume"], b[k]["volume"])
    capsys.readouterr()
    for volumes, out in ((single, "one.npz"), (parts, "parts.npz")):
        argv = [
            "--checkpoint",
            str(ckpt),
            "--volumes",
            str(volumes),
            "--output",
            str(tmp_path / out),
        ]
        code, stdout, err = call_main(index, [*argv, "--device", "cpu"], capsys)
        assert code == 0, err
        assert f"indexed {len(ids)} studies" in stdout
    one, many = np.load(tmp_path / "one.npz"), np.load(tmp_path / "parts.npz")
    assert one["ids"].tolist() == many["ids"].tolist() == ids
    np.testing.assert_allclose(many["embeddings"], one["embeddings"], rtol=0, atol=1e-6)


def test_shard_spec_errors_are_one_line(tmp_path: Path, helpers, capsys) -> None:
    helpers.write_series(tmp_path / "raw" / "a", helpers.ramp_volume(6, 10, 10))
    argv = ["--input", str(tmp_path / "raw"), "--shape", "4", "8", "8", "--min-slices", "3"]
    for shard, why in (
        ("3/2", "--shard: 3/2: the shard must be one of 1/2 .. 2/2"),
        ("1/0", "1/0"),
    ):
        code, _, err = call_main(
            preprocess, [*argv, "--output", str(tmp_path / "p"), "--shard", shard], capsys
        )
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
        assert why in err
    assert not (tmp_path / "p").exists()
    assert preprocess([*argv, "--output", str(tmp_path / "p"), "--shard", "1/1"]) == 0
    code, _, err = call_main(preprocess, [*argv, "--output", str(tmp_path / "p")], capsys)
    assert code == 2 and "is a folder (of shard parts?)" in err


def test_index_of_parts_that_disagree_is_one_line_error(smoke, tmp_path: Path, capsys) -> None:
    """ctretrieval-index reads a folder of parts as one store: a part written with other
    settings, or a study two parts hold, is one line naming the parts, exit 2, no index."""
    raw, ckpt, prep = smoke
    parts, other = tmp_path / "parts", tmp_path / "other"
    base = [
        "--input",
        str(raw),
        *_flags(prep),
        "--set",
        f"preprocess.min_slices={prep['min_slices']}",
    ]
    assert preprocess([*base, "--output", str(parts), "--shard", "1/2"]) == 0
    wider = [*base, "--output", str(other), "--shard", "2/2"]
    wider[wider.index("--hu-window") + 2] = str(prep["hu_window"][1] + 100)
    assert preprocess(wider) == 0
    (other / "part-00002-of-00002.h5").rename(parts / "part-00002-of-00002.h5")
    capsys.readouterr()
    out = tmp_path / "index.npz"
    argv = ["--checkpoint", str(ckpt), "--volumes", str(parts), "--output", str(out)]

    def fails(*expected: str) -> None:
        code, _, err = call_main(index, [*argv, "--device", "cpu"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        for text in expected:
            assert text in lines[0]
        assert not out.exists()

    fails(
        f"{parts / 'part-00002-of-00002.h5'}: written with other settings than "
        "part-00001-of-00002.h5",
        "hu_window=",
    )
    (parts / "part-00002-of-00002.h5").write_bytes((parts / "part-00001-of-00002.h5").read_bytes())
    fails(f"in two parts of {parts}: part-00001-of-00002.h5 and part-00002-of-00002.h5")
