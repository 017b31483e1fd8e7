"""Fault injection and broken inputs through ctclip's own commands (issue 9).

Covered: kill -9 of ``ctclip-preprocess`` before reading a volume and in the middle of writing
one, then a rerun (nothing processed twice, the same file as an uninterrupted run, the output
never unreadable); kill -9 mid-epoch of ``ctclip-train`` then ``--resume latest`` (the same
weights as an uninterrupted run); a second job into a running job's output (refused by the
lock); a failing checkpoint write; checkpoints that would run code or belong to another package,
given to ``ctclip-eval`` and ``ctclip-train --resume``; a table of broken NIfTI volumes, metadata,
reports and labels CSVs, HDF5 files and checkpoints; NaN losses. Not here: DDP rank failure
(medcore's own fault tests cover it at Trainer level; ctclip's only distributed code is the
feature gather of the loss, and two torchrun processes importing timm + open_clip cost more than
this file's CPU budget).
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
import ctclip.train as train_mod
from ctclip.cli import evaluate, preprocess, train
from medcore.testing import (
    RunsCode,
    all_finite,
    assert_refused_while_running,
    call_main,
    disk_full_on,
    error_line,
    wait_until,
)
from medcore.weights.checkpoint import load_checkpoint

pytestmark = pytest.mark.faults

RUNNER = str(Path(__file__).with_name("fault_runner.py"))
KIND = "ctclip.CTCLIP"
SHAPE = ["--target-shape", "8", "28", "28", "--num-workers", "0"]
# On top of conftest's tiny model: 8 training volumes, batch 4 -> 2 steps per epoch, 2 epochs.
RUN = [
    "num_threads=1",
    "device=cpu",
    "trainer.epochs=2",
    "trainer.num_workers=0",
    "trainer.save_every_steps=1",
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
    """An uninterrupted tiny run (also the checkpoint the eval cases use)."""
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


# -- 1 + 3: kill -9 mid-epoch, a second job refused, --resume latest ----------------------------


def test_kill_9_mid_epoch_second_job_refused_then_resume_latest(
    tiny_demo: Path, reference: Path, train_argv, tmp_path: Path, capsys
) -> None:
    run = tmp_path / "killed"
    marker, log = tmp_path / "paused", tmp_path / "victim.err"
    latest = run / "checkpoints" / "latest.pt"
    # Paused inside the second step of the first epoch: latest.pt of step 1 is on disk.
    victim = _start("train", marker, 2, train_argv(tiny_demo, run), log)
    try:
        wait_until(marker.exists, victim, log)
        config = (run / "config.yaml").read_bytes()
        code, _, err = call_main(train, train_argv(tiny_demo, run, "trainer.lr=0.5"), capsys)
        assert_refused_while_running(code, err, run, victim.pid)
        assert (run / "config.yaml").read_bytes() == config
    finally:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    state = load_checkpoint(latest, kind=KIND)
    assert state["epoch"] == 0 and state["batch_in_epoch"] == 1 and state["global_step"] == 1
    assert not (run / "checkpoints" / "final.pt").exists()

    # Only the run dir: the data, tiny model and schedule come from the run's config.yaml.
    code, _, err = call_main(train, ["--resume", "latest", "--output-dir", str(run)], capsys)
    assert code == 0, err
    a = load_checkpoint(reference / "checkpoints" / "final.pt", kind=KIND)
    b = load_checkpoint(run / "checkpoints" / "final.pt", kind=KIND)
    assert a["global_step"] == b["global_step"] == 4
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# -- 4: a checkpoint write that fails -----------------------------------------------------------


def test_failed_checkpoint_write_keeps_previous(
    tiny_demo: Path, train_argv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run = tmp_path / "run"
    with disk_full_on("latest.pt", nth=2):  # the second step's save: the disk is full
        code, _, err = call_main(train, train_argv(tiny_demo, run), capsys)
    assert code == 2
    assert "No space left on device" in error_line(err)
    ckpts = run / "checkpoints"
    state = load_checkpoint(ckpts / "latest.pt", kind=KIND)
    assert state["global_step"] == 1 and all_finite(state["model"])  # step 1's, intact
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.pt"]  # no temp file left


# -- 5: checkpoints that would run code, checkpoints of another package -------------------------


def _eval_argv(ckpt: Path, data: Path, out: Path) -> list[str]:
    return [
        "--model-path",
        str(ckpt),
        "--test-data",
        str(data / "ct_volumes.h5"),
        "--test-labels",
        str(data / "ct_rate" / "valid_predicted_labels.csv"),
        "--output-dir",
        str(out),
        "--n-boot",
        "10",
        "--device",
        "cpu",
    ]


@pytest.mark.parametrize("command", ["eval", "train --resume"])
@pytest.mark.parametrize("content", ["pickle", "foreign"])
def test_unsafe_or_foreign_checkpoint_is_refused(
    command: str, content: str, tiny_demo: Path, train_argv, tmp_path: Path, capsys
) -> None:
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "model.pt"
    weights = {"w": torch.zeros(2)}
    if content == "pickle":
        torch.save({"kind": KIND, "model": weights, "payload": RunsCode(marker)}, ckpt)
    else:
        torch.save({"kind": "ctretrieval.Proximity100x100", "model": weights}, ckpt)
    if command == "eval":
        fn, argv = evaluate, _eval_argv(ckpt, tiny_demo, tmp_path / "ev")
    else:
        fn, argv = train, ["--resume", str(ckpt), *train_argv(tiny_demo, tmp_path / "run")]
    code, _, err = call_main(fn, argv, capsys)
    assert code == 2
    line = error_line(err)
    assert str(ckpt) in line
    if content == "pickle":
        assert "refused: contains pickled objects that could run code" in line
        assert not marker.exists()
        torch.load(ckpt, weights_only=False)  # the payload is real: unsafe loading runs it
        assert marker.is_dir()
    else:
        assert "ctretrieval.Proximity100x100 checkpoint, not ctclip.CTCLIP" in line
    assert not (tmp_path / "ev").exists() and not (tmp_path / "run" / "checkpoints").exists()


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
    ("truncated .nii.gz header", "not a readable NIfTI file (truncated or corrupt"),
    ("truncated .nii.gz voxels", "cannot read the voxels (truncated or corrupt"),
    ("not gzip", "not a readable NIfTI file"),
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


def _data_case(case: str, tiny_demo: Path, dst: Path) -> None:
    """``dst``: the tiny data dir (HDF5 + CSVs) with one thing broken as ``case`` says."""
    dst.mkdir(parents=True)
    if case == "empty data directory":
        return
    shutil.copytree(tiny_demo / "ct_rate", dst / "ct_rate")
    shutil.copy(tiny_demo / "ct_volumes.h5", dst / "ct_volumes.h5")
    h5 = dst / "ct_volumes.h5"
    reports, labels = (
        dst / "ct_rate" / "train_reports.csv",
        dst / "ct_rate" / "valid_predicted_labels.csv",
    )
    rep, lab = pd.read_csv(reports), pd.read_csv(labels)
    first = rep["VolumeName"][0]
    if case == "reports missing column":
        rep.drop(columns="Findings_EN").to_csv(reports, index=False)
    elif case == "reports duplicated ids":
        pd.concat([rep, rep.iloc[:1]]).to_csv(reports, index=False)
    elif case == "reports not UTF-8":
        reports.write_bytes(rep.assign(Technique_EN="Tórax").to_csv(index=False).encode("latin-1"))
    elif case == "reports all texts empty":
        rep.assign(Findings_EN="  ").to_csv(reports, index=False)
    elif case == "reports name climbing out with ../":
        rep.loc[0, "VolumeName"] = "../../etc/passwd"
        rep.to_csv(reports, index=False)
    elif case == "volumes file zero-byte":
        h5.write_bytes(b"")
    elif case == "volumes file truncated":
        h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    elif case == "volumes file not HDF5":
        h5.write_bytes(b"this is not an HDF5 file" * 40)
    elif case == "volumes file of another tool":
        with h5py.File(h5, "a") as f:
            del f.attrs["format"]
    elif case == "volume missing from the HDF5":
        with h5py.File(h5, "a") as f:
            del f["volumes"][first]
    elif case == "volume never marked complete":
        with h5py.File(h5, "a") as f:
            f["volumes"][first].attrs["complete"] = 0
    elif case == "volume of another shape":
        with h5py.File(h5, "a") as f:
            del f["volumes"][first]
            f["volumes"].create_dataset(first, data=np.zeros((8, 28), np.uint8))
            f["volumes"][first].attrs["complete"] = 1
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
    ("train", "empty data directory", "train_reports.csv: file not found"),
    ("train", "reports missing column", "missing column(s) Findings_EN"),
    ("train", "reports duplicated ids", "duplicated VolumeName value(s)"),
    ("train", "reports not UTF-8", "not UTF-8"),
    ("train", "reports all texts empty", "no report has text in Findings_EN"),
    ("train", "reports name climbing out with ../", "../../etc/passwd"),
    ("train", "volumes file zero-byte", "not a readable HDF5 file"),
    ("train", "volumes file truncated", "not a readable HDF5 file"),
    ("train", "volumes file not HDF5", "not a readable HDF5 file"),
    ("train", "volumes file of another tool", "not a ctclip volume file"),
    ("train", "volume missing from the HDF5", "1 of 8 volumes are not in"),
    ("train", "volume never marked complete", "1 of 8 volumes are not in"),
    ("train", "volume of another shape", "shape (8, 28)"),
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
    train_argv,
    tmp_path: Path,
    capsys,
) -> None:
    data = tmp_path / "data"
    if command == "preprocess":
        argv = [*_metadata_case(case, tiny_demo, tmp_path), str(tmp_path / "meta.csv"), *SHAPE]
        code, _, err = call_main(preprocess, argv, capsys)
        assert code == 2, err
        assert message in error_line(err)
        assert not list(tmp_path.glob("o.h5*"))  # nothing written, no lock left
        return
    _data_case(case, tiny_demo, data)
    if command == "train":
        code, _, err = call_main(train, train_argv(data, tmp_path / "run"), capsys)
    else:
        ckpt = reference / "checkpoints" / "final.pt"
        if case.startswith("checkpoint"):
            ckpt = tmp_path / "model.pt"
            ckpt.write_bytes(
                b"" if "zero" in case else (reference / "checkpoints/final.pt").read_bytes()[:5000]
            )
        code, _, err = call_main(evaluate, _eval_argv(ckpt, data, tmp_path / "ev"), capsys)
    assert code == 2, err
    assert message in error_line(err)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "ev").exists()


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
    _data_case("reports duplicated ids", tiny_demo, data)  # a copy; the reports are rewritten
    rep = pd.read_csv(tiny_demo / "ct_rate" / "train_reports.csv")
    rep.loc[[1, 2], "Findings_EN"] = np.nan
    rep.to_csv(data / "ct_rate" / "train_reports.csv", index=False)
    code, _, err = call_main(train, train_argv(data, tmp_path / "run", "trainer.epochs=1"), capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert any("2 report(s) without text" in w and rep["VolumeName"][1] in w for w in warnings), err
    assert (tmp_path / "run" / "checkpoints" / "final.pt").is_file()


# -- 7: NaN losses -------------------------------------------------------------------------------


def _nan_on(calls: Callable[[int], bool], monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the image features of the training steps ``calls`` says NaN (counted from 1)."""
    count = [0]
    real = train_mod.ClipLoss

    class PoisonedLoss(real):
        def forward(self, image, text, scale):
            count[0] += 1
            if calls(count[0]):
                image = image * torch.nan
            return super().forward(image, text, scale)

    monkeypatch.setattr(train_mod, "ClipLoss", PoisonedLoss)


def test_nan_batch_is_skipped_with_a_warning(
    tiny_demo: Path,
    reference: Path,
    train_argv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    _nan_on(lambda n: n == 2, monkeypatch)
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="non-finite loss at step 1; step skipped"):
        code, _, err = call_main(train, train_argv(tiny_demo, run), capsys)
    assert code == 0, err
    state = load_checkpoint(run / "checkpoints" / "final.pt", kind=KIND)
    assert all_finite(state["model"])
    full = load_checkpoint(reference / "checkpoints" / "final.pt", kind=KIND)
    assert state["global_step"] == full["global_step"] - 1  # one step skipped, the rest taken


def test_nan_every_step_stops_cleanly_keeping_the_last_good_checkpoint(
    tiny_demo: Path, train_argv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _nan_on(lambda n: n > 2, monkeypatch)  # the first epoch (2 steps) is fine, then NaN only
    run = tmp_path / "run"
    # every epoch end writes latest.pt (the demo config writes it at most every 30 s)
    items = ("trainer.max_nonfinite_steps=2", "trainer.save_interval_s=0")
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        code, _, err = call_main(train, train_argv(tiny_demo, run, *items), capsys)
    assert code == 2
    line = error_line(err)
    latest = run / "checkpoints" / "latest.pt"
    assert "NaN/inf for 2 consecutive steps" in line and str(latest) in line
    state = load_checkpoint(latest, kind=KIND)
    assert state["epoch"] == 1 and state["global_step"] == 2 and all_finite(state["model"])
    assert not (run / "checkpoints" / "final.pt").exists()
