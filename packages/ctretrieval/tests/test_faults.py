"""Fault injection and broken inputs through ctretrieval's own commands (issue 9).

Covered: kill -9 mid-epoch of ``ctretrieval-train`` then ``--resume latest`` (same weights as an
uninterrupted run); kill -9 of ``ctretrieval-preprocess`` while reading studies and while
appending them to the HDF5 file, then a rerun (nothing processed twice, same file as an uninterrupted
run, the output never unreadable); a second job into a running job's output (refused by the
lock); a failing checkpoint write; checkpoints that would run code or belong to another package,
given to eval / index / search / train --resume; a table of broken raw studies, label CSVs,
volume files, indexes and queries; NaN batches. Not here: DDP rank failure (medcore's own fault
tests cover it at Trainer level; ctretrieval adds nothing to it).
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
import ctretrieval.train as train_mod
from ctretrieval.cli import evaluate, index, preprocess, search, train
from medcore.testing import (
    RunsCode,
    all_finite,
    assert_refused_while_running,
    call_main,
    disk_full_on,
    error_line,
    wait_until,
)
from medcore.volumes.store import complete_names
from medcore.weights.checkpoint import load_checkpoint

pytestmark = pytest.mark.faults

RUNNER = str(Path(__file__).with_name("fault_runner.py"))
KIND = "ctretrieval.Proximity100x100"
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
    "trainer.save_every_steps=1",
]
PREP = ["--shape", "4", "8", "8", "--min-slices", "3", "--workers", "1"]
FINDINGS = ["condensacion", "nodulos", "quistes"]


def _sets(*items: str) -> list[str]:
    return [arg for item in [*TINY, *items] for arg in ("--set", item)]


def _train_argv(data: Path, out: Path, *items: str) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), *_sets(*items)]


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
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """volumes.h5 (16 studies, 6 x 16 x 16 uint8, findings drawn in) and labels.csv."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    with h5py.File(root / "volumes.h5", "w") as f:
        group = f.create_group("volumes")
        for i in range(16):
            found = [int(v) for v in rng.integers(0, 2, 3)]
            vol = rng.integers(0, 40, (6, 16, 16)).astype(np.uint8)
            for j, on in enumerate(found):
                if on:
                    vol[:, 2 + 4 * j : 5 + 4 * j, 3:8] = 220
            group.create_dataset(f"s{i:02d}", data=vol)
            rows.append({"CT": f"s{i:02d}", **dict(zip(FINDINGS, found, strict=True))})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted tiny run (also the checkpoint the eval / index / search cases use)."""
    run = tmp_path_factory.mktemp("runs") / "full"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        assert train(_train_argv(data_dir, run)) == 0
    return run


@pytest.fixture(scope="module")
def index_file(reference: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "archive.npz"
    ckpt = reference / "checkpoints" / "final.pt"
    assert (
        index(["--checkpoint", str(ckpt), "--data-dir", str(data_dir), "--output", str(out)]) == 0
    )
    return out


def _start(what: str, marker: Path, at: int, argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as err:
        return subprocess.Popen(
            [sys.executable, RUNNER, what, str(marker), str(at), *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


# -- 1 + 3: kill -9 mid-epoch, a second job refused, --resume latest ----------------------------


def test_kill_9_mid_epoch_second_job_refused_then_resume_latest(
    data_dir: Path, reference: Path, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "killed"
    marker, log = tmp_path / "paused", tmp_path / "victim.err"
    latest = run / "checkpoints" / "latest.pt"
    # Paused inside the third step of the epoch: latest.pt of step 2 is on disk.
    victim = _start("train", marker, 3, _train_argv(data_dir, run), log)
    try:
        wait_until(marker.exists, victim, log)
        # 3: a second job into the running job's directory is refused and changes nothing
        config = (run / "config.yaml").read_bytes()
        code, _, err = call_main(train, _train_argv(data_dir, run, "trainer.lr=0.5"), capsys)
        assert_refused_while_running(code, err, run, victim.pid)
        assert (run / "config.yaml").read_bytes() == config
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    state = load_checkpoint(latest, kind=KIND)
    assert state["epoch"] == 0 and state["batch_in_epoch"] == 2 and state["global_step"] == 2
    assert not (run / "checkpoints" / "final.pt").exists()

    # Only the run dir: the data, tiny model and schedule come from the run's config.yaml.
    code, out, err = call_main(train, ["--resume", "latest", "--output-dir", str(run)], capsys)
    assert code == 0, err
    assert "queries ranked against" in out
    a = load_checkpoint(reference / "checkpoints" / "final.pt", kind=KIND)
    b = load_checkpoint(run / "checkpoints" / "final.pt", kind=KIND)
    assert a["global_step"] == b["global_step"]
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# -- 2 + 3: kill -9 during preprocessing, a second job refused, rerun ---------------------------


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


# -- 4: a checkpoint write that fails -----------------------------------------------------------


def test_failed_checkpoint_write_keeps_previous(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run = tmp_path / "run"
    with disk_full_on("latest.pt", nth=2):  # the second step's save: the disk is full
        code, _, err = call_main(train, _train_argv(data_dir, run), capsys)
    assert code == 2
    assert "No space left on device" in error_line(err)
    ckpts = run / "checkpoints"
    state = load_checkpoint(ckpts / "latest.pt", kind=KIND)
    assert state["global_step"] == 1 and all_finite(state["model"])  # step 1's, intact
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.pt"]  # no temp file left


# -- 5: checkpoints that would run code, checkpoints of another package -------------------------


def _command_argv(
    command: str, ckpt: Path, data_dir: Path, index_file: Path, raw: Path, out: Path
) -> tuple[Callable[[list[str]], int], list[str]]:
    if command == "eval":
        return evaluate, ["--checkpoint", str(ckpt), "--split", "all", "--data-dir", str(data_dir)]
    if command == "index":
        return index, [
            "--checkpoint",
            str(ckpt),
            "--data-dir",
            str(data_dir),
            "--output",
            str(out / "i.npz"),
        ]
    if command == "search":
        return search, [
            "--index",
            str(index_file),
            "--query",
            str(raw),
            "--checkpoint",
            str(ckpt),
            "--output",
            str(out / "r.csv"),
        ]
    return train, ["--resume", str(ckpt), *_train_argv(data_dir, out / "run")]


@pytest.mark.parametrize("command", ["eval", "index", "search", "train --resume"])
@pytest.mark.parametrize("content", ["pickle", "foreign"])
def test_unsafe_or_foreign_checkpoint_is_refused(
    command: str,
    content: str,
    data_dir: Path,
    index_file: Path,
    raw_dir: Path,
    tmp_path: Path,
    capsys,
) -> None:
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "model.pt"
    weights = {"w": torch.zeros(2)}
    if content == "pickle":
        torch.save({"kind": KIND, "model": weights, "payload": RunsCode(marker)}, ckpt)
    else:
        torch.save({"kind": "ctclip.CTCLIP", "model": weights, "model_config": {}}, ckpt)
    fn, argv = _command_argv(command, ckpt, data_dir, index_file, raw_dir / "n0.nii.gz", tmp_path)
    code, _, err = call_main(fn, argv, capsys)
    assert code == 2
    line = error_line(err)
    assert str(ckpt) in line
    if content == "pickle":
        assert "refused: contains pickled objects that could run code" in line
        assert not marker.exists()
    else:
        assert "ctclip.CTCLIP" in line and "ctretrieval" in line


# -- 6: broken inputs ----------------------------------------------------------------------------


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
    ("nifti truncated", "(truncated or corrupt"),
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
    """``dst``: a copy of the tiny data dir with the labels or volumes broken as ``case`` says."""
    shutil.copytree(src, dst)
    csv, h5 = dst / "labels.csv", dst / "volumes.h5"
    frame = _labels(src)
    if case == "labels missing column":
        frame.drop(columns="nodulos").to_csv(csv, index=False)
    elif case == "labels duplicated column":
        csv.write_text(
            "CT,condensacion,nodulos,quistes,nodulos\n"
            + "".join(
                f"{r.CT},{r.condensacion},{r.nodulos},{r.quistes},0\n" for r in frame.itertuples()
            )
        )
    elif case == "labels duplicated ids":
        pd.concat([frame, frame.iloc[:1]]).to_csv(csv, index=False)
    elif case == "labels not UTF-8":
        frame.loc[0, "CT"] = "s00"
        text = frame.to_csv(index=False).replace("condensacion", "condensaci\u00f3n")
        csv.write_bytes(text.encode("latin-1"))
    elif case == "labels zero-byte":
        csv.write_bytes(b"")
    elif case == "labels all outside {0,1}":
        frame[FINDINGS] = 2
        frame.to_csv(csv, index=False)
    elif case == "no study id in common":
        frame.assign(CT=[f"x{i}" for i in range(len(frame))]).to_csv(csv, index=False)
    elif case == "volumes zero-byte":
        h5.write_bytes(b"")
    elif case == "volumes not HDF5":
        h5.write_bytes(b"this is not an HDF5 file" * 10)
    elif case == "volumes truncated":
        h5.write_bytes(h5.read_bytes()[:3000])
    elif case == "volumes of mixed shapes":
        with h5py.File(h5, "a") as f:
            del f["volumes/s03"]
            f["volumes"].create_dataset("s03", data=np.zeros((5, 16, 16), np.uint8))
    elif case == "volume 2-D":
        with h5py.File(h5, "a") as f:
            del f["volumes/s03"]
            f["volumes"].create_dataset("s03", data=np.zeros((16, 16), np.uint8))
    elif case == "volumes float":
        with h5py.File(h5, "a") as f:
            del f["volumes/s03"]
            f["volumes"].create_dataset("s03", data=np.zeros((6, 16, 16), np.float32))
    # Broken in a way the job survives, each bad row or study named on stderr:
    elif case == "labels extra column":
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


# (case, what the error line says)
DATA_ERRORS = [
    ("labels missing column", "missing column(s) nodulos"),
    ("labels duplicated column", "duplicated column(s)"),
    ("labels duplicated ids", "duplicated CT value(s): s00"),
    ("labels not UTF-8", "not UTF-8"),
    ("labels zero-byte", "the CSV is empty"),
    ("labels all outside {0,1}", "no row has 0/1 values"),
    ("no study id in common", "no study id in common"),
    ("volumes zero-byte", "not a readable HDF5 file"),
    ("volumes not HDF5", "not a readable HDF5 file"),
    ("volumes truncated", "volumes.h5"),
    ("volumes of mixed shapes", "s03"),
    ("volume 2-D", "s03"),
    ("volumes float", "uint8"),
]


@pytest.mark.parametrize(("case", "message"), DATA_ERRORS, ids=[c for c, _ in DATA_ERRORS])
def test_broken_training_data_is_one_line_error(
    case: str, message: str, data_dir: Path, tmp_path: Path, capsys
) -> None:
    bad = tmp_path / "data"
    _bad_data(case, data_dir, bad)
    code, _, err = call_main(train, _train_argv(bad, tmp_path / "run"), capsys)
    assert code == 2, err
    assert message in error_line(err)
    assert not (tmp_path / "run" / "checkpoints").exists()


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
    case: str, named: str, data_dir: Path, reference: Path, tmp_path: Path, capsys
) -> None:
    bad = tmp_path / "data"
    _bad_data(case, data_dir, bad)
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
            "not a readable NIfTI",
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


# -- 7: NaN batches ------------------------------------------------------------------------------


def _nan_on(calls: Callable[[int], bool], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the batches of the training steps ``calls`` says NaN (counted from 1)."""
    real = train_mod._step_fn
    count = [0]

    def step_fn(cfg, augment):
        step = real(cfg, augment)

        def poisoned(model, batch):
            count[0] += 1
            if calls(count[0]):
                batch = {**batch, "volume": torch.full(batch["volume"].shape, torch.nan)}
            return step(model, batch)

        return poisoned

    monkeypatch.setattr(train_mod, "_step_fn", step_fn)


def test_nan_batch_is_skipped_with_a_warning(
    data_dir: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _nan_on(lambda n: n == 2, monkeypatch)
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="non-finite loss at step 1; step skipped"):
        code, _, err = call_main(train, _train_argv(data_dir, run), capsys)
    assert code == 0, err
    state = load_checkpoint(run / "checkpoints" / "final.pt", kind=KIND)
    assert all_finite(state["model"])  # BatchNorm running stats included
    full = load_checkpoint(reference / "checkpoints" / "final.pt", kind=KIND)
    assert state["global_step"] == full["global_step"] - 1  # one step skipped, the rest taken


def test_nan_every_step_stops_cleanly_keeping_the_last_good_checkpoint(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _nan_on(lambda n: n > 3, monkeypatch)  # the first epoch (3 steps) is fine, then NaN only
    run = tmp_path / "run"
    # every epoch end writes latest.pt (the demo config writes it at most every 30 s)
    items = ("trainer.epochs=2", "trainer.max_nonfinite_steps=2", "trainer.save_interval_s=0")
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        code, _, err = call_main(train, _train_argv(data_dir, run, *items), capsys)
    assert code == 2
    line = error_line(err)
    latest = run / "checkpoints" / "latest.pt"
    assert "NaN/inf for 2 consecutive steps" in line and str(latest) in line
    state = load_checkpoint(latest, kind=KIND)
    assert state["epoch"] == 1 and state["global_step"] == 3 and all_finite(state["model"])
    assert not (run / "checkpoints" / "final.pt").exists()
