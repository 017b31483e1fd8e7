"""Fault injection and broken inputs through ctclip's own commands, beyond the run contract
every package keeps (test_run_contract.py: kill -9 of training and resume, a second job, a full
disk, unsafe and foreign checkpoints also given to ``ctclip-eval``, broken data directories,
NaN losses).

Covered here: kill -9 of ``ctclip-preprocess`` before reading a volume and in the middle of
writing one, then a rerun (nothing processed twice, the same file as an uninterrupted run, the
output never unreadable) and a second job into it refused; a table of broken NIfTI volumes,
metadata and labels CSVs, HDF5 files and checkpoints given to preprocess and eval; partly broken
tables named while the job goes on. Not here: DDP rank failure (medcore's own fault tests cover
it at Trainer level; ctclip's only distributed code is the feature gather of the loss, and two
torchrun processes importing timm + open_clip cost more than this file's CPU budget).
"""

from __future__ import annotations

import gzip
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

import ctclip.preprocess as prep_mod
from ctclip.cli import evaluate, preprocess, train
from medcore.testing import assert_refused_while_running, call_main, error_line, wait_until

pytestmark = pytest.mark.faults

RUNNER = str(Path(__file__).with_name("fault_runner.py"))
SHAPE = ["--target-shape", "8", "28", "28", "--num-workers", "0"]
# On top of conftest's tiny model: 8 training volumes, batch 4 -> 2 steps per epoch.
RUN = [
    "num_threads=1",
    "device=cpu",
    "trainer.epochs=1",
    "trainer.num_workers=0",
    "trainer.warmup_steps=1",
    "validation.do_validate=false",
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the runs set num_threads=1; leave other tests as they were


@pytest.fixture(scope="module")
def train_argv(tiny_sets: list[str]) -> Callable[..., list[str]]:
    def argv(data: Path, out: Path, *items: str) -> list[str]:
        sets = [a for item in [*RUN, *items] for a in ("--set", item)]
        return ["--data-dir", str(data), "--output-dir", str(out), *tiny_sets, *sets]

    return argv


@pytest.fixture(scope="module")
def reference(tiny_demo: Path, train_argv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run: the checkpoint the eval cases use."""
    run = tmp_path_factory.mktemp("runs") / "full"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCORE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        threads = torch.get_num_threads()
        assert train(train_argv(tiny_demo, run)) == 0
        torch.set_num_threads(threads)
    return run


def _start(what: str, marker: Path, at: int, argv: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as err:
        return subprocess.Popen(
            [sys.executable, RUNNER, what, str(marker), str(at), *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _h5_contents(path: Path) -> dict[str, object]:
    """Everything a reader sees: file attributes, and every volume's data and attributes."""

    def plain(attrs) -> dict[str, object]:
        return {k: np.asarray(v).tolist() for k, v in attrs.items()}

    with h5py.File(path, "r") as f:
        out: dict[str, object] = {"/": plain(f.attrs)}
        for name, ds in f["volumes"].items():
            out[name] = (ds[()].tobytes(), ds.shape, str(ds.dtype), plain(ds.attrs))
        return out


# -- 2 + 3: kill -9 during preprocessing, a second job refused, rerun ---------------------------


@pytest.mark.parametrize("where", ["before reading a volume", "while writing a volume"])
def test_kill_9_during_preprocess_then_rerun(
    where: str, tiny_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    src = sorted((tiny_demo / "ct_volumes" / "train").glob("*.nii.gz"))
    meta = tiny_demo / "ct_rate" / "train_metadata.csv"
    raw = tmp_path / "raw"
    raw.mkdir()
    out = tmp_path / "out" / "ct_volumes.h5"
    argv = ["--ct-data-path", str(raw), "--ct-out-path", str(out), "--metadata-path", str(meta)]
    argv += SHAPE
    # An earlier complete output with two of the volumes: it must survive the kill readable.
    for path in src[:2]:
        shutil.copy(path, raw / path.name)
    assert preprocess(argv) == 0
    before = _h5_contents(out)
    before_names = set(before) - {"/"}
    for path in src[2:]:
        shutil.copy(path, raw / path.name)
    ref = tmp_path / "ref.h5"
    ref_argv = [*argv[:2], "--ct-out-path", str(ref), *argv[4:]]
    assert preprocess(ref_argv) == 0
    capsys.readouterr()

    marker, log = tmp_path / "paused", tmp_path / "victim.err"
    what, at = ("preprocess", 3) if where.startswith("before") else ("write", 2)
    victim = _start(what, marker, at, argv, log)
    try:
        wait_until(marker.exists, victim, log)
        code, _, err = call_main(preprocess, argv, capsys)
        assert_refused_while_running(code, err, out, victim.pid)
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    # Whenever the kill hit, the output is the earlier complete file, readable and unchanged.
    assert _h5_contents(out) == before
    partial = out.with_name(out.name + ".partial")
    with h5py.File(partial, "r") as f:  # the unfinished file reopens too
        done_by_victim = prep_mod.complete_names(f) - before_names
        in_file = set(f["volumes"])
    assert len(done_by_victim) == (2 if what == "preprocess" else 1)
    if what == "write":
        assert len(in_file - before_names - done_by_victim) == 1  # half-written, unmarked

    seen: list[str] = []
    real = prep_mod.preprocess_volume
    monkeypatch.setattr(
        prep_mod, "preprocess_volume", lambda p, *a, **k: seen.append(p.name) or real(p, *a, **k)
    )
    code, stdout, err = call_main(preprocess, argv, capsys)
    assert code == 0, err
    done = len(before_names) + len(done_by_victim)
    assert f"{8 - done} written, {done} already present, 0 skipped" in stdout
    assert len(seen) == len(set(seen)) == 8 - done
    assert not set(seen) & (done_by_victim | before_names)  # nothing processed twice
    assert _h5_contents(out) == _h5_contents(ref)  # identical to the uninterrupted run
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no partial, no lock


# -- 6a: broken NIfTI volumes are named, skipped, and the rest preprocessed ----------------------


def _good_volume(shape=(10, 10, 6)) -> np.ndarray:
    return np.linspace(-900, 300, int(np.prod(shape)), dtype=np.float32).reshape(shape)


def _write_nifti(path: Path, data: np.ndarray, affine=None) -> None:
    nib.save(
        nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), path
    )


def _nifti_bomb(path: Path) -> None:
    """A small file whose header claims 30000^3 voxels (100 TB as float32)."""
    _write_nifti(path, _good_volume())
    header = nib.load(str(path)).header.copy()
    header.set_data_shape((30000, 30000, 30000))
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(header.binaryblock + data[len(header.binaryblock) :]))


def _bad_nifti(case: str, path: Path) -> None:
    if case == "zero-byte":
        path.write_bytes(b"")
    elif case == "truncated .nii.gz header":
        _write_nifti(path, _good_volume())
        path.write_bytes(path.read_bytes()[:200])
    elif case == "truncated .nii.gz voxels":
        _write_nifti(path, _good_volume((40, 40, 20)))
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    elif case == "not gzip":
        path.write_bytes(b"this is not a NIfTI file" * 20)
    elif case == "2-D":
        _write_nifti(path, _good_volume()[..., 0])
    elif case == "4-D":
        _write_nifti(path, np.stack([_good_volume(), _good_volume()], axis=-1))
    elif case == "NaN voxels":
        vol = _good_volume()
        vol[2, 3, 1] = np.nan
        _write_nifti(path, vol)
    elif case == "inf voxels":
        vol = _good_volume()
        vol[0, 0, 0] = -np.inf
        _write_nifti(path, vol)
    elif case == "bomb-sized header":
        _nifti_bomb(path)
    elif case in ("not in the metadata", "zero voxel size in the metadata"):
        _write_nifti(path, _good_volume())
    else:
        raise AssertionError(case)


# (case, what the skip line says)
NIFTI_SKIPS = [
    ("zero-byte", "empty file (0 bytes)"),
    ("truncated .nii.gz header", "truncated or corrupt gzip data"),
    ("truncated .nii.gz voxels", "truncated or corrupt gzip data"),
    ("not gzip", "not a NIfTI-1/NIfTI-2 file (no valid header"),
    ("2-D", "expected a 3D volume"),
    ("4-D", "expected a 3D volume"),
    ("NaN voxels", "NaN"),
    ("inf voxels", "infinite"),
    ("bomb-sized header", "30000x30000x30000 voxels; refusing to decode"),
    ("zero voxel size in the metadata", "voxel size (0.0, 0.0, 0.0) mm (z y x) is not positive"),
    ("not in the metadata", "not in the metadata CSV"),
]


@pytest.mark.parametrize(("case", "reason"), NIFTI_SKIPS, ids=[c for c, _ in NIFTI_SKIPS])
def test_broken_nifti_is_skipped_by_name(case: str, reason: str, tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_nifti(raw / "good.nii.gz", _good_volume())
    _bad_nifti(case, raw / "bad.nii.gz")
    names = ["good.nii.gz"] + ([] if case == "not in the metadata" else ["bad.nii.gz"])
    rows = [{"VolumeName": n, "RescaleSlope": 1.0, "RescaleIntercept": 0.0} for n in names]
    if case == "zero voxel size in the metadata":
        # A table with spacing columns needs them in every row (a blank cell is skipped too).
        rows[0].update(XYSpacing="[2.0, 2.0]", ZSpacing=3.0)
        rows[1].update(XYSpacing="[0.0, 0.0]", ZSpacing=0.0)
    pd.DataFrame(rows).to_csv(tmp_path / "meta.csv", index=False)
    out = tmp_path / "v.h5"
    argv = ["--ct-data-path", str(raw), "--ct-out-path", str(out)]
    argv += ["--metadata-path", str(tmp_path / "meta.csv"), *SHAPE]
    code, stdout, err = call_main(preprocess, argv, capsys)
    assert code == 0, err
    assert "Traceback" not in err and "error:" not in err
    skips = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(skips) == 1 and skips[0].startswith("skipped bad.nii.gz: "), err
    assert reason in skips[0], err
    assert "1 written, 0 already present, 1 skipped" in stdout
    with h5py.File(out, "r") as f:
        assert list(f["volumes"]) == ["good.nii.gz"]


# -- 6b: broken tables, HDF5 files and checkpoints are one-line errors ---------------------------


def _metadata_case(case: str, tiny_demo: Path, dst: Path) -> list[str]:
    """A raw directory + metadata CSV broken as ``case`` says; returns the preprocess argv."""
    raw = dst / "raw"
    raw.mkdir(parents=True)
    if case != "empty data directory":
        for path in sorted((tiny_demo / "ct_volumes" / "train").glob("*.nii.gz"))[:2]:
            shutil.copy(path, raw / path.name)
    meta = dst / "meta.csv"
    frame = pd.read_csv(tiny_demo / "ct_rate" / "train_metadata.csv")
    if case == "metadata missing column":
        frame.drop(columns="RescaleIntercept").to_csv(meta, index=False)
    elif case == "metadata duplicated column":
        frame.insert(1, "RescaleSlope_", frame["RescaleSlope"])
        frame.to_csv(meta, index=False)
        meta.write_text(meta.read_text().replace("RescaleSlope_", "RescaleSlope", 1))
    elif case == "metadata duplicated ids":
        pd.concat([frame, frame.iloc[:1]]).to_csv(meta, index=False)
    elif case == "metadata not UTF-8":
        text = frame.assign(Manufacturer="Philips Médical").to_csv(index=False)
        meta.write_bytes(text.encode("latin-1"))
    elif case == "metadata zero-byte":
        meta.write_bytes(b"")
    elif case == "metadata names no volume":
        frame.assign(VolumeName=[f"x{i}.nii.gz" for i in range(len(frame))]).to_csv(
            meta, index=False
        )
    else:
        frame.to_csv(meta, index=False)
    return ["--ct-data-path", str(raw), "--ct-out-path", str(dst / "o.h5"), "--metadata-path"]


def _eval_argv(ckpt: Path, data: Path, out: Path) -> list[str]:
    return [
        *("--model-path", str(ckpt), "--test-data", str(data / "ct_volumes.h5")),
        *("--test-labels", str(data / "ct_rate" / "valid_predicted_labels.csv")),
        *("--output-dir", str(out), "--n-boot", "10", "--device", "cpu"),
    ]


def _data_case(case: str, tiny_demo: Path, dst: Path) -> None:
    """``dst``: the tiny data dir (HDF5 + CSVs) with one thing broken as ``case`` says."""
    dst.mkdir(parents=True)
    shutil.copytree(tiny_demo / "ct_rate", dst / "ct_rate")
    shutil.copy(tiny_demo / "ct_volumes.h5", dst / "ct_volumes.h5")
    h5 = dst / "ct_volumes.h5"
    reports, labels = (
        dst / "ct_rate" / "train_reports.csv",
        dst / "ct_rate" / "valid_predicted_labels.csv",
    )
    lab = pd.read_csv(labels)
    if case == "reports texts missing":  # two reports without text (a copy for the rest)
        rep = pd.read_csv(reports)
        rep.loc[[1, 2], "Findings_EN"] = np.nan
        rep.to_csv(reports, index=False)
    elif case == "volumes file truncated":
        h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    elif case == "labels outside {0,1}":
        lab.loc[2, "Cardiomegaly"] = 2
        lab.to_csv(labels, index=False)
    elif case == "labels missing column":
        lab.drop(columns="Cardiomegaly").to_csv(labels, index=False)
    elif case == "labels zero-byte":
        labels.write_bytes(b"")
    elif case == "labels NaN":
        lab.loc[1, "Lung nodule"] = np.nan
        lab.to_csv(labels, index=False)
    elif case in ("checkpoint zero-byte", "checkpoint truncated"):
        pass
    else:
        raise AssertionError(case)


# (command, case, what the error line says)
ERRORS = [
    ("preprocess", "empty data directory", "no NIfTI files"),
    ("preprocess", "metadata missing column", "missing column(s) RescaleIntercept"),
    ("preprocess", "metadata duplicated column", "duplicated column(s): RescaleSlope"),
    ("preprocess", "metadata duplicated ids", "duplicated VolumeName value(s)"),
    ("preprocess", "metadata not UTF-8", "not UTF-8"),
    ("preprocess", "metadata zero-byte", "the CSV is empty"),
    ("preprocess", "metadata names no volume", "none of the 2 volumes is listed"),
    ("eval", "labels outside {0,1}", "must hold 0 or 1 (not so in: Cardiomegaly)"),
    ("eval", "labels NaN", "must hold 0 or 1 (not so in: Lung nodule)"),
    ("eval", "labels missing column", "missing column(s) Cardiomegaly"),
    ("eval", "labels zero-byte", "the CSV is empty"),
    ("eval", "volumes file truncated", "not a readable HDF5 file"),
    ("eval", "checkpoint zero-byte", "empty file"),
    ("eval", "checkpoint truncated", "truncated or corrupt"),
]


@pytest.mark.parametrize(
    ("command", "case", "message"), ERRORS, ids=[f"{c}: {k}" for c, k, _ in ERRORS]
)
def test_broken_input_is_one_line_error(
    command: str,
    case: str,
    message: str,
    tiny_demo: Path,
    reference: Path,
    tmp_path: Path,
    capsys,
) -> None:
    if command == "preprocess":
        argv = [*_metadata_case(case, tiny_demo, tmp_path), str(tmp_path / "meta.csv"), *SHAPE]
        code, _, err = call_main(preprocess, argv, capsys)
        assert code == 2, err
        assert message in error_line(err)
        assert not list(tmp_path.glob("o.h5*"))  # nothing written, no lock left
        return
    data = tmp_path / "data"
    _data_case(case, tiny_demo, data)
    ckpt = reference / "checkpoints" / "final.pt"
    if case.startswith("checkpoint"):
        ckpt = tmp_path / "model.pt"
        ckpt.write_bytes(
            b"" if "zero" in case else (reference / "checkpoints/final.pt").read_bytes()[:5000]
        )
    code, _, err = call_main(evaluate, _eval_argv(ckpt, data, tmp_path / "ev"), capsys)
    assert code == 2, err
    assert message in error_line(err)
    assert not (tmp_path / "ev").exists()


# -- 6c: partly broken inputs are named and the job goes on --------------------------------------


def test_partly_broken_tables_are_named_and_the_job_goes_on(
    tiny_demo: Path, reference: Path, train_argv, tmp_path: Path, capsys
) -> None:
    # Preprocess: metadata rows naming files outside the data directory only ever match names
    # of files found under it, so they go nowhere and are named.
    raw = tmp_path / "raw"
    raw.mkdir()
    src = sorted((tiny_demo / "ct_volumes" / "train").glob("*.nii.gz"))[0]
    shutil.copy(src, raw / src.name)
    (tmp_path / "secret.nii.gz").write_bytes(src.read_bytes())
    meta = pd.read_csv(tiny_demo / "ct_rate" / "train_metadata.csv")
    meta = pd.concat([meta.iloc[:1].assign(VolumeName="../secret.nii.gz"), meta])
    meta.to_csv(tmp_path / "meta.csv", index=False)
    argv = ["--ct-data-path", str(raw), "--ct-out-path", str(tmp_path / "o.h5")]
    code, out, err = call_main(
        preprocess, [*argv, "--metadata-path", str(tmp_path / "meta.csv"), *SHAPE], capsys
    )
    assert code == 0 and "Traceback" not in err and "error:" not in err
    assert "1 written" in out and "../secret.nii.gz" in err
    with h5py.File(tmp_path / "o.h5", "r") as f:
        assert list(f["volumes"]) == [src.name]

    # Train: reports without text are named and left out; the others train.
    data = tmp_path / "data"
    _data_case("reports texts missing", tiny_demo, data)
    rep = pd.read_csv(tiny_demo / "ct_rate" / "train_reports.csv")
    code, _, err = call_main(train, train_argv(data, tmp_path / "run"), capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert any("2 report(s) without text" in w and rep["VolumeName"][1] in w for w in warnings), err
    assert (tmp_path / "run" / "checkpoints" / "final.pt").is_file()
