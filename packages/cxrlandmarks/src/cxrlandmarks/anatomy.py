"""The 15 chest X-ray landmarks: names, symmetric pairs, mediastinal axis, fixed distances.

Indices are 0-based. "left" and "right" are IMAGE left and right (in a PA radiograph the
image left is the patient's right). Coordinates are ``[..., 15, 2]`` as ``(x, y)``; normalised
coordinates are pixel coordinates divided by the image width and height (``x / W, y / H``).
"""

from __future__ import annotations

import torch

NUM_LANDMARKS = 15

LANDMARK_NAMES: tuple[str, ...] = (
    "mediastinum_top",  # 0: upper end of the mediastinal line
    "mediastinum_bottom",  # 1: lower end of the mediastinal line (at the diaphragm)
    "apex_left",  # 2: lung apex
    "apex_right",  # 3
    "hilum_left",  # 4: hilum (inner lung border, mid height)
    "hilum_right",  # 5
    "base_left",  # 6: lung base (diaphragm dome)
    "base_right",  # 7
    "mediastinum_q1",  # 8: mediastinal line at 1/4
    "mediastinum_mid",  # 9: mediastinal line at 1/2
    "mediastinum_q3",  # 10: mediastinal line at 3/4
    "superior_border_left",  # 11: outer lung border, upper third
    "superior_border_right",  # 12
    "costophrenic_left",  # 13: costophrenic angle
    "costophrenic_right",  # 14
)

SYMMETRIC_PAIRS: tuple[tuple[int, int], ...] = ((2, 3), (4, 5), (6, 7), (11, 12), (13, 14))

MEDIASTINAL_LANDMARKS: tuple[int, ...] = (0, 1, 8, 9, 10)

# Distances that anatomy fixes for a given patient and pose (the spec names the loss but not
# its pairs): the mediastinal length and its segments, the bilateral widths at apex, hilum,
# base and costophrenic angle, and the two lung heights.
DISTANCE_PAIRS: tuple[tuple[int, int], ...] = (
    (0, 1),
    (0, 8),
    (8, 9),
    (9, 10),
    (10, 1),
    (2, 3),
    (4, 5),
    (6, 7),
    (13, 14),
    (2, 6),
    (3, 7),
)

CATEGORIES: tuple[str, ...] = ("COVID", "Normal", "Viral Pneumonia")


def swap_permutation(num_landmarks: int = NUM_LANDMARKS) -> list[int]:
    """Index permutation that exchanges the members of every symmetric pair."""
    perm = list(range(num_landmarks))
    for a, b in SYMMETRIC_PAIRS:
        perm[a], perm[b] = b, a
    return perm


def flip_coords(coords: torch.Tensor, width: float = 1.0) -> torch.Tensor:
    """Mirror ``[..., 15, 2]`` pixel-index coordinates of an image ``width`` wide and swap pairs.

    Pixel index ``x`` goes to ``width - 1 - x`` (torchvision's convention); for normalised
    coordinates of an image S pixels wide pass ``width=1`` and use :func:`flip_normalised`.
    """
    out = coords.clone()
    out[..., 0] = (width - 1) - out[..., 0]
    return out[..., swap_permutation(coords.shape[-2]), :]


def flip_normalised(coords: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`flip_coords` for normalised coordinates predicted on an input ``size`` pixels wide."""
    out = coords.clone()
    out[..., 0] = (size - 1) / size - out[..., 0]
    return out[..., swap_permutation(coords.shape[-2]), :]


def mediastinal_axis(coords: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """x of the mediastinal axis: the (weighted) mean x of landmarks 0, 1, 8, 9, 10 -> ``[...]``."""
    xs = coords[..., list(MEDIASTINAL_LANDMARKS), 0]
    if weights is None:
        return xs.mean(-1)
    weights = weights.to(xs)
    return (xs * weights).sum(-1) / weights.sum()


def asymmetry(coords: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per pair, the right landmark mirrored about the mediastinal axis minus the left one.

    Returns ``[..., 5, 2]``: ``(x_l + x_r - 2 * axis, y_l - y_r)`` up to sign; zero for a chest that
    is perfectly symmetric about a vertical mediastinal axis.
    """
    axis = mediastinal_axis(coords, weights)
    left = coords[..., [a for a, _ in SYMMETRIC_PAIRS], :]
    right = coords[..., [b for _, b in SYMMETRIC_PAIRS], :]
    dx = left[..., 0] + right[..., 0] - 2 * axis.unsqueeze(-1)
    dy = left[..., 1] - right[..., 1]
    return torch.stack([dx, dy], dim=-1)


def pair_distances(coords: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Euclidean distances of :data:`DISTANCE_PAIRS` -> ``[..., n_pairs]``."""
    i = [a for a, _ in DISTANCE_PAIRS]
    j = [b for _, b in DISTANCE_PAIRS]
    diff = coords[..., i, :] - coords[..., j, :]
    return torch.sqrt((diff**2).sum(-1) + eps)
