"""``cxrlandmarks-predict``: images -> landmark coordinates (CSV + JSON) and overlay PNGs.

Several checkpoints form an ensemble (their normalised predictions are averaged); ``--tta-flip``
also averages each model's prediction of the mirrored image, flipped back with pairs swapped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrlandmarks.anatomy import LANDMARK_NAMES
from cxrlandmarks.config import DataConfig
from cxrlandmarks.data import IMAGE_EXTENSIONS, image_tensor, resize_and_normalise
from cxrlandmarks.evaluate import coordinates_frame, predict_batches
from cxrlandmarks.model import input_normalisation, load_model
from medcore.config import from_dict
from medcore.device import amp_policy, autocast, resolve_device
from medcore.errors import DataError, UserError
from medcore.io import atomic_write_csv, atomic_write_json


def collect_images(inputs: list[Path]) -> list[Path]:
    """Image files named directly or found (recursively) in the folders named."""
    images: list[Path] = []
    for item in inputs:
        if item.is_dir():
            images += sorted(
                p for p in item.rglob("*") if p.suffix in IMAGE_EXTENSIONS and p.is_file()
            )
        elif item.is_file():
            images.append(item)
        else:
            raise UserError(item, "no such image file or folder")
    if not images:
        raise UserError(", ".join(map(str, inputs)), "no .png/.jpg images found")
    return images


def predict_command(args: Any) -> int:
    from cxrlandmarks.plots import draw_landmarks

    device = resolve_device(args.device)
    loaded = [load_model(p, device) for p in args.checkpoint]
    sizes = {
        int(from_dict(DataConfig, state.get("data_config", {})).image_size) for _, state in loaded
    }
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
    policy = amp_policy(device, True)
    names, coords, skipped = [], [], 0
    for start in range(0, len(images), args.batch_size):
        batch, shapes, kept = [], [], []
        for path in images[start : start + args.batch_size]:
            try:
                img = image_tensor(path)
            except DataError as exc:
                skipped += 1
                print(f"skipped {path}: {exc.why}", file=sys.stderr)
                continue
            tensor, _ = resize_and_normalise(img, torch.zeros(1, 2), size, norms[0])
            batch.append(tensor)
            shapes.append(img.shape[-2:])
            kept.append(path)
        if not batch:
            continue
        with torch.no_grad(), autocast(device, policy):
            pred = (
                predict_batches(models, torch.stack(batch).to(device), args.tta_flip).cpu().numpy()
            )
        for path, (h, w), p in zip(kept, shapes, pred, strict=True):
            names.append(str(path))
            coords.append(p * np.array([w, h], dtype=float))
    if not coords:
        raise UserError("inputs", f"none of the {len(images)} images could be read")
    out = Path(args.output_dir)
    coords_px = np.stack(coords)
    atomic_write_csv(out / "predictions.csv", coordinates_frame(names, coords_px))
    atomic_write_json(
        out / "predictions.json",
        {
            "checkpoints": [str(p) for p in args.checkpoint],
            "tta_flip": bool(args.tta_flip),
            "landmark_names": list(LANDMARK_NAMES),
            "images": [
                {"image": n, "landmarks_px": c.round(2).tolist()}
                for n, c in zip(names, coords_px, strict=True)
            ],
        },
    )
    if not args.no_overlays:
        import matplotlib.pyplot as plt

        from medcore.io import load_image
        from medcore.plots import save_figure

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
