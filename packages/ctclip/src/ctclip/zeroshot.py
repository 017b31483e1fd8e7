"""Zero-shot finding classification: a softmax over each finding's (positive, negative) prompt pair.

Shapes: ``n`` volumes, ``f`` findings, ``e`` embedding dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ctclip.findings import FINDINGS, prompt_pairs
from ctclip.model import CTCLIP
from ctclip.text import Tokenizer
from medcore.engine import inference
from medcore.runtime.device import AmpPolicy, autocast


@torch.no_grad()
def prompt_features(
    model: CTCLIP,
    tokenizer: Tokenizer,
    findings: Sequence[str] = FINDINGS,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Normalised text features of every finding's prompts: ``[f, 2, e]`` (positive, negative)."""
    texts = [t for pair in prompt_pairs(list(findings)) for t in pair]
    feats = model.encode_text(tokenizer(texts).to(device)).float()
    return feats.view(len(findings), 2, -1)


def zero_shot_probs(
    volume_features: torch.Tensor, prompt_feats: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """P(finding present) ``[n, f]`` from volume features ``[n, e]`` and prompt features ``[f, 2, e]``."""
    logits = logit_scale * torch.einsum(
        "ne,fke->nfk", volume_features.float(), prompt_feats.float()
    )
    return logits.softmax(dim=-1)[..., 0]


def predict(
    model: CTCLIP,
    dataset: Dataset,
    tokenizer: Tokenizer,
    device: torch.device,
    amp: AmpPolicy | None = None,
    batch_size: int = 8,
    num_workers: int | None = None,
    findings: Sequence[str] = FINDINGS,
    shard: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities ``[n, f]``, labels ``[n, f]``) of the volumes of ``dataset`` (in order).

    The volumes go through :func:`medcore.engine.inference.predict` (DataLoader workers: ``num_workers``,
    None for the device's default; pinned memory on CUDA; under DDP with ``shard`` each rank
    embeds its shard and every rank gets all of them; ``shard=False`` for one rank alone).
    """
    amp = amp or AmpPolicy(False, torch.float32, False)
    was_training = model.training
    model.eval()
    with autocast(device, amp):
        prompts = prompt_features(model, tokenizer, findings, device).cpu()
    model.train(was_training)

    def forward(m: CTCLIP, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"features": m.encode_volume(batch["volume"]).float(), "labels": batch["labels"]}

    out = inference.predict(
        model,
        dataset,
        forward,
        inference.PredictOptions(device, amp, batch_size, num_workers, shard, desc="zero-shot"),
    )
    probs = zero_shot_probs(out["features"], prompts, model.scale().detach().float().cpu())
    return probs, out["labels"]
