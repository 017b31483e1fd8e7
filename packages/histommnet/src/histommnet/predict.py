"""Prediction: the model's P(malignant) per draw (``predict_draws``) and per patient
(``patient_table``), used by validation, a fold's test, ``histommnet-gradcam`` and
``histommnet.load``; and the ``histommnet-predict`` command, new patients' folders -> P(malignant)
per patient and per draw (CSV).

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
from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Subset

from histommnet.breakhis import SUBTYPE_CODES
from histommnet.data import MultiMagDataset
from medcore.engine import inference
from medcore.io import atomic_write_csv


def predict_draws(
    model: nn.Module,
    dataset: MultiMagDataset,
    options: inference.PredictOptions,
    indices: Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per draw (of ``indices`` only, when given): patient, label, subtype, malignant
    probability (and subtype guess).

    ``medcore.engine.inference.predict`` with ``options`` (sharded over the ranks under DDP unless
    ``options.shard`` is False: every rank gets all rows).
    """

    def forward(net: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = net(dataset.model_input(batch["images"]))
        kept = {"logits": out["logits"].float(), "patient": batch["patient"]}
        if "subtype_logits" in out:
            kept["subtype_pred"] = out["subtype_logits"].argmax(-1)
        return kept

    out = inference.predict(
        model,
        dataset if indices is None else Subset(dataset, list(indices)),
        forward,
        options.but(desc=None),
    )
    logits = out["logits"].numpy()
    patients = [dataset.patients[int(i)] for i in out["patient"]]
    frame = pd.DataFrame(
        {
            "patient": [p.key for p in patients],
            "patient_id": [p.patient_id for p in patients],
            "label": [p.label for p in patients],
            # new patients (``histommnet.load``) have no known label or subtype: -1
            "subtype": [SUBTYPE_CODES[p.subtype] if p.subtype >= 0 else "" for p in patients],
            "prob_malignant": out["logits"].softmax(-1)[:, 1].numpy().astype(float),
            "logit_benign": logits[:, 0].astype(float),
            "logit_malignant": logits[:, 1].astype(float),
        }
    )
    if "subtype_pred" in out:
        frame["subtype_pred"] = [SUBTYPE_CODES[int(i)] for i in out["subtype_pred"]]
    return frame


def patient_table(draws: pd.DataFrame) -> pd.DataFrame:
    """Per-patient mean malignant probability over the patient's draws."""
    grouped = draws.groupby("patient", sort=True)
    return pd.DataFrame(
        {
            "label": grouped["label"].first(),
            "subtype": grouped["subtype"].first(),
            "prob_malignant": grouped["prob_malignant"].mean(),
            "draws": grouped.size(),
        }
    ).reset_index()


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
