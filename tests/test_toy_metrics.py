"""kdpp.toy metrics against exact values."""
import math

import pytest
import torch

from kdpp.toy import GaussianMixture, bootstrap, mmd_rbf, mode_coverage, mode_masses, nll, ring, sliced_wasserstein, wasserstein2

G = torch.Generator().manual_seed(0)
X = torch.randn(400, 3, generator=G, dtype=torch.float64)


def test_exact_w2_of_a_translation_is_its_length():
    shift = torch.tensor([0.3, -0.4, 1.2], dtype=torch.float64)
    est = wasserstein2(X, X + shift, n_boot=5)
    assert est.value == pytest.approx(1.3, abs=1e-12)
    assert wasserstein2(X, X[torch.randperm(400, generator=G)], n_boot=0).value == pytest.approx(0, abs=1e-7)


def test_sliced_w2_of_a_translation():
    """Each projection moves by theta.c, so SW^2 = E[(theta.c)^2] = |c|^2 / d for uniform directions."""
    shift = torch.tensor([0.3, -0.4, 1.2], dtype=torch.float64)
    est = sliced_wasserstein(X, X + shift, n_projections=4096, n_boot=0)
    assert est.value == pytest.approx(1.3 / math.sqrt(3), rel=0.03)
    assert sliced_wasserstein(X, X.flip(0), n_boot=0).value == pytest.approx(0, abs=1e-12)
    unequal = sliced_wasserstein(X, X[::2], n_boot=0).value
    assert 0 < unequal < 0.2


def test_mmd_is_unbiased_and_separates():
    mix = ring()
    a, b = mix.sample(800, G), mix.sample(800, G)
    same = mmd_rbf(a, b)
    assert same.low <= 0 <= same.high
    shifted = mmd_rbf(a, b + 0.5, bandwidth=0.5)
    assert shifted.low > 0
    h = 1.3
    k = lambda u, v: torch.exp(-torch.cdist(u, v) ** 2 / (2 * h * h))
    n = 800
    direct = (k(a, a).sum() - n) / (n * (n - 1)) + (k(b, b).sum() - n) / (n * (n - 1)) - 2 * k(a, b).mean()
    assert mmd_rbf(a, b, bandwidth=h, n_boot=0).value == pytest.approx(float(direct), abs=1e-14)


def test_nll_and_mode_coverage():
    mix = GaussianMixture([[0.0, 0.0], [6.0, 0.0]], 0.5, [0.25, 0.75])
    x = mix.sample(4000, G)
    assert nll(x, mix, n_boot=0).value == pytest.approx(float(-mix.log_prob(x).mean()), abs=1e-12)
    assert mode_coverage(x, mix).value < 0.02
    one_mode = torch.zeros(100, 2, dtype=torch.float64)
    assert mode_coverage(one_mode, mix, n_boot=0).value == pytest.approx(0.75)
    assert mode_masses(one_mode, mix).tolist() == [1.0, 0.0]


def test_bootstrap_interval_brackets_the_value_and_is_reproducible():
    data = torch.randn(500, generator=G, dtype=torch.float64)
    est = bootstrap(lambda v: float(v.mean()), data, n_boot=300, seed=4)
    assert est.low < est.value < est.high
    assert est.high - est.low == pytest.approx(2 * 1.96 / math.sqrt(500), rel=0.25)
    assert est == bootstrap(lambda v: float(v.mean()), data, n_boot=300, seed=4)
    assert "±" in str(est)
