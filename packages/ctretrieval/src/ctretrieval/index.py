"""``ctretrieval-index``: embed an archive once, into an index file ``ctretrieval-search`` reads.

An index is one ``.npz`` file (written atomically, read without pickle): ``ids`` [n] strings,
``embeddings`` [n, e] float32 (L2-normalised), ``labels`` [n, c] uint8 and ``has_labels`` [n]
(studies of the archive without a row in the labels CSV have no findings to show), and ``meta``,
a JSON string with the class names, the checkpoint, a fingerprint of its weights and the
store's preprocessing settings. :class:`Index` is the same in memory.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctretrieval.config import DataConfig, PreprocessConfig
from ctretrieval.data import (
    CTVolumeDataset,
    check_store,
    locate_data,
    normalise_id,
    read_labels,
    volume_ids,
)
from ctretrieval.metrics import embed
from ctretrieval.predict import load_model, weights_fingerprint
from medcore.config import from_dict
from medcore.engine.inference import PredictOptions, checkpoint_precision
from medcore.errors import DataError
from medcore.io import atomic_path
from medcore.runtime.device import resolve_device
from medcore.volumes.store import read_settings

INDEX_FORMAT = "ctretrieval.index/1"


@dataclass
class Index:
    """An archive's embeddings: what an index file holds, in memory (see the module docstring).

    ``ctretrieval-index`` writes one from a volume store, ``ctretrieval.load(...).build_index``
    from raw volumes or embeddings; :meth:`read` and :meth:`write` move it to and from a file.
    """

    ids: np.ndarray  # [n] str
    embeddings: np.ndarray  # [n, e] float32, L2-normalised
    labels: np.ndarray  # [n, c] uint8, in the order of meta["class_names"]
    has_labels: np.ndarray  # [n] bool
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def read(cls, path: str | Path) -> Index:
        """The index file ``path``; a missing or foreign file is a one-line DataError."""
        path = Path(path)
        if not path.is_file():
            raise DataError(path, "index file not found (build one with ctretrieval-index)")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("ids", "embeddings", "labels", "has_labels", "meta")}
            arrays["meta"] = json.loads(str(arrays["meta"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            why = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
            raise DataError(path, f"not a ctretrieval index ({why})") from None
        if arrays["meta"].get("format") != INDEX_FORMAT:
            raise DataError(path, "not a ctretrieval index (unknown format)")
        return cls(**arrays)

    def write(self, path: str | Path) -> Path:
        """Write the index to ``path`` (``.npz``, atomically, no pickled objects)."""
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                ids=np.asarray(self.ids, dtype=str),
                embeddings=np.asarray(self.embeddings, dtype=np.float32),
                labels=np.asarray(self.labels, dtype=np.uint8),
                has_labels=np.asarray(self.has_labels, dtype=bool),
                meta=np.asarray(json.dumps({**self.meta, "format": INDEX_FORMAT})),
            )
        return path


def build_index(
    checkpoint: Path,
    h5: Path,
    labels_csv: Path | None,
    output: Path,
    device: torch.device,
    batch_size: int = 4,
) -> int:
    """Embed every volume of ``h5`` with ``checkpoint`` into the index file ``output``; its size."""
    model, state = load_model(checkpoint, device)
    dcfg = from_dict(DataConfig, state.get("data_config", {}))
    check_store(h5, from_dict(PreprocessConfig, state.get("preprocess_config", {})))
    keys = volume_ids(h5)
    class_names = list(state.get("class_names", []))
    labels = np.zeros((len(keys), len(class_names)), dtype=np.uint8)
    has = np.zeros(len(keys), dtype=bool)
    if labels_csv is not None and labels_csv.is_file():
        table = read_labels(labels_csv, dcfg)
        rows = {i: r for r, i in enumerate(table.ids)}
        for k, key in enumerate(keys):
            r = rows.get(normalise_id(key, dcfg.id_suffixes))
            if r is not None:
                labels[k], has[k] = table.y[r], True
    data = CTVolumeDataset(h5, keys, labels, np.zeros(len(keys), dtype=np.int64))
    precision = checkpoint_precision(state, device)
    emb = embed(model, data, PredictOptions(device, precision, batch_size, desc="indexing")).emb
    meta = {
        "format": INDEX_FORMAT,
        "checkpoint": str(checkpoint),
        "kind": state.get("kind"),
        "weights": weights_fingerprint(state["model"]),
        "class_names": class_names,
        "preprocess_config": state.get("preprocess_config", {}),
        "eval_config": state.get("eval_config", {}),
        "store_settings": read_settings(h5),  # raw queries are preprocessed with these
        "volumes": str(h5),
    }
    Index(np.asarray(keys, dtype=str), emb.numpy(), labels, has, meta).write(output)
    return len(keys)


def main(args: argparse.Namespace) -> int:
    """``ctretrieval-index`` with parsed arguments (see :mod:`ctretrieval.cli`)."""
    device = resolve_device(args.device)
    h5, csv = args.volumes, args.labels
    if h5 is None:
        _, state = load_model(args.checkpoint, torch.device("cpu"))
        dcfg = from_dict(DataConfig, state.get("data_config", {}))
        if args.data_dir is not None:
            dcfg.data_dir = str(args.data_dir)
        h5, default_csv = locate_data(
            dcfg, from_dict(PreprocessConfig, state.get("preprocess_config", {}))
        )
        csv = csv or default_csv
    n = build_index(args.checkpoint, h5, csv, args.output, device, args.batch_size)
    print(f"indexed {n} studies into {args.output}")
    return 0
