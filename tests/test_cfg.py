"""The batched CFG denoiser and the CFG++ solver forms."""
import math

import pytest
import torch

import kdpp
from conftest import nonlinear_denoiser, other_denoiser


class Counting:
    """A conditional toy model: D = x / (1 + s^2) + shift * emb.mean + extra['bias']; counts calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, sigma, emb, added, flag="on"):
        self.calls += 1
        assert flag == "on"
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        shift = emb.mean(dim=(1, 2)).reshape(-1, *([1] * (x.ndim - 1)))
        return x / (1 + s**2) + shift + added["bias"][0].reshape(-1, *([1] * (x.ndim - 1))) * torch.tanh(x)


def conds(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return {"emb": torch.randn(batch, 7, 5, generator=g, dtype=torch.float64),
            "added": {"bias": [torch.randn(batch, generator=g, dtype=torch.float64)]}}


def test_batched_cfg_equals_two_calls():
    model = Counting()
    x, sigma = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.full((3,), 2.5, dtype=torch.float64)
    c, u = conds(3, 0), conds(3, 1)
    cfg = kdpp.CFGDenoiser(model, scale=7.5)
    got = cfg(x, sigma, cond=c, uncond=u)
    assert model.calls == 1
    Dc, Du = model(x, sigma, **c), model(x, sigma, **u)
    torch.testing.assert_close(got, Du + 7.5 * (Dc - Du), rtol=0, atol=1e-12)
    w, un = cfg.guided_and_uncond(x, sigma, cond=c, uncond=u)
    torch.testing.assert_close(un, Du, rtol=0, atol=1e-14)
    torch.testing.assert_close(w, got, rtol=0, atol=0)


def test_scale_one_and_zero_evaluate_one_branch():
    model = Counting()
    x, sigma = torch.randn(2, 3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    c, u = conds(2, 0), conds(2, 1)
    assert torch.equal(kdpp.CFGDenoiser(model, 1.0)(x, sigma, cond=c, uncond=u), model(x, sigma, **c))
    assert torch.equal(kdpp.CFGDenoiser(model, 0.0)(x, sigma, cond=c, uncond=u), model(x, sigma, **u))
    assert model.calls == 4


def test_cond_key_and_shared_kwargs():
    seen = {}

    def model(x, sigma, cond, flag):
        seen["shape"], seen["flag"] = cond.shape, flag
        return x * 0 + cond.mean(1, keepdim=True)

    cfg = kdpp.CFGDenoiser(model, 2.0, cond_key="cond")
    x = torch.zeros(2, 3)
    out = cfg(x, torch.ones(2), cond=torch.ones(2, 4), uncond=torch.zeros(2, 4), flag=7)
    assert seen == {"shape": (4, 4), "flag": 7}
    torch.testing.assert_close(out, torch.full((2, 3), 2.0))


@pytest.mark.parametrize("cond, uncond, match", [
    ({"emb": torch.ones(2, 3)}, {"other": torch.ones(2, 3)}, "cond and uncond must be dicts with the same keys"),
    ({"emb": torch.ones(2, 3)}, {"emb": torch.ones(2, 4)}, r"cond\['emb'\] and uncond\['emb'\] must be tensors of matching shape"),
    ({"n": 1, "emb": torch.ones(2, 3)}, {"n": 2, "emb": torch.ones(2, 3)}, r"cond\['n'\] and uncond\['n'\] are non-batched values and must be equal"),
    ({"l": [torch.ones(2)]}, {"l": [torch.ones(2), torch.ones(2)]}, r"cond\['l'\] and uncond\['l'\] must be sequences of the same length"),
])
def test_mismatched_conditioning_is_named(cond, uncond, match):
    with pytest.raises(ValueError, match=match):
        kdpp.CFGDenoiser(lambda x, s, **kw: x, 3.0)(torch.ones(2, 3), torch.ones(2), cond=cond, uncond=uncond)


def test_cfg_errors():
    with pytest.raises(ValueError, match="scale 3.* called without uncond"):
        kdpp.CFGDenoiser(lambda x, s, **kw: x, 3.0)(torch.ones(2, 3), torch.ones(2), cond={})
    with pytest.raises(TypeError, match="cond must be a dict of model kwargs"):
        kdpp.CFGDenoiser(lambda x, s, **kw: x, 3.0)(torch.ones(2, 3), torch.ones(2), cond=torch.ones(2), uncond={})
    with pytest.raises(ValueError, match="scale must be finite"):
        kdpp.CFGDenoiser(lambda x, s: x, math.nan)


CFG_PP = [(kdpp.sample_euler_cfg_pp_distpp, kdpp.sample_euler_distpp),
          (kdpp.sample_euler_ancestral_cfg_pp_distpp, kdpp.sample_euler_ancestral_distpp),
          (kdpp.sample_dpmpp_2s_ancestral_cfg_pp_per_stage_distpp, kdpp.sample_dpmpp_2s_ancestral_distpp),
          (kdpp.sample_dpmpp_2m_cfg_pp_guided_history_distpp, kdpp.sample_dpmpp_2m_distpp)]


@pytest.mark.parametrize("cfg_pp, plain", CFG_PP, ids=[p.__name__ for _, p in CFG_PP])
def test_cfg_pp_with_equal_branches_is_the_plain_sampler(cfg_pp, plain):
    """With D_w == D_u, CFG++ must reduce to the plain solver bit for bit."""

    class EqualBranches:
        def __call__(self, x, sigma):
            return nonlinear_denoiser(x, sigma)

        def guided_and_uncond(self, x, sigma):
            d = nonlinear_denoiser(x, sigma)
            return d, d.clone()

    x = torch.randn(3, 2, 4, 4, dtype=torch.float64) * 10
    sig = [10.0, 4.0, 1.5, 0.5, 0.0]
    runs = []
    for fn in (cfg_pp, plain):
        torch.manual_seed(0)
        runs.append(fn(EqualBranches(), other_denoiser, x, sig, 0.5, 2, renoise="deterministic", disable=True))
    assert torch.equal(*runs)
    assert cfg_pp.cfg_pp and cfg_pp.__name__.startswith(plain.__name__.replace("_distpp", "_cfg_pp"))
    assert kdpp.SAMPLERS[cfg_pp.__name__[len("sample_"):-len("_distpp")]] is cfg_pp


def test_cfg_pp_student_gets_cond_and_uncond_in_one_call():
    model = Counting()
    c, u = conds(3, 0), conds(3, 1)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64) * 10
    kdpp.sample_euler_cfg_pp_distpp(kdpp.CFGDenoiser(model, 0.6), None, x, [10.0, 4.0, 1.5, 0.0], 0.0,
                                    extra_args={"cond": c, "uncond": u}, disable=True)
    assert model.calls == 3


def _branches():
    mu_c = torch.tensor([[1.0, -1.0]], dtype=torch.float64).expand(2, 2)
    mu_u = torch.tensor([[-0.5, 0.8]], dtype=torch.float64).expand(2, 2)

    def model(y, t, mu):
        return mu + 0.5 / (0.5 + t[:, None] ** 2) * (y - mu)

    def exact(mu):
        return lambda y, t: mu + 0.5 / (0.5 + t**2) * (y - mu)

    return model, {"cond": {"mu": mu_c}, "uncond": {"mu": mu_u}}, exact(mu_c), exact(mu_u)


def test_dpmpp_2m_cfg_pp_closed_form():
    """x_{i+1} = D_w + s_{i+1} (x_i - D_u) / s_i + (1 - s_{i+1}/s_i) (D_w - D_w_old) / (2 r)."""
    w, (s0, s1, s2) = 0.3, (5.0, 1.2, 0.3)
    model, args, Dc, Du = _branches()
    x0 = torch.tensor([[4.0, -2.0], [1.0, 6.0]], dtype=torch.float64)
    Dw = lambda y, t: Du(y, t) + w * (Dc(y, t) - Du(y, t))
    x1 = Dw(x0, s0) + s1 * (x0 - Du(x0, s0)) / s0
    r = math.log(s0 / s1) / math.log(s1 / s2)
    want = Dw(x1, s1) + s2 * (x1 - Du(x1, s1)) / s1 + (1 - s2 / s1) * (Dw(x1, s1) - Dw(x0, s0)) / (2 * r)
    got = kdpp.sample_dpmpp_2m_cfg_pp_guided_history_distpp(kdpp.CFGDenoiser(model, w), None, x0, [s0, s1, s2], 0.0,
                                             extra_args=args, disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_dpmpp_2s_ancestral_cfg_pp_closed_form():
    w, (s0, s1) = 0.3, (5.0, 1.2)
    model, args, Dc, Du = _branches()
    x0 = torch.tensor([[4.0, -2.0], [1.0, 6.0]], dtype=torch.float64)
    z = torch.randn_like(x0)
    Dw = lambda y, t: Du(y, t) + w * (Dc(y, t) - Du(y, t))
    down, up = kdpp.ancestral_step(s0, s1, 0.5)
    mid = math.sqrt(s0 * down)
    x_mid = Dw(x0, s0) + mid * (x0 - Du(x0, s0)) / s0
    want = Dw(x_mid, mid) + down * (x0 - Du(x_mid, mid)) / s0 + up * z
    got = kdpp.sample_dpmpp_2s_ancestral_cfg_pp_per_stage_distpp(kdpp.CFGDenoiser(model, w), None, x0, [s0, s1], 0.0, eta=0.5,
                                                       noise_sampler=lambda a, b: z, extra_args=args, disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
