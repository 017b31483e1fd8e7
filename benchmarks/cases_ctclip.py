"""Cases 2-4: ctclip preprocessing against the inflate floor and the previous path, HDF5
reading, slice-encoding memory."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
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


CTRATE_VOLUMES = 50_000  # CT-RATE's reconstructed volumes (50,188)


def _children_cpu() -> float:
    """CPU seconds of this process's finished child processes (the workers, once joined)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Clock:
    """Wall seconds and CPU seconds (all threads of this process, plus the child processes it
    joined) of each block it times; ``loads`` the 1-minute load average after each block."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.loads: list[float] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time() + _children_cpu()
        yield
        self.cpu.append(time.process_time() + _children_cpu() - cpu)
        self.wall.append(time.perf_counter() - wall)
        self.loads.append(os.getloadavg()[0])


def _floor(paths: list[Path]) -> None:
    """The floor: each file read and inflated with isal's igzip, then one pass over its voxels
    (int16 -> float32). No preprocessing of the file can do less."""
    from isal import igzip

    for path in paths:
        raw = igzip.decompress(path.read_bytes())
        offset = int(np.frombuffer(raw, "<f4", 1, 108)[0])  # the header's vox_offset
        np.frombuffer(raw, "<i2", offset=offset).astype(np.float32)


def _float64_read(paths: list[Path]) -> None:
    """What a script without a dtype pays: nibabel's default ``get_fdata()`` (zlib, float64)."""
    import nibabel as nib

    for path in paths:
        nib.load(str(path)).get_fdata()


def _previous_path(paths: list[Path], out: Path) -> None:
    """ctclip-preprocess before the stored-type reader, step by step (commit 59f966d): nibabel's
    ``get_fdata(float32)`` (zlib inflate, scaling), one contiguous canonical copy, the HU
    evidence on the whole volume, clip in place, one torch resize of the whole volume in-plane
    then along z, padding in float, uint8, one write per volume through the same store writer."""
    import nibabel as nib
    import torch.nn.functional as F

    from ctclip.preprocess import HU_RANGE, STORE_KIND, output_grid, store_settings
    from medcore.volumes.geometry import center_in_box, to_canonical, voxel_spacing
    from medcore.volumes.reader import hu_evidence
    from medcore.volumes.store import VolumeStoreWriter

    lo, hi = HU_RANGE
    with VolumeStoreWriter(
        out, STORE_KIND, store_settings(TARGET, True), compression="lzf"
    ) as store:
        for path in paths:
            img = nib.load(str(path))
            data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(img.shape, order="A")
            hu, affine, _ = to_canonical(data, np.asarray(img.affine, dtype=np.float64))
            hu_evidence(hu)
            np.clip(hu, lo, hi, out=hu)
            size, _ = output_grid(hu.shape, voxel_spacing(affine), TARGET)
            x = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))
            x = F.interpolate(x[:, None], size=size[1:], mode="bilinear", antialias=True)[:, 0]
            flat = x.reshape(1, 1, hu.shape[0], -1)
            x = F.interpolate(flat, size=(size[0], flat.shape[-1]), mode="bilinear", antialias=True)
            boxed = center_in_box(x.reshape(size).numpy(), TARGET, lo)[0]
            voxels = np.round((np.clip(boxed, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.uint8)
            store.write(path.name, voxels)
        store.finish()


def _preprocess(src: Path, out: Path, workers: int, *more: str) -> None:
    from ctclip.cli import preprocess

    argv = ["--ct-data-path", str(src), "--ct-out-path", str(out), "--num-workers", str(workers)]
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        code = preprocess([*argv, *more])
    if code != 0:
        raise RuntimeError(f"ctclip-preprocess exited with {code}")


def _same_bytes(a, b, names) -> int:
    """How many volumes of ``names`` two stores hold identically (array and attributes)."""
    same = 0
    for name in names:
        x, y = a.dataset(name), b.dataset(name)
        attrs = set(x.attrs) == set(y.attrs) and all(
            np.array_equal(x.attrs[k], y.attrs[k]) for k in x.attrs
        )
        same += attrs and np.array_equal(x[()], y[()])
    return same


def _spread(ratios: list[float]) -> str:
    return f"{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} interleaved repeats"


def case_preprocess(device: torch.device, quick: bool) -> list[Row]:
    from ctclip.preprocess import open_store

    n, repeats = (4, 3) if quick else (8, 4)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "nifti"
        paths = _dataset(src, n)
        floor, ours, before, fdata64 = Clock(), Clock(), Clock(), Clock()
        one_run, shards, two = Clock(), Clock(), Clock()
        torch.set_num_threads(1)  # one process, one thread: the cost per core
        try:
            _floor(paths)  # page cache warm for every side
            # Interleaved, so the drift of a shared machine hits every side alike; the ratios
            # are of CPU seconds, which other jobs on the cores change far less than wall time.
            for rep in range(repeats):
                with floor():
                    _floor(paths)
                with ours():
                    _preprocess(src, root / f"ours{rep}.h5", 1)
                with before():
                    _previous_path(paths, root / f"before{rep}.h5")
                with fdata64():
                    _float64_read(paths)
            for rep in range(repeats):
                with one_run():
                    _preprocess(src, root / f"one{rep}.h5", 1)
                with shards():  # one after the other, as two array tasks on one core would
                    for i in (1, 2):
                        _preprocess(src, root / f"parts{rep}", 1, "--shard", f"{i}/2")
                with two():  # the workers set one thread each
                    _preprocess(src, root / f"two{rep}.h5", 2)
        finally:
            torch.set_num_threads(threads)
        stores = {p: open_store(root / p) for p in ("ours0.h5", "before0.h5", "parts0", "two0.h5")}
        names = sorted(stores["ours0.h5"].names)
        same_parts = _same_bytes(stores["ours0.h5"], stores["parts0"], names)
        same_two = _same_bytes(stores["ours0.h5"], stores["two0.h5"], names)
        same_before = sum(
            np.array_equal(stores["ours0.h5"].read(k), stores["before0.h5"].read(k)) for k in names
        )
        for store in stores.values():
            store.close()
    per = {
        k: [t / n for t in c.cpu] for k, c in (("floor", floor), ("ours", ours), ("before", before))
    }
    floor_ratio = [o / f for o, f in zip(per["ours"], per["floor"], strict=True)]
    before_ratio = [b / o for b, o in zip(per["before"], per["ours"], strict=True)]
    wall_floor = statistics.median(o / f for o, f in zip(ours.wall, floor.wall, strict=True))
    wall_before = statistics.median(b / o for b, o in zip(before.wall, ours.wall, strict=True))
    shard_ratio = [s / o for s, o in zip(shards.cpu, one_run.cpu, strict=True)]
    two_ratio = [o / t for o, t in zip(one_run.wall, two.wall, strict=True)]
    ours_s = statistics.median(per["ours"])
    hours = CTRATE_VOLUMES * ours_s / 3600
    shape = "x".join(str(s) for s in SOURCE_SHAPE)
    loads = [x for c in (floor, ours, before, one_run, shards, two) for x in c.loads]
    busy = f"1-min load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores"
    return [
        Row(
            f"2a ctclip-preprocess vs isal inflate floor ({n} volumes {shape} int16 .nii.gz, "
            "1 process, 1 thread)",
            f"{fmt_s(ours_s)}/volume CPU",
            f"igzip inflate + one pass {fmt_s(statistics.median(per['floor']))}/volume CPU",
            statistics.median(floor_ratio),
            "<= 1.3x floor",
            statistics.median(floor_ratio) <= 1.3,
            f"CPU seconds, median; {_spread(floor_ratio)}; wall {wall_floor:.2f}x; {busy}; "
            f"CT-RATE ({CTRATE_VOLUMES} volumes of this size) {hours:.1f} core-hours",
        ),
        Row(
            "2b ctclip-preprocess vs the previous path (nibabel get_fdata, whole-volume resize)",
            f"{fmt_s(ours_s)}/volume CPU",
            f"{fmt_s(statistics.median(per['before']))}/volume CPU",
            statistics.median(before_ratio),
            ">= 2x faster",
            statistics.median(before_ratio) >= 2,
            f"{_spread(before_ratio)}; wall {wall_before:.2f}x; identical arrays "
            f"{same_before}/{n}; nibabel's default get_fdata() (float64) alone "
            f"{fmt_s(statistics.median(fdata64.cpu) / n)}/volume CPU",
        ),
        Row(
            f"2c ctclip-preprocess --num-workers 2 ({os.cpu_count()} cores)",
            f"{n / statistics.median(two.wall):.2f} volumes/s",
            f"--num-workers 1: {n / statistics.median(one_run.wall):.2f} volumes/s",
            statistics.median(two_ratio),
            "report",
            None,
            f"wall time, median of {repeats}, each run starting its 2 worker processes; "
            f"{_spread(two_ratio)}; CPU of the run (workers included) "
            f"{fmt_s(statistics.median(two.cpu))} against {fmt_s(statistics.median(one_run.cpu))}"
            f" for 1 worker; identical volumes {same_two}/{n}; {busy}",
        ),
        Row(
            "2d --shard 1/2 then 2/2 (one after the other) vs one run",
            f"{fmt_s(statistics.median(shards.cpu))} CPU",
            f"one run {fmt_s(statistics.median(one_run.cpu))} CPU",
            statistics.median(shard_ratio),
            "<= 1.1x, same bytes",
            statistics.median(shard_ratio) <= 1.1 and same_parts == n,
            f"{_spread(shard_ratio)}; the folder of parts read as one store: identical volumes "
            f"(array and attributes) {same_parts}/{n}",
        ),
    ]


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

    from ctclip.config import CTClipConfig, ModelConfig
    from ctclip.model import build_model
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
    model = build_model(CTClipConfig(model=cfg)).to(device)
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
