"""Precision rules of model calls.

Every model call (student, teacher, in every solver, the refinement, DistillationDenoiser,
CFGDenoiser) gets sigma as a [B] tensor of dtype torch.promote_types(x.dtype, torch.float32): in
fp16 / bf16 the models see exactly the float32 sigmas of the fp32 / fp64 run, never half-precision
ones (bf16 moves 230 of SD's 1000 training sigmas onto a neighbouring timestep).
A model that computes in float32 for an fp16 / bf16 x is accepted; its output is cast to
x's dtype and the result stays in x's dtype.
"""
import pytest
import torch

import kdpp
from kdpp.wrappers import DistillationDenoiser
from conftest import nonlinear_denoiser, other_denoiser

# none of these is a bf16 or fp16 number; all sampler forms, the CFG++ ones with a CFGDenoiser student
SIGMAS = torch.tensor([14.614642, 6.0797, 2.8321, 1.0237, 0.3123, 0.0], dtype=torch.float64)
SAMPLERS = list(kdpp.SAMPLERS.items())
HALF = [torch.float16, torch.bfloat16]


class SigmaLog:
    """A denoiser that records the dtype and values of every sigma it is handed."""

    def __init__(self, fn, out_dtype=None):
        self.fn, self.out_dtype, self.dtypes, self.values = fn, out_dtype, [], []

    def __call__(self, x, sigma, **extra):
        self.dtypes.append(sigma.dtype)
        self.values.append(sigma.double())
        out = self.fn(x.to(sigma.dtype), sigma, **{k: v for k, v in extra.items() if k not in ("cond", "uncond")})
        return out.to(self.out_dtype or x.dtype)


def models(name, out_dtype=None):
    student, teacher = SigmaLog(nonlinear_denoiser, out_dtype), SigmaLog(other_denoiser, out_dtype)
    if getattr(kdpp.SAMPLERS[name], "cfg_pp", False):
        return student, teacher, kdpp.CFGDenoiser(student, 0.5), {"cond": {}, "uncond": {}}
    return student, teacher, student, {}


def sampled(name, dtype, out_dtype=None, device="cpu"):
    """(student log, teacher log, output) of one guided run with two teacher-called steps."""
    student, teacher, model, extra = models(name, out_dtype)
    x = (torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 14.6).to(device=device, dtype=dtype)
    torch.manual_seed(0)  # the solver noise
    out = kdpp.SAMPLERS[name](model, teacher, x, SIGMAS, 0.5, 2, extra_args=extra, teacher_extra_args={},
                              seed=1, disable=True)
    return student, teacher, out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", [n for n, _ in SAMPLERS])
def test_models_see_float32_sigmas_in_half_precision(name, dtype, device):
    """Item 2: the fp16/bf16 run hands the models the fp64 run's sigmas rounded once to float32."""
    student, teacher, _ = sampled(name, dtype, device=device)
    ref_student, ref_teacher, _ = sampled(name, torch.float64)
    for log, ref in ((student, ref_student), (teacher, ref_teacher)):
        assert log.values and set(log.dtypes) == {torch.float32}
        assert {v.device.type for v in log.values} == {device}
        assert set(ref.dtypes) == {torch.float64}  # float64 x: float64 sigmas
        assert len(log.values) == len(ref.values)
        for got, want in zip(log.values, ref.values):
            assert torch.equal(got.cpu(), want.float().double()), (got, want)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_distillation_denoiser_snaps_half_precision_host_sigmas_to_the_schedule(dtype):
    """Item 2: k-diffusion hands the model sigma in x's dtype; the wrapper gives its models float32."""
    ks = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is the oracle (pip install '.[test]')")
    student, teacher = SigmaLog(nonlinear_denoiser), SigmaLog(other_denoiser)
    wrapped = DistillationDenoiser(student, teacher, SIGMAS, 0.5, 2, seed=0)
    x = (torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 14.6).to(dtype)
    ks.sample_euler(wrapped, x, SIGMAS.float(), disable=True)
    wrapped.raise_if_nonfinite()
    assert set(student.dtypes) == set(teacher.dtypes) == {torch.float32}
    assert [float(v[0]) for v in student.values] == SIGMAS[:-1].float().tolist()
    assert [float(v[0]) for v in teacher.values] == SIGMAS[1:3].float().tolist()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cfg_denoiser_promotes_sigma_for_its_model(dtype):
    """Item 2: CFGDenoiser never hands its model a half-precision sigma (nor narrows a wider one)."""
    model = SigmaLog(nonlinear_denoiser)
    cfg = kdpp.CFGDenoiser(model, 3.0)
    x = torch.randn(2, 3).to(dtype)
    for sigma_dtype, want in ((dtype, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)):
        cfg(x, torch.full((2,), 2.5, dtype=sigma_dtype), cond={}, uncond={})
        cfg.guided_and_uncond(x, torch.full((2,), 2.5, dtype=sigma_dtype), cond={}, uncond={})
        assert model.dtypes[-2:] == [want, want]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", [n for n, _ in SAMPLERS])
def test_float32_model_output_is_cast_to_x_dtype(name, dtype):
    """Item 11: models returning float32 for fp16/bf16 x work; the result is what casting them yourself gives.

    (Exactly, except with a CFGDenoiser student, which mixes its branches in float32 before the cast.)
    """
    _, teacher, wide = sampled(name, dtype, out_dtype=torch.float32)
    _, _, own = sampled(name, dtype)
    assert teacher.values and wide.dtype == dtype
    if getattr(kdpp.SAMPLERS[name], "cfg_pp", False):
        torch.testing.assert_close(wide.float(), own.float(), rtol=0.05, atol=0.05)
    else:
        assert torch.equal(wide, own)


def test_teacher_refinement_hands_the_teacher_float32_sigmas():
    """Item 2, the refinement used alone: the teacher gets float32 tau for a bf16 x."""
    teacher = SigmaLog(other_denoiser)
    x = torch.randn(2, 3).to(torch.bfloat16)
    ref = kdpp.TeacherRefinement(teacher, 0.5, 1, SIGMAS.tolist(), x, renoise="deterministic")
    ref.refine(0, x, x, x, SIGMAS[0].item(), SIGMAS[1].item())
    assert teacher.dtypes == [torch.float32] and float(teacher.values[0][0]) == SIGMAS[1].float().item()
