"""LoRA students on the teacher's own weights: one model, adapters on for the student, off for the teacher.

Real peft adapters on diffusers' tiny test models (UNet, SD3, FLUX, Wan), loaded with diffusers' own loaders.
"""
import copy

import pytest
import torch

import kdpp
from kdpp.diffusers.presets import lcm_lora, lightning_lora
from kdpp.diffusers.sdxl import SDXLConditioning, generate, time_ids, vp_denoisers
from kdpp.noise import stream_seed

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
peft = pytest.importorskip("peft", reason="peft is not installed")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from tiny_diffusers import BETAS, add_lora, tiny_flux, tiny_sd3, tiny_sdxl_text_pipeline, tiny_unet, tiny_wan  # noqa: E402

from kdpp.diffusers.lora import SharedLoRAModel  # noqa: E402

X = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
COND = SDXLConditioning(*(torch.randn(*shape, generator=torch.Generator().manual_seed(j))
                          for j, shape in enumerate([(2, 7, 64), (2, 7, 64), (2, 32), (2, 32)])))
KW = COND.unet_kwargs(time_ids(128, 128))
T = torch.tensor([499.0, 499.0])
BASE = tiny_unet(seed=0)  # the base weights every LoRA UNet below carries


def peft_state(model):
    """Every PEFT layer's public adapter state: active adapters, disabled flag, scales."""
    return [(list(m.active_adapters), m.disable_adapters, dict(m.scaling))
            for m in model.modules() if isinstance(m, BaseTunerLayer)]


def call(model):
    with torch.no_grad():
        return model(X, T, **KW).sample


def one(cond):
    return SDXLConditioning(cond.prompt_embeds[1:2], cond.negative_prompt_embeds[1:2], cond.pooled_prompt_embeds[1:2],
                            cond.negative_pooled_prompt_embeds[1:2])


def save_lora(unet, folder, adapter_name="default"):
    """The adapter as diffusers' SDXL LoRA file (pytorch_lora_weights.safetensors), what LoRA repos ship."""
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=adapter_name))
    return folder


# ------------------------------------------------------------------ the two roles


def test_student_is_the_model_with_its_adapter_and_teacher_the_base_model():
    unet = add_lora(tiny_unet(seed=0))
    shared = SharedLoRAModel(unet)
    student, teacher, direct = call(shared.student), call(shared.teacher), call(unet)
    assert torch.equal(student, direct)
    torch.testing.assert_close(teacher, call(BASE), rtol=0, atol=1e-6)
    assert (student - teacher).abs().mean() > 1e-2  # the adapter changes the output
    half = SharedLoRAModel(unet, "default", 0.5)  # a scale, as diffusers' set_adapters takes it
    assert torch.equal(call(unet), direct)  # building the pair leaves the model as it was
    unet.set_adapters("default", 0.5)
    assert torch.equal(call(half.student), call(unet))


def test_a_lora_loaded_with_diffusers_loader(tmp_path):
    """A LoRA file read by diffusers' loader (lora_state_dict + load_lora_adapter, as pipe.load_lora_weights does)."""
    original = add_lora(tiny_unet(seed=0))
    state, _ = diffusers.StableDiffusionXLPipeline.lora_state_dict(save_lora(original, tmp_path))
    unet = tiny_unet(seed=0)
    unet.load_lora_adapter(state, prefix="unet", adapter_name="lcm")
    shared = SharedLoRAModel(unet)
    assert torch.equal(call(shared.student), call(original))
    torch.testing.assert_close(call(shared.teacher), call(BASE), rtol=0, atol=1e-6)


def test_parameters_are_held_once():
    """Student and teacher share every parameter storage; two separate models hold the base twice."""
    unet = add_lora(tiny_unet(seed=0))
    pair = SharedLoRAModel(unet)
    student, teacher = vp_denoisers(pair.student, pair.teacher, lightning_lora(4))

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


def guidance_embedding_of(scale):
    """The SDXL pipeline's own timestep_cond for guidance_scale ``scale`` (time_cond_proj_dim 8)."""
    return diffusers.StableDiffusionXLPipeline.get_guidance_scale_embedding(None, torch.tensor([scale - 1]), 8)


def test_the_views_read_the_models_config():
    """vp_denoisers on the two views reads the UNet's config through them (LCM's guidance embedding where the UNet
    has time_cond_proj_dim: the pipeline's default 5.0, or student_guidance; an error for a UNet without one)."""
    pair = SharedLoRAModel(add_lora(tiny_unet(seed=0, time_cond_proj_dim=8)))
    student, _ = vp_denoisers(pair.student, pair.teacher, lcm_lora(4))
    torch.testing.assert_close(student.timestep_cond, guidance_embedding_of(5.0), rtol=0, atol=0)
    student, _ = vp_denoisers(pair.student, pair.teacher, lcm_lora(4), student_guidance=2.0)
    torch.testing.assert_close(student.timestep_cond, guidance_embedding_of(2.0), rtol=0, atol=0)
    plain = SharedLoRAModel(add_lora(tiny_unet(seed=0)))
    with pytest.raises(ValueError, match="student_guidance=2.0 .* student_unet has none"):
        vp_denoisers(plain.student, plain.teacher, lcm_lora(4), student_guidance=2.0)


# ------------------------------------------------------------------ state: restored, switched per role change


def test_adapter_state_is_restored_after_a_run_and_after_an_exception_in_the_teacher():
    unet = add_lora(add_lora(tiny_unet(seed=0), "a", seed=1), "b", seed=2)
    unet.set_adapters(["a"], 0.7)  # the user's own state: only "a", at 0.7
    unet.disable_adapters()
    before, out_before = peft_state(unet), call(unet)
    grads = [p.requires_grad for p in unet.parameters()]
    pair = SharedLoRAModel(unet, ["a", "b"], [1.0, 0.5])
    assert peft_state(unet) == before and [p.requires_grad for p in unet.parameters()] == grads
    roles = []
    hook = unet.register_forward_pre_hook(lambda module, args: roles.append(
        "teacher" if peft_state(unet)[0][1] else f"student{peft_state(unet)[0][0]}"))
    generate(pair.student, pair.teacher, COND, lcm_lora(4), seeds=[0, 1], height=128, width=128, lam=0.3, k=2,
             dtype=torch.float32, disable=True)
    hook.remove()
    student = "student['a', 'b']"
    assert roles == [student, "teacher", student, "teacher", student, student]  # per step: student, then teacher
    assert peft_state(unet) == before and torch.equal(call(unet), out_before)

    def boom(module, args):
        if peft_state(module)[0][1]:  # adapters disabled: inside the teacher call
            raise RuntimeError("teacher failed")

    unet.register_forward_pre_hook(boom)
    student, teacher = vp_denoisers(pair.student, pair.teacher, lcm_lora(4))
    with pytest.raises(RuntimeError, match="teacher failed"):
        kdpp.sample_lcm_distpp(student, teacher, X * 15, lcm_lora(4).sigmas(), 0.01, extra_args=KW,
                               teacher_extra_args={"cond": KW, "uncond": KW}, disable=True)
    assert peft_state(unet) == before and [p.requires_grad for p in unet.parameters()] == grads


def test_within_a_session_the_model_stays_in_the_last_role_until_the_role_changes():
    """The adapters are switched when the role changes, not around every call: after a teacher call the model keeps
    its adapters disabled until a student call; the session's end restores the model."""
    unet = add_lora(tiny_unet(seed=0))
    pair = SharedLoRAModel(unet)
    before = peft_state(unet)
    with pair.session():
        call(pair.teacher)
        assert all(disabled for _, disabled, _ in peft_state(unet))
        call(pair.teacher)
        call(pair.student)
        assert not any(disabled for _, disabled, _ in peft_state(unet))
        with pair.session():  # re-entrant: the outer session holds
            call(pair.teacher)
        assert all(disabled for _, disabled, _ in peft_state(unet))
    assert peft_state(unet) == before


# ------------------------------------------------------------------ adapters changed after the pair was built


def test_teacher_follows_adapters_loaded_after_the_pair_was_built(tmp_path):
    """pipe.load_lora_weights(other) on modules the first LoRA did not touch, after the pair was built: the teacher is
    still the base model, and the student is the model's active adapters as diffusers set them."""
    style = add_lora(tiny_unet(seed=0), "style", seed=3, targets=("ff.net.2", "proj_in"))
    pipe = tiny_sdxl_text_pipeline()
    pipe.unet = add_lora(tiny_unet(seed=0), "distill")
    pipe.register_modules(unet=pipe.unet)
    pair = SharedLoRAModel(pipe.unet)
    pipe.load_lora_weights(save_lora(style, tmp_path, "style"), adapter_name="style")
    torch.testing.assert_close(call(pair.teacher), call(BASE), rtol=0, atol=1e-6)
    assert torch.equal(call(pair.student), call(pipe.unet))  # only "style" active, as loading left it
    pipe.set_adapters(["distill", "style"], [1.0, 0.5])
    both = call(pipe.unet)
    assert torch.equal(call(pair.student), both) and (both - call(BASE)).abs().mean() > 1e-2
    torch.testing.assert_close(call(pair.teacher), call(BASE), rtol=0, atol=1e-6)
    named = SharedLoRAModel(pipe.unet, "distill")  # a fixed student: the later adapter stays off for it
    torch.testing.assert_close(call(named.student), call(add_lora(tiny_unet(seed=0), "distill")), rtol=0, atol=1e-6)


def test_deleted_adapters_are_refused_or_followed():
    """delete_adapters after the pair was built: with no adapter left active the student would be the base model, so
    the run is refused naming the fix; named adapters that are gone are refused; remaining active ones are followed."""
    unet = add_lora(tiny_unet(seed=0), "distill")
    pair, named = SharedLoRAModel(unet), SharedLoRAModel(unet, "distill")
    unet.delete_adapters("distill")
    with pytest.raises(ValueError, match=r"no adapter is active on the model \(it has \[\]\).*\(pipe.set_adapters"):
        call(pair.student)
    with pytest.raises(ValueError, match=r"adapter_names \['distill'\] are not loaded .* deleted after the pair was built"):
        generate(named.student, named.teacher, COND, lcm_lora(2), seeds=[0, 1], height=128, width=128, disable=True)
    two = add_lora(add_lora(tiny_unet(seed=0), "a", seed=1), "b", seed=2)
    two.set_adapters(["a", "b"])
    pair = SharedLoRAModel(two)
    two.delete_adapters("a")
    assert torch.equal(call(pair.student), call(two)) and not torch.allclose(call(pair.student), call(BASE), atol=1e-4)


@pytest.mark.parametrize("targets", [("ff.net.2", "proj_in"), ("to_q", "to_k", "to_v", "to_out.0")],
                         ids=["other-modules", "same-modules"])
def test_an_adapter_reloaded_under_its_name_is_followed(targets):
    """delete_adapters then an adapter of the same name (on other modules, or the same ones), with no run in between:
    the teacher is still the base model and the student the model as it is now."""
    unet = add_lora(tiny_unet(seed=0), "distill")
    pair = SharedLoRAModel(unet)
    call(pair.teacher)
    unet.delete_adapters("distill")
    add_lora(unet, "distill", seed=9, targets=targets)
    torch.testing.assert_close(call(pair.teacher), call(BASE), rtol=0, atol=1e-6)
    assert torch.equal(call(pair.student), call(unet)) and not torch.allclose(call(unet), call(BASE), atol=1e-4)


def test_adapters_disabled_or_fused_after_the_pair_was_built_are_refused():
    unet = add_lora(tiny_unet(seed=0))
    pair = SharedLoRAModel(unet)
    unet.disable_adapters()
    with pytest.raises(ValueError, match=r"adapters are disabled \(model.disable_adapters\(\)\).*model.enable_adapters\(\)"):
        call(pair.student)
    unet.enable_adapters()
    unet.fuse_lora()
    with pytest.raises(ValueError, match=r"fused into its weights.*\(unfuse_lora\)"):
        call(pair.teacher)


def test_refuses_models_without_adapters_or_with_a_fused_lora():
    with pytest.raises(ValueError, match="no PEFT adapter layers"):
        SharedLoRAModel(tiny_unet(seed=0))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        SharedLoRAModel(lambda x: x)
    unet = add_lora(tiny_unet(seed=0))
    with pytest.raises(ValueError, match=r"adapter_names \['nope'\] are not loaded"):
        SharedLoRAModel(unet, "nope")
    with pytest.raises(ValueError, match="adapter_weights has 2 entries for 1 adapter_names"):
        SharedLoRAModel(unet, "default", [1.0, 0.5])
    unet.fuse_lora()
    with pytest.raises(ValueError, match="fused into its weights"):
        SharedLoRAModel(unet)


# ------------------------------------------------------------------ LoRA pairs of every family, through the one body


def run_diffusers(unet, scheduler, steps, seed, generators=None):
    """diffusers' denoising loop for one image at 128 x 128 (no CFG, as the LoRA students run); step j's
    scheduler noise from ``generators(j)``."""
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
    kw = one(COND).unet_kwargs(time_ids(128, 128))
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
    """With lam = 0 the one-model pair samples the LoRA student exactly as diffusers' matching scheduler does
    (LCMScheduler for LCM-LoRA, EulerDiscreteScheduler with trailing spacing for Lightning LoRA)."""
    unet = add_lora(tiny_unet(seed=0))
    pair = SharedLoRAModel(unet)
    seed = 7
    got = generate(pair.student, pair.teacher, one(COND), preset, seeds=[seed], height=128, width=128, lam=0.0,
                   disable=True)
    solver_stream = lambda j: torch.Generator().manual_seed(stream_seed(stream_seed(seed, 1), j))  # noqa: E731 (kdpp.noise)
    want = run_diffusers(unet, scheduler(), 4, seed, generators=solver_stream)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    guided = generate(pair.student, pair.teacher, one(COND), preset, seeds=[seed], height=128, width=128, disable=True)
    assert not torch.equal(guided, got)  # the default lam guides


def family_run(family):
    """(generate, LoRA model, base model, conditioning, preset, size) of a tiny model of ``family``."""
    from kdpp.diffusers import flow_presets, flux, sd3, wan
    from kdpp.diffusers.flow_models import FlowConditioning

    g = torch.Generator().manual_seed(4)
    if family == "sdxl":
        return generate, add_lora(tiny_unet(0)), tiny_unet(0), COND, lcm_lora(2), dict(height=64, width=64)
    if family == "sd3":
        cond = FlowConditioning(*(torch.randn(*s, generator=g) for s in ((2, 9, 32), (2, 9, 32), (2, 64), (2, 64))))
        return sd3.generate, add_lora(tiny_sd3(0)), tiny_sd3(0), cond, flow_presets.sd35_large_turbo(2), dict(height=32, width=32)
    if family == "flux":
        cond = FlowConditioning(torch.randn(2, 7, 32, generator=g), pooled_prompt_embeds=torch.randn(2, 32, generator=g))
        preset = flow_presets.flux_dev_lora(2)
        return (flux.generate, add_lora(tiny_flux(0, guidance_embeds=True)), tiny_flux(0, guidance_embeds=True), cond,
                preset, dict(height=32, width=32))
    cond = wan.WanConditioning(torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g))
    return wan.generate, add_lora(tiny_wan(0)), tiny_wan(0), cond, flow_presets.wan21_lightx2v(2), dict(height=32, width=32,
                                                                                                        num_frames=5)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux", "wan"])
def test_every_familys_lora_pair_runs_through_the_body(family):
    """For each family: the pair at lam = 0 is the LoRA model sampled alone (no teacher); a guided run calls the one
    model once per guided step with its adapters off, and equals the same run with a separate copy of the base
    model as the teacher."""
    run, model, base, cond, preset, size = family_run(family)
    pair = SharedLoRAModel(model)
    options = dict(seeds=[3, 4], disable=True, **size)
    torch.testing.assert_close(run(pair.student, pair.teacher, cond, preset, lam=0.0, **options),
                               run(model, None, cond, preset, lam=0.0, **options), rtol=0, atol=0)
    layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    roles = []
    hook = model.register_forward_pre_hook(lambda module, args: roles.append(layer.disable_adapters))
    guided = run(pair.student, pair.teacher, cond, preset, lam=0.5, k=1, **options)
    hook.remove()
    assert roles == [False, True, False]  # 2 steps: student, teacher (the first step), student
    separate = run(model, base, cond, preset, lam=0.5, k=1, **options)
    torch.testing.assert_close(guided, separate, rtol=1e-5, atol=1e-5)
