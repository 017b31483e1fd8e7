from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from binensemble.config import TTA_VIEWS
from binensemble.tta import apply_view, invert_view, tta_embed, tta_probs


@pytest.mark.parametrize("view", TTA_VIEWS)
def test_every_view_is_inverted_exactly(view: str) -> None:
    x = torch.randn(2, 3, 5, 7)  # non-square: a wrong rotation axis would change the shape
    torch.testing.assert_close(invert_view(view, apply_view(view, x)), x)


def test_views_match_numpy_and_are_distinct() -> None:
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    a = x[0, 0].numpy()
    np.testing.assert_array_equal(apply_view("hflip", x)[0, 0].numpy(), a[:, ::-1])
    np.testing.assert_array_equal(apply_view("vflip", x)[0, 0].numpy(), a[::-1, :])
    np.testing.assert_array_equal(apply_view("rot90", x)[0, 0].numpy(), np.rot90(a, 1))
    views = [apply_view(v, x) for v in TTA_VIEWS]
    assert all(not torch.equal(views[i], views[j]) for i in range(4) for j in range(i + 1, 4))


class _PixelEmbed(nn.Module):
    """An embedding that depends on where pixels are (not invariant to the views)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.proj(x.flatten(1)), dim=1)


def test_tta_embedding_is_the_renormalised_mean_of_the_views() -> None:
    torch.manual_seed(0)
    model = _PixelEmbed()
    x = torch.randn(3, 3, 4, 4)
    expected = torch.stack([model(apply_view(v, x)) for v in TTA_VIEWS]).mean(0)
    expected = expected / expected.norm(dim=1, keepdim=True)
    out = tta_embed(model, x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_tta_is_a_no_op_for_a_view_invariant_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(tta_probs(model, x), model(x).softmax(1))
    torch.testing.assert_close(tta_embed(model, x), nn.functional.normalize(model(x), dim=1))
