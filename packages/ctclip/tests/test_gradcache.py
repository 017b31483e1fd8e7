"""The gradient cache gives the gradients of the single big contrastive batch."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ctclip.config import CTClipConfig
from ctclip.gradcache import cached_embeddings
from ctclip.losses import ClipLoss
from ctclip.model import build_model


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 3])
def test_gradient_cache_equals_the_big_batch(tiny_cfg, chunk):
    torch.manual_seed(0)
    ref = build_model(CTClipConfig(model=tiny_cfg()))
    cached = copy.deepcopy(ref)
    volume = torch.randint(0, 256, (5, 4, 28, 28), dtype=torch.uint8)
    tokens = torch.randint(1, 1000, (5, 32))
    loss_fn = ClipLoss()

    image, text, scale = ref(volume, tokens)
    big, _ = loss_fn(image, text, scale)
    (big * 0.5).backward()  # a scaled loss, as the Trainer's accumulation and AMP scaler send

    image, text = cached_embeddings(
        lambda v, t: cached(v, t)[:2], volume, tokens, chunk, cached.logit_scale
    )
    loss, _ = loss_fn(image, text, cached.scale())
    (loss * 0.5).backward()

    torch.testing.assert_close(loss, big)
    expected, got = _grads(ref), _grads(cached)
    assert expected.keys() == got.keys() and len(got) == len(list(ref.parameters()))
    for name in expected:  # float32 rounding only: gradients here reach about 20
        torch.testing.assert_close(got[name], expected[name], atol=1e-4, rtol=1e-4, msg=name)


def test_separate_micro_batches_give_other_gradients(tiny_cfg):
    """Why the cache exists: accumulating two halves is not the big batch's gradient."""
    torch.manual_seed(0)
    ref = build_model(CTClipConfig(model=tiny_cfg()))
    accum = copy.deepcopy(ref)
    volume = torch.randint(0, 256, (4, 4, 28, 28), dtype=torch.uint8)
    tokens = torch.randint(1, 1000, (4, 32))
    ClipLoss()(*ref(volume, tokens))[0].backward()
    for half in (slice(0, 2), slice(2, 4)):
        (ClipLoss()(*accum(volume[half], tokens[half]))[0] / 2).backward()
    diff = (ref.text.token_embedding.weight.grad - accum.text.token_embedding.weight.grad).abs()
    assert diff.max() > 1e-4


def test_training_with_the_cache_ends_with_the_same_weights(tiny_demo, tiny_sets, tmp_path):
    """Through ctclip-train and the Trainer (clipping, AdamW, schedule): two steps of batch 4,
    cached in chunks of 1, give the weights of two plain steps."""
    from ctclip import cli
    from medcore.weights.checkpoint import load_checkpoint

    weights = []
    for name, chunk in (("plain", 0), ("cached", 1)):
        argv = ["--data-dir", str(tiny_demo), "--output-dir", str(tmp_path / name), "--smoke"]
        sets = ["num_threads=1", f"grad_cache_chunk_size={chunk}", "trainer.num_workers=0"]
        argv += [*tiny_sets, "--no-do-validate", *[a for s in sets for a in ("--set", s)]]
        assert cli.train(argv) == 0
        final = load_checkpoint(tmp_path / name / "checkpoints/final.pt", kind="ctclip.CTCLIP")
        weights.append(final["model"])
    for key, plain in weights[0].items():
        torch.testing.assert_close(weights[1][key], plain, atol=1e-5, rtol=1e-4, msg=key)
    for name in ("plain", "cached"):
        assert json.loads((tmp_path / name / "metrics.json").read_text())["global_step"] == 2
