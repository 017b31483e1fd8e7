"""Preprocessing: orientation and HU scaling voxel by voxel, resize/pad, resume, bad files."""

from __future__ import annotations

import gzip

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from ctclip import cli
from ctclip import preprocess as pp
from ctclip.preprocess import VolumeMeta, preprocess_volume, run_preprocess
from medcore.testing import call_main
from medcore.volumes.store import complete_names, shard_of

RNG = np.random.default_rng(0)


def _hu(shape) -> np.ndarray:
    return RNG.integers(-1100, 1300, size=shape).astype(np.float64)


def _expected_uint8(hu: np.ndarray) -> np.ndarray:
    return np.round((np.clip(hu, -1000, 1000) + 1000) / 2000 * 255).astype(np.uint8)


def _save(path, data, affine, slope=None, inter=None):
    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return path


def test_lps_header_scaled_volume_voxel_by_voxel(tmp_path):
    # Voxel axes i->L, j->P, k->S at 1 mm: stored view [k, j, i] (rows anterior->posterior = +j,
    # columns right->left = +i); the header's slope/intercept apply, the metadata's must not.
    hu = _hu((6, 5, 4))
    raw = np.round((hu + 1024) / 0.5).astype(np.int16)
    path = _save(
        tmp_path / "v.nii.gz", raw, np.diag([-1.0, -1.0, 1.0, 1.0]), slope=0.5, inter=-1024
    )
    meta = VolumeMeta(slope=1.0, intercept=-1024.0, spacing_zyx=(1.0, 1.0, 1.0))
    vol, attrs = preprocess_volume(path, meta, (4, 5, 6))
    true_hu = raw.astype(np.float64) * 0.5 - 1024
    np.testing.assert_array_equal(vol, _expected_uint8(true_hu.transpose(2, 1, 0)))
    assert attrs["out_spacing"][0] == pytest.approx(1.0)


def test_ras_metadata_scaled_volume_and_slice_order(tmp_path):
    # RAS voxel axes: rows and columns are flipped to the radiological view; the header does not
    # scale, so the metadata's RescaleSlope/RescaleIntercept apply.
    hu = _hu((4, 6, 5))
    raw = (hu + 1024).astype(np.int16)
    path = _save(tmp_path / "v.nii.gz", raw, np.eye(4))
    meta = VolumeMeta(slope=1.0, intercept=-1024.0)
    expected = _expected_uint8(hu.transpose(2, 1, 0)[:, ::-1, ::-1])
    vol, _ = preprocess_volume(path, meta, (5, 6, 4))
    np.testing.assert_array_equal(vol, expected)
    top_down, _ = preprocess_volume(path, meta, (5, 6, 4), slide_b2u=False)
    np.testing.assert_array_equal(top_down, expected[::-1])


def test_permuted_axes_are_reoriented(tmp_path):
    # Voxel axes (S, R, A): the first array axis runs along z.
    hu = _hu((3, 4, 5))  # (z, x, y)
    affine = np.zeros((4, 4))
    affine[2, 0] = affine[0, 1] = affine[1, 2] = affine[3, 3] = 1.0
    path = _save(tmp_path / "v.nii.gz", hu.astype(np.float32), affine)
    vol, _ = preprocess_volume(path, None, (3, 5, 4))
    ras = hu.transpose(1, 2, 0)  # (x, y, z)
    np.testing.assert_array_equal(vol, _expected_uint8(ras.transpose(2, 1, 0)[:, ::-1, ::-1]))


def test_resize_keeps_aspect_and_centres(tmp_path):
    # 0.5 mm in-plane, 2 mm slices: 40x40 px -> 20x20 at 1 mm, 4 slices -> 8 at 1 mm, padded to 12.
    data = np.full((40, 40, 4), 500.0, dtype=np.float32)
    path = _save(tmp_path / "v.nii.gz", data, np.diag([0.5, 0.5, 2.0, 1.0]))
    vol, attrs = preprocess_volume(path, None, (12, 20, 20))
    assert attrs["out_spacing"][0] == pytest.approx(1.0)
    value = _expected_uint8(np.array(500.0))
    assert (vol[2:10] == value).all()
    assert (vol[:2] == 0).all() and (vol[10:] == 0).all()  # air padding, centred


def test_long_scan_is_padded_never_cropped(tmp_path):
    # 300 slices at 1.25 mm (375 mm) with a 350 mm field of view: the z extent sets the voxel
    # size, and markers on the first and last slice survive (the old centre crop lost ~100 mm).
    data = np.full((70, 70, 300), -1000.0, dtype=np.float32)  # x, y, z at 5 mm in-plane
    data[30:40, 30:40, :3] = 1000.0  # inferior marker (first slices)
    data[30:40, 30:40, -3:] = 1000.0  # superior marker (last slices)
    path = _save(tmp_path / "long.nii.gz", data, np.diag([5.0, 5.0, 1.25, 1.0]))
    vol, attrs = preprocess_volume(path, None, (160, 224, 224))
    out_mm = 375.0 / 160
    assert attrs["out_spacing"][0] == pytest.approx(out_mm)
    np.testing.assert_array_equal(attrs["pad"][0], [0, 0])  # depth fills the box exactly
    inplane = round(350 / out_mm)
    assert attrs["pad"][1].sum() == 224 - inplane and attrs["pad"][2].sum() == 224 - inplane
    assert vol[0].max() > 128 and vol[-1].max() > 128  # both markers kept
    assert vol[80].max() == 0  # the middle holds air only
    top, left = attrs["pad"][1][0], attrs["pad"][2][0]
    assert (vol[:, :top] == 0).all() and (vol[:, :, :left] == 0).all()  # padding is air


def _write_dataset(root, n=4):
    vols = root / "vols"
    vols.mkdir()
    rows = []
    for i in range(n):
        name = f"train_{i}_a_1.nii.gz"
        _save(vols / name, (_hu((8, 8, 4)) + 1024).astype(np.int16), np.diag([2.0, 2.0, 4.0, 1.0]))
        rows.append(
            {
                "VolumeName": name,
                "XYSpacing": "[2.0, 2.0]",
                "ZSpacing": 4.0,
                "RescaleSlope": 1,
                "RescaleIntercept": -1024,
                "Manufacturer": "X",
            }
        )
    pd.DataFrame(rows).to_csv(root / "meta.csv", index=False)
    return vols, root / "meta.csv"


def test_bad_files_are_named_skipped_and_counted(tmp_path, capsys):
    vols, meta = _write_dataset(tmp_path)
    good = (vols / "train_0_a_1.nii.gz").read_bytes()
    (vols / "train_1_a_1.nii.gz").write_bytes(good[: len(good) // 2])  # truncated
    (vols / "train_2_a_1.nii.gz").write_bytes(gzip.compress(b"not a nifti"))  # corrupt
    _save(vols / "train_3_a_1.nii.gz", np.zeros((4, 4, 4, 2), np.int16), np.eye(4))  # 4D
    _save(vols / "train_9_a_1.nii.gz", np.zeros((4, 4, 4), np.int16), np.eye(4))  # not in metadata
    out = tmp_path / "out.h5"
    code = cli.preprocess(
        [
            "--ct-data-path",
            str(vols),
            "--ct-out-path",
            str(out),
            "--metadata-path",
            str(meta),
            "--target-shape",
            "4",
            "8",
            "8",
            "--num-workers",
            "0",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    for name in ("train_1_a_1", "train_2_a_1", "train_3_a_1", "train_9_a_1"):
        assert f"skipped {name}.nii.gz" in captured.err
    # the cut gzip stream is named as such, on one line (isal and zlib raise different errors)
    (cut,) = [line for line in captured.err.splitlines() if "train_1_a_1" in line]
    assert "truncated or corrupt gzip data" in cut
    assert "1 written, 0 already present, 4 skipped" in captured.out
    with h5py.File(out) as h5:
        assert sorted(h5["volumes"]) == ["train_0_a_1.nii.gz"]
        ds = h5["volumes/train_0_a_1.nii.gz"]
        assert ds.shape == (4, 8, 8) and ds.dtype == np.uint8 and ds.chunks == (4, 8, 8)
        assert ds.attrs["name"] == "train_0_a_1.nii.gz" and ds.attrs["source"].endswith(
            "train_0_a_1.nii.gz"
        )
        np.testing.assert_allclose(ds.attrs["spacing"], [4.0, 2.0, 2.0])
        assert h5.attrs["kind"] == "ctclip.volumes" and list(h5.attrs["target_shape"]) == [4, 8, 8]


def test_interrupted_run_resumes_without_redoing_work(tmp_path, monkeypatch):
    vols, meta = _write_dataset(tmp_path)
    out = tmp_path / "out.h5"
    calls = []
    real = pp.preprocess_volume

    def interrupt_third(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pp, "preprocess_volume", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(vols, out, [meta], (4, 8, 8), num_workers=0, show_progress=False)
    partial = tmp_path / "out.h5.partial"
    assert not out.exists() and partial.exists()  # the finished name never holds a partial file
    with h5py.File(partial, "a") as h5:
        assert len(complete_names(h5)) == 2
        h5["volumes"].create_dataset(
            calls[2], data=np.zeros((4, 8, 8), np.uint8)
        )  # half-written, unmarked

    calls.clear()
    monkeypatch.setattr(
        pp, "preprocess_volume", lambda *a, **k: (calls.append(a[0].name), real(*a, **k))[1]
    )
    result = run_preprocess(vols, out, [meta], (4, 8, 8), num_workers=0, show_progress=False)
    assert len(calls) == 2 and result.skipped_existing == 2
    assert out.exists() and not partial.exists()
    with h5py.File(out) as h5:
        assert len(complete_names(h5)) == 4
        fresh, _ = real(vols / calls[0], pp.read_metadata([meta])[calls[0]], (4, 8, 8))
        np.testing.assert_array_equal(h5["volumes"][calls[0]][()], fresh)
    calls.clear()
    run_preprocess(vols, out, [meta], (4, 8, 8), num_workers=0, show_progress=False)
    assert calls == []  # nothing left to do


def test_parallel_workers_match_serial(tmp_path):
    vols, meta = _write_dataset(tmp_path, n=3)
    run_preprocess(vols, tmp_path / "a.h5", [meta], (4, 8, 8), num_workers=0, show_progress=False)
    run_preprocess(vols, tmp_path / "b.h5", [meta], (4, 8, 8), num_workers=2, show_progress=False)
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert sorted(a["volumes"]) == sorted(b["volumes"])
        for name in a["volumes"]:
            np.testing.assert_array_equal(a["volumes"][name][()], b["volumes"][name][()])


def test_wrong_shape_in_existing_file_is_one_line_error(tmp_path, capsys):
    vols, meta = _write_dataset(tmp_path, n=1)
    out = tmp_path / "out.h5"
    run_preprocess(vols, out, [meta], (4, 8, 8), num_workers=0, show_progress=False)
    before = out.read_bytes()
    code = cli.preprocess(
        [
            "--ct-data-path",
            str(vols),
            "--ct-out-path",
            str(out),
            "--metadata-path",
            str(meta),
            "--target-shape",
            "4",
            "16",
            "16",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "target_shape=[4, 8, 8], not [4, 16, 16]" in err[0]
    assert out.read_bytes() == before


def test_metadata_missing_columns_is_one_line_error(tmp_path, capsys):
    vols, meta = _write_dataset(tmp_path, n=1)
    pd.read_csv(meta).drop(columns=["RescaleSlope"]).to_csv(meta, index=False)
    code = cli.preprocess(
        [
            "--ct-data-path",
            str(vols),
            "--ct-out-path",
            str(tmp_path / "o.h5"),
            "--metadata-path",
            str(meta),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "RescaleSlope" in err[0]
    assert not (tmp_path / "o.h5").exists()


def test_demo_orientations_agree_after_preprocessing(tmp_path):
    # One phantom written with six voxel orientations comes out the same (up to noise).
    from ctclip.synthetic import ORIENTATIONS, Case, _write_nifti, render

    labels = {
        "Lung nodule": 1,
        "Pleural effusion": 1,
        "Cardiomegaly": 0,
        "Medical material": 1,
        "Consolidation": 1,
    }
    case = Case(labels=labels, seed=5)
    spacing = {0: 5.0, 1: 5.0, 2: 3.2}
    volumes = []
    for i, orientation in enumerate(ORIENTATIONS):
        hu, affine = render(case, orientation, spacing, noise_seed=i, jitter_mm=0.0)
        path = tmp_path / f"train_1_a_{i}.nii.gz"
        _write_nifti(path, hu, affine, storage=i % 3, slope=0.5, inter=-1024.0)
        meta = VolumeMeta(
            slope=0.5 if i % 3 == 1 else 1.0, intercept=-1024.0 if i % 3 == 1 else 0.0
        )
        volumes.append(preprocess_volume(path, meta, (16, 56, 56))[0].astype(float))
    for vol in volumes[1:]:
        assert np.abs(vol - volumes[0]).mean() < 2.5  # noise (15 HU) is ~2 grey levels
    # A reading with rows flipped (anterior/posterior swapped) would differ far more.
    assert np.abs(volumes[0] - volumes[0][:, ::-1, :]).mean() > 6.0


# -- the slab pipeline against the whole-volume float path -------------------------------------


def _whole_volume_reference(path, rescale, target, slide_b2u=True):
    """What the whole-volume float path stores: nibabel's float32 reading, reoriented, the
    metadata's rescale, clipped, one antialiased resize of the whole volume, padded, uint8."""
    import torch
    import torch.nn.functional as F

    img = nib.as_closest_canonical(nib.load(path))
    hu = np.ascontiguousarray(img.get_fdata(dtype=np.float32).transpose(2, 1, 0)[:, ::-1, ::-1])
    if rescale is not None:
        hu *= rescale[0]
        hu += rescale[1]
    np.clip(hu, -1000, 1000, out=hu)
    hu = np.ascontiguousarray(hu if slide_b2u else hu[::-1])
    zooms = img.header.get_zooms()[:3][::-1]
    size, _ = pp.output_grid(hu.shape, zooms, target)
    x = torch.from_numpy(hu)
    x = F.interpolate(x[:, None], size=size[1:], mode="bilinear", antialias=True)[:, 0]
    flat = x.reshape(1, 1, hu.shape[0], -1)
    x = F.interpolate(flat, size=(size[0], flat.shape[-1]), mode="bilinear", antialias=True)
    out = np.full(target, -1000.0, np.float32)
    start = [(t - n) // 2 for t, n in zip(target, size, strict=True)]
    out[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = x.reshape(size).numpy()
    return _expected_uint8(out.astype(np.float64))


@pytest.mark.parametrize(
    "dtype, scaling, rescale",
    [
        (np.int16, None, (1.0, -1024.0)),
        (np.int16, (0.5, -1024.0), None),
        (np.uint8, (8.0, -1024.0), None),
        (np.float32, None, None),
        (np.int16, None, (0.7, -1010.5)),
    ],
)
def test_slab_pipeline_stores_the_whole_volume_result(tmp_path, dtype, scaling, rescale):
    data = np.random.default_rng(1).uniform(0, 2000 if dtype != np.uint8 else 255, (90, 70, 45))
    if scaling is None and rescale is None:
        data -= 1000
    path = _save(
        tmp_path / "v.nii.gz",
        data.astype(dtype),
        np.diag([-0.8, 0.8, 2.0, 1]),
        *(scaling or (None, None)),
    )
    meta = None if rescale is None else VolumeMeta(*rescale)
    source = "metadata" if rescale else "header"
    for target, b2u in (((40, 48, 48), True), ((24, 40, 56), False)):
        vol, attrs = preprocess_volume(path, meta, target, slide_b2u=b2u, hu_source=source)
        np.testing.assert_array_equal(vol, _whole_volume_reference(path, rescale, target, b2u))
        assert attrs["hu_source"] == ("metadata" if rescale else "header" if scaling else "stored")


# -- shards ------------------------------------------------------------------------------------


def _argv(vols, out, meta, *more):
    return [
        "--ct-data-path", str(vols), "--ct-out-path", str(out), "--metadata-path", str(meta),
        "--target-shape", "4", "8", "8", "--num-workers", "0", *more,
    ]  # fmt: skip


def test_shards_read_back_as_one_store_equal_one_run(tmp_path, capsys, monkeypatch):
    from ctclip.data import VolumeReader, check_store, check_volumes, match_names

    vols, meta = _write_dataset(tmp_path, n=9)
    single = tmp_path / "one.h5"
    assert cli.preprocess(_argv(vols, single, meta)) == 0
    parts = tmp_path / "parts"
    assert cli.preprocess(_argv(vols, parts, meta, "--shard", "1/3")) == 0
    assert cli.preprocess(_argv(vols, parts, meta, "--shard", "2/3")) == 0
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "3"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    assert cli.preprocess(_argv(vols, parts, meta)) == 0  # the third task of a job array
    err = capsys.readouterr().err
    assert "shard 3/3 from the SLURM job array" in err and "shard 3/3:" in err
    names = pp.read_volume_names(single)
    assert len(names) == 9 and pp.read_volume_names(parts) == names
    assert sorted(p.name for p in parts.iterdir()) == [
        f"part-0000{i}-of-00003.h5" for i in (1, 2, 3)
    ]  # no partial, no lock
    one, many = VolumeReader(single), VolumeReader(parts)
    with h5py.File(single) as h5:
        for name in names:
            np.testing.assert_array_equal(many(name).numpy(), one(name).numpy())
            part = pp.open_store(parts).dataset(name)
            for key, value in h5["volumes"][name].attrs.items():
                np.testing.assert_array_equal(part.attrs[key], value)
    assert check_store(parts) == check_store(single)
    listed = sorted(names)
    assert match_names(listed, parts, meta, allow_missing=False) == listed
    check_volumes(parts, listed)
    assert pp.volume_shape(parts) == (4, 8, 8)
    # a rerun of a finished shard does nothing; the shards split by name alone
    assert cli.preprocess(_argv(vols, parts, meta, "--shard", "1/3")) == 0
    assert "0 written" in capsys.readouterr().out
    owner = {n: shard_of(n, 3) for n in names}
    for i in (1, 2, 3):
        assert pp.read_volume_names(parts / f"part-0000{i}-of-00003.h5") == {
            n for n in names if owner[n] == i
        }


def test_shard_bad_input_is_one_line_error(tmp_path, capsys):
    vols, meta = _write_dataset(tmp_path, n=3)
    parts = tmp_path / "parts"

    def fails(argv, *expected):
        code = cli.preprocess(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        for text in expected:
            assert text in err[0]

    fails(_argv(vols, parts, meta, "--shard", "3/2"), "--shard: 3/2: the shard must be one of")
    fails(_argv(vols, parts, meta, "--shard", "two"), "is not I/N")
    assert cli.preprocess(_argv(vols, parts, meta, "--shard", "1/2")) == 0
    capsys.readouterr()
    other = _argv(vols, parts, meta, "--shard", "2/2")
    other[other.index("--target-shape") + 1] = "6"
    fails(other, "part-00001-of-00002.h5: written with other settings than this job", "[4, 8, 8]")
    fails(_argv(vols, parts, meta, "--shard", "1/4"), "a part of 2 shards; this job is shard 1/4")
    fails(_argv(vols, parts, meta), f"{parts}: is a folder (of shard parts?)")
    assert sorted(p.name for p in parts.iterdir()) == ["part-00001-of-00002.h5"]


def test_training_on_parts_that_disagree_is_one_line_error(tiny_demo, tiny_sets, tmp_path, capsys):
    """ctclip-train reads a folder of parts as one store: a part written with other settings,
    or a volume two parts hold, stops it before any step with one line naming the parts."""
    vols = tiny_demo / "ct_volumes"
    csv = tiny_demo / "ct_rate"
    meta = [csv / "train_metadata.csv", csv / "validation_metadata.csv"]
    shape = tuple(int(v) for v in pp.open_store(tiny_demo / "ct_volumes.h5").attrs["target_shape"])
    parts = tmp_path / "parts"
    run_preprocess(vols, parts, meta, shape, num_workers=0, show_progress=False,
                   shard=pp.Shard(1, 2))  # fmt: skip
    other = tmp_path / "other"
    run_preprocess(vols, other, meta, (shape[0] + 2, *shape[1:]), num_workers=0,
                   show_progress=False, shard=pp.Shard(2, 2))  # fmt: skip
    argv = ["--data-dir", str(tiny_demo), "--output-dir", str(tmp_path / "run"), *tiny_sets,
            "--set", f"data.ct_filepath={parts}", "--set", "device=cpu"]  # fmt: skip

    def fails(*expected):
        code, _, err = call_main(cli.train, argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and lines[-1].startswith("error: ") and "Traceback" not in err, err
        for text in expected:
            assert text in lines[-1]
        assert not (tmp_path / "run" / "checkpoints").exists()

    (other / "part-00002-of-00002.h5").rename(parts / "part-00002-of-00002.h5")
    fails(
        f"{parts / 'part-00002-of-00002.h5'}: written with other settings than "
        "part-00001-of-00002.h5",
        f"target_shape=[{shape[0] + 2}, {shape[1]}, {shape[2]}]",
    )
    # shard 1's part again as shard 2's: every volume of it in two parts
    (parts / "part-00002-of-00002.h5").write_bytes((parts / "part-00001-of-00002.h5").read_bytes())
    fails(f"in two parts of {parts}: part-00001-of-00002.h5 and part-00002-of-00002.h5")
