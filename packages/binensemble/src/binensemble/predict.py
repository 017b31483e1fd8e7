"""Load a trained model bundle (``model.pt``) and predict images with test-time augmentation.

A bundle is what ``binensemble-train`` leaves in a model's run directory: the best weights,
the model and data configs, and for the metric model the chosen k and the KNN gallery (the
training split's embeddings and labels).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from binensemble.config import BinEnsembleConfig, DataConfig, ModelConfig
from binensemble.data import ImageSet, data_root, read_labels, scan_labelled, scan_unlabelled
from binensemble.ensemble import write_predictions
from binensemble.evaluate import extract, summarise
from binensemble.model import MODEL_CLASSES, build_model, model_kind
from medcore.cli.run_setup import load_run_config
from medcore.config import from_dict
from medcore.data.splits import load_splits
from medcore.engine.inference import checkpoint_precision, load_model
from medcore.errors import CheckpointError, DataError, UserError
from medcore.metrics import knn_predict_proba
from medcore.report.tables import format_table
from medcore.runtime.device import AmpPolicy, resolve_device

BUNDLE_NAME = "model.pt"


@dataclass
class Bundle:
    """A model ready to predict: network, configs, precision and (metric model) the KNN
    settings and gallery."""

    path: Path
    name: str  # "metric" or "baseline"
    model: torch.nn.Module
    model_cfg: ModelConfig
    data_cfg: DataConfig
    precision: AmpPolicy
    knn: dict[str, Any] | None
    gallery_emb: torch.Tensor | None
    gallery_y: torch.Tensor | None


def resolve_bundle_path(path: str | Path) -> Path:
    path = Path(path)
    return path / BUNDLE_NAME if path.is_dir() else path


def _configs(state: dict[str, Any]) -> tuple[ModelConfig, DataConfig]:
    model_cfg, data_cfg = dict(state["model_config"]), dict(state["data_config"])
    # Bundles of version 0.1.0 normalised both branches with data.mean / data.std.
    old_mean, old_std = data_cfg.pop("mean", None), data_cfg.pop("std", None)
    for branch in ("convnext", "vit"):
        model_cfg.setdefault(f"{branch}_mean", old_mean)
        model_cfg.setdefault(f"{branch}_std", old_std)
    return from_dict(ModelConfig, model_cfg), from_dict(DataConfig, data_cfg)


def _build(state: dict[str, Any]) -> torch.nn.Module:
    model_cfg, data_cfg = _configs(state)
    return build_model(model_cfg, data_cfg.img_size, load_weights=False)


def load_bundle(path: str | Path, device: torch.device) -> Bundle:
    """Rebuild the model of a ``model.pt`` (or a training checkpoint of the baseline)."""
    path = resolve_bundle_path(path)
    kinds = {model_kind(name): name for name in MODEL_CLASSES}
    model, state = load_model(path, list(kinds), _build, device=device)
    name = kinds[state["kind"]]
    model_cfg, data_cfg = _configs(state)
    knn = gallery_emb = gallery_y = None
    if name == "metric":
        if "gallery" not in state or "knn" not in state:
            raise CheckpointError(
                path,
                f"a metric training checkpoint has no KNN gallery; use the {BUNDLE_NAME} in the run directory",
            )
        knn = dict(state["knn"])
        gallery_emb = state["gallery"]["embeddings"].float()
        gallery_y = state["gallery"]["labels"].long()
    precision = checkpoint_precision(state, device)
    return Bundle(path, name, model, model_cfg, data_cfg, precision, knn, gallery_emb, gallery_y)


def predict_probs(
    bundle: Bundle,
    images: ImageSet,
    cfg: BinEnsembleConfig,
    device: torch.device,
    views: Sequence[str],
    desc: str | None = None,
) -> np.ndarray:
    """Class probabilities ``[n, c]`` of ``images``: KNN on TTA embeddings, or mean TTA softmax
    (``cfg``: the eval batch size and the loader workers; this process predicts everything).

    A metric model's queries must be embedded with the views its KNN gallery was embedded with
    (an embedding averaged over other views lies elsewhere on the sphere).
    """
    if bundle.knn is not None:
        check_views(bundle, views)
    data_cfg = dataclasses.replace(bundle.data_cfg, eval_batch_size=cfg.data.eval_batch_size)
    workers = cfg.trainer.num_workers
    out = extract(
        bundle.model, images, data_cfg, device, bundle.precision, workers, views, desc, False
    )
    if bundle.name == "baseline":
        return out.numpy()
    assert (
        bundle.knn is not None and bundle.gallery_emb is not None and bundle.gallery_y is not None
    )
    probs = knn_predict_proba(
        bundle.gallery_emb,
        bundle.gallery_y,
        out,
        int(bundle.knn["k"]),
        weighted=bool(bundle.knn["weighted"]),
        num_classes=bundle.model_cfg.num_classes,
        metric=bundle.knn["metric"],
    )
    return probs.cpu().numpy()


def check_views(bundle: Bundle, views: Sequence[str]) -> None:
    """Refuse query views that differ from the KNN gallery's (order does not matter)."""
    assert bundle.knn is not None
    gallery = list(bundle.knn["views"])
    if sorted(views) != sorted(gallery):
        raise UserError(
            "TTA views",
            f"the KNN gallery of {bundle.path} was embedded with {','.join(gallery)}; "
            f"queries must use the same views, not {','.join(views)} "
            "(drop --no-tta / the predict.tta and predict.views settings)",
        )


def validation_images(root: Path, data_cfg: DataConfig, splits_path: Path) -> ImageSet:
    """The validation split that a training run saved, checked against the current data."""
    if not splits_path.is_file():
        raise DataError(splits_path, "no saved split beside the model (needed for --split val)")
    labelled = scan_labelled(root, data_cfg)
    try:
        splits = load_splits(splits_path, ids=labelled.ids)
    except ValueError as exc:
        raise DataError(splits_path, str(exc).splitlines()[0]) from None
    return labelled.subset(splits["val"])


# -- the binensemble-predict command ------------------------------------------------------------
def run_predict(args: argparse.Namespace) -> int:
    # As in training, a --config stands alone; the demo preset applies only without one.
    cfg = load_run_config(args, BinEnsembleConfig, "binensemble")
    device = resolve_device(cfg.device)
    bundle = load_bundle(args.model, device)
    data_cfg = bundle.data_cfg
    if args.data_dir is not None:
        data_cfg = dataclasses.replace(data_cfg, data_dir=str(args.data_dir))
    root = data_root(data_cfg)
    targets = None
    if args.split == "val":
        images = validation_images(root, data_cfg, bundle.path.parent / "splits.json")
        targets = images.labels
    else:
        images = scan_unlabelled(root, data_cfg)
        labels_path = root / data_cfg.test_labels
        if labels_path.is_file():
            labels = read_labels(labels_path)
            if all(i in labels for i in images.ids):
                targets = np.asarray([labels[i] for i in images.ids])
    views = ["identity"] if args.no_tta or not cfg.predict.tta else list(cfg.predict.views)
    asked = (
        args.no_tta
        or args.config is not None
        or any(
            item.split("=")[0].strip() in ("predict.tta", "predict.views")
            for item in args.overrides
        )
    )
    if bundle.knn is not None and not asked:
        views = list(bundle.knn["views"])  # nothing asked: the gallery's own views
    probs = predict_probs(bundle, images, cfg, device, views, f"{bundle.name}: {args.split}")
    out_dir = Path(args.output_dir) if args.output_dir else bundle.path.parent / "predictions"
    name = args.name or (bundle.name if args.split == "test" else f"{bundle.name}_val")
    pred_path, prob_path = write_predictions(
        out_dir, name, images.ids, probs, data_cfg.classes, targets
    )
    if targets is not None:
        print(
            format_table(
                [
                    {
                        "model": bundle.name,
                        "split": args.split,
                        **summarise(targets, probs, prefix=""),
                    }
                ]
            )
        )
    print(f"{len(images)} images ({', '.join(views)}): {pred_path}, {prob_path}")
    return 0
