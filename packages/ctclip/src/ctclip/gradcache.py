"""Gradient cache for the contrastive loss: a large batch of negatives in bounded memory.

Gradient accumulation does not enlarge a contrastive batch: each micro-batch's loss only sees its
own texts as negatives. The gradient cache (Gao et al., 2021) keeps the whole batch in the loss:

1. embed every chunk of the batch without a graph (activations freed at once);
2. compute the full-batch loss on those embeddings;
3. in the backward pass, re-run each chunk with a graph and backpropagate the loss's gradient
   with respect to that chunk's embeddings into the towers, one chunk at a time.

Step 3 runs inside the caller's ``loss.backward()`` (an autograd function whose backward replays
the chunks, as reentrant activation checkpointing does), so the Trainer's loss scaling,
accumulation and clipping apply unchanged. The RNG and autocast state of each chunk's first pass
are restored for its replay, so dropout and precision match. Gradients equal those of the single
big batch (tests/test_gradcache.py).

Shapes: ``b`` batch, ``k`` chunk size, ``e`` embedding dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Encode = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _ChunkState:
    """What a chunk's replay must reproduce: its RNG streams and autocast setting."""

    cpu_rng: torch.Tensor
    device_rng: torch.Tensor | None
    autocast: bool
    autocast_dtype: torch.dtype


def _capture(device: torch.device) -> _ChunkState:
    cuda = device.type == "cuda"
    return _ChunkState(
        cpu_rng=torch.get_rng_state(),
        device_rng=torch.cuda.get_rng_state(device) if cuda else None,
        autocast=torch.is_autocast_enabled(device.type),
        autocast_dtype=torch.get_autocast_dtype(device.type),
    )


class _Replay(torch.autograd.Function):
    """Identity on the cached embeddings; its backward re-runs the chunks with a graph."""

    @staticmethod
    def forward(ctx, replay, anchor, image, text):
        ctx.replay = replay
        return image.clone(), text.clone()

    @staticmethod
    def backward(ctx, grad_image, grad_text):
        ctx.replay(grad_image, grad_text)
        return None, None, None, None


def cached_embeddings(
    encode: Encode,
    volume: torch.Tensor,
    tokens: torch.Tensor,
    chunk_size: int,
    anchor: nn.Parameter,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[b, e]`` of volumes and texts whose backward runs chunk by chunk.

    ``encode(volume_chunk, token_chunk) -> (image [k, e], text [k, e])`` is the model's forward;
    ``anchor`` is any parameter that requires grad (it ties the embeddings into the graph; its
    own gradient is not touched here). Use the result in the full-batch loss as usual.
    """
    device = volume.device
    chunks = list(zip(volume.split(chunk_size), tokens.split(chunk_size), strict=True))
    states, images, texts = [], [], []
    with torch.no_grad():
        for v, t in chunks:
            states.append(_capture(device))
            image, text = encode(v, t)
            images.append(image)
            texts.append(text)

    def replay(grad_image: torch.Tensor, grad_text: torch.Tensor) -> None:
        sizes = [len(v) for v, _ in chunks]
        for (v, t), state, gi, gt in zip(
            chunks, states, grad_image.split(sizes), grad_text.split(sizes), strict=True
        ):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.set_rng_state(state.cpu_rng)
                if state.device_rng is not None:
                    torch.cuda.set_rng_state(state.device_rng, device)
                with (
                    torch.enable_grad(),
                    torch.autocast(device.type, dtype=state.autocast_dtype, enabled=state.autocast),
                ):
                    image, text = encode(v, t)
                torch.autograd.backward([image, text], [gi.to(image.dtype), gt.to(text.dtype)])

    return _Replay.apply(replay, anchor, torch.cat(images), torch.cat(texts))
