"""Cases 2-4: ctclip preprocessing against nibabel and scipy, HDF5 reading, slice-encoding memory."""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    Row,
    ab_comparison,
    added_peak_memory,
    fmt_bytes,
    fmt_s,
    peak_rss_in_child,
)

SOURCE_SHAPE = (512, 512, 200)  # x, y, z voxels, as a chest CT of CT-RATE
SPACING = (0.7, 0.7, 1.5)  # mm
TARGET = (160, 224, 224)


def _write_ct(path: Path, seed: int) -> None:
    """A chest-like int16 CT (body, fat, lungs, spine, noise) in LPS voxel order, gzip NIfTI.

    Structure and noise matter: they set how well gzip compresses, so reading costs what a
    real scan costs; the header is what dcm2niix writes for an axial series.
    """
    import nibabel as nib

    rng = np.random.default_rng(seed)
    nx, ny, nz = SOURCE_SHAPE
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :]
    a, b = rng.uniform(0.75, 0.9), rng.uniform(0.55, 0.7)
    plane = np.full((nx, ny), -1024, np.int16)
    plane[(x / a) ** 2 + (y / b) ** 2 < 1] = -90
    plane[(x / (a - 0.06)) ** 2 + (y / (b - 0.06)) ** 2 < 1] = 40
    for side in (-1, 1):
        plane[((x - side * 0.42 * a) / 0.3) ** 2 + (y / 0.42) ** 2 < 1] = -820
    plane[(x / 0.1) ** 2 + ((y + 0.5 * b) / 0.09) ** 2 < 1] = 700
    vol = np.repeat(plane[:, :, None], nz, axis=2)
    vol += rng.normal(0, 18, vol.shape).astype(np.int16)
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [nx * SPACING[0] / 2, ny * SPACING[1] / 2, -nz * SPACING[2] / 2]
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def _dataset(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"train_{i}_a_1.nii.gz"
        _write_ct(path, seed=i)
        paths.append(path)
    return paths


def _floor(paths: list[Path]) -> float:
    """nibabel load + get_fdata of every file, one process: no pipeline reads faster."""
    import nibabel as nib

    start = time.perf_counter()
    for path in paths:
        nib.load(str(path)).get_fdata()
    return time.perf_counter() - start


def _naive(path: Path, order: int = 3) -> np.ndarray:
    """What a first script does: scipy.ndimage.zoom (default: cubic spline) to the same grid."""
    import nibabel as nib
    from scipy import ndimage

    from ctclip.preprocess import hu_to_uint8
    from medcore.volumes.geometry import center_in_box

    img = nib.load(str(path))
    hu = np.clip(img.get_fdata(dtype=np.float32), -1000, 1000)
    view = hu.transpose(2, 1, 0)[:, ::-1, ::-1]
    d, h, w = view.shape
    # The same grid as ctclip-preprocess: the whole volume fits the target, then is padded.
    out_mm = max(d * SPACING[2] / TARGET[0], h * SPACING[1] / TARGET[1], w * SPACING[0] / TARGET[2])
    factors = (SPACING[2] / out_mm, SPACING[1] / out_mm, SPACING[0] / out_mm)
    resized = ndimage.zoom(view, factors, order=order)
    return hu_to_uint8(center_in_box(resized, TARGET, -1000)[0])


def _per_volume(fn, paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        fn(path)
    return (time.perf_counter() - start) / len(paths)


def _preprocess(src: Path, out: Path, workers: int) -> float:
    from ctclip.cli import preprocess

    start = time.perf_counter()
    code = preprocess(
        [
            "--ct-data-path",
            str(src),
            "--ct-out-path",
            str(out),
            "--num-workers",
            str(workers),
        ]
    )
    elapsed = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"ctclip-preprocess exited with {code}")
    return elapsed


def case_preprocess(device: torch.device, quick: bool) -> list[Row]:
    n = 8
    n_naive = 2 if quick else n
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "nifti"
        paths = _dataset(src, n)
        floor = min(_floor(paths), _floor(paths)) / n  # page cache warm for both sides
        ours_1 = _preprocess(src, Path(tmp) / "one.h5", 1) / n
        ours_n = _preprocess(src, Path(tmp) / "all.h5", workers) / n
        naive = _per_volume(_naive, paths[:n_naive])
        naive_linear = _per_volume(functools.partial(_naive, order=1), paths[:n_naive])
    shape = "x".join(str(s) for s in SOURCE_SHAPE)
    rows = [
        Row(
            f"2a ctclip-preprocess vs nibabel floor ({n} volumes {shape}, 1 worker)",
            f"{fmt_s(ours_1)}/volume",
            f"load + get_fdata {fmt_s(floor)}/volume",
            ours_1 / floor,
            "<= 1.5x floor",
            ours_1 / floor <= 1.5,
            "same single process on both sides",
        ),
        Row(
            f"2a' ctclip-preprocess, --num-workers {workers}",
            f"{fmt_s(ours_n)}/volume",
            f"load + get_fdata {fmt_s(floor)}/volume (1 process)",
            ours_n / floor,
            "report",
            None,
            f"includes starting {workers} worker processes (imports), amortised over a real dataset",
        ),
        Row(
            "2b ctclip-preprocess vs naive scipy.ndimage.zoom (1 process each)",
            f"{fmt_s(ours_1)}/volume",
            f"zoom {fmt_s(naive)}/volume" + (f" (timed on {n_naive})" if n_naive < n else ""),
            naive / ours_1,
            ">= 3x faster",
            naive / ours_1 >= 3,
            f"zoom with scipy's default cubic spline; with order=1 {fmt_s(naive_linear)}/volume "
            f"({naive_linear / ours_1:.1f}x): both sides pay the same gzip read",
        ),
    ]
    return rows


# -- 3: HDF5 reading ------------------------------------------------------------------------


def _small_nifti(root: Path, n: int) -> None:
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        vol = rng.normal(0, 300, (96, 96, 60)).astype(np.int16)
        nib.save(nib.Nifti1Image(vol, np.diag([1.6, 1.6, 2.5, 1.0])), root / f"v{i:02d}.nii.gz")


def case_hdf5(device: torch.device, quick: bool) -> list[Row]:
    import h5py

    from ctclip.data import CTReportDataset
    from ctclip.preprocess import read_volume_names
    from ctclip.text import Tokenizer

    n = 16 if quick else 48
    repeats = 3
    with tempfile.TemporaryDirectory() as tmp:
        _small_nifti(Path(tmp) / "nifti", n)
        h5_path = Path(tmp) / "volumes.h5"
        _preprocess(Path(tmp) / "nifti", h5_path, 1)  # the real file layout (chunks, lzf)
        names = sorted(read_volume_names(h5_path))
        reports = {name: "The heart is enlarged. No pleural effusion." for name in names}
        dataset = CTReportDataset(h5_path, reports, names, Tokenizer(77))

        def ours() -> None:
            for i in range(len(dataset)):
                dataset[i]["volume"].float()

        def raw() -> None:
            with h5py.File(h5_path, "r") as f:
                group = f["volumes"]
                for name in names:
                    torch.from_numpy(group[name][()]).float()

        ours()
        raw()
        t_ours, t_raw = [], []
        for _ in range(repeats):  # interleaved, so drift on a busy machine hits both
            start = time.perf_counter()
            ours()
            t_ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            raw()
            t_raw.append(time.perf_counter() - start)
    rate_ours, rate_raw = n / min(t_ours), n / min(t_raw)
    ratio = rate_ours / rate_raw
    return [
        Row(
            f"3 ctclip HDF5 reading ({n} volumes {'x'.join(map(str, TARGET))} uint8, lzf)",
            f"{rate_ours:.1f} volumes/s",
            f"raw h5py {rate_raw:.1f} volumes/s",
            ratio,
            ">= 0.80",
            ratio >= 0.80,
            "CTReportDataset (volume + tokenised report) vs h5py read of the same volumes",
        )
    ]


# -- 4: memory of one training step, chunked + checkpointed vs all slices at once -----------


def _one_step(slices: int, chunked: bool, device_type: str) -> tuple[float, float, int]:
    """(loss, grad checksum, peak bytes the step adds) of one training step of a fresh model.

    Run it in a fresh process on CPU (the RSS high-water mark never goes down). The step's
    memory is measured over the built model and optimizer: activations, gradients, optimizer
    state, all of it what slice chunking and checkpointing act on or leave as they are.
    """
    import torch.nn.functional as F

    from ctclip.config import ModelConfig
    from ctclip.model import CTCLIP
    from ctclip.text import Tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device(device_type)
    cfg = ModelConfig(
        dinov2_model_name="dinov2_vits14",
        image_size=224,
        slice_chunk_size=32 if chunked else slices,
        grad_checkpointing=chunked,
    )
    model = CTCLIP.from_config(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(1)
    volume = torch.randint(0, 256, (1, slices, 224, 224), generator=gen, dtype=torch.uint8)
    texts = [
        "The heart is enlarged.",
        "No pleural effusion.",
        "A nodule in the right lung.",
        "Normal study.",
    ]
    tokens = Tokenizer(77)(texts).to(device)
    volume = volume.to(device)
    with added_peak_memory(device) as memory:
        image, text, scale = model(volume, tokens)
        # Batch 1: the volume is scored against its report and three others (the reports that
        # the other ranks hold under DDP), image -> text cross-entropy.
        logits = scale * image @ text.T
        loss = F.cross_entropy(logits.float(), torch.zeros(1, dtype=torch.long, device=device))
        loss.backward()
        opt.step()
    step_bytes = memory["bytes"]
    checksum = float(
        sum(p.grad.double().abs().sum() for p in model.parameters() if p.grad is not None)
    )
    return float(loss.detach()), checksum, step_bytes


def case_memory(device: torch.device, quick: bool) -> list[Row]:
    slices = 160  # the spec's depth in both modes: the saving grows with the slice count
    results = {}
    for chunked in (False, True):
        if device.type == "cuda":
            results[chunked] = _one_step(slices, chunked, "cuda")
            torch.cuda.empty_cache()
        else:  # a fresh process per mode: a CPU high-water mark never goes down
            results[chunked] = peak_rss_in_child(
                functools.partial(_one_step, slices, chunked, "cpu")
            )[1]
    (_, _, mem_a), (_, _, mem_c) = results[False], results[True]
    ratio, loss_diff, grad_rel, what = ab_comparison(results[False], results[True], device)
    return [
        Row(
            f"4 ctclip step memory, {slices} slices at 224, ViT-S/14, batch 1",
            f"{fmt_bytes(mem_c)} (chunks of 32 + checkpointing)",
            f"{fmt_bytes(mem_a)} (all slices at once)",
            ratio,
            "<= 0.35x, same loss to 1e-4",
            ratio <= 0.35 and loss_diff <= 1e-4,
            f"{what} the step adds to the built model; |loss diff| {loss_diff:.1e}, "
            f"grad-sum rel diff {grad_rel:.1e}",
        )
    ]


CASES = {
    "ctclip_preprocess": case_preprocess,
    "ctclip_hdf5": case_hdf5,
    "ctclip_memory": case_memory,
}
