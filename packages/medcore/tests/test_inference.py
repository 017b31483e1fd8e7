"""load_model, checkpoint_precision, predict (single process and sharded), export_best."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medcore.engine.inference import PredictOptions, checkpoint_precision, load_model, predict
from medcore.errors import CheckpointError
from medcore.weights.checkpoint import export_best, load_safetensors, save_checkpoint


def _build(state):
    return nn.Linear(state["model_config"]["width"], 2)


def _save(tmp_path: Path, kind: str = "pkg.Linear", width: int = 3, **extra) -> Path:
    model = nn.Linear(width, 2)
    state = {"model": model.state_dict(), "model_config": {"width": width}, **extra}
    return save_checkpoint(state, tmp_path / f"{kind}-{width}.pt", kind=kind)


def test_load_model_rebuilds_and_checks(tmp_path: Path) -> None:
    path = _save(tmp_path)
    model, state = load_model(path, "pkg.", _build)
    assert not model.training and torch.equal(model.weight, state["model"]["weight"])
    with pytest.raises(CheckpointError, match=r"this is a pkg\.Linear checkpoint, not other"):
        load_model(path, "other.", _build)
    with pytest.raises(CheckpointError, match="has no model_config"):
        bare = save_checkpoint({"model": {}}, tmp_path / "bare.pt", kind="pkg.Linear")
        load_model(bare, "pkg.", _build)
    wrong = {**torch.load(path, weights_only=True), "model_config": {"width": 4}}
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_model(path, ["pkg.Linear"], _build, state=wrong)


def test_checkpoint_precision() -> None:
    cpu = torch.device("cpu")
    assert checkpoint_precision({"precision": "bf16-mixed"}, cpu).dtype == torch.bfloat16
    assert not checkpoint_precision({"precision": "16-mixed"}, cpu).enabled  # no fp16 on CPU
    assert not checkpoint_precision({"precision": "32-true"}, cpu).enabled
    policy = checkpoint_precision({"trainer_config": {"amp": True, "amp_dtype": "bf16"}}, cpu)
    assert policy.enabled and policy.dtype == torch.bfloat16 and not policy.use_scaler


def test_predict_matches_the_model_in_order() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(11, 3)
    data = TensorDataset(x, torch.arange(11))
    out = predict(
        model,
        data,
        lambda m, b: {"y": m(b[0]), "i": b[1], "tag": [f"s{int(i)}" for i in b[1]]},
        PredictOptions(torch.device("cpu"), batch_size=4, num_workers=0),
    )
    torch.testing.assert_close(out["y"], model(x).detach())
    assert out["i"].tolist() == list(range(11)) and out["tag"][10] == "s10"
    assert model.training  # left as it was
    torch.manual_seed(5)
    predict(model, data, lambda m, b: m(b[0]), PredictOptions(torch.device("cpu"), num_workers=2))
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))  # the caller's random stream is untouched


def test_export_best_exports_the_best_weights(tmp_path: Path) -> None:
    best = _save(tmp_path, width=3)
    model = nn.Linear(3, 2)
    chosen = export_best(best, None, model, tmp_path / "model.safetensors", {"kind": "pkg.L"})
    assert chosen == best
    weights = load_safetensors(tmp_path / "model.safetensors")
    torch.testing.assert_close(
        weights["weight"], torch.load(best, weights_only=True)["model"]["weight"]
    )
    torch.testing.assert_close(model.weight.detach(), weights["weight"])
    with pytest.raises(CheckpointError, match="neither a best nor a final"):
        export_best(tmp_path / "missing.pt", None, model, tmp_path / "x.safetensors")


def _sharded_predict(rank: int, world_size: int, out: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(11, 3)
    seen: list[int] = []

    def forward(m, batch):
        seen.extend(int(i) for i in batch[1])
        return m(batch[0])

    y = predict(
        model,
        TensorDataset(x, torch.arange(11)),
        forward,
        PredictOptions(torch.device("cpu"), batch_size=4, num_workers=0),
    )
    torch.save({"y": y, "seen": seen}, Path(out) / f"rank{rank}.pt")


def test_predict_shards_across_ranks_and_gathers_in_order(tmp_path: Path) -> None:
    from medcore.testing import run_gloo

    run_gloo(_sharded_predict, 2, str(tmp_path))
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    expected = model(torch.randn(11, 3)).detach()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.testing.assert_close(r0["y"], expected)
    torch.testing.assert_close(r1["y"], expected)
    assert r0["seen"] == [0, 1, 2, 3, 4] and r1["seen"] == [5, 6, 7, 8, 9, 10]  # each its shard
