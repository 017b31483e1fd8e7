import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medcore.errors import CheckpointError, DataError, UserError
from medcore.io import RunLock, atomic_path, atomic_write_json, load_image, read_csv, safe_join
from medcore.testing import png_header_only, write_png
from medcore.weights.checkpoint import (
    copy_checkpoint,
    export_safetensors,
    finish_releasing,
    load_checkpoint,
    load_safetensors,
    release_spares,
    save_checkpoint,
)
from medcore.weights.pretrained import load_pretrained


def test_save_load_round_trip_and_kind(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "name": "x"}
    path = save_checkpoint(state, tmp_path / "c.pt", kind="pkg.Model")
    loaded = load_checkpoint(path, kind="pkg.Model")
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0)) and loaded["epoch"] == 3
    with pytest.raises(CheckpointError, match=r"this is a pkg\.Model checkpoint, not other\.Net"):
        load_checkpoint(path, kind="other.Net")
    assert not list(tmp_path.glob(".c.pt.*")), "no temporary file left behind"


def test_rewriting_a_checkpoint_reuses_the_replaced_file_in_place(tmp_path: Path) -> None:
    path, spare = tmp_path / "latest.pt", tmp_path / ".latest.pt.spare"
    save_checkpoint({"step": 1, "w": torch.zeros(1000)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]
    first = path.stat().st_ino
    # A process killed between the two renames left the old file's second name behind.
    (tmp_path / ".latest.pt.old").write_bytes(b"stale")
    save_checkpoint({"step": 2, "w": torch.ones(1000)}, path)
    assert load_checkpoint(path)["step"] == 2
    assert spare.stat().st_ino == first and spare.stat().st_nlink == 1  # kept as the spare
    save_checkpoint({"step": 3, "w": torch.full((10,), 3.0)}, path)  # shorter: truncated
    assert path.stat().st_ino == first, "the spare was overwritten in place and renamed"
    assert load_checkpoint(path)["step"] == 3
    # Written without per-record CRCs; the caller's torch.save setting is left as it was.
    assert torch.serialization.get_crc32_options()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".latest.pt.spare", "latest.pt"]
    release_spares(tmp_path)
    finish_releasing()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def test_a_checkpoint_another_name_links_to_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint({"step": 1}, path)
    copy_checkpoint(path, tmp_path / "final.pt")  # a hard link to the same file
    for step in (2, 3, 4):
        save_checkpoint({"step": step}, path)
    assert load_checkpoint(tmp_path / "final.pt")["step"] == 1
    assert load_checkpoint(path)["step"] == 4
    # A spare some other name links to (a user's `ln`) is replaced, not written through.
    os.link(tmp_path / ".latest.pt.spare", tmp_path / "mine.pt")
    mine = load_checkpoint(tmp_path / "mine.pt")["step"]
    save_checkpoint({"step": 5}, path)
    assert load_checkpoint(tmp_path / "mine.pt")["step"] == mine
    assert load_checkpoint(path)["step"] == 5


class _DiskFull:
    """Fails while torch.save writes it, as a full disk would."""

    def __reduce__(self):
        raise OSError(28, "No space left on device")


def test_a_failed_write_leaves_the_checkpoint_and_no_spare(tmp_path: Path) -> None:
    path = tmp_path / "latest.pt"
    save_checkpoint({"step": 1}, path)
    save_checkpoint({"step": 2}, path)  # the first file is now the spare
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"step": 3, "w": torch.ones(1000), "bad": _DiskFull()}, path)
    assert load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt"]


def test_missing_empty_truncated(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pt")
    good = save_checkpoint({"w": torch.randn(100)}, tmp_path / "good.pt")
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "trunc.pt")


class _Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickled_object_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Payload(str(marker))}, path, pickle_protocol=2)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_safetensors_export(tmp_path: Path) -> None:
    lin = torch.nn.Linear(3, 2)
    path = export_safetensors(lin.state_dict(), tmp_path / "w.safetensors")
    back = load_safetensors(path)
    assert torch.equal(back["weight"], lin.weight.detach())
    assert torch.equal(load_checkpoint(path)["model"]["bias"], lin.bias.detach())


def test_atomic_path_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_run_lock_refuses_a_second_live_job_and_takes_over_stale(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (target / ".lock").write_text(str(other.pid))
        with pytest.raises(UserError, match="in use by another running job"), RunLock(target):
            pass
    finally:
        other.kill()
        other.wait()
    with RunLock(target) as lock:  # the owner is dead now: stale lock taken over
        assert lock.path.read_text() == str(os.getpid())
    assert not (target / ".lock").exists()


def test_safe_join_refuses_climbing(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/b.png") == (tmp_path / "a/b.png").resolve()
    for bad in ("../x.png", "a/../../x.png", "/etc/passwd"):
        with pytest.raises(DataError, match="leaves the data directory"):
            safe_join(tmp_path, bad)


def test_read_csv_errors(tmp_path: Path) -> None:
    ok = tmp_path / "ok.csv"
    ok.write_text("id,a\n1,0\n2,1\n")
    assert list(read_csv(ok, required=["id", "a"], unique="id")["a"]) == [0, 1]
    with pytest.raises(DataError, match="missing column"):
        read_csv(ok, required=["id", "b"])
    dup = tmp_path / "dup.csv"
    dup.write_text("id,a\n1,0\n1,1\n")
    with pytest.raises(DataError, match="duplicated id"):
        read_csv(dup, unique="id")
    dupcol = tmp_path / "dupcol.csv"
    dupcol.write_text("id,a,a\n1,0,0\n")
    with pytest.raises(DataError, match="duplicated column"):
        read_csv(dupcol)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,name\n1,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_csv(latin)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_csv(tmp_path / "empty.csv")


def test_load_image_conversions(tmp_path: Path) -> None:
    from PIL import Image

    gray = write_png(tmp_path / "g.png", np.full((5, 6), 100, np.uint8))
    assert load_image(gray).shape == (5, 6, 3) and load_image(gray)[0, 0, 0] == 100
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    assert load_image(write_png(tmp_path / "a.png", rgba))[0, 0].tolist() == [200, 0, 0]
    sixteen = np.array([[0, 65535], [32768, 0]], dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "s.png")
    out = load_image(tmp_path / "s.png", mode="L")
    assert out.dtype == np.uint8 and out[0, 1] == 255 and out[0, 0] == 0
    pal = Image.new("P", (3, 3))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png")[0, 0].tolist() == [10, 20, 30]
    floats = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)  # a float TIFF in [0, 1]
    Image.fromarray(floats, mode="F").save(tmp_path / "f.tif")
    assert load_image(tmp_path / "f.tif", mode="L").tolist() == [[0, 128], [255, 64]]
    floats[0, 0] = np.nan
    Image.fromarray(floats, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(DataError, match="NaN or infinite"):
        load_image(tmp_path / "nan.tif")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot decode"):
        load_image(tmp_path / "t.png")
    (tmp_path / "z.png").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_image(tmp_path / "z.png")


def test_decompression_bomb_header_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(png_header_only(60_000, 60_000))
    with pytest.raises(DataError, match=r"refusing to decode|implausibly large"):
        load_image(tmp_path / "bomb.png")


def test_load_pretrained_strips_prefixes_and_rejects_foreign(tmp_path: Path) -> None:
    src = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    wrapped = {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    torch.save(wrapped, tmp_path / "w.pth")
    dst = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    report = load_pretrained(dst, tmp_path / "w.pth")
    assert report.missing == [] and report.unexpected == [] and report.matched == 4
    assert torch.equal(dst[0].weight, src[0].weight)
    torch.save({"conv.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="wrong architecture"):
        load_pretrained(dst, tmp_path / "other.pth")
