"""Landmark predictions of one or several models (flip TTA), and ``cxrlandmarks-predict``.

:func:`predict_batches` and :func:`predict_dataset` run the models through medcore's inference
loop; training (validation), ``cxrlandmarks-eval``, :mod:`cxrlandmarks.api` and the command all
predict through them.

``cxrlandmarks-predict``: images -> landmark coordinates (CSV + JSON) and overlay PNGs.

Each row carries the image's key as the annotation CSV writes it (``image_name``, the file's
stem: ``COVID-269``) beside the path given (``image_path``), so predictions join with the
annotations on ``image_name``.

Each ``--checkpoint`` is any source :func:`cxrlandmarks.load` reads (a run, a checkpoint, an
exported folder, ``hf-hub:ORG/NAME``), and the images go through the same
:func:`cxrlandmarks.api.predict_inputs` as ``LandmarkModel.predict``: the command and the Python
API agree exactly. Several checkpoints form an ensemble (their normalised predictions are
averaged); ``--tta-flip`` also averages each model's prediction of the mirrored image, flipped
back with pairs swapped (default: as the models' configs say).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from cxrlandmarks.anatomy import LANDMARK_NAMES, flip_coords
from medcore.engine.inference import PredictOptions, predict
from medcore.errors import UserError
from medcore.io import atomic_write_csv, atomic_write_json
from medcore.runtime.device import resolve_device

REFERENCE_SIZE = 224  # "px at 224": ||pred - target|| x 224 on normalised coordinates


@torch.no_grad()
def predict_batches(
    models: Sequence[nn.Module], images: torch.Tensor, tta_flip: bool = False
) -> torch.Tensor:
    """Mean prediction ``[b, 15, 2]`` of ``models``; with ``tta_flip`` each model also sees the
    mirrored image, whose prediction is flipped back (x mirrored, pairs swapped) before averaging."""
    outs = []
    for model in models:
        pred = model(images).float()
        outs.append(pred.reshape(pred.shape[0], -1, 2))
        if tta_flip:
            flipped = model(torch.flip(images, dims=[-1])).float()
            outs.append(flip_coords(flipped.reshape(pred.shape[0], -1, 2)))
    return torch.stack(outs).mean(0)


def predict_dataset(
    models: Sequence[nn.Module],
    dataset: Dataset,
    options: PredictOptions,
    tta_flip: bool = False,
) -> np.ndarray:
    """Normalised predictions ``[n, 15, 2]`` in dataset order. Under DDP with ``shard`` (every
    rank calls it) each rank predicts its shard and gets all of them; ``shard=False``: this
    rank predicts everything alone (see :func:`medcore.engine.inference.predict`)."""
    ensemble = nn.ModuleList(models)  # one module: predict() switches all of them to eval

    def forward(net: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return predict_batches(list(net), batch["image"], tta_flip)

    out = predict(
        ensemble,
        dataset,
        forward,
        options,
    )
    return out.numpy()


def coordinates_frame(
    names: Sequence[str], paths: Sequence[str], coords_px: np.ndarray
) -> pd.DataFrame:
    """The headed coordinates CSV layout, ``image_name, image_path, L1_x, L1_y, ..., L15_y``
    (pixels): ``image_name`` is the annotation CSV's key, ``image_path`` the file read."""
    frame = pd.DataFrame({"image_name": list(names), "image_path": list(paths)})
    for i in range(coords_px.shape[1]):
        frame[f"L{i + 1}_x"] = coords_px[:, i, 0]
        frame[f"L{i + 1}_y"] = coords_px[:, i, 1]
    return frame


def tta_of(models: list[Any], flag: bool | None) -> bool:
    """``--tta-flip`` / ``--no-tta-flip``, else the models' own setting (which must agree)."""
    if flag is not None:
        return flag
    own = {m.tta_flip for m in models}
    if len(own) > 1:
        raise UserError(
            "--checkpoint", "the models disagree on flip TTA: pass --tta-flip or --no-tta-flip"
        )
    return own.pop()


def main(args: Any) -> int:
    """``cxrlandmarks-predict``: CSV, JSON and overlays of the images' landmarks."""
    from cxrlandmarks.api import image_inputs, load, predict_inputs  # api predicts through here
    from cxrlandmarks.plots import draw_landmarks

    device = resolve_device(args.device)
    models = [load(source, device) for source in args.checkpoint]
    tta_flip = tta_of(models, args.tta_flip)
    items = image_inputs(list(args.inputs))
    result = predict_inputs(models, items, tta_flip, args.batch_size)
    names = [i.path for i in result.inputs]
    keys = [i.name for i in result.inputs]
    skipped = len(result.skipped)
    shared = len(keys) - len(set(keys))
    if shared:
        print(
            f"warning: {shared} image(s) share their image_name (file stem) with another input: "
            "joins on image_name will match several rows",
            file=sys.stderr,
        )
    coords_px = result.coords
    out = Path(args.output_dir)
    atomic_write_csv(out / "predictions.csv", coordinates_frame(keys, names, coords_px))
    atomic_write_json(
        out / "predictions.json",
        {
            "checkpoints": [str(p) for p in args.checkpoint],
            "tta_flip": tta_flip,
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
        f"predicted {len(names)} image(s) with {len(models)} model(s){' + flip TTA' if tta_flip else ''}: "
        f"{out / 'predictions.csv'}{note}"
    )
    return 0
