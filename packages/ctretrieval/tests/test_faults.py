"""Fault injection and broken inputs through ctretrieval's own commands, beyond the run contract
every package keeps (test_run_contract.py: kill -9 of training and resume, a second job, a full
disk, unsafe and foreign checkpoints, broken data directories, NaN batches).

Covered here: kill -9 of ``ctretrieval-preprocess`` while reading studies and while appending them
to the HDF5 file, then a rerun (nothing processed twice, same file as an uninterrupted run, the
output never unreadable) and a second job into it refused; a table of broken raw studies, label
rows, indexes and queries, each named while the job goes on or refused in one line.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import ctretrieval.preprocess as prep_mod
from ctretrieval.cli import evaluate, index, preprocess, search, train
from medcore.testing import assert_refused_while_running, call_main, error_line, wait_until
from medcore.volumes.store import complete_names

pytestmark = pytest.mark.faults

RUNNER = str(Path(__file__).with_name("fault_runner.py"))
TINY = [
    "num_threads=1",
    "device=cpu",
    "model.num_slices=6",
    "model.image_size=[16,16]",
    "model.embedding_size=8",
    "model.fc_hidden=8",
    "model.reduce_channels=[4,4,4]",
    "data.train_eval_frac=1.0",
    "eval.ks=[1,3]",
    "eval.batch_size=16",
    "trainer.batch_size=4",
    "trainer.epochs=1",
    "trainer.num_workers=0",
]
PREP = ["--shape", "4", "8", "8", "--min-slices", "3", "--workers", "1"]


def _h5_volumes(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f["volumes"][k][()] for k in f["volumes"]}


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the runs set num_threads=1; leave other tests as they were


@pytest.fixture(scope="module")
def reference(tiny_volumes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run: the checkpoint the eval / index / search cases use."""
    run = tmp_path_factory.mktemp("runs") / "full"
    sets = [arg for item in TINY for arg in ("--set", item)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        assert train(["--data-dir", str(tiny_volumes), "--output-dir", str(run), *sets]) == 0
    return run


@pytest.fixture(scope="module")
def index_file(
    reference: Path, tiny_volumes: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("index") / "archive.npz"
    ckpt = reference / "checkpoints" / "final.pt"
    argv = ["--checkpoint", str(ckpt), "--data-dir", str(tiny_volumes), "--output", str(out)]
    assert index(argv) == 0
    return out


def _start(what: str, marker: Path, at: int, argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as err:
        return subprocess.Popen(
            [sys.executable, RUNNER, what, str(marker), str(at), *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


# -- kill -9 during preprocessing, a second job refused, rerun -------------------------------


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six raw studies: three DICOM series and three NIfTI files."""
    import importlib.util

    # conftest is not importable under --import-mode=importlib: load its writers by file.
    spec = importlib.util.spec_from_file_location(
        "_ctr_conftest", Path(__file__).with_name("conftest.py")
    )
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    write_series, ramp_volume = conftest.write_series, conftest.ramp_volume
    raw = tmp_path_factory.mktemp("raw")
    for i in range(3):
        write_series(raw / f"d{i}", ramp_volume(5, 10, 10) + 10 * i, seed=i)
        vol = np.linspace(-900, 300, 10 * 10 * 6, dtype=np.float32).reshape(10, 10, 6) + 50 * i
        nib.save(nib.Nifti1Image(vol, np.eye(4)), raw / f"n{i}.nii.gz")
    return raw


@pytest.mark.parametrize("where", ["reading studies", "appending to the HDF5 file"])
def test_kill_9_during_preprocess_then_rerun(
    where: str, raw_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    ref = tmp_path / "ref.h5"
    assert preprocess(["--input", str(raw_dir), "--output", str(ref), *PREP]) == 0
    # An earlier complete output with two of the studies: it must survive the kill readable.
    first = tmp_path / "first"
    first.mkdir()
    for name in ("d0", "n0.nii.gz"):
        src = raw_dir / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, first / name)
    out = tmp_path / "out" / "volumes.h5"
    assert preprocess(["--input", str(first), "--output", str(out), *PREP]) == 0
    before = _h5_volumes(out)
    capsys.readouterr()

    marker, log = tmp_path / "paused", tmp_path / "victim.err"
    what, at = ("preprocess", 3) if where == "reading studies" else ("append", 2)
    argv = ["--input", str(raw_dir), "--output", str(out), *PREP]
    victim = _start(what, marker, at, argv, log)
    try:
        wait_until(marker.exists, victim, log)
        code, _, err = call_main(preprocess, argv, capsys)
        assert_refused_while_running(code, err, out, victim.pid)
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    # Whenever the kill hit, the output is readable, its earlier studies unchanged; the kill while
    # appending leaves the one study already appended, complete and as the reference has it.
    expected = _h5_volumes(ref)
    with h5py.File(out, "r") as f:
        after_kill = {k: f["volumes"][k][()] for k in complete_names(f)}
    appended = set(after_kill) - set(before)
    assert set(before) <= set(after_kill)
    assert all(np.array_equal(after_kill[k], before[k]) for k in before)
    assert len(appended) == (0 if where == "reading studies" else 1)
    assert all(np.array_equal(after_kill[k], expected[k]) for k in appended)
    with h5py.File(out.with_name(out.name + ".partial"), "r") as f:  # the staging store
        done_by_victim = complete_names(f)
    assert len(done_by_victim) == (2 if where == "reading studies" else 4)

    seen: list[str] = []
    real = prep_mod._process_one
    monkeypatch.setattr(prep_mod, "_process_one", lambda s, c: seen.append(s.id) or real(s, c))
    code, stdout, err = call_main(preprocess, argv, capsys)
    assert code == 0, err
    assert f"{len(done_by_victim) + len(before)} already done; 6 volumes in the file" in stdout
    assert len(seen) == len(set(seen))
    assert not set(seen) & (done_by_victim | set(before))  # nothing processed twice
    assert sorted([*seen, *done_by_victim, *before]) == sorted(expected)
    final = _h5_volumes(out)
    assert final.keys() == expected.keys()
    assert all(np.array_equal(final[k], expected[k]) for k in expected)
    assert sorted(p.name for p in out.parent.iterdir()) == ["volumes.h5"]  # no staging, lock


# -- broken inputs ----------------------------------------------------------------------------


def _write_nifti(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def _good_nifti(shape=(10, 10, 6)) -> np.ndarray:
    return np.linspace(-900, 300, int(np.prod(shape)), dtype=np.float32).reshape(shape)


def _edit_slices(folder: Path, edit: Callable) -> None:
    import pydicom

    for k, path in enumerate(sorted(folder.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        edit(k, ds)
        ds.save_as(path)


def _mixed_sizes(k, ds) -> None:
    if k == 0:
        ds.Rows, ds.Columns = 12, 12
        ds.PixelData = np.zeros((12, 12), np.int16).tobytes()


def _bomb_header(k, ds) -> None:
    ds.Rows, ds.Columns = 60000, 60000


def _no_pixels(k, ds) -> None:
    del ds.PixelData


def _nifti_bomb(path: Path) -> None:
    _write_nifti(path, _good_nifti())
    img = nib.load(str(path))
    header = img.header.copy()
    header.set_data_shape((30000, 30000, 30000))
    raw = path.read_bytes()
    import gzip

    data = gzip.decompress(raw)
    new = header.binaryblock + data[len(header.binaryblock) :]
    path.write_bytes(gzip.compress(new))


def _raw_case(case: str, bad: Path, helpers) -> None:
    """Write the broken study ``bad`` (a DICOM folder or ``bad.nii.gz``) of ``case``."""
    nii = bad.with_name("bad.nii.gz")
    if case.startswith("dicom"):
        slices = 2 if case == "dicom too few slices" else 5
        paths = helpers.write_series(bad, helpers.ramp_volume(slices, 10, 10))
    if case == "dicom zero-byte slice":
        paths[1].write_bytes(b"")
    elif case == "dicom truncated header":
        paths[1].write_bytes(paths[1].read_bytes()[:500])
    elif case == "dicom truncated pixel data":
        paths[1].write_bytes(paths[1].read_bytes()[:-50])
    elif case == "dicom mixed slice sizes":
        _edit_slices(bad, _mixed_sizes)
    elif case == "dicom without pixel data":
        _edit_slices(bad, _no_pixels)
    elif case == "dicom bomb-sized header":
        _edit_slices(bad, _bomb_header)
    elif case == "nifti zero-byte":
        nii.write_bytes(b"")
    elif case == "nifti truncated":
        _write_nifti(nii, _good_nifti())
        nii.write_bytes(nii.read_bytes()[:200])
    elif case == "nifti 4-D":
        _write_nifti(nii, np.stack([_good_nifti(), _good_nifti()], axis=-1))
    elif case == "nifti 2-D":
        _write_nifti(nii, _good_nifti((10, 10, 1))[..., 0])
    elif case == "nifti NaN voxels":
        vol = _good_nifti()
        vol[2, 3, 1] = np.nan
        _write_nifti(nii, vol)
    elif case == "nifti inf voxels":
        vol = _good_nifti()
        vol[0, 0, 0] = np.inf
        _write_nifti(nii, vol)
    elif case == "nifti bomb-sized header":
        _nifti_bomb(nii)


# (case, what the skip line says)
RAW_SKIPS = [
    ("dicom zero-byte slice", "corrupt or not a DICOM file"),
    ("dicom truncated header", "without pixel data (truncated?)"),
    ("dicom truncated pixel data", "cannot decode pixel data"),
    ("dicom mixed slice sizes", "mixed slice sizes"),
    ("dicom too few slices", "too few slices (2 < 3)"),
    ("dicom without pixel data", "without pixel data"),
    ("dicom bomb-sized header", "60000 x 60000 pixels; refusing to decode"),
    ("nifti zero-byte", "empty file (0 bytes)"),
    ("nifti truncated", "truncated or corrupt gzip data"),
    ("nifti 4-D", "expected a 3D volume"),
    ("nifti 2-D", "expected a 3D volume"),
    ("nifti NaN voxels", "NaN"),
    ("nifti inf voxels", "inf"),
    ("nifti bomb-sized header", "refusing to decode"),
]


@pytest.mark.parametrize(("case", "reason"), RAW_SKIPS, ids=[c for c, _ in RAW_SKIPS])
def test_broken_raw_study_is_skipped_by_name(
    case: str, reason: str, tmp_path: Path, helpers, capsys
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_nifti(raw / "good.nii.gz", _good_nifti())
    _raw_case(case, raw / "bad", helpers)
    out = tmp_path / "v.h5"
    code, stdout, err = call_main(
        preprocess, ["--input", str(raw), "--output", str(out), *PREP], capsys
    )
    assert code == 0, err
    assert "Traceback" not in err and "error:" not in err
    skips = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(skips) == 1 and skips[0].startswith("skipped bad: ") and reason in skips[0], err
    assert "1 studies written, 1 skipped" in stdout
    assert list(_h5_volumes(out)) == ["good"]


@pytest.mark.parametrize("case", ["empty input directory", "only broken studies"])
def test_preprocess_nothing_readable_is_one_line_error(case: str, tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    if case == "only broken studies":
        (raw / "a.nii.gz").write_bytes(b"\x1f\x8b broken")
    out = tmp_path / "v.h5"
    code, _, err = call_main(preprocess, ["--input", str(raw), "--output", str(out), *PREP], capsys)
    assert code == 2
    line = error_line(err)
    assert ("no studies found" if case.startswith("empty") else "none of the 1 studies") in line
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()


def _labels(data_dir: Path) -> pd.DataFrame:
    return pd.read_csv(data_dir / "labels.csv", dtype={"CT": str})


def _bad_data(case: str, src: Path, dst: Path) -> None:
    """``dst``: a copy of the tiny data dir with the labels broken as ``case`` says, in a way the
    job survives, each bad row or study named on stderr."""
    shutil.copytree(src, dst)
    csv = dst / "labels.csv"
    frame = _labels(src)
    if case == "labels extra column":
        frame.assign(enfisema=1).to_csv(csv, index=False)
    elif case == "labels outside {0,1} in some rows":
        frame.loc[1, "nodulos"], frame.loc[2, "quistes"] = 2, -1
        frame.to_csv(csv, index=False)
    elif case == "labelled ids without a volume":
        pd.concat([frame, frame.iloc[:1].assign(CT="ghost")]).to_csv(csv, index=False)
    elif case == "volumes without labels":
        frame.iloc[1:].to_csv(csv, index=False)
    elif case == "ids climbing out with ../":
        pd.concat([frame, frame.iloc[:1].assign(CT="../../etc/passwd")]).to_csv(csv, index=False)
    else:
        raise AssertionError(case)


# (case, what the warning names)
DATA_WARNINGS = [
    ("labels extra column", "enfisema"),
    ("labels outside {0,1} in some rows", "dropped 2 row(s)"),
    ("labelled ids without a volume", "ghost"),
    ("volumes without labels", "s00"),
    ("ids climbing out with ../", "../../etc/passwd"),
]


@pytest.mark.parametrize(("case", "named"), DATA_WARNINGS, ids=[c for c, _ in DATA_WARNINGS])
def test_partly_broken_data_is_named_and_the_job_goes_on(
    case: str, named: str, tiny_volumes: Path, reference: Path, tmp_path: Path, capsys
) -> None:
    bad = tmp_path / "data"
    _bad_data(case, tiny_volumes, bad)
    ckpt = reference / "checkpoints" / "final.pt"
    argv = ["--checkpoint", str(ckpt), "--split", "all", "--data-dir", str(bad)]
    code, out, err = call_main(evaluate, [*argv, "--output-dir", str(tmp_path / "ev")], capsys)
    assert code == 0, err
    assert "map@1" in out
    assert "Traceback" not in err and "error:" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert any(named in line for line in warnings), err
    assert (tmp_path / "ev" / "metrics.json").is_file()


def test_search_and_eval_inputs_are_one_line_errors(
    reference: Path, index_file: Path, tmp_path: Path, capsys
) -> None:
    ckpt = reference / "checkpoints" / "final.pt"
    broken_nii = tmp_path / "q.nii.gz"
    _write_nifti(broken_nii, _good_nifti())
    broken_nii.write_bytes(broken_nii.read_bytes()[:200])
    zero_index = tmp_path / "zero.npz"
    zero_index.write_bytes(b"")
    zero_ckpt, half_ckpt = tmp_path / "zero.pt", tmp_path / "half.pt"
    zero_ckpt.write_bytes(b"")
    half_ckpt.write_bytes(ckpt.read_bytes()[:100_000])
    out = ["--output", str(tmp_path / "r.csv")]
    cases = [
        (search, ["--index", str(index_file), "--query", "CT_9999", *out], "CT_9999"),
        (
            search,
            ["--index", str(index_file), "--query", str(broken_nii), *out],
            "truncated or corrupt gzip data",
        ),
        (
            search,
            ["--index", str(index_file), "--query", str(tmp_path / "missing.nii.gz"), *out],
            "not found",
        ),
        (search, ["--index", str(zero_index), "--query", "s00", *out], "not a ctretrieval index"),
        (evaluate, ["--checkpoint", str(zero_ckpt), "--split", "all"], "empty file"),
        (evaluate, ["--checkpoint", str(half_ckpt), "--split", "all"], "truncated or corrupt"),
    ]
    for fn, argv, message in cases:
        code, _, err = call_main(fn, argv, capsys)
        assert code == 2, (argv, err)
        assert message in error_line(err), (argv, err)
    assert not (tmp_path / "r.csv").exists()
