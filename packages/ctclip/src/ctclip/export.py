"""``ctclip-export RUN|CHECKPOINT --output DIR``: a trained ctclip model as a Hugging Face model
folder (``model.safetensors``, ``config.json``, ``README.md``), read back by :func:`ctclip.load`.

The model of a run is its best checkpoint: the one with the highest validation mean AUC
(``checkpoints/<prefix>_*.pt``, or ``trainer.best_name``), which the run's zero-shot report
also describes; a run trained without validation has only
``checkpoints/final.pt``, which is then its model.

``config.json`` carries what :func:`ctclip.load` needs without the run: the model config (the
slice normalisation mean/std included), the preprocessing settings of the store the model was
trained on (target shape, slice order, HU window, orientation), the finding names, the prompt
templates, the training precision and the identity of the text tokenizer (open_clip's CLIP BPE
vocabulary; the vocabulary itself comes from the installed open_clip, it is not copied).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from ctclip.findings import NEGATIVE_TEMPLATE, POSITIVE_TEMPLATE
from ctclip.model import KIND
from medcore.cli.export import export_main
from medcore.report.model_card import ModelCard, metric_rows, read_metrics, split_sizes
from medcore.weights.export import ModelExport
from medcore.weights.sources import ModelSource, ModelSourceError, checkpoint_in_run

PREPROCESSING_KEYS = ("target_shape", "slide_b2u", "hu_range", "orientation")
# The run's zero-shot report metrics the card shows (metrics.json of ctclip-train).
CARD_METRICS = ("auc", "f1", "precision", "recall", "accuracy")


def tokenizer_identity(context_length: int) -> dict[str, Any]:
    """What tokenizes the text tower's input: open_clip's CLIP BPE tokenizer and its vocabulary
    file (shipped inside open_clip), by name and version, not by content."""
    from open_clip.tokenizer import default_bpe

    try:
        open_clip_version = version("open_clip_torch")
    except PackageNotFoundError:
        open_clip_version = "unknown"
    return {
        "class": "open_clip.tokenizer.SimpleTokenizer",
        "vocabulary": Path(default_bpe()).name,
        "open_clip_version": open_clip_version,
        "context_length": int(context_length),
        "truncation": "keeps the end-of-text token (the text tower pools there)",
    }


def prompt_templates() -> dict[str, str]:
    return {"positive": POSITIVE_TEMPLATE, "negative": NEGATIVE_TEMPLATE}


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    return config if isinstance(config, dict) else {}


def find_in_run(run_dir: str | Path) -> Path | None:
    """The checkpoint that is a run's model: its best (by the run's own checkpoint naming),
    else ``final.pt``; None when the folder holds neither."""
    run_dir = Path(run_dir)
    trainer = _run_config(run_dir).get("trainer") or {}
    best = trainer.get("best_name") or f"{trainer.get('checkpoint_prefix') or 'model'}_*.pt"
    return checkpoint_in_run(run_dir, [f"checkpoints/{best}", "checkpoints/final.pt"])


def _card(source: ModelSource, findings: list[str]) -> ModelCard:
    card = ModelCard(
        title="ctclip: 3D chest CT CLIP with zero-shot findings",
        description=(
            "A 3D CT CLIP model trained with ctclip: a DINOv2 ViT (timm) encodes every axial "
            "slice, an x-transformers encoder fuses the slices, and a CLIP text transformer "
            "encodes radiology reports. Findings are classified zero-shot: the volume is "
            'compared with "<finding> is present." and "<finding> is not present.", and a '
            "softmax over the pair gives P(present). Any finding name can be asked; the "
            f"{len(findings)} it was validated on are listed in config.json."
        ),
        intended_use=(
            "Research on chest CT representation learning: zero-shot finding probabilities, "
            "volume and text embeddings for retrieval and probing. The probabilities are not "
            "calibrated and come without a decision threshold; choose one on labelled data of "
            "your own (ctclip-eval --val-labels)."
        ),
        limitations=(
            "Volumes are preprocessed as ctclip-preprocess stores them (config.json "
            "`preprocessing`); a volume read with the wrong HU (a second rescale, raw stored "
            "values) gives meaningless outputs. Prompts longer than the text tower's context "
            "are refused. Performance on findings the run was not validated on is unknown."
        ),
        license="apache-2.0",
        pipeline_tag="zero-shot-classification",
        tags=["ct", "chest-ct", "clip", "zero-shot", "3d"],
        usage=(
            'probs = model.zero_shot(["scan.nii.gz", "dicom_series_folder/"])  # P(present)\n'
            'emb = model.encode_volumes(["scan.nii.gz"])  # [1, e], L2-normalised\n'
            'text = model.encode_text(["Pleural effusion is present."])'
        ),
        command="ctclip-predict --model {source} scans/ --output findings.csv",
    )
    run_dir = source.run_dir
    if run_dir is None:
        return card
    if (run_dir / "splits.json").is_file():
        card.splits = split_sizes(run_dir / "splits.json")
    data = (_run_config(run_dir).get("data") or {}).get("data_dir")
    card.training_data = (
        f"Trained on the CT-RATE-format data at `{data}` (reports and labels tables)."
        if data
        else "Trained on ctclip's built-in synthetic demo (phantom chest CTs in CT-RATE formats)."
    )
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return card
    metrics = read_metrics(metrics_path)
    # The report describes one checkpoint (the run's model): another one exported from the
    # same run gets no metrics rather than someone else's.
    reported = Path(str(metrics.get("checkpoint", ""))).name
    if reported != source.path.name or not isinstance(metrics.get("zero_shot"), dict):
        return card
    wanted = {f"zero_shot.{m}" for m in CARD_METRICS}
    wanted |= {f"auc_per_finding.{f}" for f in findings}
    card.metrics = [row for row in metric_rows(metrics) if row.name in wanted]
    n_boot = (_run_config(run_dir).get("validation") or {}).get("n_boot", "?")
    n = metrics["zero_shot"].get("n", "?")
    k = metrics.get("num_evaluated_findings", "?")
    card.metrics_note = (
        f"Zero-shot on the run's {n} validation volumes (checkpoint {reported}): the mean over "
        f"the {k} findings with both classes there, and the AUC of each; F1, precision, recall "
        f"and accuracy at threshold 0.5. 95% bootstrap intervals over {n_boot} resamples."
    )
    return card


def describe(source: ModelSource) -> ModelExport:
    """The exported form of a ctclip checkpoint (see the module docstring)."""
    config = source.config
    preprocessing = config.get("preprocessing")
    if not isinstance(preprocessing, dict) or not set(PREPROCESSING_KEYS) <= preprocessing.keys():
        raise ModelSourceError(
            source.source,
            "records no preprocessing settings of its training store (target shape, slice "
            "order, HU window): trained by an older ctclip, or on a store without settings; "
            "retrain with this version to export or load it",
        )
    findings = config.get("findings")
    if not isinstance(findings, list) or not findings:
        raise ModelSourceError(source.source, "records no finding names")
    model_config = source.model_config
    return ModelExport(
        kind=source.kind,
        package="ctclip",
        model_config=model_config,
        tensors=source.tensors,
        preprocessing={
            **{key: preprocessing[key] for key in PREPROCESSING_KEYS},
            # Applied by the model itself (model_config mean/std); repeated for readers.
            "slice_normalization": {
                "scaling": "uint8 volume -> per-slice min-max to [0, 1] -> 3 channels",
                "mean": model_config.get("mean"),
                "std": model_config.get("std"),
            },
            "steps": (
                "read (NIfTI or DICOM) into the canonical orientation; HU; clip to hu_range; "
                "resample (antialiased) to isotropic voxels at which the whole volume fits "
                "target_shape; centre and pad with air; map hu_range to uint8 0..255"
            ),
        },
        labels=[str(f) for f in findings],
        extras={
            "prompt_templates": prompt_templates(),
            "tokenizer": tokenizer_identity(model_config["context_length"]),
            "precision": config.get("precision"),
            "text_column": config.get("text_column"),
        },
        card=_card(source, [str(f) for f in findings]),
    )


main = export_main(KIND, describe, find_in_run)
