"""``cxrlandmarks-predict``: images -> landmark coordinates (CSV + JSON) and overlay PNGs.

Each row carries the image's key as the annotation CSV writes it (``image_name``, the file's
stem: ``COVID-269``) beside the path given (``image_path``), so predictions join with the
annotations on ``image_name``.

Several checkpoints form an ensemble (their normalised predictions are averaged); ``--tta-flip``
also averages each model's prediction of the mirrored image, flipped back with pairs swapped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from cxrlandmarks.anatomy import LANDMARK_NAMES
from cxrlandmarks.data import IMAGE_EXTENSIONS, image_tensor, resize_and_normalise
from cxrlandmarks.evaluate import coordinates_frame, data_config_of
from cxrlandmarks.inference import predict_batches
from cxrlandmarks.model import input_normalisation, load_model
from medcore.engine.inference import PredictOptions, checkpoint_precision, predict
from medcore.errors import DataError, UserError
from medcore.io import atomic_write_csv, atomic_write_json
from medcore.runtime.device import resolve_device


def _is_mask(path: Path) -> bool:
    """A lung mask of the Kaggle release: a file in ``masks/`` beside an ``images/`` folder."""
    return path.parent.name == "masks" and (path.parent.parent / "images").is_dir()


def collect_images(inputs: list[Path]) -> list[Path]:
    """Image files named directly or found (recursively) in the folders named; in folders, the
    Kaggle release's ``masks/`` (beside ``images/``) are left out, with a line saying so."""
    images: list[Path] = []
    masks = 0
    for item in inputs:
        if item.is_dir():
            found = sorted(
                p for p in item.rglob("*") if p.suffix in IMAGE_EXTENSIONS and p.is_file()
            )
            images += [p for p in found if not _is_mask(p)]
            masks += sum(map(_is_mask, found))
        elif item.is_file():
            images.append(item)
        else:
            raise UserError(item, "no such image file or folder")
    if masks:
        print(f"left out {masks} lung mask(s) in masks/ folders beside images/ (not radiographs)")
    if not images:
        raise UserError(", ".join(map(str, inputs)), "no .png/.jpg images found")
    return images


def image_key(path: Path) -> str:
    """The annotation CSV's name of an image file: its stem (``COVID-269``)."""
    return path.stem


class ImageFiles(Dataset):
    """New images -> ``{"image": [3, S, S] normalised, "size": [W, H], "why": ""}``; one that
    cannot be read comes back blank with the reason in ``why`` (named, dropped and counted)."""

    def __init__(self, paths: list[Path], size: int, norm: dict[str, Any]) -> None:
        self.paths, self.size, self.norm = paths, size, norm

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        try:
            img = image_tensor(self.paths[index])
        except DataError as exc:
            blank = torch.zeros(3, self.size, self.size)
            return {"image": blank, "size": torch.zeros(2), "why": exc.why}
        tensor, _ = resize_and_normalise(img, torch.zeros(1, 2), self.size, self.norm)
        wh = torch.tensor([img.shape[-1], img.shape[-2]], dtype=torch.float32)
        return {"image": tensor, "size": wh, "why": ""}


def predict_command(args: Any) -> int:
    from cxrlandmarks.plots import draw_landmarks

    device = resolve_device(args.device)
    loaded = [load_model(p, device) for p in args.checkpoint]
    sizes = {data_config_of(args, state).image_size for _, state in loaded}
    if len(sizes) != 1:
        raise UserError(
            "--checkpoint", f"ensemble members use different input sizes {sorted(sizes)}"
        )
    size = sizes.pop()
    # Each checkpoint's own input normalisation (the original code's: ImageNet's).
    norms = [state.get("input_norm") or input_normalisation() for _, state in loaded]
    if any(n["mean"] != norms[0]["mean"] or n["std"] != norms[0]["std"] for n in norms):
        raise UserError("--checkpoint", "ensemble members use different input normalisations")
    models = [m for m, _ in loaded]
    images = collect_images(args.inputs)
    data = ImageFiles(images, size, norms[0])
    ensemble = nn.ModuleList(models)  # one module: predict() switches all of them to eval

    def forward(net: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = predict_batches(list(net), batch["image"], args.tta_flip)
        return {"pred": pred, "size": batch["size"], "why": batch["why"]}

    precision = checkpoint_precision(loaded[0][1], device)
    result = predict(ensemble, data, forward, PredictOptions(device, precision, args.batch_size))
    for path, why in zip(images, result["why"], strict=True):
        if why:
            print(f"skipped {path}: {why}", file=sys.stderr)
    ok = np.array([not why for why in result["why"]])
    skipped = int((~ok).sum())
    if not ok.any():
        raise UserError("inputs", f"none of the {len(images)} images could be read")
    kept = [p for p, good in zip(images, ok, strict=True) if good]
    names, keys = [str(p) for p in kept], [image_key(p) for p in kept]
    shared = len(keys) - len(set(keys))
    if shared:
        print(
            f"warning: {shared} image(s) share their image_name (file stem) with another input: "
            "joins on image_name will match several rows",
            file=sys.stderr,
        )
    coords_px = (result["pred"].double() * result["size"][:, None, :]).numpy()[ok]
    out = Path(args.output_dir)
    atomic_write_csv(out / "predictions.csv", coordinates_frame(keys, names, coords_px))
    atomic_write_json(
        out / "predictions.json",
        {
            "checkpoints": [str(p) for p in args.checkpoint],
            "tta_flip": bool(args.tta_flip),
            "landmark_names": list(LANDMARK_NAMES),
            "images": [
                {"image_name": k, "image_path": n, "landmarks_px": c.round(2).tolist()}
                for k, n, c in zip(keys, names, coords_px, strict=True)
            ],
        },
    )
    if not args.no_overlays:
        import matplotlib.pyplot as plt

        from medcore.io import load_image
        from medcore.report.plots import save_figure

        for i, (name, c) in enumerate(zip(names, coords_px, strict=True)):
            fig, ax = plt.subplots(figsize=(4, 4))
            draw_landmarks(ax, load_image(name, "L"), c)
            ax.set_title(Path(name).name, fontsize=8)
            save_figure(fig, out / "overlays" / f"{i:04d}_{Path(name).stem}.png")
    note = f"; skipped {skipped} unreadable image(s)" if skipped else ""
    print(
        f"predicted {len(names)} image(s) with {len(models)} model(s){' + flip TTA' if args.tta_flip else ''}: "
        f"{out / 'predictions.csv'}{note}"
    )
    return 0
