"""CLIP's symmetric contrastive loss; under DDP each rank scores its rows against all ranks' features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medcore.runtime.distributed import gather_with_grad, get_rank


class ClipLoss(nn.Module):
    """Cross-entropy of image->text and text->image similarities, matching pairs on the diagonal.

    Local loss: rank ``r`` computes the rows of its own ``b`` samples against the gathered
    ``world * b`` features (gradients flow through the gather), so the mean over ranks equals the
    single-process loss on the concatenated batch.

    Returns ``(total, terms)``: the mean of the two directions, and each direction's
    cross-entropy (``image_to_text``, ``text_to_image``) detached, left on the device for the
    trainer to log.
    """

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        all_image = gather_with_grad(image_features)
        all_text = gather_with_grad(text_features)
        b = image_features.shape[0]
        labels = torch.arange(b, device=image_features.device) + b * get_rank()
        logits_per_image = logit_scale * image_features @ all_text.T
        logits_per_text = logit_scale * text_features @ all_image.T
        image_to_text = F.cross_entropy(logits_per_image.float(), labels)
        text_to_image = F.cross_entropy(logits_per_text.float(), labels)
        terms = {"image_to_text": image_to_text.detach(), "text_to_image": text_to_image.detach()}
        return (image_to_text + text_to_image) / 2, terms
