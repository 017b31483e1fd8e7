"""The model of a binensemble run as one exported folder, and every source read the same way.

**The model of a run** is every model the run trained and their soft vote: the metric model
(its weights, k and KNN gallery), the baseline, and the vote with the run's
``predict.vote_weights`` (equal when empty). A run of one model (``--model metric``) is that
model alone, without a vote. A checkpoint (``<model>/model.pt``, or a baseline's training
checkpoint) is its one model.

``binensemble-export RUN|CHECKPOINT --output DIR`` writes medcore's folder layout
(:mod:`medcore.weights.export`), kind :data:`binensemble.model.KIND`:

- ``model.safetensors``: each model's tensors under its name (``metric.backbone.vit...``,
  ``baseline.head.0.weight``); the metric model's gallery as ``extras/metric.gallery.embeddings``
  ``[n, e]`` float32 and ``extras/metric.gallery.labels`` ``[n]`` int64. One file with a prefix
  per model, not a file per model: medcore's reader, overwrite check and hub upload know one
  weights file, and one file keeps the models of a vote together.
- ``config.json``: ``model_config`` ``{"members": {name: ModelConfig}}`` (each model's
  architecture and its branches' normalisation); ``preprocessing`` per model (the data config
  the evaluation transforms read, the working size, crop, resampling and TTA views);
  ``labels`` the class names; ``thresholds`` ``{<class 1>: 0.5}`` (P above it: class 1, a tie
  is class 0); ``extras``: the models in order, the vote weights, the KNN settings (k, weighting,
  metric, views) and each model's precision.

Every source (run, checkpoint, folder, ``hf-hub:``) is read into that exported form
(:func:`read_export`), so ``binensemble.load`` and ``binensemble-predict`` build the models
one way whatever they were given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from binensemble.config import TTA_VIEWS, DataConfig
from binensemble.ensemble import check_weights
from binensemble.model import KIND, MEMBER_KINDS, MODEL_CLASSES
from binensemble.predict import BUNDLE_NAME
from medcore.config import read_yaml
from medcore.errors import CheckpointError, UserError
from medcore.io import json_default
from medcore.report.model_card import ModelCard, metric_rows, read_metrics, split_sizes
from medcore.weights.export import CONFIG_FILE, WEIGHTS_FILE, ModelExport
from medcore.weights.pretrained import HUB_PREFIX
from medcore.weights.sources import ModelSource, ModelSourceError, read_model_source

PACKAGE = "binensemble"
NAMES_BY_KIND = {kind: name for name, kind in MEMBER_KINDS.items()}
GALLERY = ("embeddings", "labels")


@dataclass(frozen=True)
class Origin:
    """Where an exported form came from: ``origin`` (run, checkpoint, export, hub), the local
    weights file read, and for runs and checkpoints each model's directory (its ``splits.json``)
    and the training data directory (None: the built-in demo), which an export leaves out."""

    origin: str
    source: str
    path: Path
    model_dirs: dict[str, Path]
    data_dir: str | None = None


def _read_member(path: Path) -> tuple[str, ModelSource]:
    """One model's checkpoint (``model.pt``), checked to be a binensemble model with what
    prediction needs."""
    src = read_model_source(path, list(NAMES_BY_KIND))
    name = NAMES_BY_KIND[src.kind]
    if name == "metric" and not {"gallery", "knn"} <= src.config.keys():
        raise ModelSourceError(
            path,
            f"a metric training checkpoint has no KNN gallery; use the {BUNDLE_NAME} of its "
            "model directory (or the run directory)",
        )
    if "data_config" not in src.config:
        raise ModelSourceError(path, "has no data_config to rebuild the preprocessing from")
    return name, src


def _run_members(run_dir: Path) -> list[Path] | None:
    """The ``model.pt`` of each model of a run (the run itself for a one-model run); None when
    the folder holds no model directory. A model directory without its ``model.pt`` (training
    stopped before the end) is an error, not a smaller ensemble."""
    if (run_dir / BUNDLE_NAME).is_file():
        return [run_dir / BUNDLE_NAME]
    dirs = [run_dir / name for name in MODEL_CLASSES if (run_dir / name).is_dir()]
    if not dirs:
        return None
    unfinished = [d for d in dirs if not (d / BUNDLE_NAME).is_file()]
    if unfinished:
        raise CheckpointError(
            unfinished[0],
            f"has no {BUNDLE_NAME}: this model did not finish training "
            "(finish the run with binensemble-train --resume latest)",
        )
    return [d / BUNDLE_NAME for d in dirs]


def read_export(source: str | Path) -> tuple[ModelExport, Origin]:
    """The exported form of any source and where it came from.

    A run directory or a checkpoint goes through :func:`describe` (with the model card), an
    exported folder, its ``model.safetensors`` or ``hf-hub:ORG/NAME[@REV]`` is read as written.
    Anything else (another package's model, a bare weights file, a folder with neither) is a
    one-line :class:`~medcore.weights.sources.ModelSourceError`.
    """
    text = str(source)
    path = Path(text).expanduser()
    local = not text.startswith(HUB_PREFIX)
    members: list[Path] | None = None
    if local and path.is_dir() and not (path / CONFIG_FILE).is_file():
        members = _run_members(path)
    elif (
        local
        and path.suffix == ".safetensors"
        and path.is_file()
        and not (path.parent / CONFIG_FILE).is_file()
    ):
        # A model directory's model.safetensors: the weights alone, without k, gallery or configs.
        raise ModelSourceError(
            text,
            f"a weights file without its {CONFIG_FILE}: not loadable as a binensemble model (pass "
            f"the run directory or its {BUNDLE_NAME}, or an exported folder: binensemble-export)",
        )
    elif local and path.is_file() and path.suffix != ".safetensors":
        members = [path]
    if members is None:
        if local and path.is_dir() and not (path / WEIGHTS_FILE).is_file():
            raise ModelSourceError(
                text,
                f"checkpoint not found: neither a run or model directory of binensemble-train "
                f"({BUNDLE_NAME}) nor an exported model folder ({CONFIG_FILE} + {WEIGHTS_FILE})",
            )
        src = read_model_source(text, KIND)
        return src.as_export(), Origin(src.origin, text, src.path, {})
    read = dict(_read_member(p) for p in members)
    if len(read) != len(members):
        raise ModelSourceError(text, "holds two models of the same kind")
    run_dir = path if path.is_dir() else None
    origin = "run" if run_dir is not None else "checkpoint"
    export = describe(read, run_dir)
    # The values as config.json holds them (lists, not tuples ...), so that a model loaded from
    # its run and from its export are given the same settings.
    as_json = json.loads(json.dumps(export.config(), default=json_default))
    parts = ("model_config", "preprocessing", "labels", "thresholds", "extras")
    export = dataclasses.replace(export, **{f: as_json[f] for f in parts})
    model_dirs = {name: src.path.parent for name, src in read.items()}
    first = read[next(iter(read))]
    data_dir = first.config["data_config"].get("data_dir")
    return export, Origin(origin, text, first.path, model_dirs, data_dir)


def _views(name: str, src: ModelSource) -> list[str]:
    """The TTA views a model predicts with: the metric model's gallery views, the baseline's
    from its run's config (``predict.tta`` / ``predict.views``)."""
    if name == "metric":
        return list(src.config["knn"]["views"])
    config = src.run_dir / "config.yaml" if src.run_dir is not None else None
    if config is None or not config.is_file():
        print(
            f"note: {src.path} is not inside its run directory: its TTA views are not recorded; "
            f"the baseline predicts with {', '.join(TTA_VIEWS)}",
            file=sys.stderr,
        )
        return list(TTA_VIEWS)
    predict = read_yaml(config).get("predict") or {}
    return list(predict.get("views", TTA_VIEWS)) if predict.get("tta", True) else ["identity"]


def _vote_weights(run_dir: Path | None, names: list[str]) -> list[float] | None:
    """The run's ``predict.vote_weights`` normalised (equal when the run gives none)."""
    if len(names) < 2:
        return None
    weights = None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        weights = (read_yaml(run_dir / "config.yaml").get("predict") or {}).get("vote_weights")
    try:
        return [float(w) for w in check_weights(weights or None, len(names))]
    except UserError:
        raise UserError(
            "predict.vote_weights", f"the run's config gives {len(weights)} for {len(names)} models"
        ) from None


def _precision(state: dict[str, Any]) -> dict[str, Any]:
    """What :func:`medcore.engine.inference.checkpoint_precision` reads of a checkpoint."""
    if "precision" in state:
        return {"precision": state["precision"]}
    trainer = state.get("trainer_config") or {}
    return {"trainer_config": {k: trainer[k] for k in ("amp", "amp_dtype") if k in trainer}}


def _preprocessing(data_config: dict[str, Any], views: list[str]) -> dict[str, Any]:
    # The training machine's data path is no part of the model.
    data = {**data_config, "data_dir": None}
    cfg = DataConfig(**{k: v for k, v in data.items() if k in DataConfig.__dataclass_fields__})
    working = round(cfg.img_size * cfg.resize_scale)
    return {
        "data_config": data,
        "working_size": [working, working],
        "resize": "stretch, bilinear (antialiased)",
        "crop": f"centre {cfg.img_size}x{cfg.img_size}",
        "pixels": "RGB in [0, 1]; each branch normalises with its mean/std (model_config)",
        "tta_views": views,
    }


def describe(members: dict[str, ModelSource], run_dir: Path | None = None) -> ModelExport:
    """The export of a run's models (``members``: model name -> its checkpoint, in training
    order), with the vote of the run in ``run_dir`` and the model card."""
    names = list(members)
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    model_config, preprocessing, knn, precision = {}, {}, {}, {}
    for name, src in members.items():
        tensors.update({f"{name}.{k}": v for k, v in src.tensors.items()})
        model_config[name] = src.model_config
        preprocessing[name] = _preprocessing(src.config["data_config"], _views(name, src))
        precision[name] = _precision(src.config)
        if name == "metric":
            knn[name] = {k: v for k, v in src.config["knn"].items() if k != "scores"}
            gallery = src.config["gallery"]
            extra[f"{name}.gallery.embeddings"] = gallery["embeddings"].float().contiguous()
            extra[f"{name}.gallery.labels"] = gallery["labels"].long().contiguous()
    classes = list(members[names[0]].config["data_config"]["classes"])
    return ModelExport(
        kind=KIND,
        package=PACKAGE,
        model_config={"members": model_config},
        tensors=tensors,
        preprocessing=preprocessing,
        labels=classes,
        thresholds={classes[1]: 0.5},
        extras={
            "members": names,
            "vote_weights": _vote_weights(run_dir, names),
            "decision": f"{classes[1]} when P({classes[1]}) > 0.5; a tie is {classes[0]}",
            "knn": knn,
            "precision": precision,
        },
        extra_tensors=extra,
        card=_card(members, run_dir),
    )


def member_states(export: ModelExport) -> dict[str, dict[str, Any]]:
    """Each model of an export as the checkpoint dict its ``model.pt`` was (``kind``, ``model``,
    configs, precision, KNN settings and gallery), for :func:`binensemble.predict.bundle_from_state`."""
    extras = export.extras
    states = {}
    for name in extras["members"]:
        prefix = f"{name}."
        state: dict[str, Any] = {
            "kind": MEMBER_KINDS[name],
            "model": {
                k[len(prefix) :]: v for k, v in export.tensors.items() if k.startswith(prefix)
            },
            "model_config": export.model_config["members"][name],
            "data_config": export.preprocessing[name]["data_config"],
            "views": export.preprocessing[name]["tta_views"],
            **extras["precision"][name],
        }
        if name in extras["knn"]:
            state["knn"] = extras["knn"][name]
            state["gallery"] = {
                part: export.extra_tensors[f"{name}.gallery.{part}"] for part in GALLERY
            }
        states[name] = state
    return states


def _card(members: dict[str, ModelSource], run_dir: Path | None) -> ModelCard:
    names = list(members)
    first = members[names[0]]
    mcfg, dcfg = first.model_config, first.config["data_config"]
    parts = []
    if "metric" in members:
        knn = members["metric"].config["knn"]
        n = len(members["metric"].config["gallery"]["labels"])
        parts.append(
            f"the metric model (triplet loss, {mcfg['embed_dim']}-d embeddings, "
            f"{'distance-weighted ' if knn['weighted'] else ''}{knn['k']}-NN over a gallery of "
            f"{n} training images carried in the file)"
        )
    if "baseline" in members:
        parts.append("the cross-entropy baseline")
    vote = " and their soft vote" if len(names) > 1 else ""
    what = " and ".join(parts)
    description = (
        f"{what[0].upper()}{what[1:]}{vote}: normal-vs-disease image classification "
        f"with a {mcfg['convnext_name']} + {mcfg['vit_name']} dual backbone at "
        f"{dcfg['img_size']}x{dcfg['img_size']}, test-time augmentation "
        "(identity, flips, 90-degree rotation). The model of a binensemble run: every model it "
        "trained and the vote."
    )
    card = ModelCard(
        title=f"binensemble {' + '.join(names)}",
        description=description,
        training_data=(
            f"Images in two classes ({', '.join(dcfg['classes'])}), a stratified validation "
            f"split of {dcfg['val_fraction']:.0%} (seed {dcfg['split_seed']}) chose the epoch"
            + (" and k." if "metric" in members else ".")
        ),
        pipeline_tag="image-classification",
        intended_use="Research on normal-vs-disease classification of 2-D medical images of "
        "the kind it was trained on.",
        usage='predictions = model.predict("images/")  # files, folders or arrays\n'
        "print(predictions.frame())",
        command="binensemble-predict {source} --images images/ --output-dir predictions",
    )
    model_dir = first.run_dir
    if model_dir is not None and (model_dir / "splits.json").is_file():
        card.splits = split_sizes(model_dir / "splits.json")
    where = run_dir or model_dir
    if where is not None:
        card.metrics, card.metrics_note = _metrics(where, names)
    return card


def _metrics(run_dir: Path, names: list[str]) -> tuple[list[Any], str]:
    """A two-model run: accuracy of each model and the vote with Wilson intervals, the vote's
    gain with its paired bootstrap interval, the agreement (the run's analysis files); one
    model: the run's metrics as recorded."""
    rows: dict[str, Any] = {}
    for split in ("val", "test"):
        path = run_dir / "analysis" / split / "analysis.json"
        if len(names) < 2 or not path.is_file():
            continue
        analysis = read_metrics(path)
        keep = ("accuracy", "vote_gain")
        for row in analysis["models"]:
            rows[f"{split}.{row['model']}"] = {
                k: v for k, v in row.items() if k.startswith(keep) and v is not None
            }
        pair = analysis["pairs"][0]
        rows[f"{split}.{pair['pair'].replace(' vs ', '_vs_')}"] = {
            k: pair[k] for k in ("agreement", "agreement_ci_low", "agreement_ci_high")
        }
        rows[f"{split}.n_images"] = analysis["n_images"]
    if rows:
        note = (
            "Accuracy with 95% Wilson intervals, the vote's gain over each model with a paired "
            "bootstrap interval, agreement of the two models (val: the validation split, "
            "test: the labelled test set)."
        )
        return metric_rows(rows), note
    if not (run_dir / "metrics.json").is_file():
        return [], ""
    metrics = read_metrics(run_dir / "metrics.json")
    return metric_rows(metrics), "The run's metrics on its validation split (and test set)."


# -- the binensemble-export command -------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    """Export a run or checkpoint (see the module docstring); medcore's export command, with
    binensemble's reading of a run (several models, one kind each) in place of one checkpoint."""
    from medcore.report.model_card import format_size
    from medcore.report.tables import format_table
    from medcore.weights.export import check_can_push, export_files, push_to_hub, write_export

    if args.private and not args.push_to_hub:
        raise UserError("--private", "applies to the hub repository: use it with --push-to-hub")
    if args.push_to_hub:  # before any work: an upload that cannot happen fails first
        check_can_push(args.push_to_hub)
    export, origin = read_export(args.source)
    if origin.origin in ("export", "hub"):
        raise UserError(
            args.source,
            "already an exported model: load it as it is, or export its run or checkpoint",
        )
    export = dataclasses.replace(export, exported_from=origin.path.name)
    if export.card is None or not export.card.metrics:
        print(f"note: the model card has no metrics ({origin.source} holds none)", file=sys.stderr)
    folder = write_export(export, args.output, overwrite=args.overwrite, repo_id=args.push_to_hub)
    files = export_files(folder)
    rows = [{"file": name, "size": format_size(size)} for name, size in files]
    rows.append({"file": "total", "size": format_size(sum(size for _, size in files))})
    members = ", ".join(export.extras["members"])
    vote = " and their vote" if len(export.extras["members"]) > 1 else ""
    print(f"exported {members}{vote} from {origin.source} to {folder}")
    print(format_table(rows))
    if args.push_to_hub:
        url = push_to_hub(folder, args.push_to_hub, private=args.private)
        print(f"uploaded to {args.push_to_hub}: {url}")
    return 0
