"""``binensemble-predict``, and the prediction of images by a trained model bundle
(``model.pt``) with test-time augmentation.

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
from binensemble.model import MEMBER_KINDS, build_model
from medcore.cli.run_setup import load_run_config
from medcore.config import from_dict
from medcore.data.splits import load_splits
from medcore.engine.inference import checkpoint_precision, load_model
from medcore.errors import CheckpointError, DataError, UserError
from medcore.metrics import knn_predict_proba
from medcore.report.tables import format_table
from medcore.runtime.device import AmpPolicy

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
    views: list[str] | None = None  # the TTA views it predicts with, when recorded


def resolve_bundle_path(path: str | Path) -> Path:
    path = Path(path)
    return path / BUNDLE_NAME if path.is_dir() else path


def _config(state: dict[str, Any]) -> BinEnsembleConfig:
    """The config a checkpoint's model was built from (its model and data sections)."""
    model_cfg, data_cfg = dict(state["model_config"]), dict(state["data_config"])
    # Bundles of version 0.1.0 normalised both branches with data.mean / data.std.
    old_mean, old_std = data_cfg.pop("mean", None), data_cfg.pop("std", None)
    for branch in ("convnext", "vit"):
        model_cfg.setdefault(f"{branch}_mean", old_mean)
        model_cfg.setdefault(f"{branch}_std", old_std)
    return BinEnsembleConfig(
        model=from_dict(ModelConfig, model_cfg), data=from_dict(DataConfig, data_cfg)
    )


def _build(state: dict[str, Any]) -> torch.nn.Module:
    return build_model(_config(state), load_weights=False)


def load_bundle(path: str | Path, device: torch.device) -> Bundle:
    """Rebuild the model of a ``model.pt`` (or a training checkpoint of the baseline)."""
    return bundle_from_state(resolve_bundle_path(path), None, device)


def bundle_from_state(
    path: str | Path, state: dict[str, Any] | None, device: torch.device
) -> Bundle:
    """The model of a checkpoint dict (read from ``path`` when ``state`` is None; an exported
    model's, :func:`binensemble.export.member_states`, names ``path`` only in errors)."""
    path = Path(path)
    kinds = {kind: name for name, kind in MEMBER_KINDS.items()}
    model, state = load_model(path, list(kinds), _build, device=device, state=state)
    name = kinds[state["kind"]]
    cfg = _config(state)
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
    views = list(state["views"]) if "views" in state else None
    return Bundle(
        path, name, model, cfg.model, cfg.data, precision, knn, gallery_emb, gallery_y, views
    )


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
    return member_probs(
        bundle, images, device, views, cfg.data.eval_batch_size, cfg.trainer.num_workers, desc
    )


def member_probs(
    bundle: Bundle,
    images: ImageSet,
    device: torch.device,
    views: Sequence[str],
    batch_size: int,
    workers: int | None,
    desc: str | None = None,
) -> np.ndarray:
    """:func:`predict_probs` with the batch size and loader workers given."""
    if bundle.knn is not None:
        check_views(bundle, views)
    data_cfg = dataclasses.replace(bundle.data_cfg, eval_batch_size=batch_size)
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
def main(args: argparse.Namespace) -> int:
    """Predict with every model of ``args.model`` (run, checkpoint, export or hub name) and, with
    several models, vote: the functions of :func:`binensemble.load` and ``binensemble-vote``."""
    import tempfile

    from binensemble.api import load

    # As in training, a --config stands alone; the demo preset applies only without one.
    cfg = load_run_config(args, BinEnsembleConfig, "binensemble")
    model = load(args.model, cfg.device)
    names = model.names
    if args.name and len(names) > 1:
        raise UserError(
            "--name",
            f"names one model's files; {args.model} holds {', '.join(names)} and their vote",
        )
    exported = not model.origin.model_dirs
    data_dir = model.origin.data_dir if args.data_dir is None else str(args.data_dir)
    data_cfg = dataclasses.replace(model.data_config, data_dir=data_dir)
    # Views asked for on the command line apply to every model; else each its recorded ones.
    asked = (
        args.no_tta
        or args.config is not None
        or any(
            item.split("=")[0].strip() in ("predict.tta", "predict.views")
            for item in args.overrides
        )
    )
    views = None
    if asked:
        views = ["identity"] if args.no_tta or not cfg.predict.tta else list(cfg.predict.views)
    with tempfile.TemporaryDirectory(prefix="binensemble-predict-") as tmp:
        images, targets = _inputs(args, data_cfg, model, exported, Path(tmp))
        probs = model.predict_set(
            images, views, cfg.data.eval_batch_size, cfg.trainer.num_workers, args.split
        )
    if args.output_dir:
        out_dir = Path(args.output_dir)
    elif exported:
        out_dir = Path("predictions")
    elif model.origin.origin == "run":
        out_dir = Path(args.model) / "predictions"
    else:
        out_dir = model.origin.model_dirs[names[0]] / "predictions"
    written = []
    for name, p in probs.items():
        stem = args.name or (name if args.split == "test" else f"{name}_val")
        written += write_predictions(out_dir, stem, images.ids, p, data_cfg.classes, targets)
    if targets is not None:
        rows = [
            {"model": name, "split": args.split, **summarise(targets, p, prefix="")}
            for name, p in probs.items()
        ]
        print(format_table(rows))
    used = "; ".join(f"{n}: {', '.join(views or model.members[n].views or [])}" for n in names)
    print(f"{len(images)} images ({used}): {', '.join(str(p) for p in written)}")
    return 0


def _inputs(
    args: argparse.Namespace, data_cfg: DataConfig, model: Any, exported: bool, workdir: Path
) -> tuple[ImageSet, np.ndarray | None]:
    """The images to predict and their labels when known: ``--images``, the validation split
    of the run, or ``TestSet/`` (scored when its labels file covers it)."""
    from binensemble.api import read_images

    if args.images:
        if args.split == "val" or args.data_dir is not None:
            flag = "--split val" if args.split == "val" else "--data-dir"
            raise UserError("--images", f"predicts the images given; leave out {flag}")
        images, _ = read_images(args.images, data_cfg, workdir)
        return images, None
    if exported and args.data_dir is None:
        raise UserError(
            "--data-dir", "an exported model carries no data directory: give --data-dir or --images"
        )
    root = data_root(data_cfg)
    if args.split == "val":
        if exported:
            raise UserError(
                "--split", "val reads the run's saved split: pass the run directory, not an export"
            )
        splits = next(iter(model.origin.model_dirs.values())) / "splits.json"
        images = validation_images(root, data_cfg, splits)
        return images, images.labels
    images = scan_unlabelled(root, data_cfg)
    labels_path = root / data_cfg.test_labels
    if labels_path.is_file():
        labels = read_labels(labels_path)
        if all(i in labels for i in images.ids):
            return images, np.asarray([labels[i] for i in images.ids])
    return images, None
