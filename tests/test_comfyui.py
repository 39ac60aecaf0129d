"""The Distillation++ node pack inside a real ComfyUI (0.3.75, fetched on first use: tests/comfyui_env.py).

Tiny checkpoint-free SD1.5-shaped UNets (EPS, and the same UNet as a CONST flow model) with random
weights, one torch thread; ComfyUI is imported once per session.
"""
import asyncio
import json
import time
import warnings
from pathlib import Path

import pytest
import torch

import comfyui_env
from comfyui_env import comfyui_root, import_comfyui

DOCS = Path(__file__).resolve().parent.parent / "docs"
CONTEXT = 16
# ComfyUI's built-in samplers that kdpp has and defines the same way, by the name both use
# (ComfyUI's dpmpp_2s_ancestral_cfg_pp and dpmpp_2m_cfg_pp differ from kdpp's, which have names of their own:
# test_cfg_pp_forms_comfyui_defines_differently)
BUILTIN = ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm", "euler_cfg_pp", "euler_ancestral_cfg_pp"]


@pytest.fixture(scope="session")
def cf():
    root, reason = comfyui_root()
    if root is None:
        pytest.skip(reason)
    started = time.perf_counter()
    env = import_comfyui(root)
    env.import_seconds = time.perf_counter() - started
    from kdpp.comfyui import sampling  # imports comfy: only now
    env.sampling = sampling
    return env


def tiny_model(cf, flow=False, seed=0):
    return comfyui_env.tiny_model(cf, flow=flow, seed=seed, channels=32, context_dim=CONTEXT)


def cond(seed, batch=1):
    return comfyui_env.conditioning(seed, CONTEXT, batch)


def latent(batch=1):
    return {"samples": torch.zeros(batch, 4, 8, 8)}


def custom_sample(cf, model, sampler, sigmas, seed=5, cfg=3.0, lat=None, add_noise=True):
    """ComfyUI's SamplerCustom node, as a graph runs it."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    out = SamplerCustom.execute(model, add_noise, seed, cfg, cond(1), cond(2), sampler, sigmas, lat or latent())
    return out.result[0]["samples"]


def schedule(cf, model, steps=6, scheduler="karras"):
    return cf.comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


class Counter:
    """Counts the teacher's evaluations from inside ComfyUI (its UNet function wrapper): one per conditional batch."""

    def __init__(self, patcher):
        self.patcher = patcher.clone()
        self.patcher.set_model_unet_function_wrapper(self)
        self.timesteps, self.inputs = [], []

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: keep counting here
        return self

    def __call__(self, apply_model, args):
        for j, kind in enumerate(args["cond_or_uncond"]):
            if kind == 0:
                n = args["input"].shape[0] // len(args["cond_or_uncond"])
                self.timesteps.append(float(args["timestep"][j * n]))  # sigma (t for CONST models)
                self.inputs.append(args["input"][j * n:(j + 1) * n].clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    @property
    def evaluations(self):
        return len(self.timesteps)


def kdpp_sampler(cf, solver, teacher=None, lam=0.0, k=1, teacher_cfg=3.0, **kw):
    return cf.sampling.DistillationSampler(solver, teacher, cond(1), cond(2), teacher_cfg, lam, k, **kw)


@pytest.fixture(scope="session")
def student(cf):
    return tiny_model(cf, seed=0)


@pytest.fixture(scope="session")
def teacher(cf):
    return tiny_model(cf, seed=1)


@pytest.mark.parametrize("name", BUILTIN)
def test_lam_zero_equals_comfyui_builtin_sampler(cf, student, name):
    """lam = 0 through SamplerCustom is ComfyUI's own sampler of that name (same seed, same noise)."""
    sigmas = schedule(cf, student)
    want = custom_sample(cf, student, cf.comfy.samplers.sampler_object(name), sigmas)
    got = custom_sample(cf, student, kdpp_sampler(cf, name), sigmas)
    assert torch.isfinite(want).all() and want.std() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("name, ours", [("dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp_per_stage"),
                                        ("dpmpp_2m_cfg_pp", "dpmpp_2m_cfg_pp_guided_history")])
def test_cfg_pp_forms_comfyui_defines_differently(cf, student, name, ours):
    """Two CFG++ forms are defined differently in ComfyUI 0.3.75 and in kdpp, which names them apart (docs/method.md:
    D_w leads, the same stage's D_u
    gives the direction, the student's own estimates elsewhere):

    - 2S: ComfyUI ends a step with (s_down / s) (x + D1_w - D2_u) - expm1(-h) D2_w (the first stage's guided x0
      next to the second stage's unconditional one); kdpp with D2_w + (s_down / s) (x - D2_u);
    - 2M: ComfyUI's second-order term extrapolates D_w - D_u_old, kdpp's D_w - D_w_old.

    Where no midpoint / no second-order term is used they agree: one step to 0 (2S), two steps (2M: the first
    step and the step to 0 are first order)."""
    sigmas = schedule(cf, student)
    same = sigmas[-2:] if name.startswith("dpmpp_2s") else torch.cat([sigmas[:2], sigmas[-1:]])
    want = custom_sample(cf, student, cf.comfy.samplers.sampler_object(name), same)
    got = custom_sample(cf, student, kdpp_sampler(cf, ours), same)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    full = custom_sample(cf, student, cf.comfy.samplers.sampler_object(name), sigmas)
    assert (custom_sample(cf, student, kdpp_sampler(cf, ours), sigmas) - full).abs().max() > 1e-2
    from kdpp.comfyui.nodes import DistillationPPSampler

    offered = DistillationPPSampler.INPUT_TYPES()["required"]["solver"][0]
    assert ours in offered and name not in offered  # one name, one sampler


SOLVERS5 = ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"]


@pytest.mark.parametrize("name", SOLVERS5 + ["euler_cfg_pp", "dpmpp_2m_cfg_pp_guided_history"])
def test_teacher_evaluations_counted_inside_comfyui(cf, student, teacher, name):
    """0 at lam = 0 (the teacher is not even loaded); k per run (2S: two per guided step, one per stage)."""
    sigmas = schedule(cf, student)
    counter = Counter(teacher)
    custom_sample(cf, student, kdpp_sampler(cf, name, counter.patcher, lam=0.0, k=3), sigmas)
    assert counter.evaluations == 0
    custom_sample(cf, student, kdpp_sampler(cf, name, counter.patcher, lam=0.5, k=2), sigmas)
    per_step = 2 if name.startswith("dpmpp_2s") else 1
    assert counter.evaluations == 2 * per_step
    # renoised to the next sigma (2S: the midpoint, then the next sigma); apply_model receives sigma
    assert counter.timesteps[-1] == pytest.approx(float(sigmas[2]), rel=1e-5)


@pytest.mark.parametrize("name", SOLVERS5)
def test_teacher_clone_of_student_in_guidance_form_is_lam_zero_exactly(cf, student, name):
    """Guidance form (paper eq. 10): R = D + lam (T(x_i) - S(x_i)) = D when T is the student's clone, same conds and CFG."""
    sigmas = schedule(cf, student)
    clone = Counter(student)
    plain = custom_sample(cf, student, kdpp_sampler(cf, name), sigmas)
    guided = custom_sample(cf, student, kdpp_sampler(cf, name, clone.patcher, lam=0.7, k=3, renoise="guidance"), sigmas)
    assert clone.evaluations >= 3
    assert torch.equal(guided, plain)


def test_guided_run_differs_and_is_reproducible(cf, student, teacher):
    sigmas = schedule(cf, student)
    plain = custom_sample(cf, student, kdpp_sampler(cf, "euler_ancestral"), sigmas)
    a = custom_sample(cf, student, kdpp_sampler(cf, "euler_ancestral", teacher, lam=0.5, k=2), sigmas)
    b = custom_sample(cf, student, kdpp_sampler(cf, "euler_ancestral", teacher, lam=0.5, k=2), sigmas)
    assert torch.equal(a, b) and (a - plain).abs().max() > 1e-3


def comfy_sample(cf, model, sampler, sigmas, seed=5, cfg=3.0):
    """comfy.samplers.sample with a callback recording (i, x)."""
    lat = latent()["samples"]
    noise = cf.comfy.sample.prepare_noise(lat, seed)
    xs = {}
    out = cf.comfy.samplers.sample(model, noise, cond(1), cond(2), cfg, model.load_device, sampler, sigmas,
                                   model_options=model.model_options, latent_image=lat, seed=seed,
                                   callback=lambda i, denoised, x, total: xs.setdefault(i, x.clone()))
    return out, xs


@pytest.fixture(scope="session")
def flow_student(cf):
    return tiny_model(cf, flow=True, seed=2)


def test_const_flow_model_euler_equals_comfyui_euler(cf, flow_student):
    """A CONST model (x in the RF frame, sigma = t, schedule from t = 1): kdpp runs in the VE frame around it."""
    ms = flow_student.get_model_object("model_sampling")
    assert isinstance(ms, cf.comfy.model_sampling.CONST)
    sigmas = schedule(cf, flow_student, scheduler="simple")
    assert float(sigmas[0]) == 1.0
    want, want_x = comfy_sample(cf, flow_student, cf.comfy.samplers.sampler_object("euler"), sigmas)
    got, got_x = comfy_sample(cf, flow_student, kdpp_sampler(cf, "euler"), sigmas)
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    for i in want_x:  # callbacks see the host's frame
        torch.testing.assert_close(got_x[i], want_x[i], rtol=1e-5, atol=1e-5 * want_x[i].abs().max().item())


def test_const_flow_model_teacher_is_queried_in_the_rf_frame(cf, flow_student):
    """renoise='deterministic' at the next level: the teacher sees the point plain Euler steps to, x_1 in RF."""
    sigmas = schedule(cf, flow_student, scheduler="simple")
    _, plain_x = comfy_sample(cf, flow_student, cf.comfy.samplers.sampler_object("euler"), sigmas)
    counter = Counter(flow_student)
    comfy_sample(cf, flow_student, kdpp_sampler(cf, "euler", counter.patcher, lam=1.0, k=1, renoise="deterministic"), sigmas)
    assert counter.evaluations == 1
    assert counter.timesteps[0] == pytest.approx(float(sigmas[1]), rel=1e-5)  # apply_model receives t
    torch.testing.assert_close(counter.inputs[0], plain_x[1], rtol=1e-5, atol=1e-5 * plain_x[1].abs().max().item())


def test_kdpp_hosts_registered_into_comfyui(cf, student, flow_student):
    """kdpp.hosts.register into ComfyUI's k_diffusion namespace: ComfyUI's own seeding, the CONST frame."""
    import comfy.k_diffusion.sampling as ks

    from kdpp.hosts import register

    added = register(ks, ["euler", "euler_ancestral", "lcm"])
    try:
        for model, name, builtin, scheduler in [(student, "euler_ancestral_distpp", "euler_ancestral", "karras"),
                                                (student, "lcm_distpp", "lcm", "karras"),
                                                (flow_student, "euler_distpp", "euler", "simple"),
                                                (flow_student, "lcm_distpp", "lcm", "simple")]:
            sigmas = schedule(cf, model, scheduler=scheduler)
            want = custom_sample(cf, model, cf.comfy.samplers.sampler_object(builtin), sigmas)
            got = custom_sample(cf, model, cf.comfy.samplers.ksampler(name, {"lam": 0.0}), sigmas)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)
    finally:
        for name in added:
            delattr(ks, name)


def test_split_schedule_calls_the_teacher_as_often_as_the_unsplit_run(cf, student, teacher):
    from comfy_extras.nodes_custom_sampler import SplitSigmas

    from kdpp.comfyui.nodes import DistillationPPKSampler

    counter = Counter(teacher)
    node = DistillationPPKSampler()
    common = dict(model=student, seed=5, steps=6, cfg=3.0, solver="euler_ancestral", scheduler="karras",
                  positive=cond(1), negative=cond(2), teacher=counter.patcher, teacher_positive=cond(1),
                  teacher_negative=cond(2), teacher_cfg=3.0, lam=0.5, k=3, renoise="random", renoise_level="next",
                  denoise=1.0)
    node.sample(latent_image=latent(), **common)
    assert counter.evaluations == 3
    for split in (1, 2, 4):  # KSamplerAdvanced-style two stages
        counter.timesteps.clear()
        first = node.sample(latent_image=latent(), end_at_step=split, return_with_leftover_noise="enable", **common)[0]
        node.sample(latent_image=first, add_noise="disable", start_at_step=split, **common)
        assert counter.evaluations == 3, split
    # SamplerCustom with SplitSigmas: k counts on the full schedule given as full_sigmas
    sigmas = schedule(cf, student)
    high, low = SplitSigmas.execute(sigmas, 2).result
    counter.timesteps.clear()
    stage = lambda s: kdpp_sampler(cf, "euler", counter.patcher, lam=0.5, k=3, full_sigmas=sigmas)
    first = custom_sample(cf, student, stage(high), high)
    custom_sample(cf, student, stage(low), low, lat={"samples": first}, add_noise=False)
    assert counter.evaluations == 3


def test_lora_student_on_its_base_teacher_shares_the_base_weights(cf):
    """LoraLoader's own code makes the student a clone of the base with LoRA patches; the base is the teacher.

    One BaseModel holds the weights for both; the result equals the same run with an independent
    copy of the base as teacher (so each call saw its own weights), and the shared model is
    left with the student's weights loaded, as ComfyUI leaves a sampled model.
    """
    import comfy.sd

    base = tiny_model(cf, seed=4)
    student, _ = comfy.sd.load_lora_for_models(base, None, comfyui_env.lora_state_dict(base), 1.0, 0.0)
    assert student.is_clone(base) and student.model is base.model and student.patches
    sigmas = schedule(cf, student)
    plain = custom_sample(cf, student, kdpp_sampler(cf, "euler_ancestral"), sigmas)
    counter = Counter(base)
    sampler = kdpp_sampler(cf, "euler_ancestral", counter.patcher, lam=0.5, k=2)
    params_before = {p.data_ptr() for p in base.model.parameters()}
    shared = custom_sample(cf, student, sampler, sigmas)
    assert counter.evaluations == 2
    switch = sampler.last_switch
    assert switch.shared and switch.needed and switch.switches == 2 * 2 + 1  # load the student, then 2 per call
    separate = custom_sample(cf, student, kdpp_sampler(cf, "euler_ancestral", tiny_model(cf, seed=4), lam=0.5, k=2), sigmas)
    torch.testing.assert_close(shared, separate, rtol=1e-5, atol=1e-5 * separate.abs().max().item())
    assert (shared - plain).abs().max() > 1e-3
    assert base.model.current_weight_patches_uuid == student.patches_uuid
    # the plain student run after a guided one is unchanged (no weights left from the teacher)
    torch.testing.assert_close(custom_sample(cf, student, kdpp_sampler(cf, "euler_ancestral"), sigmas), plain,
                               rtol=0, atol=0)
    assert len(params_before) == sum(1 for _ in base.model.parameters())


class TinyModel:
    """Test-only node: a tiny checkpoint-free MODEL (ComfyUI nodes need a checkpoint file otherwise)."""

    CATEGORY, RETURN_TYPES, FUNCTION = "testing", ("MODEL",), "load"
    env = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "flow": ("BOOLEAN", {"default": False})}}

    def load(self, seed, flow):
        return (tiny_model(self.env, flow=flow, seed=seed),)


class TinyConditioning:
    CATEGORY, RETURN_TYPES, FUNCTION = "testing", ("CONDITIONING",), "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    def encode(self, seed):
        return (cond(seed),)


class CaptureLatent:
    CATEGORY, RETURN_TYPES, FUNCTION, OUTPUT_NODE = "testing", (), "capture", True
    seen = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "name": ("STRING", {"default": ""})}}

    def capture(self, samples, name):
        self.seen[name] = samples["samples"]
        return {}


class Server:
    """The minimal server object PromptExecutor reports to."""

    client_id, last_node_id, sockets_metadata = None, None, {}

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


@pytest.fixture(scope="session")
def graph(cf, tmp_path_factory):
    """ComfyUI's node registry with the kdpp node pack loaded as a custom node (the documented shim)."""
    import kdpp.comfyui

    custom_nodes = tmp_path_factory.mktemp("ComfyUI") / "custom_nodes"
    custom_nodes.mkdir()
    kdpp.comfyui.install(custom_nodes)
    cf.folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes)], set())
    models = tmp_path_factory.mktemp("models")
    for folder, name in [("checkpoints", "sd_xl_base_1.0.safetensors"), ("loras", "sdxl_lightning_4step_lora.safetensors")]:
        (models / folder).mkdir()
        (models / folder / name).touch()  # validation checks the names only
        cf.folder_paths.add_model_folder_path(folder, str(models / folder))
    asyncio.run(cf.nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    TinyModel.env = cf
    cf.nodes.NODE_CLASS_MAPPINGS.update(KDPPTestTinyModel=TinyModel, KDPPTestConditioning=TinyConditioning,
                                        KDPPTestCapture=CaptureLatent)
    return cf


def run_prompt(cf, prompt):
    valid = asyncio.run(cf.execution.validate_prompt("test", prompt, None))
    assert valid[0], valid
    server = Server()
    executor = cf.execution.PromptExecutor(server, cache_type=False, cache_args={"lru": 0, "ram": 0})  # as main.py
    executor.execute(prompt, "test", {}, valid[2])
    assert executor.success, [m for m in server.messages if m[0] == "execution_error"]
    return server


def test_node_pack_loads_as_custom_node_and_runs_an_api_graph_headless(graph):
    assert {"DistillationPPSampler", "DistillationPPKSampler"} <= set(graph.nodes.NODE_CLASS_MAPPINGS)
    assert graph.nodes.NODE_DISPLAY_NAME_MAPPINGS["DistillationPPSampler"] == "Distillation++ Sampler"
    teacher_args = {"teacher": ["2", 0], "teacher_positive": ["3", 0], "teacher_negative": ["4", 0], "teacher_cfg": 3.0,
                    "lam": 0.5, "k": 2, "renoise": "random", "renoise_level": "next"}
    prompt = {
        "1": {"class_type": "KDPPTestTinyModel", "inputs": {"seed": 0, "flow": False}},
        "2": {"class_type": "KDPPTestTinyModel", "inputs": {"seed": 1, "flow": False}},
        "3": {"class_type": "KDPPTestConditioning", "inputs": {"seed": 1}},
        "4": {"class_type": "KDPPTestConditioning", "inputs": {"seed": 2}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 6, "denoise": 1.0}},
        "7": {"class_type": "DistillationPPSampler", "inputs": {"solver": "dpmpp_2m", "eta": 1.0, "s_noise": 1.0, **teacher_args}},
        "8": {"class_type": "SamplerCustom", "inputs": {"model": ["1", 0], "add_noise": True, "noise_seed": 5, "cfg": 3.0,
                                                         "positive": ["3", 0], "negative": ["4", 0], "sampler": ["7", 0],
                                                         "sigmas": ["6", 0], "latent_image": ["5", 0]}},
        "9": {"class_type": "KDPPTestCapture", "inputs": {"samples": ["8", 0], "name": "custom"}},
        "10": {"class_type": "DistillationPPKSampler",
               "inputs": {"model": ["1", 0], "seed": 5, "steps": 6, "cfg": 3.0, "solver": "dpmpp_2m", "scheduler": "karras",
                          "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0, **teacher_args}},
        "11": {"class_type": "KDPPTestCapture", "inputs": {"samples": ["10", 0], "name": "ksampler"}},
    }
    run_prompt(graph, prompt)
    custom, ksampler = CaptureLatent.seen["custom"], CaptureLatent.seen["ksampler"]
    assert custom.shape == (1, 4, 8, 8) and torch.isfinite(custom).all()
    torch.testing.assert_close(ksampler, custom, rtol=0, atol=0)  # the same run, built two ways
    direct = custom_sample(graph, tiny_model(graph, seed=0), kdpp_sampler(graph, "dpmpp_2m", tiny_model(graph, seed=1),
                                                                          lam=0.5, k=2), schedule(graph, tiny_model(graph)))
    torch.testing.assert_close(custom, direct, rtol=0, atol=0)


def ui_to_api(cf, workflow):
    """The API form of a UI-format workflow: links by slot, widget values in INPUT_TYPES order (seed widgets
    carry the frontend's control_after_generate value after them)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        spec = cf.nodes.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i.get("link") is not None}
        widgets = iter(node["widgets_values"])
        inputs = {}
        for section in ("required", "optional"):
            for name, (typ, *opts) in spec.get(section, {}).items():
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
                else:
                    value = next(widgets, None)
                    if value is None:
                        continue
                    inputs[name] = value
                    if opts and opts[0].get("control_after_generate"):
                        assert next(widgets) in ("fixed", "increment", "decrement", "randomize")
        assert next(widgets, None) is None, f"node {node['id']} has widget values left over"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_example_workflow_in_docs_validates(graph):
    """docs/comfyui/: the LoRA-on-base workflow in API format validates; the UI format is the same graph."""
    api = json.loads((DOCS / "comfyui" / "distillation_pp_lora_api.json").read_text())
    valid = asyncio.run(graph.execution.validate_prompt("docs", api, None))
    assert valid[0] and valid[2] == ["8"], valid
    ui = json.loads((DOCS / "comfyui" / "distillation_pp_lora.json").read_text())
    assert ui_to_api(graph, ui) == api


def test_inpainting_mask_reaches_the_teacher(cf, student, teacher):
    """With a noise_mask ComfyUI keeps the unmasked latent in the student's x0; the teacher gets the same masking,
    so the guided x0 R(D) = D + lam (T - D) keeps it too on the guided steps."""
    lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, 4:] = 1.0  # repaint the right half
    sigmas = schedule(cf, student)
    counter = Counter(teacher)
    denoised = {}
    noise = cf.comfy.sample.prepare_noise(lat, 5)
    out = cf.comfy.samplers.sample(student, noise, cond(1), cond(2), 3.0, student.load_device,
                                   kdpp_sampler(cf, "euler_ancestral", counter.patcher, lam=0.8, k=2), sigmas,
                                   model_options=student.model_options, latent_image=lat, denoise_mask=mask, seed=5,
                                   callback=lambda i, d, x, total: denoised.setdefault(i, d.clone()))
    assert counter.evaluations == 2
    kept = student.model.process_latent_in(lat)[..., :4]  # the sampler works on the model's latent scale
    for i in (0, 1):  # guided steps: the refined x0 keeps the latent where the mask is 0
        torch.testing.assert_close(denoised[i][..., :4], kept, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[..., :4], lat[..., :4], rtol=1e-5, atol=1e-5)


def test_bad_inputs_get_clear_errors(cf, student, teacher):
    with pytest.raises(ValueError, match="solver must be one of .* got 'heun'"):
        kdpp_sampler(cf, "heun")
    with pytest.raises(ValueError, match="lam=0.5 needs a teacher MODEL"):
        kdpp_sampler(cf, "euler", None, lam=0.5)
    sdxl_like = tiny_model(cf, seed=1)
    sdxl_like.model.latent_format = cf.comfy.latent_formats.SDXL()
    with pytest.raises(ValueError, match="teacher MODEL works in the SDXL latent space and the student in SD15"):
        custom_sample(cf, student, kdpp_sampler(cf, "euler", sdxl_like, lam=0.5), schedule(cf, student))
    with pytest.raises(ValueError, match="renoise must be one of"):
        custom_sample(cf, student, kdpp_sampler(cf, "euler", teacher, lam=0.5, renoise="sometimes"), schedule(cf, student))


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_ksampler_node_at_lam_zero_equals_comfyuis_ksampler(cf, student, teacher, denoise):
    """The all-in-one node builds the schedule, noise and conditioning as ComfyUI's KSampler (and KSamplerAdvanced)."""
    from kdpp.comfyui.nodes import DistillationPPKSampler

    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    want = cf.nodes.KSampler().sample(student, 7, 5, 3.0, "euler_ancestral", "normal", cond(1), cond(2), lat,
                                      denoise=denoise)[0]["samples"]
    got = DistillationPPKSampler().sample(student, 7, 5, 3.0, "euler_ancestral", "normal", cond(1), cond(2), lat, teacher,
                                          cond(1), cond(2), 3.0, 0.0, 1, "random", "next", denoise)[0]["samples"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    stage = cf.nodes.KSamplerAdvanced().sample(student, "enable", 7, 5, 3.0, "euler_ancestral", "normal", cond(1), cond(2),
                                               lat, 0, 2, "enable")[0]
    ours = DistillationPPKSampler().sample(student, 7, 5, 3.0, "euler_ancestral", "normal", cond(1), cond(2), lat, teacher,
                                           cond(1), cond(2), 3.0, 0.0, 1, "random", "next", 1.0, end_at_step=2,
                                           return_with_leftover_noise="enable")[0]
    torch.testing.assert_close(ours["samples"], stage["samples"], rtol=1e-5, atol=1e-5 * stage["samples"].abs().max().item())


def test_one_step_run_calls_the_teacher_with_the_default_renoise_level(cf, student, teacher):
    """A 1-step student (SD-Turbo's SDTurboScheduler, 1-step LCM / DMD2): renoise_level 'auto' (the default) renoises
    the step to sigma 0 at its own level, so lam acts; 'next' (tau = 0 there) calls no teacher."""
    from comfy_extras.nodes_custom_sampler import SDTurboScheduler

    from kdpp.comfyui.nodes import TEACHER_INPUTS

    assert TEACHER_INPUTS["renoise_level"][1]["default"] == "auto"
    sigmas = SDTurboScheduler.execute(student, 1, 1.0).result[0]
    assert len(sigmas) == 2 and float(sigmas[-1]) == 0
    plain = custom_sample(cf, student, kdpp_sampler(cf, "euler"), sigmas, cfg=1.0)
    counter = Counter(teacher)
    guided = custom_sample(cf, student, kdpp_sampler(cf, "euler", counter.patcher, lam=1.0, k=1), sigmas, cfg=1.0)
    assert counter.timesteps == pytest.approx([float(sigmas[0])], rel=1e-5) and (guided - plain).abs().max() > 1e-3
    counter.timesteps.clear()
    with warnings.catch_warnings():  # kdpp's core may warn that this guided step calls no teacher
        warnings.simplefilter("ignore", UserWarning)
        same = custom_sample(cf, student, kdpp_sampler(cf, "euler", counter.patcher, lam=1.0, k=1, renoise_sigma="next"),
                             sigmas, cfg=1.0)
    assert counter.evaluations == 0 and torch.equal(same, plain)



@pytest.mark.parametrize("renoise, level", [("random", "next"), ("deterministic", "next"), ("random", "random")])
def test_split_runs_equal_the_unsplit_run(cf, student, teacher, renoise, level):
    """Each step's renoise noise and random level are functions of (seed, step of the full schedule): split runs
    (KSamplerAdvanced-style stages, SamplerCustom + SplitSigmas with full_sigmas) equal the unsplit run, random renoise
    included."""
    from comfy_extras.nodes_custom_sampler import SplitSigmas

    from kdpp.comfyui.nodes import DistillationPPKSampler

    node = DistillationPPKSampler()
    common = dict(model=student, seed=5, steps=6, cfg=3.0, solver="euler", scheduler="karras", positive=cond(1),
                  negative=cond(2), teacher=teacher, teacher_positive=cond(1), teacher_negative=cond(2), teacher_cfg=3.0,
                  lam=0.5, k=3, renoise=renoise, renoise_level=level, denoise=1.0)
    full = node.sample(latent_image=latent(), **common)[0]["samples"]
    tol = dict(rtol=1e-5, atol=1e-5 * full.abs().max().item())
    for split in (1, 2):
        first = node.sample(latent_image=latent(), end_at_step=split, return_with_leftover_noise="enable", **common)[0]
        two = node.sample(latent_image=first, add_noise="disable", start_at_step=split, **common)[0]["samples"]
        torch.testing.assert_close(two, full, **tol, msg=f"KSampler stages split at {split}")
    sigmas = schedule(cf, student)
    stage = lambda: kdpp_sampler(cf, "euler", teacher, lam=0.5, k=3, renoise=renoise, renoise_sigma=level, full_sigmas=sigmas)
    unsplit = custom_sample(cf, student, stage(), sigmas)
    torch.testing.assert_close(unsplit, full, **tol)
    for split in (1, 2):
        high, low = SplitSigmas.execute(sigmas, split).result
        first = custom_sample(cf, student, stage(), high)
        two = custom_sample(cf, student, stage(), low, lat={"samples": first}, add_noise=False)
        torch.testing.assert_close(two, unsplit, **tol, msg=f"SplitSigmas at {split}")


def test_flow_student_with_eps_teacher_is_refused(cf, student, flow_student):
    for s, t, match in [(flow_student, student, r"teacher MODEL is a diffusion model.*the student a flow \(CONST\)"),
                        (student, flow_student, r"teacher MODEL is a flow \(CONST\) model.*the student a diffusion")]:
        with pytest.raises(ValueError, match=match):
            custom_sample(cf, s, kdpp_sampler(cf, "euler", t, lam=0.5), schedule(cf, s, scheduler="simple"))


def test_ksampler_node_noise_switches_are_ksampleradvanced_combos(cf):
    """add_noise / return_with_leftover_noise take KSamplerAdvanced's values, so its API prompts port unchanged."""
    from kdpp.comfyui.nodes import DistillationPPKSampler

    ours, theirs = DistillationPPKSampler.INPUT_TYPES()["optional"], cf.nodes.KSamplerAdvanced.INPUT_TYPES()["required"]
    for name in ("add_noise", "return_with_leftover_noise"):
        assert ours[name][0] == theirs[name][0] and sorted(ours[name][0]) == ["disable", "enable"]
        assert ours[name][1]["default"] == theirs[name][0][0]  # a combo's default is its first value
    with pytest.raises(ValueError, match="add_noise must be 'enable' or 'disable'.*got True"):
        DistillationPPKSampler().sample(None, 0, 1, 1.0, "euler", "normal", None, None, latent(), None, None, None, 1.0,
                                        0.0, 1, "random", "auto", 1.0, add_noise=True)


def test_teacher_conditioning_of_the_wrong_width_names_the_teacher(cf, student, teacher):
    """A teacher conditioning from another text encoder (context dim 32 for a 16-wide UNet): the error says it came
    from the teacher's model / conditioning, with torch's own error as its cause."""
    wide = comfyui_env.conditioning(1, 2 * CONTEXT)
    sampler = cf.sampling.DistillationSampler("euler", teacher, wide, cond(2), 3.0, 0.5, 1)
    with pytest.raises(RuntimeError, match="the teacher MODEL call failed.*teacher_positive") as info:
        custom_sample(cf, student, sampler, schedule(cf, student))
    assert isinstance(info.value.__cause__, RuntimeError) and "teacher" not in str(info.value.__cause__)


def ve_frame_sampler(cf, sample):
    """A ComfyUI SAMPLER running ComfyUI's own k-diffusion ``sample`` in the VE frame around a CONST model
    (sigma = t / (1 - t), x_ve = x / (1 - t), the model called at x_ve / (1 + sigma), t = sigma / (1 + sigma))."""

    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None):
        t = sigmas.double().clamp(max=1 - 1e-9)
        ve = t / (1 - t)

        def denoiser(x_ve, sigma):
            rf = (x_ve / (1 + sigma.reshape(-1, 1, 1, 1))).to(x.dtype)
            return model(rf, (sigma / (1 + sigma)).to(sigmas.dtype), **extra_args).double()

        return (sample(denoiser, x.double() * (1 + ve[0]), ve, disable=True) / (1 + ve[-1])).to(x.dtype)

    return cf.comfy.samplers.KSAMPLER(fn)


@pytest.mark.parametrize("name", ["lcm", "dpmpp_2m"])  # euler: test_const_flow_model_euler_equals_comfyui_euler
def test_const_flow_models_at_lam_zero_against_comfyui(cf, flow_student, name):
    """lam = 0 on a CONST model equals ComfyUI's sampler of that name (lcm), with one documented exception:
    dpmpp_2m. ComfyUI runs DPM-Solver++(2M) in its own sigma = t (log-t step sizes h), kdpp in the VE frame
    (sigma = t / (1 - t), log-sigma step sizes): the first-order steps agree (DPM-Solver++(1) is frame-free), the
    second-order terms (ratios of successive h) differ. kdpp's run equals ComfyUI's own 2M run in the VE frame."""
    import comfy.k_diffusion.sampling as ks

    sigmas = schedule(cf, flow_student, scheduler="simple")
    want = custom_sample(cf, flow_student, cf.comfy.samplers.sampler_object(name), sigmas)
    got = custom_sample(cf, flow_student, kdpp_sampler(cf, name), sigmas)
    tol = dict(rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if name != "dpmpp_2m":
        torch.testing.assert_close(got, want, **tol)
        return
    assert (got - want).abs().max() > 1e-3 * want.abs().max()  # docs/comfyui.md: measured 0.016 on a scale of 15
    torch.testing.assert_close(got, custom_sample(cf, flow_student, ve_frame_sampler(cf, ks.sample_dpmpp_2m), sigmas), **tol)
    two = torch.cat([sigmas[:2], sigmas[-1:]])  # both steps first order
    torch.testing.assert_close(custom_sample(cf, flow_student, kdpp_sampler(cf, name), two),
                               custom_sample(cf, flow_student, cf.comfy.samplers.sampler_object(name), two), **tol)


def test_split_run_of_a_flow_model_equals_the_unsplit_run(cf, flow_student):
    """The same on a CONST model (the solver calls the renoise noise and levels with VE sigmas t / (1 - t))."""
    from comfy_extras.nodes_custom_sampler import SplitSigmas

    flow_teacher = tiny_model(cf, flow=True, seed=3)
    sigmas = schedule(cf, flow_student, scheduler="simple")
    stage = lambda: kdpp_sampler(cf, "euler", flow_teacher, lam=0.5, k=4, renoise="random", renoise_sigma="random",
                                 full_sigmas=sigmas)
    unsplit = custom_sample(cf, flow_student, stage(), sigmas)
    high, low = SplitSigmas.execute(sigmas, 2).result
    two = custom_sample(cf, flow_student, stage(), low, lat={"samples": custom_sample(cf, flow_student, stage(), high)},
                        add_noise=False)
    torch.testing.assert_close(two, unsplit, rtol=1e-5, atol=1e-5 * unsplit.abs().max().item())
