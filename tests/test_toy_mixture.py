"""kdpp.toy.GaussianMixture: exact denoiser, density, score and flow map against independent references."""
import math

import pytest
import torch

from kdpp.toy import GaussianMixture, gaussian, grid, high_dim, ring

MIX_1D = GaussianMixture([[-1.5], [0.5], [2.0]], [0.3, 0.6, 0.2], [0.2, 0.5, 0.3])


def quadrature(mix, x, sigma):
    """E[x0 | x] and p_sigma(x) for a 1-D mixture by the trapezoid rule on a fine grid."""
    grid_ = torch.linspace(-8, 8, 200001, dtype=torch.float64)
    prior = mix.log_prob(grid_[:, None]).exp()
    like = torch.exp(-0.5 * ((x[:, None] - grid_[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    w = prior[None] * like
    return torch.trapezoid(w * grid_, grid_) / torch.trapezoid(w, grid_), torch.trapezoid(w, grid_)


@pytest.mark.parametrize("sigma", [0.05, 0.4, 1.0, 5.0])
def test_denoiser_and_density_match_numerical_integration(sigma):
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    mean, density = quadrature(MIX_1D, x, sigma)
    torch.testing.assert_close(MIX_1D.denoiser(x[:, None], sigma)[:, 0], mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(MIX_1D.log_prob(x[:, None], sigma), density.log(), rtol=0, atol=1e-8)


def test_denoiser_matches_monte_carlo_posterior_mean_in_2d_diagonal():
    mix = GaussianMixture([[0.0, 1.0], [2.0, -1.0]], [[0.3, 0.8], [0.5, 0.2]], [0.3, 0.7])
    g = torch.Generator().manual_seed(0)
    x0 = mix.sample(400000, g)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    sigma = 0.7
    w = torch.exp(-0.5 * ((x - x0) ** 2).sum(1) / sigma**2)
    mc = (w[:, None] * x0).sum(0) / w.sum()
    ess = w.sum() ** 2 / (w**2).sum()
    torch.testing.assert_close(mix.denoiser(x, sigma)[0], mc, rtol=0, atol=5 / math.sqrt(float(ess)))


def test_score_is_the_gradient_of_log_prob():
    mix = ring()
    x = (torch.randn(20, 2, dtype=torch.float64) * 3).requires_grad_()
    (grad,) = torch.autograd.grad(mix.log_prob(x, 0.8).sum(), x)
    torch.testing.assert_close(mix.score(x.detach(), 0.8), grad, rtol=1e-10, atol=1e-12)


def test_sample_moments():
    mix = GaussianMixture([[0.0, 1.0], [2.0, -1.0]], [0.5, 0.2], [0.25, 0.75])
    x, labels = mix.sample(200000, torch.Generator().manual_seed(1), return_labels=True)
    assert abs(labels.double().mean().item() - 0.75) < 0.005
    torch.testing.assert_close(x.mean(0), mix.mean, rtol=0, atol=0.01)


def test_denoiser_accepts_batched_sigma_any_shape_and_dtype():
    mix = gaussian(d=12, mean=0.5, std=0.7)
    x = torch.randn(3, 3, 2, 2)
    sigma = torch.tensor([0.5, 1.0, 2.0])
    out = mix.denoiser(x, sigma)
    assert out.shape == x.shape and out.dtype == torch.float32
    want = 0.5 + 0.49 / (0.49 + sigma.double() ** 2).reshape(3, 1, 1, 1) * (x.double() - 0.5)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="x has 5 values per sample, the mixture has d = 12"):
        mix.denoiser(torch.randn(2, 5), 1.0)


@pytest.mark.parametrize("sigma_to", [0.0, 0.3, 2.0])
def test_flow_map_matches_the_closed_form_for_one_gaussian(sigma_to):
    """x(sigma') = mu + (x - mu) sqrt(s^2 + sigma'^2) / sqrt(s^2 + sigma^2), per dimension (diagonal s)."""
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    s = torch.tensor([0.3, 1.0, 0.05], dtype=torch.float64)
    mix = GaussianMixture(mu[None], s[None])
    x = torch.randn(500, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 20
    got = mix.flow_map(x, 20.0, sigma_to)
    want = mu + (x - mu) * (s**2 + sigma_to**2).sqrt() / (s**2 + 400).sqrt()
    err = (got - want).abs().max().item()
    assert err < 2e-7, err  # the documented accuracy at the default 32 steps per unit of log sigma


def test_flow_map_is_fourth_order_and_invertible():
    mix = ring()
    x = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10
    ref = mix.flow_map(x, 10.0, 0.5, steps_per_unit=128)
    e8 = (mix.flow_map(x, 10.0, 0.5, steps_per_unit=8) - ref).abs().max()
    e16 = (mix.flow_map(x, 10.0, 0.5, steps_per_unit=16) - ref).abs().max()
    assert 12 < e8 / e16 < 20  # 2^4 = 16
    back = mix.flow_map(mix.flow_map(x, 10.0, 0.5), 0.5, 10.0)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-7)


@pytest.mark.slow  # 1500 points through the ODE; quick: the flow map against closed forms and its order
def test_flow_map_pushes_the_noised_marginal_onto_the_data():
    from kdpp.toy import mmd_rbf

    mix = grid(side=3)
    g = torch.Generator().manual_seed(0)
    x_sigma = mix.sample(1500, g) + 8.0 * torch.randn(1500, 2, generator=g, dtype=torch.float64)
    pushed = mix.flow_map(x_sigma, 8.0, 0.0)
    est = mmd_rbf(pushed, mix.sample(1500, g))
    assert est.low <= 0 <= est.high


def test_named_distributions():
    assert ring().K == 8 and ring().d == 2
    assert grid(side=4).K == 16
    hd = high_dim(d=64, n_modes=5)
    assert (hd.K, hd.d) == (5, 64) and abs(hd.weights.sum().item() - 1) < 1e-12
    assert torch.equal(high_dim(seed=3).means, high_dim(seed=3).means)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="means must be"):
        GaussianMixture([1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="stds must be positive"):
        GaussianMixture([[1.0]], [0.0])
    with pytest.raises(ValueError, match="stds must be"):
        GaussianMixture([[1.0, 2.0]], [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="weights must be"):
        GaussianMixture([[1.0], [2.0]], 1.0, [1.0])


COV = torch.tensor([[1.0, 0.6, 0.1], [0.6, 0.5, -0.05], [0.1, -0.05, 0.2]], dtype=torch.float64)
MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)


def test_full_covariance_denoiser_density_and_flow_map_match_closed_forms():
    mix = GaussianMixture(MU[None], covs=COV[None])
    x = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 4
    sigma = 1.3
    c_sigma = COV + sigma**2 * torch.eye(3, dtype=torch.float64)
    want = MU + (COV @ torch.linalg.solve(c_sigma, (x - MU).T)).T
    torch.testing.assert_close(mix.denoiser(x, sigma), want, rtol=0, atol=1e-12)
    mvn = torch.distributions.MultivariateNormal(MU, c_sigma)
    torch.testing.assert_close(mix.log_prob(x, sigma), mvn.log_prob(x), rtol=0, atol=1e-12)
    lam, U = torch.linalg.eigh(COV)
    for to in (0.0, 0.4):
        gain = U @ torch.diag(((lam + to**2) / (lam + 16.0)).sqrt()) @ U.T  # C_to^1/2 C_4^-1/2 (they commute)
        torch.testing.assert_close(mix.flow_map(x, 4.0, to), MU + (gain @ (x - MU).T).T, rtol=0, atol=1e-6)
    torch.testing.assert_close(mix.covariances[0], COV, rtol=0, atol=1e-12)


def test_full_covariance_sampling_shifting_and_mixtures():
    mix = GaussianMixture(torch.stack([MU, -MU]), covs=torch.stack([COV, 0.5 * COV]), weights=[0.3, 0.7])
    x, labels = mix.sample(200000, torch.Generator().manual_seed(2), return_labels=True)
    torch.testing.assert_close(torch.cov(x[labels == 0].T), COV, rtol=0, atol=0.02)
    wide = mix.shifted(std_scale=2.0)
    torch.testing.assert_close(wide.covariances, 4 * mix.covariances, rtol=0, atol=1e-12)
    est = mix.denoiser(x[:5], torch.full((5,), 0.7, dtype=torch.float64))
    r = mix.responsibilities(x[:5], 0.7)
    parts = [m + (c @ torch.linalg.solve(c + 0.49 * torch.eye(3, dtype=torch.float64), (x[:5] - m).T)).T
             for m, c in zip(mix.means, mix.covariances)]
    torch.testing.assert_close(est, r[:, :1] * parts[0] + r[:, 1:] * parts[1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="exactly one of stds and covs"):
        GaussianMixture(MU[None])
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(MU[None], covs=-COV[None])
