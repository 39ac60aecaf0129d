"""LoRA students on the teacher's own weights (issue 13): one model, adapters on for the student, off for the teacher."""
import copy

import pytest
import torch

import kdpp
from kdpp.diffusers.presets import lcm_lora, lightning_lora
from kdpp.noise import stream_seed
from kdpp.diffusers.sdxl import SDXLConditioning, time_ids

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
peft = pytest.importorskip("peft", reason="peft is not installed")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from tiny_diffusers import BETAS, add_lora, tiny_flux, tiny_unet  # noqa: E402

from kdpp.diffusers.lora import SharedLoRAModel, generate_sdxl, lora_vp_denoisers  # noqa: E402

X = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
COND = SDXLConditioning(*(torch.randn(*shape, generator=torch.Generator().manual_seed(j))
                          for j, shape in enumerate([(2, 7, 64), (2, 7, 64), (2, 32), (2, 32)])))
KW = COND.unet_kwargs(time_ids(128, 128))
T = torch.tensor([499.0, 499.0])


def peft_state(model):
    """Every PEFT layer's public adapter state: active adapters, disabled flag, scales."""
    return [(list(m.active_adapters), m.disable_adapters, dict(m.scaling))
            for m in model.modules() if isinstance(m, BaseTunerLayer)]


def call(model):
    with torch.no_grad():
        return model(X, T, **KW).sample


def test_student_is_the_model_with_its_adapter_and_teacher_the_base_model():
    unet = add_lora(tiny_unet(seed=0))
    base = tiny_unet(seed=0)  # built separately: the same base weights, no adapter
    shared = SharedLoRAModel(unet)
    student, teacher, direct = call(shared.student), call(shared.teacher), call(unet)
    assert torch.equal(student, direct)
    torch.testing.assert_close(teacher, call(base), rtol=0, atol=1e-6)
    assert (student - teacher).abs().mean() > 1e-2  # the adapter changes the output
    half = SharedLoRAModel(unet, "default", 0.5)  # a scale, as diffusers' set_adapters takes it
    assert torch.equal(call(unet), direct)  # building the pair leaves the model as it was
    unet.set_adapters("default", 0.5)
    assert torch.equal(call(half.student), call(unet))


def test_adapter_state_is_restored_after_a_run_and_after_an_exception_in_the_teacher():
    unet = add_lora(add_lora(tiny_unet(seed=0), "a", seed=1), "b", seed=2)
    unet.set_adapters(["a"], 0.7)  # the user's own state: only "a", at 0.7
    unet.disable_adapters()
    before, out_before = peft_state(unet), call(unet)
    grads = [p.requires_grad for p in unet.parameters()]
    shared = SharedLoRAModel(unet, ["a", "b"], [1.0, 0.5])
    assert peft_state(unet) == before and [p.requires_grad for p in unet.parameters()] == grads
    teacher_calls = []
    unet.register_forward_pre_hook(lambda module, args: teacher_calls.append(peft_state(unet)[0][1]))
    generate_sdxl(unet, COND, lcm_lora(4), adapter_names=["a", "b"], adapter_weights=[1.0, 0.5], seeds=[0, 1],
                  height=128, width=128, lam=0.3, k=2, dtype=torch.float32, disable=True)
    assert teacher_calls == [False, True, False, True, False, False]  # student on, teacher off, per step
    assert peft_state(unet) == before and torch.equal(call(unet), out_before)

    def boom(module, args):
        if peft_state(module)[0][1]:  # adapters disabled: inside the teacher call
            raise RuntimeError("teacher failed")

    unet.register_forward_pre_hook(boom)
    student, teacher = lora_vp_denoisers(unet, lcm_lora(4), adapter_names=["a", "b"], adapter_weights=[1.0, 0.5])
    with pytest.raises(RuntimeError, match="teacher failed"):
        kdpp.sample_lcm_distpp(student, teacher, X * 15, lcm_lora(4).sigmas(), 0.01, extra_args=KW,
                               teacher_extra_args={"cond": KW, "uncond": KW}, disable=True)
    assert peft_state(unet) == before and [p.requires_grad for p in unet.parameters()] == grads


def test_parameters_are_held_once():
    """Student and teacher share every parameter storage; two separate models hold the base twice."""
    unet = add_lora(tiny_unet(seed=0))
    student, teacher = lora_vp_denoisers(unet, lightning_lora(4))

    def storages(*models):
        return {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}

    shared = storages(student.model, teacher.model.model)
    assert shared == storages(unet)
    lora = sum(1 for n, _ in unet.named_parameters() if "lora_" in n)
    separate = storages(unet, copy.deepcopy(tiny_unet(seed=0)))
    assert len(separate) == 2 * len(shared) - lora
    kdpp.sample_euler_distpp(student, teacher, X * 15, lightning_lora(4).sigmas(), 0.1, extra_args=KW,
                             teacher_extra_args={"cond": KW, "uncond": KW}, disable=True)
    assert storages(unet) == shared  # nothing fused or copied by a guided run


def run_diffusers(unet, scheduler, steps, seed, generators=None):
    """diffusers' denoising loop for one image at 128 x 128 (no CFG, as the LoRA students run); step j's
    scheduler noise from ``generators(j)``."""
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    kw = COND.to("cpu", torch.float32)
    kw = SDXLConditioning(*(getattr(kw, f)[1:2] for f in ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                                        "negative_pooled_prompt_embeds"))).unet_kwargs(time_ids(128, 128))
    with torch.no_grad():
        for j, t in enumerate(scheduler.timesteps):
            out = unet(scheduler.scale_model_input(latents, t), t, **kw).sample
            step = scheduler.step(out, t, latents, **({"generator": generators(j)} if generators else {}),
                                  return_dict=False)
            latents, denoised = step[0], step[1] if len(step) > 1 else None
    return latents if denoised is None else denoised


@pytest.mark.parametrize("preset, scheduler", [
    (lcm_lora(4), lambda: diffusers.LCMScheduler(**BETAS)),
    (lightning_lora(4), lambda: diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="trailing")),
], ids=["lcm-lora", "lightning-lora"])
def test_lam0_run_is_the_lora_student_under_its_diffusers_scheduler(preset, scheduler):
    """With lam = 0 the one-model path samples the LoRA student exactly as diffusers' matching scheduler does
    (LCMScheduler for LCM-LoRA, EulerDiscreteScheduler with trailing spacing for Lightning LoRA)."""
    unet = add_lora(tiny_unet(seed=0))
    seed = 7
    cond = SDXLConditioning(*(getattr(COND, f)[1:2] for f in ("prompt_embeds", "negative_prompt_embeds",
                                                              "pooled_prompt_embeds", "negative_pooled_prompt_embeds")))
    got = generate_sdxl(unet, cond, preset, seeds=[seed], height=128, width=128, lam=0.0, dtype=torch.float32,
                        disable=True)
    solver_stream = lambda j: torch.Generator().manual_seed(stream_seed(stream_seed(seed, 1), j))  # noqa: E731 (kdpp.noise)
    want = run_diffusers(unet, scheduler(), 4, seed, generators=solver_stream)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    guided = generate_sdxl(unet, cond, preset, seeds=[seed], height=128, width=128, dtype=torch.float32, disable=True)
    assert not torch.equal(guided, got)  # the default lam guides


def test_refuses_models_without_adapters_or_with_a_fused_lora():
    with pytest.raises(ValueError, match="no PEFT adapter layers"):
        SharedLoRAModel(tiny_unet(seed=0))
    unet = add_lora(tiny_unet(seed=0))
    with pytest.raises(ValueError, match=r"adapter_names \['nope'\] are not loaded"):
        SharedLoRAModel(unet, "nope")
    with pytest.raises(ValueError, match="adapter_weights has 2 entries for 1 adapter_names"):
        SharedLoRAModel(unet, "default", [1.0, 0.5])
    unet.fuse_lora()
    with pytest.raises(ValueError, match="fused into its weights"):
        SharedLoRAModel(unet)


def test_the_same_mechanism_on_a_flux_transformer():
    """FluxTransformer2DModel with a PEFT LoRA: the student view is the model with the adapter, the teacher view
    the separately built base, and the model's adapter state is untouched (the FLUX.1-dev LoRA preset's mechanism)."""
    flux = add_lora(tiny_flux(seed=0), targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj"))
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 4, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.randn(16, 3, generator=g), txt_ids=torch.randn(8, 3, generator=g))
    before = peft_state(flux)
    shared = SharedLoRAModel(flux)
    with torch.no_grad():
        student, teacher = shared.student(**inputs).sample, shared.teacher(**inputs).sample
        direct, base = flux(**inputs).sample, tiny_flux(seed=0)(**inputs).sample
    assert torch.equal(student, direct) and (student - teacher).abs().mean() > 1e-3
    torch.testing.assert_close(teacher, base, rtol=0, atol=1e-6)
    assert peft_state(flux) == before and shared.teacher.config is flux.config


def save_lora(unet, folder):
    """The adapter as diffusers' SDXL LoRA file (pytorch_lora_weights.safetensors), what LoRA repos ship."""
    from peft.utils import get_peft_model_state_dict

    diffusers.StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder


def test_a_lora_loaded_with_diffusers_loader(tmp_path):
    """A LoRA file read by diffusers' loader (lora_state_dict + load_lora_adapter, as pipe.load_lora_weights does)."""
    original = add_lora(tiny_unet(seed=0))
    state, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(save_lora(original, tmp_path))
    unet = tiny_unet(seed=0)
    unet.load_lora_adapter(state, prefix="unet", adapter_name="lcm")
    shared = SharedLoRAModel(unet)
    assert torch.equal(call(shared.student), call(original))
    torch.testing.assert_close(call(shared.teacher), call(tiny_unet(seed=0)), rtol=0, atol=1e-6)


def guidance_embedding_of(scale):
    """The SDXL pipeline's own timestep_cond for guidance_scale ``scale`` (time_cond_proj_dim 8)."""
    return diffusers.StableDiffusionXLPipeline.get_guidance_scale_embedding(None, torch.tensor([scale - 1]), 8)


def test_lora_vp_denoisers_take_student_guidance_as_generate():
    """lora_vp_denoisers' student_guidance is generate's: the pipeline's default embedding (guidance_scale 5.0)
    for a UNet with time_cond_proj_dim, an error for one without (SDXL base, LCM-LoRA's)."""
    student, _ = lora_vp_denoisers(add_lora(tiny_unet(seed=0, time_cond_proj_dim=8)), lcm_lora(4))
    torch.testing.assert_close(student.timestep_cond, guidance_embedding_of(5.0), rtol=0, atol=0)
    student, _ = lora_vp_denoisers(add_lora(tiny_unet(seed=0, time_cond_proj_dim=8)), lcm_lora(4), student_guidance=2.0)
    torch.testing.assert_close(student.timestep_cond, guidance_embedding_of(2.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="student_guidance=2.0 .* student_unet has none"):
        lora_vp_denoisers(add_lora(tiny_unet(seed=0)), lcm_lora(4), student_guidance=2.0)
