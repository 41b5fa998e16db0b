"""DP-FedAvg pieces: clipping, seeded noise of the right scale, the accountant."""
from __future__ import annotations

import math

import numpy as np

from fedgate.server.config import PrivacySection
from fedgate.server.privacy import PrivacyAccountant, add_noise, clip_update


def test_clip_update_bounds_the_change():
    g = np.ones(100, dtype=np.float32)
    p = g + np.full(100, 3.0, dtype=np.float32)
    clip_update(p, g, 2.0, np.empty(100, dtype=np.float32))
    assert np.linalg.norm(p - g) == np.float32(2.0) or abs(np.linalg.norm(p - g) - 2.0) < 1e-5
    small = g + 0.01
    before = small.copy()
    clip_update(small, g, 2.0, np.empty(100, dtype=np.float32))
    np.testing.assert_allclose(small, before, rtol=1e-6)


def test_noise_is_seeded_and_scaled():
    cfg = PrivacySection(noise_multiplier=2.0, clip_norm=0.5, delta=1e-5)
    a = add_noise(np.zeros(200_000, np.float32), 10, cfg, (1, 2, 3))
    b = add_noise(np.zeros(200_000, np.float32), 10, cfg, (1, 2, 3))
    c = add_noise(np.zeros(200_000, np.float32), 10, cfg, (1, 3, 3))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(a.std() - 2.0 * 0.5 / 10) < 0.002


def test_accountant_grows_with_rounds_and_shrinks_with_noise():
    weak = PrivacyAccountant(PrivacySection(noise_multiplier=0.8, delta=1e-5))
    strong = PrivacyAccountant(PrivacySection(noise_multiplier=2.0, delta=1e-5))
    assert weak.epsilon() == 0.0
    eps = []
    for _ in range(5):
        weak.spend(0.5)
        strong.spend(0.5)
        eps.append(weak.epsilon())
    assert all(b > a for a, b in zip(eps, eps[1:]))
    assert strong.epsilon() < weak.epsilon()
    resumed = PrivacyAccountant(PrivacySection(noise_multiplier=0.8, delta=1e-5), weak.rates)
    assert resumed.epsilon() == weak.epsilon()
    off = PrivacyAccountant(PrivacySection(noise_multiplier=0.0))
    off.spend(1.0)
    assert math.isinf(off.epsilon())
