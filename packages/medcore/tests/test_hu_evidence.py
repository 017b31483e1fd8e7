"""hu_evidence: how a rescale of stored CT values reads as Hounsfield units (hand-counted)."""

from __future__ import annotations

import numpy as np
import pytest

from medcore.volumes.reader import HU_AIR, HU_SOFT_TISSUE, hu_evidence


def test_shares_near_air_and_soft_tissue_under_a_rescale():
    hu = np.array([-1000.0] * 30 + [40.0] * 50 + [700.0] * 15 + [-3024.0] * 5).reshape(5, 4, 5)
    assert HU_AIR[0] < -1000 < HU_AIR[1] and HU_SOFT_TISSUE[0] < 40 < HU_SOFT_TISSUE[1]
    direct = hu_evidence(hu)
    assert (direct.air, direct.soft_tissue, direct.score) == (0.30, 0.50, 0.30)
    assert str(direct) == "30.0% near air, 50.0% near soft tissue"
    # Stored as a scanner does (HU = stored x 0.5 - 1024): the same shares through the rescale.
    stored = (hu + 1024) / 0.5
    assert hu_evidence(stored, 0.5, -1024) == direct
    # Read without it, the air sits near +48 (in the soft-tissue window), nothing near -1000.
    raw = hu_evidence(stored)
    assert raw.air == 0.0 and raw.soft_tissue == 0.30 and raw.score == 0.0
    # HU rescaled a second time: soft tissue (40) lands at -984, the air at -2024.
    twice = hu_evidence(hu, 1.0, -1024.0)
    assert twice.air == 0.50 and twice.soft_tissue == 0.0
    # A negative slope maps the windows the other way round.
    assert hu_evidence(-hu, -1.0, 0.0) == direct


def test_unusable_rescale_is_refused():
    with pytest.raises(ValueError, match="slope 0"):
        hu_evidence(np.zeros((2, 2, 2)), 0.0, -1024.0)
    with pytest.raises(ValueError, match="not a usable rescale"):
        hu_evidence(np.zeros((2, 2, 2)), 1.0, float("nan"))
