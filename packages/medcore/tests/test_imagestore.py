"""The decode-once image store: contents, rebuild rules, bad images, disk space, workers."""

from __future__ import annotations

import json
import os
import pickle
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from medcore.data import image_store as imagestore
from medcore.data.image_store import StoreSpec, open_store
from medcore.errors import UserError


def _png(path: Path, height: int, width: int, seed: int, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


@pytest.fixture
def pngs(tmp_path: Path) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir()
    return [_png(src / f"{i}.png", 46 + i, 70 - i, seed=i) for i in range(5)]


def test_store_holds_each_image_resized_once(tmp_path: Path, pngs: list[Path]) -> None:
    store = open_store(pngs, tmp_path / "store", StoreSpec(size=(23, 35)), progress=False)
    assert store.shape == (5, 23, 35, 3)
    for i, path in enumerate(pngs):
        reference = np.asarray(Image.open(path).convert("RGB").resize((35, 23), Image.BILINEAR))
        np.testing.assert_array_equal(store[i], reference)
        h, w = np.asarray(Image.open(path)).shape[:2]
        np.testing.assert_allclose(store.scales[i], [23 / h, 35 / w])
    assert store.valid.all()


@pytest.mark.parametrize("resample", ["bicubic", "nearest"])
def test_store_resizes_with_the_named_filter_and_rebuilds_for_another(
    tmp_path: Path, pngs: list[Path], resample: str
) -> None:
    spec = StoreSpec(size=(23, 35), resample=resample)
    store = open_store(pngs, tmp_path / "store", spec, progress=False)
    pil_filter = {"bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[resample]
    for i, path in enumerate(pngs):
        reference = np.asarray(Image.open(path).convert("RGB").resize((35, 23), pil_filter))
        np.testing.assert_array_equal(store[i], reference)
    bilinear = np.asarray(Image.open(pngs[0]).convert("RGB").resize((35, 23), Image.BILINEAR))
    assert not np.array_equal(store[0], bilinear)
    # The same folder asked for another filter is another store's content: rebuilt.
    rebuilt = open_store(pngs, tmp_path / "store", StoreSpec(size=(23, 35)), progress=False)
    np.testing.assert_array_equal(rebuilt[0], bilinear)
    assert imagestore.store_key(pngs, spec) != imagestore.store_key(pngs, StoreSpec((23, 35)))


def test_pad_keeps_aspect_ratio_and_origin(tmp_path: Path) -> None:
    path = _png(tmp_path / "wide.png", 20, 40, seed=1, mode="L")
    store = open_store([path], tmp_path / "store", StoreSpec(size=(16, 16), mode="L", fit="pad"))
    image = store[0][..., 0]
    assert store.shape == (1, 16, 16, 1)
    assert (image[8:] == 0).all()  # 20x40 -> 8x16, padded at the bottom
    np.testing.assert_allclose(store.scales[0], [8 / 20, 16 / 40])
    reference = np.asarray(Image.open(path).resize((16, 8), Image.BILINEAR))
    np.testing.assert_array_equal(image[:8], reference)


def test_unchanged_sources_reuse_the_store_changed_ones_rebuild_it(
    tmp_path: Path, pngs: list[Path]
) -> None:
    spec = StoreSpec(size=(23, 35))
    open_store(pngs, tmp_path / "store", spec, progress=False)
    pixels = tmp_path / "store" / "pixels.u8"
    first = pixels.stat().st_ino, pixels.stat().st_mtime_ns
    again = open_store(pngs, tmp_path / "store", spec, progress=False)
    assert (pixels.stat().st_ino, pixels.stat().st_mtime_ns) == first
    old = again[2].copy()

    _png(pngs[2], 46 + 2, 70 - 2, seed=99)  # same name and size, other pixels
    os.utime(pngs[2], ns=(pngs[2].stat().st_atime_ns, pngs[2].stat().st_mtime_ns + 10**9))
    rebuilt = open_store(pngs, tmp_path / "store", spec, progress=False)
    assert not np.array_equal(rebuilt[2], old)
    reference = np.asarray(Image.open(pngs[2]).convert("RGB").resize((35, 23), Image.BILINEAR))
    np.testing.assert_array_equal(rebuilt[2], reference)

    # another source list (one image removed) is another store's content: rebuilt too
    fewer = open_store(pngs[:4], tmp_path / "store", spec, progress=False)
    assert len(fewer) == 4


def test_truncated_or_foreign_store_is_rebuilt(tmp_path: Path, pngs: list[Path]) -> None:
    spec = StoreSpec(size=(23, 35))
    good = open_store(pngs, tmp_path / "store", spec, progress=False)[1].copy()
    pixels = tmp_path / "store" / "pixels.u8"
    with pixels.open("r+b") as fh:
        fh.truncate(pixels.stat().st_size // 2)
    np.testing.assert_array_equal(open_store(pngs, tmp_path / "store", spec)[1], good)

    manifest = tmp_path / "store" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["sources"][0] = "/elsewhere/other.png"  # a store made from another dataset
    manifest.write_text(json.dumps(data))
    np.testing.assert_array_equal(open_store(pngs, tmp_path / "store", spec)[1], good)
    assert json.loads(manifest.read_text())["sources"][0] == str(pngs[0])


def test_undecodable_image_is_named_skipped_and_counted(
    tmp_path: Path, pngs: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    broken = pngs[3].with_name("broken.png")
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    store = open_store([*pngs, broken], tmp_path / "store", StoreSpec(size=(23, 35)))
    out = capsys.readouterr().out
    assert "broken.png" in out
    assert "1 of 6 images skipped" in out
    assert store.valid.tolist() == [True] * 5 + [False]
    assert not store[5].any()


def test_native_size_store_skips_an_image_of_another_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _png(tmp_path / "a.png", 10, 12, seed=0)
    b = _png(tmp_path / "b.png", 11, 12, seed=1)
    store = open_store([a, b], tmp_path / "store", StoreSpec(size=None, fit="none"))
    assert store.shape == (2, 10, 12, 3)
    assert store.valid.tolist() == [True, False]
    assert "b.png: size 12x11 differs" in capsys.readouterr().out


def test_store_that_does_not_fit_the_disk_is_refused_before_writing(
    tmp_path: Path, pngs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(imagestore.shutil, "disk_usage", lambda _: usage(10**6, 10**6, 1000))
    with pytest.raises(UserError, match=r"needs .* GiB and only .* GiB is free"):
        open_store(pngs, tmp_path / "store", StoreSpec(size=(23, 35)))
    assert not (tmp_path / "store" / "pixels.u8").exists()
    assert not (tmp_path / "store" / "manifest.json").exists()


class _Images(torch.utils.data.Dataset):
    def __init__(self, store: imagestore.ImageStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.store[i]))


def test_store_pickles_without_its_map_and_serves_workers(tmp_path: Path, pngs: list[Path]) -> None:
    store = open_store(pngs, tmp_path / "store", StoreSpec(size=(23, 35)), progress=False)
    _ = store[0]  # map opened in this process
    state = pickle.loads(pickle.dumps(store))
    assert state._pixels is None
    loader = torch.utils.data.DataLoader(_Images(store), batch_size=5, num_workers=1)
    (batch,) = list(loader)
    np.testing.assert_array_equal(batch.numpy(), np.asarray(store.pixels))


def test_batch_read_equals_item_reads_in_the_given_order(tmp_path: Path, pngs: list[Path]) -> None:
    store = open_store(pngs, tmp_path / "store", StoreSpec(size=(23, 35)), progress=False)
    order = [3, 0, 4, 0]
    np.testing.assert_array_equal(store.batch(order), np.stack([store[i] for i in order]))
    crop = store.batch(order, rows=slice(1, 5), cols=slice(2, None))
    np.testing.assert_array_equal(crop, np.stack([store[i][1:5, 2:] for i in order]))
    assert crop.flags.c_contiguous


def _hold_lock(target: str, release: Any) -> None:
    from medcore.io import RunLock

    with RunLock(target, directory=False):
        release.wait(60)


def test_waiting_lock_waits_for_a_sibling_instead_of_refusing(tmp_path: Path) -> None:
    """A second rank generating the same demo data / store waits, then finds the work done."""
    import multiprocessing as mp
    import threading
    import time

    from medcore.io import RunLock, waiting_lock

    ctx = mp.get_context("fork")
    release = ctx.Event()  # the holder keeps the lock until the test says so, however slow
    target = tmp_path / "demo-v1.gen"
    holder = ctx.Process(target=_hold_lock, args=(str(target), release))
    holder.start()
    lock_file = tmp_path / "demo-v1.gen.lock"
    deadline = time.monotonic() + 30
    while not lock_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(UserError, match="in use by another running job"):
        RunLock(target, directory=False).__enter__()
    released = threading.Event()

    def let_go() -> None:
        time.sleep(0.5)
        released.set()
        release.set()

    threading.Thread(target=let_go, daemon=True).start()
    with waiting_lock(target, wait_s=60):
        assert released.is_set()  # acquired only after the holder let go
        assert lock_file.read_text() == str(os.getpid())
    holder.join()
    assert not lock_file.exists()


def test_cached_store_is_found_again_under_the_cache(
    tmp_path: Path, pngs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
    spec = StoreSpec(size=(23, 35))
    first = imagestore.cached_store(pngs, spec, progress=False)
    assert first.directory.parent == tmp_path / "cache" / "imagestore"
    built = (first.directory / "pixels.u8").stat().st_mtime_ns
    again = imagestore.cached_store(pngs, spec, progress=False)  # no rebuild
    assert again.directory == first.directory
    assert (again.directory / "pixels.u8").stat().st_mtime_ns == built
    other = imagestore.cached_store(pngs[:3], spec, progress=False)  # other sources, other store
    assert other.directory != first.directory and len(other) == 3
