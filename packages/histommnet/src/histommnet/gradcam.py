"""``histommnet-gradcam``: Grad-CAM heatmaps per magnification for chosen patients.

Uses the ``grad-cam`` library (``pytorch_grad_cam.GradCAM``) with the last feature layer of each
magnification's trunk as target layer. Writes ``<patient>/<mag>.png`` overlays and a
``<patient>_montage.png`` (images above overlays) into the output directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import torch
from einops import rearrange
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from histommnet.breakhis import CLASSES, Patient, find_patients
from histommnet.config import PACKAGE, HistoConfig
from histommnet.data import MultiMagDataset, WorkingImages, load_index, normalization
from histommnet.export import fold_thresholds
from histommnet.model import SingleMagNet, load_model, resolve_normalization
from histommnet.predict import predict_draws
from medcore.engine.inference import PredictOptions, checkpoint_precision
from medcore.errors import UserError
from medcore.io import atomic_path, atomic_write_json
from medcore.report.plots import save_figure

if TYPE_CHECKING:
    from medcore.cli.run_setup import RunContext


class _LogitsOnly(nn.Module):
    """Adapts a model to Grad-CAM: ``[b, m*3, h, w] -> logits [b, classes]``.

    Grad-CAM wants a 4-D input (it reads a 5-D one as a volume) and a tensor output, while our
    models take ``[b, m, 3, h, w]`` and return a dict.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        return self.model(rearrange(stacked, "b (m c) h w -> b m c h w", c=3))["logits"]


def _default_patients(checkpoint: Path, patients: list[Patient], count: int) -> list[Patient]:
    """The test patients of the checkpoint's fold when its run's splits.json is at hand."""
    fold_dir = checkpoint.resolve().parent.parent  # <run>/fold_<i>/checkpoints/<file>
    splits = fold_dir.parent / "splits.json"
    if (
        checkpoint.parent.name == "checkpoints"
        and fold_dir.name.startswith("fold_")
        and splits.is_file()
    ):
        ids = json.loads(splits.read_text(encoding="utf-8")).get("ids")
        fold = int(fold_dir.name.removeprefix("fold_"))
        if isinstance(ids, list) and fold < len(ids):
            names = set(ids[fold].get("test", []))
            chosen = [p for p in patients if p.key in names]
            if chosen:
                return chosen[:count]
    return patients[:count]


def _select(wanted: list[str], patients: list[Patient]) -> list[Patient]:
    """The patient folders ``--patients`` names, in any BreakHis spelling (``find_patients``)."""
    chosen: list[Patient] = []
    for name in wanted:
        try:
            found = find_patients(name, patients)
        except LookupError as exc:
            raise UserError(f"--patients {name}", str(exc)) from None
        chosen.extend(p for p in found if p not in chosen)
    return chosen


def fold_threshold(checkpoint: Path, state: dict) -> float | None:
    """The image-level decision threshold of the checkpoint's fold (``fold_thresholds``)."""
    return fold_thresholds(checkpoint, state).get("image")


def _stored_normalization(state: dict) -> dict:
    """The checkpoint's input normalisation as DataConfig fields ({} for an older checkpoint)."""
    norm = state.get("normalization")
    if not isinstance(norm, dict):
        print(
            "note: the checkpoint records no input normalisation: using the backbone's",
            file=sys.stderr,
        )
        return {}
    return {
        "mean": tuple(norm["mean"]),
        "std": tuple(norm["std"]),
        "interpolation": norm["interpolation"],
    }


def _threshold(args: argparse.Namespace, state: dict) -> float:
    if args.threshold is not None:
        return args.threshold
    found = fold_threshold(args.checkpoint, state)
    if found is None:
        print(
            f"note: {args.checkpoint} records no threshold and has no fold result.json beside "
            "it: the predicted class uses P(malignant) >= 0.5 (pass --threshold to set the "
            "fold's)",
            file=sys.stderr,
        )
        return 0.5
    return found


def patient_cams(
    model: nn.Module,
    images: torch.Tensor,
    target: int | None,
    threshold: float = 0.5,
    prob: float | None = None,
) -> tuple[np.ndarray, float, int]:
    """Grad-CAM maps ``[m, h, w]`` of one draw ``[1, m, 3, h, w]``, P(malignant) and the class used.

    ``target`` None explains the predicted class, malignant when P(malignant) >= ``threshold``;
    ``prob``: the draw's P(malignant) when already predicted.
    """
    if prob is None:
        with torch.no_grad():
            prob = float(model(images)["logits"].float().softmax(-1)[0, 1])
    cls = int(prob >= threshold) if target is None else target
    wrapped = _LogitsOnly(model)
    layers = model.encoder.cam_layers()
    m = images.shape[1]
    stacked = rearrange(images, "b m c h w -> b (m c) h w")
    cams = np.zeros((m, *images.shape[-2:]), dtype=np.float32)
    for i, layer in enumerate(layers):
        with GradCAM(model=wrapped, target_layers=[layer]) as cam:
            maps = cam(input_tensor=stacked, targets=[ClassifierOutputTarget(cls)])
        if isinstance(model, SingleMagNet):
            cams[model.index] = maps[0]
        elif len(layers) == 1:  # one shared trunk saw all magnifications: one map each
            cams[:] = maps[:m]
        else:
            cams[i] = maps[0]
    return cams, prob, cls


def _save_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def main(args: argparse.Namespace) -> int:
    """``histommnet-gradcam`` after parsing."""
    # Imported here: ``patient_cams`` (used by ``histommnet.load``) needs no run setup, which
    # imports Lightning.
    from medcore.cli.run_setup import resolve_run, start_run

    with start_run(resolve_run(args, HistoConfig, PACKAGE, "default")) as ctx:
        return _gradcam(args, ctx)


def _gradcam(args: argparse.Namespace, ctx: RunContext) -> int:
    model, state = load_model(args.checkpoint)
    threshold = _threshold(args, state)
    model.to(ctx.device).eval()
    cfg: HistoConfig = ctx.cfg
    data_cfg = dataclasses.replace(
        cfg.data,
        magnifications=list(state["magnifications"]),
        image_size=int(state.get("image_size", cfg.data.image_size)),
        aspect_ratio=float(state.get("aspect_ratio", cfg.data.aspect_ratio)),
        **_stored_normalization(state),
    )
    data_cfg = resolve_normalization(model.cfg, data_cfg)
    cfg = dataclasses.replace(cfg, data=data_cfg)
    patients = load_index(cfg).patients
    chosen = (
        _select(args.patients, patients)
        if args.patients
        else _default_patients(args.checkpoint, patients, args.num_patients)
    )
    target = None if args.target == "predicted" else CLASSES.index(args.target)
    mags = data_cfg.magnifications
    paths = [path for p in chosen for m in mags for path in p.images[m]]
    images_once = WorkingImages(paths, data_cfg)  # decoded once for every chosen patient
    precision = checkpoint_precision(state, ctx.device)
    records = []
    for patient in chosen:
        ds = MultiMagDataset([patient], data_cfg, train=False, seed=cfg.seed, images=images_once)
        if not 0 <= args.draw < len(ds):
            raise UserError("--draw", f"patient {patient.key} has draws 0..{len(ds) - 1}")
        index = args.draw
        # One draw: no worker processes for it.
        one = PredictOptions(ctx.device, precision, num_workers=0, shard=False)
        p_draw = predict_draws(model, ds, one, indices=[index])["prob_malignant"].iloc[0]
        rgb_batch = ds[index]["images"].unsqueeze(0)
        images = ds.model_input(rgb_batch).to(ctx.device)
        cams, prob, cls = patient_cams(model, images, target, threshold, prob=float(p_draw))
        rgb = rgb_batch[0].permute(0, 2, 3, 1).numpy()
        fig, axes = plt.subplots(2, len(mags), figsize=(2.4 * len(mags), 5), squeeze=False)
        for j, mag in enumerate(mags):
            overlay = show_cam_on_image(rgb[j], cams[j], use_rgb=True)
            _save_png(ctx.run_dir / patient.key / f"{mag}.png", overlay)
            axes[0, j].imshow(rgb[j])
            axes[1, j].imshow(overlay)
            axes[0, j].set_title(mag)
            for ax in axes[:, j]:
                ax.axis("off")
        fig.suptitle(
            f"{patient.key}: true {CLASSES[patient.label]}, P(malignant)={prob:.3f} "
            f"(threshold {threshold:.3f}), "
            f"Grad-CAM for {CLASSES[cls]}",
            fontsize=9,
        )
        save_figure(fig, ctx.run_dir / f"{patient.key}_montage.png")
        records.append(
            {
                "patient": patient.key,
                "label": CLASSES[patient.label],
                "prob_malignant": prob,
                "threshold": threshold,
                "cam_class": CLASSES[cls],
                "images": [str(p) for p in ds.draws[index][1]],
            }
        )
        print(
            f"{patient.key}: P(malignant)={prob:.3f} (true {CLASSES[patient.label]}) -> "
            f"{ctx.run_dir / patient.key}/"
        )
    atomic_write_json(
        ctx.run_dir / "gradcam.json",
        {
            "checkpoint": str(args.checkpoint),
            "normalization": normalization(data_cfg),
            "patients": records,
        },
    )
    return 0
