"""Reproducible train/validation/test splits as index arrays, leak checks and JSON persistence.

Every function is deterministic for a given ``seed`` and returns sorted ``int64`` arrays of
positions into the dataset. ``ratios`` map split names to fractions that sum to 1, e.g.
``{"train": 0.7, "val": 0.15, "test": 0.15}``; splits are carved out one at a time (every split
after the first, in order, from what is left), so sizes match the ratios up to rounding and the
first split takes the remainder.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from medcore.errors import DataError
from medcore.io import atomic_write_text, json_default

__all__ = [
    "SplitLeakError",
    "check_no_leak",
    "group_split",
    "load_splits",
    "multilabel_stratified_split",
    "nested_validation",
    "save_splits",
    "stratified_group_kfold",
    "stratified_split",
]

Splits = dict[str, np.ndarray]
# Takes ``fraction`` of the items at the given positions: returns (kept, taken) positions.
_TwoWaySplit = Callable[[np.ndarray, float, int], tuple[np.ndarray, np.ndarray]]

_FORMAT = "medcore.data.splits"
_VERSION = 1


class SplitLeakError(ValueError):
    """A group (e.g. a patient) has samples in more than one split."""


def _carve(n_items: int, ratios: Mapping[str, float], two_way: _TwoWaySplit, seed: int) -> Splits:
    """Positions ``0 .. n_items - 1`` divided according to ``ratios`` by repeated two-way splits."""
    if len(ratios) < 2 or any(r <= 0 for r in ratios.values()):
        raise ValueError(f"ratios need at least two splits, all positive, got {dict(ratios)}")
    if abs(sum(ratios.values()) - 1.0) > 1e-6:
        raise ValueError(f"ratios must sum to 1, got {sum(ratios.values())}")
    if n_items < len(ratios):
        raise ValueError(
            f"cannot split {n_items} samples into {', '.join(ratios)}: "
            f"each split needs at least one sample"
        )
    first, *others = ratios
    remaining = np.arange(n_items)
    left = 1.0
    out: Splits = {}
    for name in others:
        # Fraction of what is left, so that the split is ratios[name] of the whole.
        remaining, taken = two_way(remaining, ratios[name] / left, seed)
        out[name] = np.sort(taken).astype(np.int64)
        left -= ratios[name]
    out[first] = np.sort(remaining).astype(np.int64)
    return {name: out[name] for name in ratios}


def _stratified_two_way(labels: np.ndarray | None) -> _TwoWaySplit:
    """Two-way split stratified on ``labels`` (unstratified when None or when impossible)."""

    def split(positions: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        reason = None
        if labels is not None:
            try:
                return tuple(
                    train_test_split(
                        positions, test_size=fraction, random_state=seed, stratify=labels[positions]
                    )
                )
            except ValueError as err:  # typically a class with a single member
                reason = err
        try:
            parts = tuple(train_test_split(positions, test_size=fraction, random_state=seed))
        except ValueError as err:  # a part would be empty: say so in our words, not sklearn's
            raise ValueError(
                f"cannot take a fraction {fraction:.3g} of {positions.size} samples "
                f"with both parts non-empty"
            ) from err
        if reason is not None:  # a split beats a crash
            warnings.warn(
                f"cannot stratify ({reason}); splitting this part without stratification",
                stacklevel=4,
            )
        return parts

    return split


def stratified_split(
    labels: Sequence | np.ndarray, ratios: Mapping[str, float], seed: int
) -> Splits:
    """Sample indices per split, keeping class proportions of ``labels`` (one label per sample).

    If a class is too small to stratify a step (fewer than two members, or more classes than
    items to take), that step falls back to a plain random split with a warning.
    """
    labels = np.asarray(labels)
    return _carve(labels.shape[0], ratios, _stratified_two_way(labels), seed)


def multilabel_stratified_split(Y: np.ndarray, ratios: Mapping[str, float], seed: int) -> Splits:
    """Sample indices per split, keeping the prevalence of every label of multi-hot ``Y [n, c]``.

    Uses iterative stratification (``MultilabelStratifiedShuffleSplit`` from
    ``iterative-stratification``).
    """
    Y = np.asarray(Y)
    if Y.ndim != 2:
        raise ValueError(f"Y must be a multi-hot [n, c] matrix, got shape {Y.shape}")

    def split(positions: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        splitter = MultilabelStratifiedShuffleSplit(
            n_splits=1, test_size=fraction, random_state=seed
        )
        kept, taken = next(splitter.split(np.zeros((positions.size, 1)), Y[positions]))
        return positions[kept], positions[taken]

    return _carve(Y.shape[0], ratios, split, seed)


def _majority_label(labels: np.ndarray, group_codes: np.ndarray, num_groups: int) -> np.ndarray:
    """The most frequent label of each group (ties go to the smallest label)."""
    values, label_codes = np.unique(labels, return_inverse=True)
    counts = np.zeros((num_groups, values.size), dtype=np.int64)
    np.add.at(counts, (group_codes, label_codes), 1)
    return values[counts.argmax(1)]


def group_split(
    groups: Sequence | np.ndarray,
    ratios: Mapping[str, float],
    seed: int,
    stratify: Sequence | np.ndarray | None = None,
) -> Splits:
    """Sample indices per split with every group (e.g. patient) in exactly one split.

    The ratios apply to the number of groups, not samples. With ``stratify`` (one label per
    sample) each group is labelled with its majority label and the groups are stratified on it.
    """
    group_values, group_codes = np.unique(np.asarray(groups), return_inverse=True)
    group_labels = (
        None
        if stratify is None
        else _majority_label(np.asarray(stratify), group_codes, group_values.size)
    )
    by_group = _carve(group_values.size, ratios, _stratified_two_way(group_labels), seed)
    return {
        name: np.flatnonzero(np.isin(group_codes, chosen)).astype(np.int64)
        for name, chosen in by_group.items()
    }


def stratified_group_kfold(
    y: Sequence | np.ndarray, groups: Sequence | np.ndarray, n_splits: int = 5, seed: int = 42
) -> list[Splits]:
    """``n_splits`` folds of ``{"train", "test"}`` indices, group-disjoint and stratified on ``y``.

    Uses scikit-learn's ``StratifiedGroupKFold(shuffle=True, random_state=seed)``; every sample is
    in exactly one test fold.
    """
    y = np.asarray(y)
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [
        {"train": np.sort(train).astype(np.int64), "test": np.sort(test).astype(np.int64)}
        for train, test in folds.split(np.zeros((y.shape[0], 1)), y, np.asarray(groups))
    ]


def nested_validation(
    train_idx: Sequence[int] | np.ndarray,
    y: Sequence | np.ndarray | None,
    groups: Sequence | np.ndarray,
    val_fraction: float = 0.3,
    seed: int = 42,
) -> tuple[np.ndarray, np.ndarray]:
    """A fold's training indices divided into (train, validation), group-disjoint.

    ``y`` and ``groups`` describe the whole dataset and are indexed with ``train_idx``; the
    validation part holds about ``val_fraction`` of the fold's groups, stratified on the groups'
    majority ``y`` (unstratified when ``y`` is None).
    """
    train_idx = np.asarray(train_idx, dtype=np.int64)
    parts = group_split(
        np.asarray(groups)[train_idx],
        {"train": 1.0 - val_fraction, "val": val_fraction},
        seed,
        stratify=None if y is None else np.asarray(y)[train_idx],
    )
    return np.sort(train_idx[parts["train"]]), np.sort(train_idx[parts["val"]])


def check_no_leak(splits: Mapping[str, np.ndarray], groups: Sequence | np.ndarray) -> None:
    """Raise :class:`SplitLeakError` if any group has samples in two of the ``splits``."""
    groups = np.asarray(groups)
    members = {
        name: set(np.unique(groups[np.asarray(idx)]).tolist()) for name, idx in splits.items()
    }
    for a, b in combinations(members, 2):
        shared = sorted(members[a] & members[b], key=str)
        if shared:
            shown = ", ".join(map(repr, shared[:10]))
            more = f" and {len(shared) - 10} more" if len(shared) > 10 else ""
            raise SplitLeakError(f"groups {shown}{more} are in both {a!r} and {b!r}")


def _validate_splits(splits: Any, where: str) -> Splits:
    """``splits`` with every index list as an int64 array, or a ValueError naming ``where``."""
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError(f"{where}: expected a non-empty mapping of split name to indices")
    out: Splits = {}
    for name, idx in splits.items():
        arr = np.asarray(idx) if isinstance(idx, list | np.ndarray) else None
        valid = (
            isinstance(name, str)
            and arr is not None
            and arr.ndim == 1
            # An empty list comes back from JSON as float64; any other dtype must be integral.
            and (arr.size == 0 or (arr.dtype.kind in "iu" and arr.min() >= 0))
        )
        if not valid:
            raise ValueError(f"{where}[{name!r}]: expected a flat list of non-negative integers")
        out[name] = arr.astype(np.int64)
    return out


def save_splits(
    path: str | os.PathLike,
    splits: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    meta: Mapping[str, Any] | None = None,
    ids: Sequence | np.ndarray | None = None,
) -> None:
    """Write splits (one mapping, or a list of them for k folds) to a JSON file atomically.

    ``ids`` (one identifier per dataset index, e.g. study ids) stores next to each split the ids
    of its members, so that :func:`load_splits` can detect a reordered dataset. ``meta`` is any
    JSON-serialisable provenance (seed, ratios, data version). The file is written to a temporary
    file in the same directory and renamed over ``path``, so readers never see half a file.
    """
    folds = isinstance(splits, Sequence)
    parts = [_validate_splits(s, "splits") for s in (splits if folds else [splits])]
    doc: dict[str, Any] = {"format": _FORMAT, "version": _VERSION}
    indices = [{name: idx.tolist() for name, idx in part.items()} for part in parts]
    doc["splits"] = indices if folds else indices[0]
    if ids is not None:
        id_array = np.asarray(ids)
        for part in parts:
            for name, idx in part.items():
                if idx.size and idx.max() >= id_array.size:
                    raise ValueError(
                        f"split {name!r} has index {idx.max()} but only {id_array.size} ids"
                    )
        named = [
            {name: [str(i) for i in id_array[idx]] for name, idx in part.items()} for part in parts
        ]
        doc["ids"] = named if folds else named[0]
    doc["meta"] = dict(meta or {})
    text = json.dumps(doc, default=json_default)

    atomic_write_text(path, text)


def _check_ids(path: Path, parts: list[Splits], stored: Any, ids: np.ndarray) -> None:
    """ValueError unless the stored member ids of every split equal ``ids[index]``."""
    if not isinstance(stored, list) or len(stored) != len(parts):
        raise ValueError(f"{path}: 'ids' does not have the structure of 'splits'")
    for part, stored_ids in zip(parts, stored, strict=True):
        for name, idx in part.items():
            if idx.size and idx.max() >= ids.size:
                raise ValueError(f"{path}: split {name!r} indexes past the {ids.size} ids given")
            expected = stored_ids.get(name) if isinstance(stored_ids, dict) else None
            if [str(i) for i in ids[idx]] != expected:
                raise ValueError(
                    f"{path}: ids of split {name!r} differ from the dataset's; "
                    "the dataset was reordered or changed since the split was saved"
                )


def load_splits(
    path: str | os.PathLike,
    *,
    ids: Sequence | np.ndarray | None = None,
    with_meta: bool = False,
) -> Splits | list[Splits] | tuple[Splits | list[Splits], dict[str, Any]]:
    """Read a file written by :func:`save_splits`: the same structure with int64 numpy arrays.

    With ``ids`` (the current dataset's identifiers, one per index) the stored member ids are
    compared with ``ids[index]`` and a ValueError is raised if the dataset order changed. With
    ``with_meta`` the result is ``(splits, meta)``. A malformed file raises ValueError.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a valid JSON split file ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a medcore split file (missing format {_FORMAT!r})")
    if doc.get("version") != _VERSION:
        raise ValueError(f"{path}: unsupported split file version {doc.get('version')!r}")
    raw = doc.get("splits")
    folds = isinstance(raw, list)
    if folds and not raw:
        raise ValueError(f"{path}: 'splits' is an empty list")
    parts = [_validate_splits(s, f"{path}: splits") for s in (raw if folds else [raw])]
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: 'meta' must be an object")

    if ids is not None:
        stored = doc.get("ids")
        if stored is None:
            warnings.warn(f"{path}: no ids stored, cannot check the dataset order", stacklevel=2)
        else:
            _check_ids(path, parts, stored if folds else [stored], np.asarray(ids))
    splits = parts if folds else parts[0]
    return (splits, meta) if with_meta else splits


def load_or_make_splits(
    path: str | os.PathLike,
    make: Callable[[], Splits | list[Splits]],
    *,
    ids: Sequence | np.ndarray,
    meta: Mapping[str, Any] | None = None,
    is_main: bool = True,
) -> Splits | list[Splits]:
    """The run's splits: read from ``path`` when it exists (checked against ``ids``), else made
    by ``make()`` and saved there by the main process only.

    Every rank calls ``make`` (it must be seeded, so all ranks agree) instead of waiting on a
    file the main rank writes. A saved file that no longer matches the data is a one-line
    :class:`~medcore.errors.DataError` telling the user to start a new run.
    """
    path = Path(path)
    if path.is_file():
        try:
            return load_splits(path, ids=ids)
        except ValueError as exc:
            why = str(exc).removeprefix(f"{path}: ")
            raise DataError(path, f"{why} (start a new run with another --output-dir)") from None
    splits = make()
    if is_main:
        save_splits(path, splits, meta=meta, ids=ids)
    return splits
