"""``cxrlandmarks-predict``: images -> landmark coordinates (CSV + JSON) and overlay PNGs.

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
from pathlib import Path
from typing import Any

from cxrlandmarks.anatomy import LANDMARK_NAMES
from cxrlandmarks.api import image_inputs, load, predict_inputs
from cxrlandmarks.evaluate import coordinates_frame
from medcore.errors import UserError
from medcore.io import atomic_write_csv, atomic_write_json
from medcore.runtime.device import resolve_device


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


def predict_command(args: Any) -> int:
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
