"""Checkpoints: atomic save, safe load (``weights_only=True``), safetensors export.

A checkpoint is a plain dict of tensors and primitives so that it loads with
``torch.load(weights_only=True)``: no pickled objects, nothing that can run code on load.
Every checkpoint written by medcore carries ``format`` and ``kind`` (the model it belongs
to, e.g. ``"ctclip.CTCLIP"``) so a file from another model is named as such.
"""

from __future__ import annotations

import os
import pickle
import shutil
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch

from medcore.errors import CheckpointError
from medcore.io import atomic_path

FORMAT = "medcore.weights.checkpoint/1"
_RELEASING: list[threading.Thread] = []


def save_checkpoint(state: dict[str, Any], path: str | Path, kind: str | None = None) -> Path:
    """Write ``state`` atomically; with ``kind`` the model identity is stamped in.

    The checkpoint is written under a hidden spare name beside ``path`` and renamed onto it, so
    ``path`` names a complete file at every moment (an interrupted write leaves the old one).
    The file it replaces is kept as the next write's spare, when no other name links to it
    (a :func:`copy_checkpoint` hard link), and the next write overwrites it in
    place: rewriting pages the page cache already holds costs a third of allocating a new file
    and freeing the old one (135 MB: 0.04 against 0.14 s, measured), and the trainer rewrites
    ``latest.pt`` every epoch. :func:`release_spares` frees the spares at the end of a run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    finish_releasing()  # a spare freed at the end of a previous run in this folder is gone
    payload = dict(state)
    payload.setdefault("format", FORMAT)
    if kind is not None:
        payload["kind"] = kind
    spare = _spare_name(path)
    # No CRC-32 per record: torch.load never checks it (a flipped byte loads silently either
    # way), and computing it is half the cost of serialising (0.08 of 0.14 s for the 140 MB
    # of a ResNet-18 with its Adam state, measured). Truncation, the real failure, cannot
    # happen to an atomic write and is refused on load by the zip directory check.
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    old: Path | None = path.with_name(f".{path.name}.old")
    try:
        _write_over(spare, payload)
        old.unlink(missing_ok=True)  # left by a process killed between the two renames below
        try:
            os.link(path, old)
        except OSError:  # no file there yet, or a file system without hard links
            old = None
        os.replace(spare, path)
    except BaseException:
        spare.unlink(missing_ok=True)
        if old is not None:  # a second name of the file still at ``path``: cheap to drop
            old.unlink(missing_ok=True)
        raise
    finally:
        torch.serialization.set_crc32_options(crc)
    if old is not None:
        if old.stat().st_nlink == 1:
            os.replace(old, spare)
        else:  # other names keep the old file: dropping this one frees nothing, so it is cheap
            old.unlink()
    return path


def _spare_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.spare")


def _write_over(spare: Path, payload: dict[str, Any]) -> None:
    """torch.save ``payload`` to ``spare``, in place when it is a file only this name links to."""
    try:
        reusable = spare.lstat().st_nlink == 1 and spare.is_file() and not spare.is_symlink()
    except FileNotFoundError:
        reusable = False
    if not reusable:
        spare.unlink(missing_ok=True)
        torch.save(payload, spare)
        return
    with spare.open("r+b") as f:
        torch.save(payload, f)
        f.truncate()


def release_spares(directory: str | Path) -> None:
    """Free the spare files :func:`save_checkpoint` kept in ``directory`` (end of a run).

    Freeing a large file's blocks is slow (0.1-0.3 s for 135 MB on ext4 with discard,
    measured), so it happens on a background thread; :func:`finish_releasing` waits for it.
    """
    for spare in Path(directory).glob(".*.spare"):
        thread = threading.Thread(target=spare.unlink, kwargs={"missing_ok": True})
        thread.start()
        _RELEASING.append(thread)


def finish_releasing() -> None:
    """Wait until the spares given to :func:`release_spares` are freed."""
    while _RELEASING:
        _RELEASING.pop().join()


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Make ``dst`` an atomic copy of the finished checkpoint ``src``.

    A hard link where the file system allows it (no bytes written: the files share one inode,
    which is safe because every checkpoint write replaces the file instead of changing it),
    else a byte copy.
    """
    src, dst = Path(src), Path(dst)
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return dst


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", kind: str | None = None
) -> dict[str, Any]:
    """Load a checkpoint safely; ``kind`` checks that it belongs to the expected model.

    Raises CheckpointError for a missing, empty, truncated or non-checkpoint file, for a
    file that needs unpickling arbitrary objects (refused: it could run code), and for a
    checkpoint of another model.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file (0 bytes)")
    if path.suffix == ".safetensors":
        return {"model": load_safetensors(path), "format": "safetensors"}
    with path.open("rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive (or, before 1.6, a pickle stream starting with PROTO).
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise CheckpointError(
            path, "not a readable PyTorch checkpoint (neither a torch.save archive nor a pickle)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise CheckpointError(
            path, f"refused: contains pickled objects that could run code on load ({first[:160]})"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            path,
            f"not a readable PyTorch checkpoint (truncated or corrupt: {str(exc).splitlines()[0][:120]})",
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"expected a dict checkpoint, found {type(state).__name__}")
    if kind is not None:
        found = state.get("kind")
        if found is None:
            raise CheckpointError(path, f"not a {kind} checkpoint (it carries no model identity)")
        if found != kind:
            raise CheckpointError(path, f"this is a {found} checkpoint, not {kind}")
    return state


def export_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Save model weights as safetensors (shared storage is cloned: safetensors forbids aliasing)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"not a readable safetensors file ({str(exc)[:120]})") from None


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` without DDP or torch.compile wrappers in the key names."""
    inner = unwrap_model(model)
    return inner.state_dict()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def export_best(
    best_path: str | Path | None,
    final_path: str | Path | None,
    model: torch.nn.Module,
    out: str | Path,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Load the best checkpoint's weights (the final one's when no best was kept) into
    ``model`` and export them as safetensors at ``out``; returns the checkpoint used.

    The package's report and its exported weights then describe the same model: the one
    that won model selection, not whatever the last epoch left in memory.
    """
    chosen = next(
        (Path(p) for p in (best_path, final_path) if p is not None and Path(p).is_file()), None
    )
    if chosen is None:
        raise CheckpointError(out, "training kept neither a best nor a final checkpoint to export")
    weights = load_checkpoint(chosen, map_location="cpu")["model"]
    try:
        unwrap_model(model).load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(
            chosen, f"weights do not match the model ({str(exc).splitlines()[0][:160]})"
        ) from None
    export_safetensors(
        unwrap_model(model).state_dict(), out, metadata={"source": str(chosen), **(metadata or {})}
    )
    return chosen
