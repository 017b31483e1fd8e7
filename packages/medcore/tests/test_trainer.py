import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from medcore.config import TrainerConfig
from medcore.engine.task import Stop
from medcore.engine.trainer import Trainer
from medcore.errors import TrainingDiverged
from medcore.runtime.distributed import make_fabric
from medcore.runtime.interrupts import Interrupted
from medcore.testing import stopping_in_call
from medcore.weights.checkpoint import load_checkpoint

CPU = torch.device("cpu")

X = torch.randn(48, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).float()
DATA = TensorDataset(X, Y)


def step(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)


def evaluate(model: nn.Module, ctx) -> dict[str, float]:
    logits = model(X).squeeze(1)
    return {
        "val/loss": float(step(model, (X, Y))),
        "val/acc": float(((logits > 0).float() == Y).float().mean()),
    }


def make(
    run_dir: Path, model_seed: int = 1, step_fn=step, extra_state=None, **overrides
) -> Trainer:
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    cfg = TrainerConfig(
        **{
            "epochs": 3,
            "batch_size": 8,
            "num_workers": 0,
            "lr": 1e-2,
            "warmup_steps": 2,
            "grad_accum_steps": 2,
            "log_every_steps": 1,
            **overrides,
        }
    )
    return Trainer(
        model,
        cfg,
        fabric=make_fabric(CPU, cfg),
        train_data=DATA,
        step_fn=step_fn,
        run_dir=run_dir,
        kind="test.MLP",
        evaluate_fn=evaluate,
        seed=5,
        extra_state=extra_state,
        show_progress=False,
    )


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("stop_at", [2, 4, 7])
def test_resume_is_bit_identical(tmp_path: Path, stop_at: int) -> None:
    full = make(tmp_path / "full")
    full.fit()
    # stopped in the last of the two micro-batches of step ``stop_at``, as a signal would
    part = make(tmp_path / "part", step_fn=stopping_in_call(step, 2 * stop_at))
    with pytest.raises(Interrupted):
        part.fit()
    assert load_checkpoint(tmp_path / "part/checkpoints/latest.pt")["global_step"] == stop_at
    assert not (tmp_path / "part/checkpoints/final.pt").exists()
    torch.manual_seed(12345)  # a different global RNG at restart must not matter
    resumed = make(tmp_path / "part", model_seed=99)
    result = resumed.fit(resume=tmp_path / "part/checkpoints/latest.pt")
    assert result.global_step == full.state.global_step and result.stop is Stop.COMPLETED
    for key, value in weights(full).items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_accumulation_matches_a_larger_batch(tmp_path: Path) -> None:
    small = make(tmp_path / "a", batch_size=4, grad_accum_steps=4, epochs=1, scheduler="none")
    big = make(tmp_path / "b", batch_size=16, grad_accum_steps=1, epochs=1, scheduler="none")
    # Same sample order requires same batches: compare on a model without dropout.
    for t in (small, big):
        t.model[2].p = 0.0
    small.fit()
    big.fit()
    for key, value in weights(small).items():
        torch.testing.assert_close(value, big.model.state_dict()[key], rtol=1e-5, atol=1e-6)


def test_checkpoints_names_and_best_by_monitor(tmp_path: Path) -> None:
    trainer = make(
        tmp_path,
        monitor=["val/missing", "val/acc"],
        monitor_mode="max",
        checkpoint_prefix="microf1",
    )
    result = trainer.fit()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    best = [n for n in ckpts if n.startswith("microf1_")]
    assert len(best) == 1, ckpts
    assert "final.pt" in ckpts and "latest.pt" in ckpts
    name = best[0]
    assert name.endswith(f"metric={result.best_metric:.4f}.pt") and "_epoch=" in name
    assert result.best_metric_name == "val/acc"  # fell back from the missing metric
    assert result.best_metric == max(r["val/acc"] for r in result.history)
    state = load_checkpoint(tmp_path / "checkpoints" / name, kind="test.MLP")
    assert state["best"]["value"] == pytest.approx(result.best_metric)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for x in lines if x["event"] == "eval") == 3
    assert list((tmp_path / "tb").iterdir()), "TensorBoard events written"


def test_fixed_best_name_and_early_stopping(tmp_path: Path) -> None:
    # lr 0: nothing improves after the first evaluation, so patience 2 stops at epoch 3 of 10.
    trainer = make(
        tmp_path,
        epochs=10,
        lr=0.0,
        early_stopping_patience=2,
        best_name="phase1_best.pt",
        scheduler="none",
    )
    result = trainer.fit()
    assert result.stop is Stop.EARLY_STOP and result.epochs_completed == 3
    assert (tmp_path / "checkpoints/phase1_best.pt").is_file()
    assert (tmp_path / "checkpoints/final.pt").is_file()


def test_nan_step_is_skipped_then_persistent_nan_stops(tmp_path: Path) -> None:
    calls = {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        loss = step(model, batch)
        return loss * float("nan") if calls["n"] == 3 else loss

    trainer = make(tmp_path / "a", epochs=1, grad_accum_steps=1)
    trainer.step_fn = flaky
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        result = trainer.fit()
    assert result.global_step == 5  # 6 batches, one skipped
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())

    def always_nan(model, batch):
        return step(model, batch) * float("nan")

    stopping = stopping_in_call(step, 2)
    doomed = make(
        tmp_path / "b", step_fn=stopping, epochs=3, grad_accum_steps=1, max_nonfinite_steps=3
    )
    with pytest.raises(Interrupted):
        doomed.fit()
    good = (tmp_path / "b/checkpoints/latest.pt").read_bytes()
    doomed2 = make(tmp_path / "b", epochs=3, grad_accum_steps=1, max_nonfinite_steps=3)
    doomed2.step_fn = always_nan
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        doomed2.fit(resume=tmp_path / "b/checkpoints/latest.pt")
    assert (tmp_path / "b/checkpoints/latest.pt").read_bytes() == good
    assert not (tmp_path / "b/checkpoints/final.pt").exists()


def test_param_groups_and_cosine_warmup(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 1))
    cfg = TrainerConfig(
        epochs=2, batch_size=8, num_workers=0, lr=1e-2, warmup_steps=3, scheduler="cosine"
    )
    groups = [
        {"params": model[0].parameters(), "lr": 1e-4, "name": "backbone"},
        {"params": model[1].parameters(), "lr": 1e-2, "name": "head"},
    ]
    trainer = Trainer(
        model,
        cfg,
        fabric=make_fabric(CPU, cfg),
        train_data=DATA,
        step_fn=step,
        run_dir=tmp_path,
        kind="test.MLP",
        param_groups=groups,
        show_progress=False,
    )
    lrs = []
    orig = trainer._optimizer_step

    def spy() -> None:
        lrs.append([g["lr"] for g in trainer.optimizer.param_groups])
        orig()

    trainer._optimizer_step = spy
    trainer.fit()
    total = trainer.total_steps
    assert total == 12
    for i, (backbone, head) in enumerate(lrs):
        factor = (i + 1) / 3 if i < 3 else 0.5 * (1 + math.cos(math.pi * (i - 3) / (total - 3)))
        assert backbone == pytest.approx(1e-4 * factor) and head == pytest.approx(1e-2 * factor)


def test_plateau_and_step_schedulers_resume(tmp_path: Path) -> None:
    for sched in ("plateau", "step"):
        full = make(tmp_path / f"{sched}-full", scheduler=sched, step_size=1, plateau_patience=0)
        full.fit()
        stopping = stopping_in_call(step, 10)  # in step 5
        part = make(
            tmp_path / sched, step_fn=stopping, scheduler=sched, step_size=1, plateau_patience=0
        )
        with pytest.raises(Interrupted):
            part.fit()
        resumed = make(tmp_path / sched, scheduler=sched, step_size=1, plateau_patience=0)
        resumed.fit(resume=tmp_path / sched / "checkpoints/latest.pt")
        assert [g["lr"] for g in full.optimizer.param_groups] == [
            g["lr"] for g in resumed.optimizer.param_groups
        ]
        for key, value in weights(full).items():
            assert torch.equal(value, resumed.model.state_dict()[key])


def test_skipped_nonfinite_step_leaves_batchnorm_stats_clean(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    cfg = TrainerConfig(epochs=1, batch_size=8, num_workers=0, lr=1e-2, scheduler="none")
    calls = {"n": 0}

    def poisoned(m, batch):
        calls["n"] += 1
        x, y = batch
        if calls["n"] == 2:
            x = x.clone()
            x[0, 0] = float("nan")  # NaN inside the forward pass reaches BatchNorm's statistics
        return nn.functional.binary_cross_entropy_with_logits(m(x).squeeze(1), y)

    trainer = Trainer(
        model,
        cfg,
        fabric=make_fabric(CPU, cfg),
        train_data=DATA,
        step_fn=poisoned,
        run_dir=tmp_path,
        kind="test.BN",
        show_progress=False,
    )
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        trainer.fit()
    bn = trainer.model[1]
    assert torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()
    assert int(bn.num_batches_tracked) == 5  # 6 batches, the poisoned one undone


def test_best_and_final_hold_the_weights_and_latest_what_a_resume_needs(tmp_path: Path) -> None:
    from medcore.errors import CheckpointError

    extra = {"model_config": {"width": 16}, "input_norm": {"mean": [0.5]}}
    trainer = make(tmp_path, epochs=2, best_name="best.pt", extra_state=extra)
    result = trainer.fit()
    ckpts = tmp_path / "checkpoints"
    latest = load_checkpoint(ckpts / "latest.pt", kind="test.MLP")
    resume_only = {"optimizer", "scheduler", "scaler", "rng", "rng_ranks"}
    assert resume_only <= latest.keys()
    for name in ("final.pt", "best.pt"):
        state = load_checkpoint(ckpts / name, kind="test.MLP")
        assert not resume_only & state.keys(), name
        # what evaluation and the packages read stays
        assert state["model_config"] == {"width": 16} and state["input_norm"] == {"mean": [0.5]}
        assert {"precision", "epoch", "global_step", "history", "best"} <= state.keys()
    final = load_checkpoint(ckpts / "final.pt", kind="test.MLP")
    assert final["epoch"] == 2 and final["global_step"] == latest["global_step"]
    assert final["history"] == result.history == latest["history"]
    assert all(torch.equal(final["model"][k], v) for k, v in latest["model"].items())
    # AdamW keeps two moments per weight: latest.pt is about three times the weights
    assert (ckpts / "latest.pt").stat().st_size > 2 * (ckpts / "final.pt").stat().st_size
    with pytest.raises(CheckpointError, match=r"model weights only.*latest\.pt"):
        make(tmp_path / "again", epochs=3).fit(resume=ckpts / "final.pt")


@pytest.mark.parametrize(("n", "batches"), [(17, 2), (18, 3)])
def test_a_last_batch_too_small_to_normalise_is_dropped_with_a_note(
    tmp_path: Path, n: int, batches: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """17 samples at batch 8 leave one: BatchNorm1d would raise on it; 18 leave two (kept)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    sizes: list[int] = []

    def counting_step(model: nn.Module, batch) -> torch.Tensor:
        sizes.append(batch[0].shape[0])
        return step(model, batch)

    trainer = Trainer(
        model,
        TrainerConfig(epochs=2, batch_size=8, num_workers=0, log_every_steps=1),
        fabric=make_fabric(CPU),
        train_data=TensorDataset(X[:n], Y[:n]),
        step_fn=counting_step,
        run_dir=tmp_path,
        kind="test.MLP",
        seed=5,
        show_progress=False,
    )
    trainer.fit()
    assert trainer.data.batches_per_epoch == batches
    assert min(sizes) >= 2 and len(sizes) == 2 * batches
    note = "the last training batch of each epoch would hold 1 sample"
    assert (note in capsys.readouterr().out) == (n == 17)


@dataclasses.dataclass
class _RunLike:
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)


@pytest.mark.parametrize(("key", "value"), [("amp_dtype", "float16"), ("precision", "bf16")])
def test_a_wrong_precision_is_a_config_error_at_load_time(key: str, value: str) -> None:
    from medcore.config import load_config
    from medcore.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"trainer\.{key}: expected .*{value!r}"):
        load_config(_RunLike, {"trainer": {key: value}})


def _saves(trainer: Trainer) -> list[tuple[str, int]]:
    """(name, epoch) of every latest.pt / final.pt ``trainer`` writes from now on."""
    names: list[tuple[str, int]] = []
    save = trainer.checkpoints.save

    def recording(name: str, state):
        if name in ("latest.pt", "final.pt"):
            names.append((name, state.epoch))
        return save(name, state)

    trainer.checkpoints.save = recording
    return names


def test_save_interval_skips_epoch_end_writes_but_never_the_last(tmp_path: Path) -> None:
    every = make(tmp_path / "every", epochs=3)
    names = _saves(every)
    every.fit()
    assert names == [("latest.pt", 1), ("latest.pt", 2), ("latest.pt", 3), ("final.pt", 3)]
    sparse = make(tmp_path / "sparse", epochs=3, save_interval_s=3600.0)
    names = _saves(sparse)
    sparse.fit()
    assert names == [("latest.pt", 3), ("final.pt", 3)]
    ckpts = tmp_path / "sparse/checkpoints"
    final, latest = load_checkpoint(ckpts / "final.pt"), load_checkpoint(ckpts / "latest.pt")
    assert all(torch.equal(v, latest["model"][k]) for k, v in final["model"].items())
    sparse_weights = weights(sparse)
    assert all(torch.equal(v, sparse_weights[k]) for k, v in weights(every).items())
    # An early stop is the run's last epoch too: latest.pt is written there.
    stopping = make(
        tmp_path / "stop",
        epochs=50,
        save_interval_s=3600.0,
        monitor=["val/acc"],
        monitor_mode="max",
        early_stopping_patience=1,
    )
    names = _saves(stopping)
    result = stopping.fit()
    assert result.stop is Stop.EARLY_STOP and result.epochs_completed < 50
    assert names == [("latest.pt", result.epochs_completed), ("final.pt", result.epochs_completed)]


def test_step_extras_are_averaged_over_each_logging_window(tmp_path: Path) -> None:
    """Extras stay tensors on the device; each logged value is their mean over the window's
    micro-batches (here: the batch's first label, a number known from the batch order)."""
    seen: list[float] = []

    def with_extras(model, batch):
        seen.append(float(batch[1][0]))
        return step(model, batch), {"first_label": batch[1][0], "twice": 2 * batch[1][0]}

    trainer = make(tmp_path, step_fn=with_extras, epochs=1, log_every_steps=2)
    trainer.fit()
    records = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"train/first_label"' in line
    ]
    # 6 batches, 2 micro-batches a step: 3 steps, logged at steps 2 and 3 (the epoch's end)
    assert [r["step"] for r in records] == [2, 3]
    assert records[0]["train/first_label"] == pytest.approx(sum(seen[:4]) / 4)
    assert records[1]["train/first_label"] == pytest.approx(sum(seen[4:]) / 2)
    assert records[1]["train/twice"] == pytest.approx(2 * sum(seen[4:]) / 2)


def test_a_float_extra_is_refused_with_its_name(tmp_path: Path) -> None:
    def float_extra(model, batch):
        loss = step(model, batch)
        return loss, {"acc": float(loss.detach())}

    with pytest.raises(TypeError, match="'acc' is a float, not a tensor"):
        make(tmp_path, step_fn=float_extra, epochs=1).fit()
