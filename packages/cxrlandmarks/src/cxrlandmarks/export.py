"""``cxrlandmarks-export``: a run or checkpoint -> a Hugging Face model folder; the model of a run.

The model of a run is the checkpoint of the last phase of its 4-phase chain: phase 4
(``checkpoints/geometric_complete.pt``, Wing + symmetry + distance preservation), the chain's
final model and the one the run's test report (``eval/``) describes. A run stopped earlier (or
trained with ``--phase 1|2|3``) gives the checkpoint of the last phase it finished, with a
``note:`` line naming it. The checkpoint names are the run's ``config.yaml`` ones.

The exported ``config.json`` carries what prediction needs without the run: the model config,
``preprocessing`` (input size, grayscale, the image store's bilinear stretch, the input
normalisation, flip TTA as the run's ``eval.tta_flip`` says, the training precision) and the 15
landmark names (``labels``, in output order).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from cxrlandmarks.anatomy import LANDMARK_NAMES, NUM_LANDMARKS, SYMMETRIC_PAIRS
from cxrlandmarks.config import PHASES, DataConfig, PhasesConfig
from cxrlandmarks.data import PACKAGE
from cxrlandmarks.model import KIND, input_normalisation, read_model_checkpoint
from medcore.cli.export import export_main
from medcore.config import read_yaml, to_dict
from medcore.report.model_card import MetricRow, ModelCard, read_metrics, split_sizes
from medcore.weights.checkpoint import load_checkpoint
from medcore.weights.export import ModelExport
from medcore.weights.sources import (
    ModelSource,
    ModelSourceError,
    checkpoint_in_run,
    read_model_source,
)

MODEL_CONFIG_KEYS = ("num_landmarks", "head_dropout", "coord_attention")
BOOTSTRAP = 1000


def run_config(run_dir: Path | None) -> dict[str, Any]:
    """A run's ``config.yaml`` as saved (empty without a run directory or file)."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}
    return read_yaml(run_dir / "config.yaml")


def phase_checkpoints(run_dir: Path | None) -> dict[str, str]:
    """Phase -> its best checkpoint's file name (the run's config, else the defaults)."""
    saved = run_config(run_dir).get("phases") or {}
    defaults = PhasesConfig()
    return {
        p: str((saved.get(p) or {}).get("checkpoint") or getattr(defaults, p).checkpoint)
        for p in PHASES
    }


def find_in_run(run_dir: Path) -> Path | None:
    """The model of a run: its last finished phase's checkpoint (phase 4 for a full chain)."""
    names = phase_checkpoints(run_dir)
    last = names[PHASES[-1]]
    found = checkpoint_in_run(run_dir, [f"checkpoints/{names[p]}" for p in reversed(PHASES)])
    if found is not None and found.name != last:
        print(
            f"note: {run_dir} has no {last} (phase 4): its model is {found.name}, the last "
            "phase it finished",
            file=sys.stderr,
        )
    return found


def read_source(source: str | Path) -> ModelSource:
    """A cxrlandmarks model from a run, a checkpoint (ours or the original code's), an exported
    folder or ``hf-hub:ORG/NAME``; anything else is a one-line ModelSourceError."""
    try:
        return read_model_source(source, KIND, find_in_run=find_in_run)
    except ModelSourceError:
        path = Path(str(source)).expanduser()
        if not path.is_file() or path.suffix == ".safetensors":
            raise
        state = load_checkpoint(path, map_location="cpu")
        if state.get("kind") is not None or not isinstance(state.get("model_state_dict"), dict):
            raise
    # The original code's checkpoint ({"model_state_dict", "model_config"}): imported by key.
    weights, cfg, state = read_model_checkpoint(path)
    config = {
        "kind": KIND,
        "model_config": to_dict(cfg),
        "init": "the original code's model_state_dict",
        **{k: state[k] for k in ("epoch",) if k in state},
    }
    return ModelSource(KIND, weights, config, "checkpoint", str(source), path)


def describe(source: ModelSource) -> ModelExport:
    """The exported form of a cxrlandmarks checkpoint: weights, preprocessing, names, card."""
    state = source.config
    model_config = {
        k: source.model_config[k] for k in MODEL_CONFIG_KEYS if k in source.model_config
    }
    n = int(model_config.get("num_landmarks", NUM_LANDMARKS))
    if n != NUM_LANDMARKS:
        raise ModelSourceError(
            source.source, f"predicts {n} landmarks; cxrlandmarks names {NUM_LANDMARKS}"
        )
    data_config = state.get("data_config") or {}
    size = int(data_config.get("image_size", DataConfig().image_size))
    tta = bool((run_config(source.run_dir).get("eval") or {}).get("tta_flip", False))
    preprocessing = {
        "image_size": size,
        "color_mode": "L",  # read as grayscale, repeated to the trunk's 3 channels
        "resize": "stretch",  # to image_size square, Pillow bilinear (antialiased)
        "resample": "bilinear",
        "input_norm": state.get("input_norm") or input_normalisation(),
        "tta_flip": tta,
        "precision": state.get("precision"),
        "coordinates": "pixels of the original image, pixel edges at integers",
    }
    extras = {
        "phase": state.get("phase"),
        "loss": state.get("loss"),
        "init": state.get("init"),
        "symmetric_pairs": [list(p) for p in SYMMETRIC_PAIRS],
    }
    return ModelExport(
        kind=KIND,
        package=PACKAGE,
        model_config=model_config,
        tensors=source.tensors,
        preprocessing=preprocessing,
        labels=list(LANDMARK_NAMES),
        extras=extras,
        card=model_card(source, size),
    )


def _bootstrap_row(name: str, per_image: np.ndarray, fn: Any) -> MetricRow:
    from medcore.metrics.classification import bootstrap_ci

    low, high = bootstrap_ci(lambda e, _: float(fn(e)), per_image, per_image, BOOTSTRAP, seed=0)
    return MetricRow(name, float(fn(per_image)), low, high)


def card_metrics(run_dir: Path, phase: str | None) -> tuple[list[MetricRow], str]:
    """The card's metrics of ``phase`` on the run's test split: with 95% bootstrap intervals
    (over images) when the run's full report (``eval/metrics.json``) is that phase's."""
    path = run_dir / "metrics.json"
    if not path.is_file():
        return [], ""
    metrics = read_metrics(path)
    report_path = run_dir / "eval" / "metrics.json"
    if phase == metrics.get("final_phase") and report_path.is_file():
        report = read_metrics(report_path)
        per_image = np.asarray(report["per_image_px224"], dtype=float)
        rows = [
            _bootstrap_row("test mean error (px at 224)", per_image, np.mean),
            MetricRow("test median error (px at 224)", report["px224"]["median"]),
            _bootstrap_row(
                "test share of images under 8.5 px", per_image, lambda e: np.mean(e < 8.5)
            ),
            MetricRow("test mean error (original px)", report["original_px"]["mean"]),
            MetricRow("test images", int(report["n_images"])),
        ]
        note = (
            f"{phase} on the run's test split; 95% percentile bootstrap intervals over images "
            f"({BOOTSTRAP} resamples). Errors are distances between predicted and annotated "
            "landmarks, on normalised coordinates x 224, averaged over the 15 landmarks."
        )
        return rows, note
    summary = (metrics.get("phases") or {}).get(phase or "")
    if not summary:
        return [], ""
    rows = [
        MetricRow("test mean error (px at 224)", summary["mean_px"]),
        MetricRow("test median error (px at 224)", summary["median_px"]),
        MetricRow("test share of images under 8.5 px", summary["<8.5px"]),
        MetricRow("test mean error (original px)", summary["mean_orig_px"]),
    ]
    return rows, f"{phase} on the run's test split (the run's phase table)."


def model_card(source: ModelSource, size: int) -> ModelCard:
    """The model card: the model, its data and splits, test metrics, intended use and limits."""
    phase = source.config.get("phase")
    card = ModelCard(
        title="cxrlandmarks: 15 anatomical landmarks on chest X-rays",
        description=(
            "A ResNet-18 regressor of 15 anatomical landmarks on frontal chest radiographs "
            "(mediastinal line and its quarter points, lung apices, hila, bases, superior "
            "borders and costophrenic angles), trained in 4 phases: frozen trunk, full "
            "fine-tune, + symmetry loss, + distance-preservation loss. "
            f"This is {f'the {phase} checkpoint' if phase else 'an imported checkpoint'}"
            f"{' (the last phase of the chain)' if phase == PHASES[-1] else ''}; input "
            f"{size} x {size} grayscale, outputs in pixels of the original image."
        ),
        training_data=_training_data(source),
        intended_use=(
            "Research on chest X-ray geometry: landmark localisation, symmetry and anatomical "
            "measurements on frontal (PA/AP) radiographs like those it was trained on."
        ),
        limitations=(
            "Trained on one dataset's frontal radiographs; lateral views, children, devices "
            "and unusual anatomy were not measured. Landmarks are always predicted, even on "
            "an image that is not a chest X-ray."
        ),
        license="apache-2.0",
        tags=["chest-x-ray", "landmark-detection", "keypoint-detection", "resnet18"],
        usage=(
            'table = model.predict("chest_xray.png")  # or a folder, or [H, W] arrays\n'
            'print(table[["image_name", "apex_left_x", "apex_left_y"]])'
        ),
        command="cxrlandmarks-predict images/ --checkpoint {source} --output-dir predictions/",
    )
    run_dir = source.run_dir
    if run_dir is not None:
        if (run_dir / "splits.json").is_file():
            card.splits = split_sizes(run_dir / "splits.json")
        card.metrics, card.metrics_note = card_metrics(run_dir, phase)
    return card


def _training_data(source: ModelSource) -> str:
    data = source.config.get("data_config") or {}
    if not data:
        return "Not recorded (a checkpoint without its training's data settings)."
    where = "the synthetic demo" if data.get("data_dir") is None else "the user's data"
    return (
        f"Chest X-rays of {where} (categories {', '.join(data.get('categories') or [])}), "
        "annotated with the 15 landmarks; split stratified by category with seed "
        f"{data.get('split_seed')}."
    )


main = export_main(KIND, describe, find_in_run)
