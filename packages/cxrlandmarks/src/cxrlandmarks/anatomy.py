"""The 15 chest X-ray landmarks: names, symmetric pairs, mediastinal axis, fixed distances.

Indices are 0-based. "left" and "right" are IMAGE left and right (in a PA radiograph the
image left is the patient's right). Coordinates are ``[..., 15, 2]`` as ``(x, y)``; normalised
coordinates are pixel coordinates divided by the image width and height (``x / W, y / H``).

Pixel convention, one for the whole package: continuous coordinates with pixel EDGES at
integers. Pixel column ``i`` covers ``[i, i + 1)`` (its centre is ``i + 0.5``) and an image
``W`` wide spans ``[0, W]``. So a resize by a factor ``r`` maps ``x -> r * x``, a horizontal
flip ``x -> W - x`` (normalised: ``1 - x``), rotation turns about ``(W / 2, H / 2)`` and
normalising is ``x / W``. The CSV's pixel coordinates are read in this convention.
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
    """Mirror ``[..., 15, 2]`` coordinates of an image ``width`` wide and swap the pairs.

    Pixel-edge convention (the package's only one, see the module docstring): ``x -> width - x``.
    ``width=1`` mirrors normalised coordinates.
    """
    out = coords.clone()
    out[..., 0] = width - out[..., 0]
    return out[..., swap_permutation(coords.shape[-2]), :]


def mediastinal_axis(coords: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The mediastinal axis: the least-squares line through landmarks 0, 1, 8, 9, 10.

    Fitted as ``x = a + b * y`` (the axis is near vertical, tilted by the pose: the augmentation
    rotates images by up to 15 degrees), so it passes through the points' centroid. Returns
    ``(centre [..., 2], direction [..., 2])``, the direction a unit vector pointing down the
    image (+y). ``eps`` (in the coordinates' unit squared) bounds the slope's denominator, which
    keeps it finite when the points coincide (as untrained predictions nearly do) and leaves
    every real fit exact.
    """
    pts = coords[..., list(MEDIASTINAL_LANDMARKS), :]
    centre = pts.mean(-2)
    d = pts - centre.unsqueeze(-2)
    slope = (d[..., 0] * d[..., 1]).sum(-1) / (d[..., 1] ** 2).sum(-1).clamp_min(eps)
    direction = torch.stack([slope, torch.ones_like(slope)], dim=-1)
    return centre, direction / direction.norm(dim=-1, keepdim=True)


def asymmetry(coords: torch.Tensor) -> torch.Tensor:
    """Per symmetric pair, the right landmark mirrored about the mediastinal axis minus the left.

    Measured in the axis' own frame (lateral offset, position along the axis): ``[..., 5, 2]`` =
    ``(s_left + s_right, t_left - t_right)`` with ``s`` the signed distance from the axis and
    ``t`` the position along it. Zero for a chest symmetric about its mediastinal axis at any
    angle, and unchanged when the whole chest is rotated or shifted. For a vertical axis at
    ``x = c`` it is ``(x_l + x_r - 2c, y_l - y_r)``.
    """
    centre, u = mediastinal_axis(coords)
    normal = torch.stack([u[..., 1], -u[..., 0]], dim=-1)  # the axis turned by -90 degrees
    rel = coords - centre.unsqueeze(-2)
    s = (rel * normal.unsqueeze(-2)).sum(-1)
    t = (rel * u.unsqueeze(-2)).sum(-1)
    left = [a for a, _ in SYMMETRIC_PAIRS]
    right = [b for _, b in SYMMETRIC_PAIRS]
    return torch.stack([s[..., left] + s[..., right], t[..., left] - t[..., right]], dim=-1)


def pair_distances(coords: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Euclidean distances of :data:`DISTANCE_PAIRS` -> ``[..., n_pairs]``."""
    i = [a for a, _ in DISTANCE_PAIRS]
    j = [b for _, b in DISTANCE_PAIRS]
    diff = coords[..., i, :] - coords[..., j, :]
    return torch.sqrt((diff**2).sum(-1) + eps)
