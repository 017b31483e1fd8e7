"""Model cards: the ``README.md`` of an exported model, in the form the Hugging Face hub reads.

A package describes its model with a :class:`ModelCard` (what it is, the data and splits it was
trained on, the run's metrics, its intended use); :func:`render_card` writes the card: YAML front
matter the hub understands (``library_name``, ``tags``, ``license``, ``pipeline_tag``,
``base_model``, ``datasets``), then the sections every card of the workspace has, in one order.
Metrics come from the run's metrics JSON as it is (:func:`metric_rows`): a number with its
confidence interval, whether the JSON nests it (``{"auc": {"value", "ci_low", "ci_high"}}``, as
:func:`medcore.metrics.classification.metrics_with_ci` returns) or flattens it (``auc``,
``auc_ci_low``, ``auc_ci_high``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medcore.errors import DataError
from medcore.report.tables import markdown_table

CI_SUFFIXES = ("_ci_low", "_ci_high")
NOT_A_MEDICAL_DEVICE = (
    "Research use only. This model is not a medical device: it has not been cleared or "
    "approved by any regulator and must not be used for diagnosis, treatment or any other "
    "clinical decision."
)
DEFAULT_LIMITATIONS = (
    "The metrics above were measured on held-out data of the training source only. "
    "Performance on other scanners, acquisition protocols, sites or patient populations is "
    "unknown and must be measured before any conclusion is drawn from its outputs."
)


@dataclass(frozen=True)
class MetricRow:
    """One metric of a card: its dotted name in the metrics JSON, value and interval."""

    name: str
    value: float | int
    ci_low: float | None = None
    ci_high: float | None = None


@dataclass(frozen=True)
class CardFile:
    """A file of an exported folder as the card lists it (``size`` None: not known yet)."""

    name: str
    what: str
    size: int | None = None


@dataclass
class ModelCard:
    """What a package says about its model; :func:`render_card` turns it into ``README.md``.

    ``splits``: the number of items in each split, one mapping per fold for cross-validation
    (:func:`split_sizes` reads a medcore splits file). ``metrics``: the rows of the card's
    metrics table (:func:`metric_rows` of the run's metrics JSON), ``metrics_note`` where they
    were measured (the split, the bootstrap). ``intended_use`` and ``limitations`` come after
    medcore's fixed research-use statement. ``usage``: Python lines that follow ``model =
    <pkg>.load(...)`` in the how-to-load example; ``command``: a command-line example, with
    ``{source}`` standing for the model's hub name or folder. ``extra_sections``: more sections
    (title -> Markdown), placed before "How to load".
    """

    title: str
    description: str
    training_data: str = ""
    splits: Sequence[Mapping[str, int]] = ()
    metrics: Sequence[MetricRow] = ()
    metrics_note: str = ""
    ci_level: float = 0.95
    intended_use: str = ""
    limitations: str = ""
    license: str | None = None
    pipeline_tag: str | None = None
    base_model: str | None = None
    datasets: Sequence[str] = ()
    tags: Sequence[str] = ()
    usage: str = ""
    command: str = ""
    extra_sections: Mapping[str, str] = field(default_factory=dict)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_rows(metrics: Mapping[str, Any], keys: Sequence[str] | None = None) -> list[MetricRow]:
    """The scalar metrics of a metrics JSON, each with its interval where the JSON has one.

    Nested sections become dotted names (``test.auc``). A ``{"value", "ci_low", "ci_high"}``
    mapping is one metric; ``name_ci_low`` / ``name_ci_high`` beside ``name`` are its interval.
    Strings and lists (names, per-item arrays) are not metrics and are left out. ``keys``
    selects and orders the rows by name; a key that is not a scalar metric of the JSON is a
    KeyError (the package asked for a metric its run does not write).
    """
    rows = dict(_walk(metrics, ""))
    if keys is None:
        return list(rows.values())
    absent = [k for k in keys if k not in rows]
    if absent:
        raise KeyError(f"not a scalar metric of the metrics JSON: {', '.join(absent)}")
    return [rows[k] for k in keys]


def _walk(node: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, MetricRow]]:
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and _is_number(value.get("value")):
            yield name, _row(name, value["value"], value.get("ci_low"), value.get("ci_high"))
        elif isinstance(value, Mapping):
            yield from _walk(value, f"{name}.")
        elif _is_number(value):
            base = next((str(key)[: -len(s)] for s in CI_SUFFIXES if str(key).endswith(s)), None)
            if base is not None and _is_number(node.get(base)):
                continue  # the interval of ``base``, in its row
            yield (
                name,
                _row(name, value, node.get(f"{key}_ci_low"), node.get(f"{key}_ci_high")),
            )


def _row(name: str, value: Any, low: Any, high: Any) -> MetricRow:
    interval = _is_number(low) and _is_number(high)
    # An integer stays one (a count of cases reads "40", not "40.0000").
    return MetricRow(
        name, value, float(low) if interval else None, float(high) if interval else None
    )


def read_metrics(path: str | Path) -> dict[str, Any]:
    """A run's metrics JSON as a dict; a missing or broken file is a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "metrics file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"unreadable JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise DataError(path, "expected a JSON object of metrics")
    return data


def split_sizes(path: str | Path) -> list[dict[str, int]]:
    """The number of items in each split of a medcore splits file, one mapping per fold."""
    from medcore.data.splits import load_splits

    try:
        splits = load_splits(path)
    except (OSError, ValueError) as exc:
        raise DataError(path, str(exc).splitlines()[0][:160]) from None
    folds = splits if isinstance(splits, list) else [splits]
    return [{name: int(idx.size) for name, idx in fold.items()} for fold in folds]


def format_size(nbytes: int) -> str:
    """A file size in decimal units, as the hub shows them (``12.3 MB``)."""
    if nbytes < 1000:
        return f"{nbytes} B"
    power = min(len(str(int(nbytes))) - 1, 12) // 3
    return f"{nbytes / 1000**power:.1f} {('kB', 'MB', 'GB', 'TB')[power - 1]}"


def front_matter(card: ModelCard, package: str) -> dict[str, Any]:
    """The card's YAML metadata: what the hub indexes and filters by."""
    meta: dict[str, Any] = {
        "library_name": package,
        "tags": list(dict.fromkeys(["medical-imaging", package, *card.tags])),
    }
    for key in ("license", "pipeline_tag", "base_model"):
        if getattr(card, key):
            meta[key] = getattr(card, key)
    if card.datasets:
        meta["datasets"] = list(card.datasets)
    return meta


def _ci(row: MetricRow) -> str:
    if row.ci_low is None or row.ci_high is None:
        return ""
    return f"[{row.ci_low:.4f}, {row.ci_high:.4f}]"


def _metrics_section(card: ModelCard) -> str:
    if not card.metrics:
        return "No metrics: the model was exported from a checkpoint without its run directory."
    level = f"{card.ci_level * 100:g}% CI"
    rows = [{"metric": r.name, "value": r.value, level: _ci(r)} for r in card.metrics]
    table = markdown_table(rows, ["metric", "value", level])
    note = f"{card.metrics_note}\n\n" if card.metrics_note else ""
    missing = "" if any(r.ci_low is not None for r in card.metrics) else "\nNo intervals recorded."
    return f"{note}{table}{missing}".rstrip()


def _splits_section(card: ModelCard) -> str:
    parts = [card.training_data] if card.training_data else []
    if card.splits:
        names = list(dict.fromkeys(name for fold in card.splits for name in fold))
        if len(card.splits) == 1:
            rows = [{"split": n, "items": card.splits[0].get(n, 0)} for n in names]
        else:
            rows = [{"fold": i, **fold} for i, fold in enumerate(card.splits)]
        parts.append(markdown_table(rows).rstrip())
    return "\n\n".join(parts) or "Not recorded."


def _load_section(card: ModelCard, package: str, repo_id: str | None) -> str:
    source = f"hf-hub:{repo_id}" if repo_id else "hf-hub:ORG/NAME"
    lines = [f"import {package}", "", f'model = {package}.load("{source}")']
    if card.usage:
        lines += card.usage.strip("\n").splitlines()
    text = "```python\n" + "\n".join(lines) + "\n```\n\n"
    text += (
        f"With `{package}` installed, a local copy of this folder loads the same way: "
        f'`{package}.load("path/to/folder")`. A hub model is read from the Hugging Face cache '
        "once downloaded; with `HF_HUB_OFFLINE=1` nothing is fetched."
    )
    if card.command:
        text += "\n\n```bash\n" + card.command.format(source=source) + "\n```"
    return text


def _files_section(files: Sequence[CardFile]) -> str:
    rows = [
        {
            "file": f"`{f.name}`",
            "size": "" if f.size is None else format_size(f.size),
            "what": f.what,
        }
        for f in files
    ]
    return markdown_table(rows, ["file", "size", "what"]).rstrip()


def render_card(
    card: ModelCard,
    *,
    package: str,
    kind: str,
    repo_id: str | None = None,
    files: Sequence[CardFile] = (),
) -> str:
    """The ``README.md`` text of an exported model: front matter, then the sections in order.

    ``repo_id`` (``ORG/NAME``) fills the how-to-load example; without it the example names
    ``hf-hub:ORG/NAME``.
    """
    sections = {
        "Model description": f"{card.description.strip()}\n\nModel kind: `{kind}` "
        f"(package `{package}`).",
        "Training data and splits": _splits_section(card),
        "Metrics": _metrics_section(card),
        "Intended use and limitations": "\n\n".join(
            p
            for p in (
                NOT_A_MEDICAL_DEVICE,
                card.intended_use.strip(),
                card.limitations.strip() or DEFAULT_LIMITATIONS,
            )
            if p
        ),
        **{title: text.strip() for title, text in card.extra_sections.items()},
        "How to load": _load_section(card, package, repo_id),
        "Files": _files_section(files),
    }
    meta = yaml.safe_dump(front_matter(card, package), sort_keys=False, allow_unicode=True)
    body = "\n\n".join(f"## {title}\n\n{text}" for title, text in sections.items())
    return f"---\n{meta}---\n\n# {card.title}\n\n{body}\n"
