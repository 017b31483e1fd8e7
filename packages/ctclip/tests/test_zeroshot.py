"""Zero-shot probabilities on a hand-made case, and the evaluation summary against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from ctclip.evaluate import format_summary, summarize, write_report
from ctclip.findings import FINDINGS, prompt_pairs
from ctclip.predict import zero_shot_probs


def test_prompt_pairs_follow_the_findings_order():
    pairs = prompt_pairs()
    assert len(pairs) == 18 and pairs[9] == (
        "Lung nodule is present.",
        "Lung nodule is not present.",
    )


def test_softmax_over_each_prompt_pair_by_hand():
    # Prompts of finding 0 along e0 (present) / e1 (absent); finding 1 along e2 / e3.
    prompts = torch.eye(4).view(2, 2, 4)
    angles = torch.tensor([0.0, math.pi / 4, math.pi / 2])
    feats = torch.stack(
        [torch.cos(angles), torch.sin(angles), torch.zeros(3), torch.ones(3)], dim=1
    )
    probs = zero_shot_probs(feats, prompts, logit_scale=10.0)
    # P(present) = exp(10 cos a) / (exp(10 cos a) + exp(10 sin a)) = sigmoid(10 (cos a - sin a))
    expected0 = torch.sigmoid(10 * (torch.cos(angles) - torch.sin(angles)))
    torch.testing.assert_close(probs[:, 0], expected0)
    torch.testing.assert_close(probs[:, 1], torch.sigmoid(torch.tensor(-10.0)).expand(3))


def test_summary_matches_sklearn_and_leaves_out_single_class_findings():
    rng = np.random.default_rng(0)
    n = 40
    labels = np.zeros((n, 18), dtype=int)
    labels[:, 9] = rng.integers(0, 2, n)
    labels[:, 12] = rng.integers(0, 2, n)
    probs = np.clip(labels * 0.3 + rng.random((n, 18)) * 0.7, 0, 1)
    summary = summarize(probs, labels, n_boot=200, seed=1)
    rows = {r["finding"]: r for r in summary["per_finding"]}
    for j in (9, 12):
        row = rows[FINDINGS[j]]
        assert row["auc"] == pytest.approx(roc_auc_score(labels[:, j], probs[:, j]))
        assert row["f1"] == pytest.approx(f1_score(labels[:, j], probs[:, j] >= 0.5))
        assert row["auc_ci_low"] <= row["auc"] <= row["auc_ci_high"]
    assert np.isnan(rows["Cardiomegaly"]["auc"])
    assert summary["num_evaluated"] == 2
    mean = summary["mean"]
    assert mean["auc"] == pytest.approx(np.mean([rows[FINDINGS[j]]["auc"] for j in (9, 12)]))
    assert mean["f1"] == pytest.approx(np.mean([rows[FINDINGS[j]]["f1"] for j in (9, 12)]))
    assert mean["auc_ci_low"] < mean["auc"] < mean["auc_ci_high"]
    text = format_summary(summary)
    assert (
        "Lung nodule" in text
        and "2 of 18 findings evaluated" in text
        and "Cardiomegaly" not in text
    )


def test_report_files(tmp_path):
    labels = np.tile([[1], [0]], (5, 18))
    labels[:, 0] = 0
    probs = np.linspace(0, 1, 10)[:, None].repeat(18, 1)
    summary = summarize(probs, labels, n_boot=10)
    paths = write_report(tmp_path, [f"v{i}" for i in range(10)], probs, labels, summary)
    assert paths["roc"].stat().st_size > 0
    import json

    data = json.loads(paths["metrics_json"].read_text())
    assert data["num_evaluated"] == 17 and data["per_finding"][0]["auc"] is None
    import pandas as pd

    assert list(pd.read_csv(paths["predictions"]).columns) == ["VolumeName", *FINDINGS]


def test_thresholds_chosen_on_validation_maximise_youden_and_apply_per_finding():
    from sklearn.metrics import roc_curve

    from ctclip.evaluate import choose_thresholds

    rng = np.random.default_rng(2)
    n = 60
    labels = np.zeros((n, 18), dtype=int)
    labels[:, 3] = rng.integers(0, 2, n)
    labels[:, 7] = rng.integers(0, 2, n)
    # finding 3 scores well around 0.2, finding 7 around 0.8: no single cut-off fits both
    probs = np.full((n, 18), 0.5)
    probs[:, 3] = 0.1 + 0.2 * labels[:, 3] + rng.normal(0, 0.05, n)
    probs[:, 7] = 0.7 + 0.2 * labels[:, 7] + rng.normal(0, 0.05, n)
    thresholds, one_class = choose_thresholds(probs, labels)
    assert len(one_class) == 16 and thresholds[0] == 0.5
    for j in (3, 7):
        fpr, tpr, _ = roc_curve(labels[:, j], probs[:, j])
        best = (tpr - fpr).max()
        y, s = labels[:, j], probs[:, j] >= thresholds[j]
        assert s[y == 1].mean() - s[y == 0].mean() == pytest.approx(best)
    fixed = summarize(probs, labels, n_boot=0)
    tuned = summarize(probs, labels, threshold=thresholds, n_boot=0)
    rows = {r["finding"]: r for r in tuned["per_finding"]}
    assert rows[FINDINGS[3]]["threshold"] == thresholds[3]
    assert rows[FINDINGS[3]]["f1"] == pytest.approx(
        f1_score(labels[:, 3], probs[:, 3] >= thresholds[3])
    )
    assert tuned["mean"]["f1"] > fixed["mean"]["f1"] + 0.2  # 0.5 misses finding 3's positives
    assert tuned["threshold"] == "per finding" and fixed["threshold"] == 0.5


def test_predict_reads_the_volumes_in_loader_workers_in_dataset_order(tiny_demo, tiny_cfg):
    """Through medcore's inference loop with 2 DataLoader workers (each opens the HDF5 file
    itself): the probabilities of a plain loop over the volumes read directly, in order."""
    import h5py

    from ctclip.config import CTClipConfig
    from ctclip.data import CTVolumeDataset, read_labels
    from ctclip.model import build_model
    from ctclip.predict import predict, prompt_features
    from ctclip.text import Tokenizer

    torch.manual_seed(0)
    model = build_model(CTClipConfig(model=tiny_cfg()), load_weights=False).eval()
    labels = read_labels(tiny_demo / "ct_rate/valid_predicted_labels.csv")
    names = list(labels.index)[::-1]  # not the file's order
    ds = CTVolumeDataset(tiny_demo / "ct_volumes.h5", labels, names)
    tokenizer = Tokenizer(model.context_length)
    probs, got_labels = predict(
        model, ds, tokenizer, torch.device("cpu"), batch_size=4, num_workers=2
    )

    with torch.no_grad(), h5py.File(tiny_demo / "ct_volumes.h5", "r") as h5:
        volumes = torch.stack([torch.from_numpy(h5["volumes"][n][()]) for n in names])
        feats = model.encode_volume(volumes)
        expected = zero_shot_probs(feats, prompt_features(model, tokenizer), model.scale())
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(got_labels, torch.tensor(labels.loc[names].to_numpy(), dtype=torch.float32))
