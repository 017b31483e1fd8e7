"""Shared fixtures: a tiny synthetic dataset on disk and the overrides of a tiny CPU config."""

from __future__ import annotations

from pathlib import Path

import pytest

from binensemble.synthetic import write_dataset

# The real classes at toy size: timm's test_* ConvNeXt / ViT, 32 x 32 input (2 x 2 ViT tokens).
TINY = [
    "data.img_size=32",
    "data.eval_batch_size=16",
    "model.convnext_name=test_convnext",
    "model.vit_name=test_vit",
    "model.hidden_dim=32",
    "model.embed_dim=16",
    "trainer.batch_size=8",
    "trainer.num_workers=0",
    "trainer.max_steps_per_epoch=2",
    "knn.ks=[1,3,5]",
]


def _tiny_args(*extra: str) -> list[str]:
    out: list[str] = []
    for item in TINY:
        out += ["--set", item]
    return [*out, *extra]


@pytest.fixture(scope="session")
def tiny_args():
    """``tiny_args(*extra)``: command-line arguments of the tiny config plus ``extra`` (a pure
    function, so any fixture scope may use it)."""
    return _tiny_args


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TrainSet with 14 normal + 10 disease images, TestSet with 6 (labels in TestSet_labels.csv)."""
    root = tmp_path_factory.mktemp("binensemble_data")
    return write_dataset(root, n_normal=14, n_disease=10, n_test=6, size=40, seed=3)


@pytest.fixture(autouse=True)
def _demo_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDCORE_CACHE_DIR", str(tmp_path / "cache"))
