"""Images decoded once: a uint8 memory-mapped store shared by every worker, phase, fold and model.

Decoding a PNG/JPEG costs more than a small model's step, and a 2-D package reads each image
once per epoch per stage. The store decodes every source image once, at the working size, into
one ``[N, H, W, C]`` uint8 file; DataLoader workers memory-map it (the OS page cache holds one
copy for all of them). A manifest records each source's size and mtime: a changed, added or
removed source, another size or mode, or a truncated store file rebuilds the store. Images
that fail to decode are named and skipped, like everywhere else, and marked invalid.

Layout of a store directory: ``pixels.u8`` (raw uint8, C order) and ``manifest.json``, both
written to temporary names and renamed into place, so an interrupted build is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from medcore.errors import DataError, UserError
from medcore.io import atomic_path, atomic_write_json, load_image, waiting_lock

FORMAT_VERSION = 1
Fit = Literal["stretch", "pad", "none"]
Resample = Literal["bilinear", "bicubic", "nearest"]


@dataclass(frozen=True)
class StoreSpec:
    """What the store holds: each image resized to ``size`` (H, W) in ``mode``.

    ``fit``: ``stretch`` resizes to exactly ``size``; ``pad`` keeps the aspect ratio and pads
    with zeros (bottom/right, so pixel coordinates keep their origin); ``none`` stores images
    at their own size, which must then be the same for all of them. ``resample``: Pillow's
    filter for the resize (antialiased when shrinking), e.g. a pretrained model's own
    ``interpolation``.
    """

    size: tuple[int, int] | None
    mode: Literal["RGB", "L"] = "RGB"
    fit: Fit = "stretch"
    resample: Resample = "bilinear"

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _resize(image: np.ndarray, spec: StoreSpec) -> tuple[np.ndarray, tuple[float, float]]:
    """``image`` at the store's size, and the (y, x) scale applied (to map coordinates such as
    landmarks: stored = original * scale, with pixel edges as the origin)."""
    from PIL import Image

    if spec.size is None or spec.fit == "none":
        return image, (1.0, 1.0)
    height, width = spec.size
    pil = Image.fromarray(image)
    resample = Image.Resampling[spec.resample.upper()]
    if spec.fit == "stretch":
        scale_yx = (height / image.shape[0], width / image.shape[1])
        return np.asarray(pil.resize((width, height), resample)), scale_yx
    scale = min(height / image.shape[0], width / image.shape[1])
    new_w = max(1, round(image.shape[1] * scale))
    new_h = max(1, round(image.shape[0] * scale))
    small = np.asarray(pil.resize((new_w, new_h), resample))
    out = np.zeros((height, width, *image.shape[2:]), dtype=np.uint8)
    out[:new_h, :new_w] = small
    return out, (new_h / image.shape[0], new_w / image.shape[1])


class ImageStore:
    """Read side of a built store: ``store[i]`` is image ``i`` as ``[H, W, C]`` uint8.

    Pickles without its memory map (a DataLoader worker re-opens the file), so it is cheap to
    hand to workers. ``valid[i]`` is False for an image that failed to decode (all zeros).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest = json.loads((self.directory / "manifest.json").read_text())
        self.manifest = manifest
        self.shape = tuple(manifest["shape"])
        self.valid = np.asarray(manifest["valid"], dtype=bool)
        # (y, x) factor from source pixels to stored pixels, per image
        self.scales = np.asarray(manifest["scales"], dtype=np.float64).reshape(-1, 2)
        self.sources = [Path(p) for p in manifest["sources"]]
        self._pixels: np.ndarray | None = None

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:
            self._pixels = np.memmap(
                self.directory / "pixels.u8", dtype=np.uint8, mode="r", shape=self.shape
            )
        return self._pixels

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.pixels[index]

    def batch(
        self, indices: Sequence[int], rows: slice = slice(None), cols: slice = slice(None)
    ) -> np.ndarray:
        """Images ``indices`` (their ``rows`` x ``cols`` region) as one ``[B, h, w, C]`` array.

        The map is read in file order and each region is copied once, straight into the
        contiguous output (a crop is never read as a whole image first).
        """
        region = self.pixels[0, rows, cols].shape
        out = np.empty((len(indices), *region), dtype=np.uint8)
        pixels = self.pixels
        for j in np.argsort(indices, kind="stable"):
            out[j] = pixels[indices[j], rows, cols]
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pixels"] = None
        return state

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))


def _expected_manifest(paths: Sequence[Path], spec: StoreSpec) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "size": list(spec.size) if spec.size else None,
        "mode": spec.mode,
        "fit": spec.fit,
        "resample": spec.resample,
        "sources": [str(p) for p in paths],
        "fingerprints": [_fingerprint(p) if p.is_file() else None for p in paths],
    }


def _is_current(directory: Path, expected: dict) -> bool:
    """The store in ``directory`` was built from exactly these sources, unchanged, and is whole."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if any(manifest.get(k) != v for k, v in expected.items()):
        return False
    pixels = directory / "pixels.u8"
    return pixels.is_file() and pixels.stat().st_size == int(np.prod(manifest["shape"]))


def store_key(paths: Sequence[Path], spec: StoreSpec) -> str:
    """A short name for the store of these sources at this size (sources' changes not included)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([spec.size, spec.mode, spec.fit, spec.resample]).encode())
    for p in paths:
        digest.update(str(Path(p).resolve()).encode() + b"\0")
    return digest.hexdigest()[:16]


def open_store(
    paths: Sequence[str | Path],
    directory: str | Path,
    spec: StoreSpec,
    num_threads: int | None = None,
    progress: bool = True,
    wait_s: float = 3600.0,
) -> ImageStore:
    """The store of ``paths`` in ``directory``, built (or rebuilt) first if it is not current.

    Images that fail to decode are named on one line each, counted, and marked invalid; a
    store that would not fit on the disk is refused with one line before anything is written.
    """
    sources = [Path(p) for p in paths]
    directory = Path(directory)
    expected = _expected_manifest(sources, spec)
    if _is_current(directory, expected):
        return ImageStore(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with waiting_lock(directory / "build", wait_s=wait_s):
        if not _is_current(directory, expected):  # another process may have built it meanwhile
            _build(sources, directory, spec, expected, num_threads, progress)
    return ImageStore(directory)


def cached_store(
    paths: Sequence[str | Path], spec: StoreSpec, directory: str | Path | None = None, **kw
) -> ImageStore:
    """:func:`open_store` in ``directory``, by default ``<medcore cache>/imagestore/<key>``: one
    store per set of sources and size, found again by every run, phase, fold and model."""
    from medcore.data.demo_cache import cache_root

    if directory is None:
        directory = cache_root() / "imagestore" / store_key([Path(p) for p in paths], spec)
    return open_store(paths, directory, spec, **kw)


def _first_shape(sources: Sequence[Path], spec: StoreSpec) -> tuple[int, int]:
    for path in sources:
        try:
            return load_image(path, spec.mode).shape[:2]
        except DataError:
            continue
    raise DataError(sources[0] if sources else "images", "no image could be decoded")


def _build(
    sources: Sequence[Path],
    directory: Path,
    spec: StoreSpec,
    expected: dict,
    num_threads: int | None,
    progress: bool,
) -> None:
    if not sources:
        raise DataError(directory, "no images to store")
    # The old manifest goes first: a build interrupted from here on is never taken as current.
    (directory / "manifest.json").unlink(missing_ok=True)
    height, width = spec.size if spec.size and spec.fit != "none" else _first_shape(sources, spec)
    shape = (len(sources), height, width, spec.channels)
    needed = int(np.prod(shape))
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise UserError(
            directory,
            f"the decoded image store needs {needed / 2**30:.2f} GiB and only "
            f"{free / 2**30:.2f} GiB is free: free space or point the cache elsewhere "
            "(MEDCORE_CACHE_DIR)",
        )
    valid = np.zeros(len(sources), dtype=bool)
    scales = np.ones((len(sources), 2), dtype=np.float64)
    skipped: list[str] = []

    def decode(index: int) -> tuple[int, np.ndarray | None, tuple[float, float], str | None]:
        try:
            image = load_image(sources[index], spec.mode)
        except DataError as exc:
            return index, None, (1.0, 1.0), f"{exc.what}: {exc.why}"
        image, scale = _resize(image, spec)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape != (height, width, spec.channels):
            return (
                index,
                None,
                (1.0, 1.0),
                (
                    f"{sources[index]}: size {image.shape[1]}x{image.shape[0]} differs from the "
                    f"store's {width}x{height} (give the store a size)"
                ),
            )
        return index, image, scale, None

    with atomic_path(directory / "pixels.u8") as tmp:
        out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
        workers = num_threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(decode, range(len(sources)))
            for index, image, scale, problem in tqdm(
                results,
                total=len(sources),
                desc="decoding images once",
                unit="img",
                disable=not progress,
                leave=False,
            ):
                if problem is not None:
                    skipped.append(problem)
                    tqdm.write(f"skipped {problem}")
                    continue
                out[index] = image
                valid[index] = True
                scales[index] = scale
        out.flush()
        del out
    if skipped:
        print(f"image store: {len(skipped)} of {len(sources)} images skipped (named above)")
    atomic_write_json(
        directory / "manifest.json",
        {**expected, "shape": list(shape), "valid": valid.tolist(), "scales": scales.tolist()},
    )
