"""``histommnet-predict``: new patients' folders -> P(malignant) per patient and per draw (CSV).

``histommnet-predict --model RUN|CHECKPOINT|FOLDER|hf-hub:ORG/NAME FOLDER... --output FILE.csv``
loads the model (``histommnet.load``: a run's best fold unless ``--fold``) and predicts every
patient folder named or found below the folders given. Two CSVs, written atomically:

- ``--output`` (per patient): ``patient, prob_malignant, predicted, threshold, images, draws,
  filled, folder``; ``predicted`` is benign or malignant at the fold's patient-level threshold;
- ``--images-output`` (per draw, default ``<output stem>_images.csv``): ``patient, draw,
  prob_malignant, predicted, threshold, image_40X ... image_400X`` and the logits; ``predicted``
  at the image-level threshold.

An unreadable image is named (``skip <path>: <why>``), left out and counted; the other images
and patients are predicted.
"""

from __future__ import annotations

import argparse
import sys

from medcore.io import atomic_write_csv


def main(args: argparse.Namespace) -> int:
    """``histommnet-predict`` after parsing."""
    from histommnet.api import load

    model = load(args.model, device=args.device, fold=args.fold)
    print(model, file=sys.stderr)
    result = model.predict(args.patients, batch_size=args.batch_size)
    images_out = args.images_output or args.output.with_name(f"{args.output.stem}_images.csv")
    for path, frame in ((args.output, result.patients), (images_out, result.images)):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_csv(path, frame)
    counts = result.patients["predicted"].value_counts()
    print(
        f"{len(result.patients)} patient(s): {counts.get('malignant', 0)} malignant, "
        f"{counts.get('benign', 0)} benign at threshold {model.thresholds['patient']:.4f}; "
        f"{len(result.images)} draws"
        + (f"; skipped {len(result.skipped)} item(s)" if result.skipped else "")
    )
    print(f"wrote {args.output} and {images_out}")
    return 0
