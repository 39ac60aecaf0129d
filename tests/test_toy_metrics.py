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
    with pytest.raises(ValueError, match="level"):
        bootstrap(lambda v: float(v.mean()), data, level=95)


def test_distance_intervals_print_as_intervals():
    """A distance's bootstrap interval is asymmetric, so it prints as [low, high], not ± half-width.

    Two exact samples of ring(): the plug-in sliced W2 is positive (biased) and the percentile
    bootstrap of it sits far above the value (resamples repeat points).
    """
    mix = ring()
    g = torch.Generator().manual_seed(0)
    est = sliced_wasserstein(mix.sample(1000, g), mix.sample(1000, g), n_boot=30)
    assert est.high - est.value > 2 * abs(est.value - est.low)  # strongly asymmetric
    assert str(est) == f"{est.value:.3g} [{est.low:.3g}, {est.high:.3g}]"
    assert "±" not in str(est)


def _plain_and_guided(n: int):
    """A biased student sampled plainly and with one teacher-guided step, from the same initial and solver noise.

    The student is the flow map of the wrong mode weights, integrated at 4 RK4 steps per unit of log sigma (its
    samples within 2e-4 of the default's 12; its bias, the wrong weights, is what the comparison sees)."""
    import kdpp
    from kdpp.schedules import timestep_sigmas, trailing_timesteps
    from kdpp.toy import FlowMapStudent

    truth = ring()
    student = FlowMapStudent(truth.shifted(weights=torch.linspace(1.0, 4.0, truth.K)), steps_per_unit=4)
    sigmas = timestep_sigmas(trailing_timesteps(4))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * sigmas[0]
    plain = kdpp.sample_euler_distpp(student, None, x, sigmas, 0.0, disable=True)
    guided = kdpp.sample_euler_distpp(student, truth.denoiser, x, sigmas, 1.0, 1, renoise="deterministic", disable=True)
    return truth, plain, guided, truth.sample(n, g)


def test_paired_difference_against_one_reference():
    """Comparing two samplers is a paired difference against one reference sample, with its interval.

    Pairing (same resampled rows of both runs, one resampled reference for both terms) gives a
    tighter interval than resampling the runs independently; the value is the difference of the
    two distances; two samples of one law give an interval around 0.
    """
    from kdpp.toy import paired_difference

    truth, plain, guided, reference = _plain_and_guided(400)
    paired = paired_difference(sliced_wasserstein, guided, plain, reference, n_boot=30)
    unpaired = paired_difference(sliced_wasserstein, guided, plain, reference, paired=False, n_boot=30)
    assert paired.value == pytest.approx(sliced_wasserstein(guided, reference, n_boot=0).value
                                         - sliced_wasserstein(plain, reference, n_boot=0).value, abs=1e-12)
    assert paired.value == unpaired.value
    assert paired.high < 0  # the teacher's step brings the student closer to the truth
    assert paired.high - paired.low < 0.7 * (unpaired.high - unpaired.low)
    g = torch.Generator().manual_seed(5)
    same = paired_difference(sliced_wasserstein, truth.sample(400, g), truth.sample(300, g), reference, paired=False,
                             n_boot=30)
    assert same.low < 0 < same.high
    # MMD: the reference's own term cancels, what is left is computed directly here
    h = 1.0
    k = lambda u, v: torch.exp(-torch.cdist(u, v) ** 2 / (2 * h * h))
    n = len(plain)
    within = lambda a: (k(a, a).sum() - n) / (n * (n - 1))
    direct = within(guided) - within(plain) - 2 * (k(guided, reference).mean() - k(plain, reference).mean())
    mmd = paired_difference(mmd_rbf, guided, plain, reference, bandwidth=h, n_boot=20)
    assert mmd.value == pytest.approx(float(direct), abs=1e-12)
    assert str(mmd) == f"{mmd.value:.3g} [{mmd.low:.3g}, {mmd.high:.3g}]"


def test_paired_difference_refuses_what_it_cannot_pair():
    """Unequal lengths cannot be paired; MMD's median bandwidth would differ between the terms."""
    from kdpp.toy import paired_difference

    with pytest.raises(ValueError, match="paired=True needs x and y of equal length"):
        paired_difference(sliced_wasserstein, X, X[:10], X)
    with pytest.raises(ValueError, match="bandwidth"):
        paired_difference(mmd_rbf, X, X, X)
    with pytest.raises(ValueError, match="n_boot"):
        paired_difference(sliced_wasserstein, X, X, X, n_boot=-1)


def test_claims_benchmark_stores_and_prints_intervals():
    """benchmarks/claims.py stores each interval as [low, high] and its tables print them so.

    Renders the committed results (benchmarks/results/claims.json) as `claims.py --render` does.
    """
    import importlib.util
    import json
    import pathlib

    from scipy import stats

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("claims", root / "benchmarks" / "claims.py")
    claims = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(claims)
    values = [0.3, 0.5, 0.4, 0.9, 0.45]
    ci = claims.interval(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 5, scale=stats.sem(values))
    assert (ci["low"], ci["high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert claims.fmt_diff({"mean": -0.1, "low": -0.2, "high": -0.05}) == "-0.100 [-0.200, -0.050] (better)"
    result = json.loads((root / "benchmarks" / "results" / "claims.json").read_text())
    rendered = claims.markdown(result)
    assert "±" not in rendered
    assert rendered == (root / "benchmarks" / "results" / "claims.md").read_text()
    row = result["table1"][0]
    assert set(row["diff"]["sw"]) == {"mean", "low", "high", "seeds"}  # the seeds a verdict needs (3 or more)
    assert claims.fmt_diff(row["diff"]["sw"]) in rendered
