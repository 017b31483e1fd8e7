"""Two CPU processes joined by gloo, as torchrun would start them."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from medcore.config import TrainerConfig
from medcore.engine.task import EvalContext
from medcore.engine.trainer import Trainer
from medcore.metrics.accumulate import MetricAccumulator
from medcore.runtime.distributed import gather_with_grad, make_fabric
from medcore.testing import run_gloo

N = 16


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=gen)
    return TensorDataset(x, x.sum(1, keepdim=True))


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Linear(5, 1)


def _step(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


_COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "all_gather_into_tensor", "reduce")


def _watch_collective_devices(expected: torch.device, seen: list[str]) -> None:
    """Wrap torch.distributed's tensor collectives: each records its tensors' devices and
    fails on one that is not ``expected`` (an NCCL group takes CUDA tensors only)."""
    for name in _COLLECTIVES:
        real = getattr(dist, name)

        def checked(*args, _real=real, _name=name, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [
                t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)
            ]
            for t in tensors:
                seen.append(f"{_name}:{t.device}")
                assert t.device == expected, f"{_name} got a tensor on {t.device}, not {expected}"
            return _real(*args, **kwargs)

        setattr(dist, name, checked)


def _eval_fn(model, ctx: EvalContext) -> dict[str, float]:
    acc = MetricAccumulator(lambda pred, target: {"val/mse": float(((pred - target) ** 2).mean())})
    part = ctx.shard(_data())
    for i in range(0, len(part), 3):
        xb, yb = zip(*[part[j] for j in range(i, min(i + 3, len(part)))], strict=True)
        acc.update(pred=model(torch.stack(xb)), target=torch.stack(yb))
    return acc.compute()


def _ddp_train(rank: int, world_size: int, out: str, watch: bool = False) -> None:
    cfg = TrainerConfig(
        epochs=1,
        batch_size=N // world_size,
        num_workers=0,
        optimizer="sgd",
        momentum=0.0,
        weight_decay=0.0,
        lr=0.5,
        scheduler="none",
        amp=False,
    )
    trainer = Trainer(
        _model(),
        cfg,
        fabric=make_fabric(torch.device("cpu"), cfg),
        train_data=_data(),
        step_fn=_step,
        run_dir=out,
        kind="test.Lin",
        evaluate_fn=lambda m, ctx: {"val/loss": 1.0 + rank, **_eval_fn(m, ctx)},
        show_progress=False,
    )
    seen: list[str] = []
    if watch:
        _watch_collective_devices(trainer.device, seen)
    trainer.fit()
    Path(out, f"collectives_rank{rank}.json").write_text(json.dumps(seen))
    weights = {k: v.tolist() for k, v in trainer.model.state_dict().items()}
    Path(out, f"weights_rank{rank}.json").write_text(json.dumps(weights))


def test_ddp_averages_gradients_and_only_rank0_writes(tmp_path: Path) -> None:
    run_gloo(_ddp_train, 2, str(tmp_path), True)
    w0 = json.loads((tmp_path / "weights_rank0.json").read_text())
    w1 = json.loads((tmp_path / "weights_rank1.json").read_text())
    assert w0 == w1
    # One SGD step on two equal shards = one step on the mean gradient of the whole set.
    ref = _model()
    x, y = _data().tensors
    _step(ref, (x, y)).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.5 * p.grad
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(torch.tensor(w0[key]), value, rtol=1e-5, atol=1e-6)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(x) for x in lines if '"eval"' in x]
    assert len(evals) == 1 and evals[0]["val/loss"] == 1.0  # rank 0's metrics, logged once
    # Each rank evaluated its half; the gathered metric is the single-process one.
    with torch.no_grad():
        trained = _model()
        trained.load_state_dict({k: torch.tensor(v) for k, v in w0.items()})
        single = _eval_fn(trained, EvalContext(0, 1, torch.device("cpu"), None, None, tmp_path))
    assert evals[0]["val/mse"] == pytest.approx(single["val/mse"], rel=1e-6)
    # The logged loss is the mean over the whole global batch, before the step.
    logged = [json.loads(x) for x in lines if '"train/loss"' in x]
    assert len(logged) == 1
    assert logged[0]["train/loss"] == pytest.approx(
        float(_step(_model(), _data().tensors).detach())
    )
    # Every collective got tensors on the trainer's device (CPU here; CUDA under NCCL).
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"collectives_rank{rank}.json").read_text())
        assert seen and all(s.endswith(":cpu") for s in seen)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert (
        names[:2] == ["final.pt", "latest.pt"] and len(names) == 3 and names[2].startswith("model_")
    )


def _gather(rank: int, world_size: int, out: str) -> None:
    feats = torch.arange(6.0).reshape(3, 2).add(10 * rank).requires_grad_(True)
    everything = gather_with_grad(feats)
    weights = torch.arange(everything.numel(), dtype=torch.float32).reshape(everything.shape)
    (everything * weights).sum().backward()
    Path(out, f"g{rank}.json").write_text(
        json.dumps({"all": everything.tolist(), "grad": feats.grad.tolist()})
    )


def test_gather_with_grad_sends_each_rank_its_gradient(tmp_path: Path) -> None:
    run_gloo(_gather, 2, str(tmp_path))
    r0 = json.loads((tmp_path / "g0.json").read_text())
    r1 = json.loads((tmp_path / "g1.json").read_text())
    expected_all = torch.cat(
        [torch.arange(6.0).reshape(3, 2), torch.arange(6.0).reshape(3, 2) + 10]
    )
    assert torch.equal(torch.tensor(r0["all"]), expected_all)
    weights = torch.arange(12.0).reshape(6, 2)
    # Both ranks' losses use every feature: each rank's gradient is the sum over both losses.
    assert torch.equal(torch.tensor(r0["grad"]), 2 * weights[:3])
    assert torch.equal(torch.tensor(r1["grad"]), 2 * weights[3:])
