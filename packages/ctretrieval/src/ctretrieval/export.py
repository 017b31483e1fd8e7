"""``ctretrieval-export``: a run or checkpoint -> a Hugging Face model folder; what it holds.

The model of a run is the checkpoint its test report was computed with: the best checkpoint
(micro-F1, ties broken by mAP@10, on ``train_eval``), named in the run's ``metrics.json``;
``final.pt`` where training kept no best. A run without a test report (stopped early) gives
its best checkpoint by name, else ``final.pt``.

``config.json`` carries everything :func:`ctretrieval.load` needs without the run: the model
config (architecture, sizes, the trunk's mean/std), ``preprocessing`` (the volume store's
settings a raw study is fitted with: target shape, HU window, target spacing, orientation, and
the minimum slice count), ``labels`` (the finding slots, "no finding" last), ``thresholds``
(``eval.threshold`` per slot) and ``extras``: the training mode, the ``eval`` settings (``knn_k``
votes the findings of a model without a head) and the training precision (what eval, index and
search autocast with).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctretrieval.model import KINDS
from medcore.cli.export import export_main
from medcore.report.model_card import ModelCard, metric_rows, read_metrics, split_sizes
from medcore.weights.export import ModelExport
from medcore.weights.pretrained import HUB_PREFIX
from medcore.weights.sources import ModelSource, checkpoint_in_run

PACKAGE = "ctretrieval"
# The store settings (ctretrieval.preprocess.store_settings) and the rest of the preprocess
# section that decides whether a study is kept.
PREPROCESS_KEYS = ("target_shape", "hu_window", "target_spacing", "min_slices")
BEST_PATTERNS = ("checkpoints/*_epoch=*_metric=*.pt", "checkpoints/final.pt")


def find_in_run(run_dir: Path) -> Path | None:
    """The checkpoint that is the run's model (see the module docstring); None: none there."""
    metrics = Path(run_dir) / "metrics.json"
    if metrics.is_file():
        reported = read_metrics(metrics).get("checkpoint")
        # By name under this run: the run directory may have moved since it was written.
        if reported and (Path(run_dir) / "checkpoints" / Path(reported).name).is_file():
            return Path(run_dir) / "checkpoints" / Path(reported).name
    return checkpoint_in_run(run_dir, BEST_PATTERNS)


def preprocessing(config: dict[str, Any]) -> dict[str, Any]:
    """The ``preprocessing`` entry of ``config.json`` from a checkpoint's stored sections."""
    from ctretrieval.config import PreprocessConfig
    from ctretrieval.preprocess import store_settings
    from medcore.config import from_dict

    prep = from_dict(PreprocessConfig, config.get("preprocess_config", {}))
    model = config["model_config"]
    return {
        **store_settings(prep),
        "min_slices": prep.min_slices,
        "interpolation": "trilinear",
        "input": "uint8 [slices, rows, columns], the HU window mapped to 0..255",
        "model_input": [int(model["num_slices"]), *(int(v) for v in model["image_size"])],
        "mean": list(model["mean"]),
        "std": list(model["std"]),
    }


def _card(source: ModelSource, names: list[str]) -> ModelCard:
    config = source.config
    model = config["model_config"]
    mode = config.get("mode", "microf1" if model.get("num_classes") else "triplet")
    data = config.get("data_config", {})
    weights = str(model.get("pretrained_weights") or "")
    head = (
        f"a linear head gives P(finding) for {', '.join(names)}"
        if model.get("num_classes")
        else f"findings are voted by the {config.get('eval_config', {}).get('knn_k', 5)} "
        "nearest labelled studies of an index"
    )
    card = ModelCard(
        title=f"ctretrieval {model['name']} ({mode})",
        description=(
            f"3D chest CT retrieval: a CT volume ({model['num_slices']} slices of "
            f"{model['image_size'][0]} x {model['image_size'][1]} after preprocessing) is "
            "embedded by a ResNet-18 trunk over three-slice images, a Conv3d reduction and "
            f"fully connected layers into an L2-normalised {model['embedding_size']}-d "
            f"vector; similar studies are the nearest by cosine similarity; {head}. Trained "
            f"in {mode} mode."
        ),
        training_data=(
            "The built-in synthetic demo of ctretrieval (DICOM phantoms with consolidation, "
            "nodules and cysts)."
            if data.get("data_dir") is None
            else f"Chest CT studies with the findings {', '.join(data.get('finding_columns', []))} "
            f"(labels `{Path(str(data.get('labels_csv', 'labels.csv'))).name}`), "
            "multi-label stratified train / test splits."
        ),
        intended_use=(
            "Research on content-based retrieval of chest CT: finding studies of a research "
            "archive that look alike and share findings, as a feature extractor for CT volumes."
        ),
        limitations=(
            f"The model knows only the findings it was trained on ({', '.join(names)}). The "
            "metrics were measured on held-out studies of the training source only; other "
            "scanners, protocols, sites or populations may retrieve differently."
        ),
        license="apache-2.0",
        pipeline_tag="feature-extraction",
        base_model=weights.removeprefix(HUB_PREFIX).split("@")[0]
        if weights.startswith(HUB_PREFIX)
        else None,
        tags=["ct", "chest-ct", "retrieval", "3d", mode],
        usage=(
            'index = model.build_index(["archive/ct_001.nii.gz", "archive/ct_002/"])\n'
            'print(model.search("new_patient.nii.gz", index, k=5))'
        ),
        command=(
            "ctretrieval-index --checkpoint CHECKPOINT.pt --data-dir /data/ct --output archive.npz"
            "\nctretrieval-search --index archive.npz --query scan.nii.gz --top-k 10"
        ),
    )
    run = source.run_dir
    if run is not None and (run / "splits.json").is_file():
        card.splits = split_sizes(run / "splits.json")
    if run is not None and (run / "metrics.json").is_file():
        report = read_metrics(run / "metrics.json")
        card.metrics = metric_rows({k: report[k] for k in ("test", "random") if k in report})
        measured = Path(str(report.get("checkpoint", ""))).name
        card.metrics_note = (
            f"Test split: {report.get('n_test', '?')} queries ranked against the "
            f"{report.get('n_archive', '?')} training studies (Jaccard-graded relevance); "
            "`random.*` is a random ranking of the same archive."
        )
        if report.get("n_boot"):
            card.metrics_note += (
                f" 95% percentile bootstrap intervals over the test queries ({report['n_boot']} "
                "resamples): P/R/mAP/NDCG@k are means over queries, the pooled F1 scores "
                "pool the resampled queries' counts."
            )
        if measured != source.path.name:
            card.metrics_note += (
                f" Measured with the run's model `{measured}`, not with this export's "
                f"`{source.path.name}`."
            )
    return card


def describe(source: ModelSource) -> ModelExport:
    """The exported form of a ctretrieval checkpoint (see the module docstring)."""
    config = source.config
    names = [str(n) for n in config.get("class_names", [])]
    ecfg = dict(config.get("eval_config", {}))
    tcfg = config.get("trainer_config", {})
    # The training precision as checkpoint_precision reads it: Fabric's, else the AMP settings.
    amp = {k: tcfg[k] for k in ("amp", "amp_dtype") if k in tcfg}
    return ModelExport(
        kind=source.kind,
        package=PACKAGE,
        model_config={**source.model_config},
        tensors=source.tensors,
        preprocessing=preprocessing(config),
        labels=names,
        thresholds={n: float(ecfg.get("threshold", 0.5)) for n in names},
        extras={
            "mode": config.get("mode"),
            "eval_config": ecfg,
            "precision": config.get("precision"),
            "trainer_config": amp,
            "no_finding": config.get("data_config", {}).get("no_finding_name"),
        },
        card=_card(source, names),
    )


main = export_main(KINDS, describe, find_in_run)
