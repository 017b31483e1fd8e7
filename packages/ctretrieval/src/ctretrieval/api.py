"""``ctretrieval.load``: a trained retrieval model in Python, applied to raw CT studies.

::

    import ctretrieval

    model = ctretrieval.load("runs/ctretrieval/<run>")    # or a .pt, an exported folder, hf-hub:
    emb = model.embed(["ct_001.nii.gz", "dicom/ct_002/"])  # Embeddings: names, [n, e], probs
    index = model.build_index(["archive/a.nii.gz", "archive/b/"])  # or ctretrieval.Index.read
    print(model.search("new.nii.gz", index, k=5))         # the rows ctretrieval-search prints

Every source is read by medcore (:mod:`medcore.weights.sources`) into the exported form
(:func:`ctretrieval.export.describe` for a run or a checkpoint), so a run, its checkpoint and
its exported folder load the same model with the same settings. Raw studies go through
:mod:`ctretrieval.predict`: the readers and preprocess's per-volume function, then the
evaluation's embedding loop in the training precision. No trainer or Lightning code is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ctretrieval.config import EvalConfig, PreprocessConfig
from ctretrieval.export import PREPROCESS_KEYS, describe, find_in_run
from ctretrieval.index import Index
from ctretrieval.model import KINDS, Proximity100x100
from ctretrieval.predict import (
    Embeddings,
    check_model,
    embed_volumes,
    load_model,
    named_items,
    preprocess_for,
    ranked,
    stored_query,
    weights_fingerprint,
)
from medcore.config import from_dict
from medcore.engine import inference
from medcore.errors import DataError
from medcore.runtime.device import resolve_device
from medcore.weights.export import ModelExport
from medcore.weights.sources import model_export, read_model_source

RESULT_COLUMNS = [
    "query",
    "query_findings",
    "rank",
    "id",
    "similarity",
    "findings",
    "shared_findings",
]


class RetrievalModel:
    """A trained ctretrieval model in eval mode, with its preprocessing and eval settings.

    ``model``: the :class:`~ctretrieval.model.Proximity100x100` network; ``export``: what it was
    loaded from (config.json's entries); ``preprocess``: how a raw study becomes its input;
    ``class_names``: the finding slots of its outputs ("no finding" last); ``threshold`` and
    ``knn_k``: its ``eval`` settings for the findings of a query.
    """

    def __init__(
        self, model: Proximity100x100, export: ModelExport, device: torch.device, source: str
    ) -> None:
        self.model = model
        self.export = export
        self.device = device
        self.source = source
        self.class_names = list(export.labels)
        prep = {k: export.preprocessing[k] for k in PREPROCESS_KEYS}
        self.preprocess = from_dict(PreprocessConfig, prep)
        self.eval = from_dict(EvalConfig, export.extras.get("eval_config", {}))
        recorded = {k: export.extras.get(k) for k in ("precision", "trainer_config")}
        self.precision = inference.checkpoint_precision(
            {k: v for k, v in recorded.items() if v}, device
        )
        self.fingerprint = weights_fingerprint(export.tensors)

    def __repr__(self) -> str:
        return (
            f"RetrievalModel({self.export.kind}, {self.model.embedding_size}-d, "
            f"findings {self.class_names}, from {self.source!r}, on {self.device})"
        )

    def _options(self, batch_size: int | None) -> inference.PredictOptions:
        size = batch_size or self.eval.batch_size
        if size < 1:
            raise DataError("batch_size", f"must be at least 1, got {size}")
        return inference.PredictOptions(
            self.device, self.precision, size, num_workers=0, shard=False, desc=None
        )

    def embed(
        self,
        volumes: Any,
        names: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        store_settings: dict[str, Any] | None = None,
    ) -> Embeddings:
        """Embeddings (and head probabilities) of raw volumes, preprocessed as
        ``ctretrieval-preprocess`` stores them.

        ``volumes``: a DICOM folder, a NIfTI file, an HU array ``[slices, rows, columns]`` in
        the readers' orientation, a :class:`medcore.volumes.geometry.Volume`, or a list / dict
        (name -> volume) of these. An unreadable one is named on stderr, left out and listed
        in ``skipped``; none readable is a DataError. ``store_settings``: preprocess as this
        volume store was (an index's ``meta["store_settings"]``) instead of as the model was
        trained. ``batch_size`` volumes are in memory at a time (default ``eval.batch_size``).
        """
        prep = preprocess_for(self.preprocess, store_settings)
        return embed_volumes(
            self.model, named_items(volumes, names), prep, self._options(batch_size)
        )

    def build_index(
        self,
        items: Any,
        names: Sequence[str] | None = None,
        labels: Any = None,
        *,
        batch_size: int | None = None,
    ) -> Index:
        """An index of an archive, the same as ``ctretrieval-index`` writes (``.write(path)``
        saves it; :meth:`Index.read` reads a saved one back).

        ``items``: raw volumes (as :meth:`embed` takes them), :class:`Embeddings`, or an
        embeddings array ``[n, e]`` of this model with its ``names``. ``labels``: optional
        0/1 findings ``[n, len(class_names)]`` shown in search results.
        """
        if isinstance(items, Embeddings):
            emb, ids = items.embeddings, list(names or items.names)
        elif isinstance(items, (np.ndarray, torch.Tensor)) and items.ndim == 2:
            emb = torch.as_tensor(items, dtype=torch.float32)
            ids = [str(n) for n in names] if names is not None else []
            if len(ids) != len(emb):
                raise DataError("names", f"{len(ids)} names for {len(emb)} embeddings")
        else:
            embedded = self.embed(items, names, batch_size=batch_size)
            emb, ids = embedded.embeddings, embedded.names
        emb = torch.as_tensor(emb, dtype=torch.float32)
        if emb.shape[1] != self.model.embedding_size:
            raise DataError(
                "embeddings", f"{emb.shape[1]}-d, this model gives {self.model.embedding_size}-d"
            )
        if len(set(ids)) != len(ids):
            raise DataError("names", "repeated names: every study of an index needs its own")
        y = np.zeros((len(ids), len(self.class_names)), dtype=np.uint8)
        if labels is not None:
            y = np.asarray(labels)
            if y.shape != (len(ids), len(self.class_names)) or not np.isin(y, (0, 1)).all():
                raise DataError(
                    "labels",
                    f"expected 0/1 findings [{len(ids)}, {len(self.class_names)}] "
                    f"({', '.join(self.class_names)}), got shape {y.shape}",
                )
        meta = {
            "checkpoint": self.source,
            "kind": self.export.kind,
            "weights": self.fingerprint,
            "class_names": self.class_names,
            "preprocess_config": {k: self.export.preprocessing[k] for k in PREPROCESS_KEYS},
            "eval_config": self.export.extras.get("eval_config", {}),
            "store_settings": {
                k: self.export.preprocessing[k]
                for k in ("target_shape", "hu_window", "target_spacing", "orientation")
            },
            "volumes": None,
        }
        has = np.full(len(ids), labels is not None)
        return Index(np.asarray(ids, dtype=str), emb.numpy(), y.astype(np.uint8), has, meta)

    def search(
        self,
        queries: Any,
        index: Index | str | Path,
        k: int = 10,
        *,
        threshold: float | None = None,
        knn_k: int | None = None,
    ) -> pd.DataFrame:
        """The ``k`` most similar studies of ``index`` for each query, as ``ctretrieval-search``
        lists them, one row per (query, rank): ``query``, ``query_findings``, ``rank``, ``id``,
        ``similarity`` (cosine), ``findings``, ``shared_findings``.

        ``queries``: ids of the index (the study itself left out), raw volumes (as
        :meth:`embed` takes them; preprocessed as the index's archive was), or
        :class:`Embeddings`. ``index``: an :class:`Index` or an index file. A query's findings
        come from the head at ``threshold``, or the vote of its ``knn_k`` nearest labelled
        studies (defaults: the model's ``eval`` settings).
        """
        if not isinstance(index, Index):
            index = Index.read(index)
        if k < 1:
            raise DataError("k", f"must be at least 1, got {k}")
        check_model(index, self.fingerprint, self.model.embedding_size, "this model")
        settings = {
            "threshold": self.eval.threshold if threshold is None else threshold,
            "knn_k": self.eval.knn_k if knn_k is None else knn_k,
        }
        known = {str(i) for i in index.ids}
        if isinstance(queries, Embeddings):
            embedded, pairs = queries, [(n, None) for n in queries.names]
        else:
            if isinstance(queries, (str, Path)) and str(queries) in known:
                queries = [str(queries)]
            pairs = named_items(queries)
            raw = [(n, item) for n, item in pairs if not (isinstance(item, str) and item in known)]
            embedded = Embeddings([], torch.zeros(0))
            if raw:
                prep = preprocess_for(self.preprocess, index.meta.get("store_settings"))
                embedded = embed_volumes(self.model, raw, prep, self._options(None))
        rows: dict[str, list[dict[str, Any]]] = {}
        for i, name in enumerate(embedded.names):
            probs = None if embedded.probs is None else embedded.probs[i]
            rows[name] = self._rows(
                name, ranked(index, embedded.embeddings[i], k, probs=probs, **settings)
            )
        for name, item in pairs:
            if isinstance(item, str) and item in known:  # a study of the index, by its id
                q_emb, row, hot = stored_query(index, item)
                rows[name] = self._rows(
                    name, ranked(index, q_emb, k, exclude=row, q_hot=hot, **settings)
                )
        results = [r for name, _ in pairs for r in rows.get(name, [])]
        return pd.DataFrame(results, columns=RESULT_COLUMNS)

    @staticmethod
    def _rows(query: str, result: tuple[list[str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        found, rows = result
        return [{"query": query, "query_findings": ";".join(found), **r} for r in rows]


def load(source: str | Path, device: str = "auto") -> RetrievalModel:
    """The ctretrieval model of ``source``, in eval mode on ``device``.

    ``source``: a run directory (its best checkpoint: see :mod:`ctretrieval.export`), a
    checkpoint (``.pt``), an exported folder (or its ``model.safetensors`` beside its
    ``config.json``), or ``hf-hub:ORG/NAME[@REV]`` (read from the Hugging Face cache; fetched
    only when online and ``HF_HUB_OFFLINE`` is unset). Another package's model, a bare weights
    file without its config, or a folder with neither raises
    :class:`medcore.weights.sources.ModelSourceError`.
    """
    read = read_model_source(source, KINDS, find_in_run=find_in_run)
    export = model_export(read, describe)
    dev = resolve_device(device)
    model, _ = load_model(read.path, dev, state=export.checkpoint())
    if read.origin == "run":
        print(f"note: {source}: the run's model is {read.path.name}", file=sys.stderr)
    return RetrievalModel(model, export, dev, str(source))  # type: ignore[arg-type]
