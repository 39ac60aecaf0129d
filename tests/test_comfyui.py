"""The Distillation++ node pack inside a real ComfyUI (0.3.75, fetched on first use: tests/comfyui_env.py).

Tiny models with random weights: an SD1.5-shaped UNet (EPS, and the same UNet as a CONST flow model) and a Wan
2.1 T2V transformer (CONST, 5-D video latents); one torch thread; ComfyUI is imported once per session. Graphs
run headless through ComfyUI's own executor with the pack loaded by its documented install shim.
"""
import ast
import asyncio
import json
import logging
import warnings
import zlib
from pathlib import Path

import pytest
import torch

import comfyui_env
from comfyui_env import comfyui_root, import_comfyui
from kdpp._checks import KdppWarning

DOCS = Path(__file__).resolve().parent.parent / "docs"
CONTEXT = 16
WAN_CONTEXT = comfyui_env.TINY_WAN["text_dim"]
# ComfyUI's built-in samplers that kdpp has and defines the same way, by the name both use
# (ComfyUI's dpmpp_2s_ancestral_cfg_pp and dpmpp_2m_cfg_pp differ from kdpp's, which have names of their own:
# test_cfg_pp_forms_comfyui_defines_differently)
BUILTIN = ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm", "euler_cfg_pp", "euler_ancestral_cfg_pp"]
SOLVERS5 = ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"]
NODES = {"DistillationPPSampler": "Distillation++ Sampler", "DistillationPPKSampler": "Distillation++ KSampler",
         "DistillationPPKSamplerAdvanced": "Distillation++ KSampler (Advanced)"}


@pytest.fixture(scope="session")
def cf():
    root, reason = comfyui_root()
    if root is None:
        pytest.skip(reason)
    env = import_comfyui(root)
    from kdpp.comfyui import nodes, sampling  # import comfy: only now
    env.sampling, env.kdpp_nodes = sampling, nodes
    return env


def tiny_model(cf, flow=False, seed=0):
    return comfyui_env.tiny_model(cf, flow=flow, seed=seed, channels=32, context_dim=CONTEXT)


def cond(seed, batch=1, width=CONTEXT):
    return comfyui_env.conditioning(seed, width, batch)


def latent(batch=1):
    return {"samples": torch.zeros(batch, 4, 8, 8)}


def custom_sample(cf, model, sampler, sigmas, seed=5, cfg=3.0, lat=None, add_noise=True, width=CONTEXT):
    """ComfyUI's SamplerCustom node, as a graph runs it."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    out = SamplerCustom.execute(model, add_noise, seed, cfg, cond(1, width=width), cond(2, width=width), sampler, sigmas,
                                lat or latent())
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


def kdpp_sampler(cf, name, teacher=None, lam=0.0, k=1, teacher_cfg=3.0, width=CONTEXT, **kw):
    """The SAMPLER the Distillation++ Sampler node returns (teacher conditioning: what custom_sample gives the student)."""
    return cf.sampling.DistillationSampler(name, teacher, cond(1, width=width), cond(2, width=width), teacher_cfg, lam, k,
                                           **kw)


GUIDANCE = dict(teacher_cfg=3.0, lam=0.5, k=2, renoise="random", renoise_level="auto")


def ksampler(cf, model, lat, teacher=None, advanced=False, width=CONTEXT, **kw):
    """The Distillation++ KSampler (or KSampler (Advanced)) node with this file's conditioning; returns its LATENT."""
    args = dict(model=model, steps=6, cfg=3.0, sampler_name="euler", scheduler="karras", positive=cond(1, width=width),
                negative=cond(2, width=width), latent_image=lat, teacher=teacher, **GUIDANCE)
    if advanced:
        args.update(add_noise="enable", noise_seed=5, start_at_step=0, end_at_step=10000,
                    return_with_leftover_noise="disable")
        node = cf.kdpp_nodes.DistillationPPKSamplerAdvanced()
    else:
        args.update(seed=5, denoise=1.0)
        node = cf.kdpp_nodes.DistillationPPKSampler()
    return node.sample(**{**args, **kw})[0]


@pytest.fixture(scope="session")
def student(cf):
    return tiny_model(cf, seed=0)


@pytest.fixture(scope="session")
def teacher(cf):
    return tiny_model(cf, seed=1)


@pytest.fixture(scope="session")
def flow_student(cf):
    return tiny_model(cf, flow=True, seed=2)


@pytest.fixture(scope="session")
def wan(cf):
    return comfyui_env.tiny_wan(cf, seed=0)


def wan_latent(cf, frames=9, size=32, batch=1):
    """ComfyUI's Wan latent node (EmptyHunyuanLatentVideo): [B, 16, (frames - 1) / 4 + 1, size / 8, size / 8]."""
    from comfy_extras.nodes_hunyuan import EmptyHunyuanLatentVideo

    return EmptyHunyuanLatentVideo.execute(size, size, frames, batch).result[0]


# --- the pack in ComfyUI's registry and executor ------------------------------------------------------------------


class TinyModel:
    """Test-only node: a tiny checkpoint-free MODEL (ComfyUI's loaders need a checkpoint file); ``counted`` wraps it
    in a :class:`Counter` kept in ``counters[seed]``."""

    CATEGORY, RETURN_TYPES, FUNCTION = "testing", ("MODEL",), "load"
    env, counters = None, {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "flow": ("BOOLEAN", {"default": False}),
                             "counted": ("BOOLEAN", {"default": False})}}

    def load(self, seed, flow, counted):
        model = tiny_model(self.env, flow=flow, seed=seed)
        if counted:
            self.counters[seed] = Counter(model)
            model = self.counters[seed].patcher
        return (model,)


class TinyCheckpoint:
    """Test-only stand-in for CheckpointLoaderSimple in ComfyUI's own example prompts: a tiny UNet per file name,
    and the name as the CLIP that TinyTextEncode reads."""

    CATEGORY, RETURN_TYPES, FUNCTION = "testing", ("MODEL", "CLIP", "VAE"), "load"
    env = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": ""})}}

    def load(self, ckpt_name):
        return tiny_model(self.env, seed=zlib.crc32(ckpt_name.encode()) % 1000), ckpt_name, None


class TinyTextEncode:
    """Test-only stand-in for CLIPTextEncode: a conditioning per (checkpoint, text)."""

    CATEGORY, RETURN_TYPES, FUNCTION = "testing", ("CONDITIONING",), "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "text": ("STRING", {"default": ""})}}

    def encode(self, clip, text):
        return (cond(zlib.crc32(f"{clip}|{text}".encode()) % 1000),)


class TinyConditioning:
    CATEGORY, RETURN_TYPES, FUNCTION = "testing", ("CONDITIONING",), "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "width": ("INT", {"default": CONTEXT})}}

    def encode(self, seed, width):
        return (cond(seed, width=width),)


class Capture:
    """Test-only output node: records what reaches it (a LATENT's samples, or any object)."""

    CATEGORY, RETURN_TYPES, FUNCTION, OUTPUT_NODE = "testing", (), "capture", True
    seen = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": ""})}, "optional": {"samples": ("LATENT",), "value": ("*",)}}

    @classmethod
    def VALIDATE_INPUTS(cls, input_types):
        return True

    def capture(self, name, samples=None, value=None):
        self.seen[name] = samples["samples"] if samples is not None else value
        return {}


class Server:
    """The minimal server object PromptExecutor reports to (the executor keeps its messages in status_messages)."""

    client_id, last_node_id, sockets_metadata = None, None, {}

    def send_sync(self, event, data, sid=None):
        pass


@pytest.fixture(scope="session")
def graph(cf, tmp_path_factory):
    """ComfyUI's node registry with the kdpp node pack loaded as a custom node (the documented shim), the test nodes,
    and model folders: empty files under the names the docs' workflows use (validation reads names only), a tiny
    Wan 2.1 checkpoint and a Wan LoRA in ComfyUI's own key format."""
    import kdpp.comfyui

    custom_nodes = tmp_path_factory.mktemp("ComfyUI") / "custom_nodes"
    custom_nodes.mkdir()
    kdpp.comfyui.install(custom_nodes)
    cf.folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes)], set())
    models = tmp_path_factory.mktemp("models")
    for folder, names in [("checkpoints", ["sd_xl_base_1.0.safetensors"]),
                          ("loras", ["sdxl_lightning_4step_lora.safetensors",
                                     "Wan21_T2V_14B_lightx2v_cfg_step_distill_lora_rank32.safetensors"]),
                          ("diffusion_models", ["wan2.1_t2v_14B_fp16.safetensors"]),
                          ("text_encoders", ["umt5_xxl_fp8_e4m3fn_scaled.safetensors"]),
                          ("vae", ["wan_2.1_vae.safetensors"])]:
        (models / folder).mkdir()
        for name in names:
            (models / folder / name).touch()
        cf.folder_paths.add_model_folder_path(folder, str(models / folder))
    wan = comfyui_env.tiny_wan(cf, seed=7)
    comfyui_env.save_checkpoint(wan, models / "checkpoints" / "tiny_wan.safetensors")
    comfyui_env.save_checkpoint(comfyui_env.tiny_wan(cf, seed=8), models / "checkpoints" / "tiny_wan_other.safetensors")
    cf.comfy.utils.save_torch_file(comfyui_env.lora_state_dict(wan, prefix="diffusion_model.", scale=0.05),
                                   str(models / "loras" / "tiny_wan_lora.safetensors"))
    with comfyui_env.torchvision_stand_in():  # ComfyUI's extra nodes import its models
        asyncio.run(cf.nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    TinyModel.env = TinyCheckpoint.env = cf
    cf.nodes.NODE_CLASS_MAPPINGS.update(KDPPTestTinyModel=TinyModel, KDPPTestCheckpoint=TinyCheckpoint,
                                        KDPPTestTextEncode=TinyTextEncode, KDPPTestConditioning=TinyConditioning,
                                        KDPPTestCapture=Capture)
    return cf


def run_prompt(cf, prompt, succeed=True):
    """Validate and execute an API prompt as ComfyUI's server does; the messages the executor reported."""
    valid = asyncio.run(cf.execution.validate_prompt("test", prompt, None))
    assert valid[0], valid
    executor = cf.execution.PromptExecutor(Server(), cache_type=False, cache_args={"lru": 0, "ram": 0})  # as main.py
    executor.execute(prompt, "test", {}, valid[2])
    errors = [m for m in executor.status_messages if m[0] == "execution_error"]
    assert executor.success == succeed, errors
    return executor.status_messages


def test_node_pack_loads_as_custom_node_next_to_comfyuis_samplers(graph):
    """The shim loads the three nodes; the SAMPLER sits with ComfyUI's sampler nodes (KSamplerSelect's category),
    the KSampler nodes with KSampler / KSamplerAdvanced."""
    registry = graph.nodes.NODE_CLASS_MAPPINGS
    for name, display in NODES.items():
        assert registry[name].__module__ == "kdpp.comfyui.nodes" and graph.nodes.NODE_DISPLAY_NAME_MAPPINGS[name] == display
    assert registry["DistillationPPSampler"].CATEGORY == registry["KSamplerSelect"].CATEGORY \
        == "sampling/custom_sampling/samplers"
    assert registry["DistillationPPKSampler"].CATEGORY == registry["KSampler"].CATEGORY
    assert registry["DistillationPPKSamplerAdvanced"].CATEGORY == registry["KSamplerAdvanced"].CATEGORY


@pytest.mark.parametrize("ours, theirs", [("DistillationPPKSampler", "KSampler"),
                                          ("DistillationPPKSamplerAdvanced", "KSamplerAdvanced"),
                                          ("DistillationPPSampler", "KSamplerSelect")])
def test_node_inputs_are_named_and_ordered_as_comfyuis(graph, ours, theirs):
    """Every input of ComfyUI's node, by its name, in its order, of its type (combos: the same values, kdpp's solvers
    for sampler_name); then the teacher's, optional where lam = 0 needs none. So nothing of a ported prompt is dropped
    (ComfyUI's executor silently ignores inputs a node does not declare)."""
    mine, comfy = (graph.nodes.NODE_CLASS_MAPPINGS[n].INPUT_TYPES() for n in (ours, theirs))
    names = list(comfy["required"])
    assert list(mine["required"])[:len(names)] == names
    for name in names:
        typ, their_typ = combo(mine["required"][name]), combo(comfy["required"][name])
        if name == "sampler_name":
            assert typ == list(graph.sampling.SOLVERS) and "euler" in their_typ
        else:
            assert typ == their_typ, name
    assert set(mine["optional"]) >= {"teacher", "teacher_positive", "teacher_negative"}
    assert {"teacher_cfg", "lam", "k", "renoise", "renoise_level"} <= set(mine["required"])
    assert mine["required"]["lam"][1]["default"] == 0.1  # the value docs/comfyui.md states and its workflows use


def combo(spec):
    """An input's type, a combo's values as a list (the classic API lists them, the newer one says COMBO + options)."""
    return spec[1]["options"] if spec[0] == "COMBO" else spec[0]


def comfyui_prompt(cf, which):
    """A KSampler / KSamplerAdvanced API prompt of ComfyUI's own: its script_examples/basic_api_example.py prompt, or
    the SDXL base + refiner graph of its inference tests (two KSamplerAdvanced stages)."""
    if which == "KSampler":
        source = (cf.root / "script_examples" / "basic_api_example.py").read_text()
        assign = next(n for n in ast.parse(source).body if isinstance(n, ast.Assign) and n.targets[0].id == "prompt_text")
        return json.loads(ast.literal_eval(assign.value))
    return json.loads((cf.root / "tests" / "inference" / "graphs" / "default_graph_sdxl1_0.json").read_text())


def runnable(prompt):
    """The prompt with its file-backed nodes swapped for tiny test nodes (loaders, text encoders, 32 px latents) and
    every sampler's LATENT captured by the sampler's node id; its sampler nodes untouched."""
    swap = {"CheckpointLoaderSimple": "KDPPTestCheckpoint", "CLIPTextEncode": "KDPPTestTextEncode"}
    out = {}
    for key, node in prompt.items():
        if node["class_type"] in ("VAEDecode", "SaveImage"):
            continue
        node = json.loads(json.dumps(node))
        node["class_type"] = swap.get(node["class_type"], node["class_type"])
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=32, height=32)
        out[key] = node
        if node["class_type"].startswith("KSampler"):
            out[f"capture{key}"] = {"class_type": "KDPPTestCapture", "inputs": {"samples": [key, 0], "name": key}}
    return out


def ported(prompt, **teacher_inputs):
    """The port the docs describe: each KSampler / KSamplerAdvanced gets the Distillation++ class_type and the teacher
    inputs; nothing else changes."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        if node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            node["class_type"] = "DistillationPP" + node["class_type"]
            node["inputs"].update(teacher_inputs)
    return out


@pytest.mark.parametrize("which", ["KSampler", "KSamplerAdvanced"])
def test_comfyuis_own_api_prompt_ports_by_class_type_and_teacher_inputs(graph, which):
    """ComfyUI's own KSampler / KSamplerAdvanced API prompts, run headless, then ported: at lam = 0 (with or without a
    teacher connected) the result is ComfyUI's; with lam = 0.5 the teacher is called k times per run and acts."""
    prompt = runnable(comfyui_prompt(graph, which))
    samplers = [key for key, node in prompt.items() if node["class_type"] == which]
    assert samplers
    run_prompt(graph, prompt)
    want = {key: Capture.seen[key] for key in samplers}
    widgets = {"teacher_cfg": 7.5, "k": 1, "renoise": "random", "renoise_level": "auto"}
    prompt["teacher"] = {"class_type": "KDPPTestTinyModel", "inputs": {"seed": 11, "flow": False, "counted": True}}
    for teacher_link in ({}, {"teacher": ["teacher", 0]}):
        run_prompt(graph, ported(prompt, lam=0.0, **widgets, **teacher_link))
        for key in samplers:
            torch.testing.assert_close(Capture.seen[key], want[key], rtol=1e-5, atol=1e-5 * want[key].abs().max().item())
    assert TinyModel.counters[11].evaluations == 0
    run_prompt(graph, ported(prompt, lam=0.5, teacher=["teacher", 0], **{**widgets, "k": 2}))
    assert TinyModel.counters[11].evaluations == 2  # k = 2 of the full schedule (the SDXL graph's stage 2 samples none)
    assert (Capture.seen[samplers[0]] - want[samplers[0]]).abs().max() > 1e-3
    other = ported(prompt, lam=0.0, **widgets)
    other[samplers[0]]["inputs"]["sampler_name"] = "dpmpp_2m_sde"  # a ComfyUI sampler kdpp does not have
    valid = asyncio.run(graph.execution.validate_prompt("test", other, None))
    error = valid[3][samplers[0]]["errors"][0]
    assert not valid[0] and error["message"] == "Value not in list" and error["details"].startswith(
        "sampler_name: 'dpmpp_2m_sde' not in")


def test_example_workflows_in_docs_validate(graph):
    """docs/comfyui/: each API-format workflow validates in ComfyUI; the UI-format one is the same graph."""
    for path in sorted((DOCS / "comfyui").glob("*_api.json")):
        api = json.loads(path.read_text())
        valid = asyncio.run(graph.execution.validate_prompt("docs", api, None))
        assert valid[0] and valid[2], (path.name, valid)
    ui = json.loads((DOCS / "comfyui" / "distillation_pp_lora.json").read_text())
    assert ui_to_api(graph, ui) == json.loads((DOCS / "comfyui" / "distillation_pp_lora_api.json").read_text())


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def ui_to_api(cf, workflow):
    """The API form of a UI-format workflow: links by slot, widget values in INPUT_TYPES order (seed widgets
    carry the frontend's control_after_generate value after them; unlinked MODEL / CONDITIONING inputs are absent)."""
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
                elif isinstance(typ, list) or typ in WIDGET_TYPES:
                    inputs[name] = next(widgets)
                    if opts and opts[0].get("control_after_generate"):
                        assert next(widgets) in ("fixed", "increment", "decrement", "randomize")
        assert next(widgets, None) is None, f"node {node['id']} has widget values left over"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_node_pack_runs_an_api_graph_headless_both_ways(graph):
    """The same guided run built as SamplerCustom + Distillation++ Sampler and as Distillation++ KSampler."""
    teacher_args = {"teacher": ["2", 0], "teacher_positive": ["3", 0], "teacher_negative": ["4", 0], "teacher_cfg": 3.0,
                    "lam": 0.5, "k": 2, "renoise": "random", "renoise_level": "next"}
    prompt = {
        "1": {"class_type": "KDPPTestTinyModel", "inputs": {"seed": 0, "flow": False, "counted": False}},
        "2": {"class_type": "KDPPTestTinyModel", "inputs": {"seed": 1, "flow": False, "counted": False}},
        "3": {"class_type": "KDPPTestConditioning", "inputs": {"seed": 1, "width": CONTEXT}},
        "4": {"class_type": "KDPPTestConditioning", "inputs": {"seed": 2, "width": CONTEXT}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 6, "denoise": 1.0}},
        "7": {"class_type": "DistillationPPSampler", "inputs": {"sampler_name": "dpmpp_2m", "eta": 1.0, "s_noise": 1.0,
                                                                **teacher_args}},
        "8": {"class_type": "SamplerCustom", "inputs": {"model": ["1", 0], "add_noise": True, "noise_seed": 5, "cfg": 3.0,
                                                         "positive": ["3", 0], "negative": ["4", 0], "sampler": ["7", 0],
                                                         "sigmas": ["6", 0], "latent_image": ["5", 0]}},
        "9": {"class_type": "KDPPTestCapture", "inputs": {"samples": ["8", 0], "name": "custom"}},
        "10": {"class_type": "DistillationPPKSampler",
               "inputs": {"model": ["1", 0], "seed": 5, "steps": 6, "cfg": 3.0, "sampler_name": "dpmpp_2m",
                          "scheduler": "karras", "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
                          "denoise": 1.0, **teacher_args}},
        "11": {"class_type": "KDPPTestCapture", "inputs": {"samples": ["10", 0], "name": "ksampler"}},
    }
    run_prompt(graph, prompt)
    custom, ksampler_out = Capture.seen["custom"], Capture.seen["ksampler"]
    assert custom.shape == (1, 4, 8, 8) and torch.isfinite(custom).all()
    torch.testing.assert_close(ksampler_out, custom, rtol=0, atol=0)
    direct = custom_sample(graph, tiny_model(graph, seed=0), kdpp_sampler(graph, "dpmpp_2m", tiny_model(graph, seed=1),
                                                                          lam=0.5, k=2), schedule(graph, tiny_model(graph)))
    torch.testing.assert_close(custom, direct, rtol=0, atol=0)


# --- lam = 0 is ComfyUI's own sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN)
def test_lam_zero_equals_comfyui_builtin_sampler(cf, student, name):
    """lam = 0 through SamplerCustom is ComfyUI's own sampler of that name (same seed, same noise)."""
    sigmas = schedule(cf, student)
    want = custom_sample(cf, student, cf.comfy.samplers.sampler_object(name), sigmas)
    got = custom_sample(cf, student, kdpp_sampler(cf, name), sigmas)
    assert torch.isfinite(want).all() and want.std() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_ksampler_nodes_at_lam_zero_equal_comfyuis_ksampler_nodes(cf, student, teacher, denoise):
    """The KSampler nodes build the schedule, noise and conditioning as ComfyUI's KSampler and KSamplerAdvanced."""
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    common = dict(steps=5, cfg=3.0, sampler_name="euler_ancestral", scheduler="normal", positive=cond(1),
                  negative=cond(2), latent_image=lat)
    want = cf.nodes.KSampler().sample(student, seed=7, denoise=denoise, **common)[0]["samples"]
    got = cf.kdpp_nodes.DistillationPPKSampler().sample(student, seed=7, denoise=denoise, teacher=teacher,
                                                        **common, **{**GUIDANCE, "lam": 0.0})[0]["samples"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    stage = dict(add_noise="enable", noise_seed=7, start_at_step=0, end_at_step=2, return_with_leftover_noise="enable")
    want = cf.nodes.KSamplerAdvanced().sample(student, **stage, **common)[0]["samples"]
    got = cf.kdpp_nodes.DistillationPPKSamplerAdvanced().sample(student, **stage, **common, **{**GUIDANCE, "lam": 0.0})
    torch.testing.assert_close(got[0]["samples"], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("name, ours", [("dpmpp_2s_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp_per_stage"),
                                        ("dpmpp_2m_cfg_pp", "dpmpp_2m_cfg_pp_guided_history")])
def test_cfg_pp_forms_comfyui_defines_differently(cf, student, name, ours):
    """Two CFG++ forms are defined differently in ComfyUI 0.3.75 and in kdpp, which names them apart (docs/method.md:
    D_w leads, the same stage's D_u gives the direction, the student's own estimates elsewhere):

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
    offered = cf.kdpp_nodes.DistillationPPSampler.INPUT_TYPES()["required"]["sampler_name"][0]
    assert ours in offered and name not in offered  # one name, one sampler


def comfy_sample(cf, model, sampler, sigmas, seed=5, cfg=3.0):
    """comfy.samplers.sample with a callback recording (i, x)."""
    lat = latent()["samples"]
    noise = cf.comfy.sample.prepare_noise(lat, seed)
    xs = {}
    out = cf.comfy.samplers.sample(model, noise, cond(1), cond(2), cfg, model.load_device, sampler, sigmas,
                                   model_options=model.model_options, latent_image=lat, seed=seed,
                                   callback=lambda i, denoised, x, total: xs.setdefault(i, x.clone()))
    return out, xs


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


def ve_frame_sampler(cf, sample):
    """A ComfyUI SAMPLER running ComfyUI's own k-diffusion ``sample`` in the VE frame around a CONST model
    (sigma = t / (1 - t), x_ve = x / (1 - t), the model called at x_ve / (1 + sigma), t = sigma / (1 + sigma))."""

    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None):
        t = sigmas.double().clamp(max=1 - 1e-9)
        ve = t / (1 - t)

        def denoiser(x_ve, sigma):
            rf = (x_ve / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)))).to(x.dtype)
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
    assert (got - want).abs().max() > 1e-4 * want.abs().max()  # size depends on the model: docs/comfyui.md
    torch.testing.assert_close(got, custom_sample(cf, flow_student, ve_frame_sampler(cf, ks.sample_dpmpp_2m), sigmas), **tol)
    two = torch.cat([sigmas[:2], sigmas[-1:]])  # both steps first order
    torch.testing.assert_close(custom_sample(cf, flow_student, kdpp_sampler(cf, name), two),
                               custom_sample(cf, flow_student, cf.comfy.samplers.sampler_object(name), two), **tol)


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


# --- the teacher: when it is called, at what ------------------------------------------------------------------------


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


def test_unconnected_teacher_conditioning_is_the_students(cf, student, teacher):
    """teacher_positive / teacher_negative left unconnected: the teacher gets the student's positive and negative
    (SamplerCustom's, the KSampler node's); other conditioning changes the result. A student guider without a
    negative (BasicGuider) needs teacher_negative for a teacher CFG other than 1."""
    from comfy_extras.nodes_custom_sampler import BasicGuider, RandomNoise, SamplerCustomAdvanced

    sigmas = schedule(cf, student)
    counter = Counter(teacher)
    unconnected = cf.sampling.DistillationSampler("euler", counter.patcher, None, None, 3.0, 0.5, 2)
    defaulted = custom_sample(cf, student, unconnected, sigmas)
    assert counter.evaluations == 2
    torch.testing.assert_close(defaulted, custom_sample(cf, student, kdpp_sampler(cf, "euler", teacher, lam=0.5, k=2),
                                                        sigmas), rtol=0, atol=0)
    other = cf.sampling.DistillationSampler("euler", teacher, cond(7), cond(8), 3.0, 0.5, 2)
    assert (custom_sample(cf, student, other, sigmas) - defaulted).abs().max() > 1e-3
    node = ksampler(cf, student, latent(), teacher=teacher)["samples"]
    explicit = ksampler(cf, student, latent(), teacher=teacher, teacher_positive=cond(1), teacher_negative=cond(2))
    torch.testing.assert_close(node, explicit["samples"], rtol=0, atol=0)
    guider = BasicGuider.execute(student, cond(1)).result[0]
    noise = RandomNoise.execute(5).result[0]
    with pytest.raises(ValueError, match="has no negative conditioning for the teacher to share: connect teacher_negative"):
        SamplerCustomAdvanced.execute(noise, guider, unconnected, sigmas, latent())
    at_cfg_1 = cf.sampling.DistillationSampler("euler", teacher, None, None, 1.0, 0.5, 2)
    assert torch.isfinite(SamplerCustomAdvanced.execute(noise, guider, at_cfg_1, sigmas, latent()).result[0]["samples"]).all()


def test_const_flow_model_teacher_is_queried_in_the_rf_frame(cf, flow_student):
    """renoise='deterministic' at the next level: the teacher sees the point plain Euler steps to, x_1 in RF."""
    sigmas = schedule(cf, flow_student, scheduler="simple")
    _, plain_x = comfy_sample(cf, flow_student, cf.comfy.samplers.sampler_object("euler"), sigmas)
    counter = Counter(flow_student)
    comfy_sample(cf, flow_student, kdpp_sampler(cf, "euler", counter.patcher, lam=1.0, k=1, renoise="deterministic"), sigmas)
    assert counter.evaluations == 1
    assert counter.timesteps[0] == pytest.approx(float(sigmas[1]), rel=1e-5)  # apply_model receives t
    torch.testing.assert_close(counter.inputs[0], plain_x[1], rtol=1e-5, atol=1e-5 * plain_x[1].abs().max().item())


def test_one_step_run_calls_the_teacher_with_the_default_renoise_level(cf, student, teacher):
    """A 1-step student (SD-Turbo's SDTurboScheduler, 1-step LCM / DMD2): renoise_level 'auto' (the default) renoises
    the step to sigma 0 at its own level, so lam acts; 'next' (tau = 0 there) calls no teacher."""
    from comfy_extras.nodes_custom_sampler import SDTurboScheduler

    assert cf.kdpp_nodes.TEACHER_WIDGETS["renoise_level"][1]["default"] == "auto"
    sigmas = SDTurboScheduler.execute(student, 1, 1.0).result[0]
    assert len(sigmas) == 2 and float(sigmas[-1]) == 0
    plain = custom_sample(cf, student, kdpp_sampler(cf, "euler"), sigmas, cfg=1.0)
    counter = Counter(teacher)
    guided = custom_sample(cf, student, kdpp_sampler(cf, "euler", counter.patcher, lam=1.0, k=1), sigmas, cfg=1.0)
    assert counter.timesteps == pytest.approx([float(sigmas[0])], rel=1e-5) and (guided - plain).abs().max() > 1e-3
    counter.timesteps.clear()
    same = custom_sample(cf, student, kdpp_sampler(cf, "euler", counter.patcher, lam=1.0, k=1, renoise_sigma="next"),
                         sigmas, cfg=1.0)
    assert counter.evaluations == 0 and torch.equal(same, plain)


@pytest.mark.parametrize("video", [False, True], ids=["image", "wan-video"])
def test_inpainting_mask_reaches_the_teacher(cf, student, teacher, wan, video):
    """With a noise_mask ComfyUI keeps the unmasked latent in the student's x0; the teacher gets the same masking,
    so the guided x0 R(D) = D + lam (T - D) keeps it too on the guided steps (4-D images and 5-D Wan video)."""
    if video:
        model, width = wan, WAN_CONTEXT
        lat = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(9))
        guide = comfyui_env.tiny_wan(cf, seed=1)
    else:
        model, guide, width = student, teacher, CONTEXT
        lat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(1, 32, 32)
    mask[..., :, 16:] = 1.0  # repaint the right half (a MASK in pixels, as SetLatentNoiseMask takes it)
    keep = lat.shape[-1] // 2
    sigmas = schedule(cf, model, scheduler="simple" if video else "karras")
    counter = Counter(guide)
    denoised = {}
    noise = cf.comfy.sample.prepare_noise(lat, 5)
    out = cf.comfy.samplers.sample(model, noise, cond(1, width=width), cond(2, width=width), 3.0, model.load_device,
                                   kdpp_sampler(cf, "euler_ancestral", counter.patcher, lam=0.8, k=2, width=width), sigmas,
                                   model_options=model.model_options, latent_image=lat, denoise_mask=mask, seed=5,
                                   callback=lambda i, d, x, total: denoised.setdefault(i, d.clone()))
    assert counter.evaluations == 2 and counter.inputs[0].shape == lat.shape
    kept = model.model.process_latent_in(lat)[..., :keep]  # the sampler works on the model's latent scale
    for i in (0, 1):  # guided steps: the refined x0 keeps the latent where the mask is 0
        torch.testing.assert_close(denoised[i][..., :keep], kept, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[..., :keep], lat[..., :keep], rtol=1e-5, atol=1e-5)
    assert (out[..., keep:] - lat[..., keep:]).abs().max() > 1e-2


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


# --- split schedules ------------------------------------------------------------------------------------------------


def test_split_schedule_calls_the_teacher_as_often_as_the_unsplit_run(cf, student, teacher):
    from comfy_extras.nodes_custom_sampler import SplitSigmas

    counter = Counter(teacher)
    kw = dict(teacher=counter.patcher, k=3, renoise_level="next", sampler_name="euler_ancestral")
    ksampler(cf, student, latent(), advanced=True, **kw)
    assert counter.evaluations == 3
    for split in (1, 2, 4):  # KSamplerAdvanced-style two stages
        counter.timesteps.clear()
        first = ksampler(cf, student, latent(), advanced=True, end_at_step=split, return_with_leftover_noise="enable", **kw)
        ksampler(cf, student, first, advanced=True, add_noise="disable", start_at_step=split, **kw)
        assert counter.evaluations == 3, split
    # SamplerCustom with SplitSigmas: k counts on the full schedule given as full_sigmas
    sigmas = schedule(cf, student)
    high, low = SplitSigmas.execute(sigmas, 2).result
    counter.timesteps.clear()
    stage = lambda: kdpp_sampler(cf, "euler", counter.patcher, lam=0.5, k=3, full_sigmas=sigmas)
    first = custom_sample(cf, student, stage(), high)
    custom_sample(cf, student, stage(), low, lat={"samples": first}, add_noise=False)
    assert counter.evaluations == 3


@pytest.mark.parametrize("renoise, level", [("random", "next"), ("deterministic", "next"), ("random", "random")])
def test_split_runs_equal_the_unsplit_run(cf, student, teacher, renoise, level):
    """Each step's renoise noise and random level are functions of (seed, step of the full schedule): split runs
    (KSamplerAdvanced-style stages, SamplerCustom + SplitSigmas with full_sigmas) equal the unsplit run, random renoise
    included."""
    from comfy_extras.nodes_custom_sampler import SplitSigmas

    kw = dict(teacher=teacher, k=3, renoise=renoise, renoise_level=level)
    full = ksampler(cf, student, latent(), advanced=True, **kw)["samples"]
    torch.testing.assert_close(ksampler(cf, student, latent(), **kw)["samples"], full, rtol=0, atol=0)
    tol = dict(rtol=1e-5, atol=1e-5 * full.abs().max().item())
    for split in (1, 2):
        first = ksampler(cf, student, latent(), advanced=True, end_at_step=split, return_with_leftover_noise="enable", **kw)
        two = ksampler(cf, student, first, advanced=True, add_noise="disable", start_at_step=split, **kw)["samples"]
        torch.testing.assert_close(two, full, **tol, msg=f"KSampler (Advanced) stages split at {split}")
    sigmas = schedule(cf, student)
    stage = lambda: kdpp_sampler(cf, "euler", teacher, lam=0.5, k=3, renoise=renoise, renoise_sigma=level, full_sigmas=sigmas)
    unsplit = custom_sample(cf, student, stage(), sigmas)
    torch.testing.assert_close(unsplit, full, **tol)
    for split in (1, 2):
        high, low = SplitSigmas.execute(sigmas, split).result
        first = custom_sample(cf, student, stage(), high)
        two = custom_sample(cf, student, stage(), low, lat={"samples": first}, add_noise=False)
        torch.testing.assert_close(two, unsplit, **tol, msg=f"SplitSigmas at {split}")


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


# --- one image of a batch -------------------------------------------------------------------------------------------


def test_one_image_of_a_batch_rerun_from_latent_from_batch(cf, student, teacher):
    """LatentFromBatch + the same seed redraws an image's initial noise (ComfyUI's prepare_noise with batch_index).
    Noise drawn during sampling is drawn for the whole batch at once from the seed: ComfyUI's ancestral solvers and
    kdpp's renoise='random' do not reproduce the image alone; solvers without noise with renoise 'deterministic' or
    'guidance' (and ComfyUI's Euler) do."""
    batch = latent(batch=3)
    one = cf.nodes.LatentFromBatch().frombatch(batch, 2, 1)[0]
    assert one["batch_index"] == [2]
    kinds = {}
    for builtin in ("euler", "euler_ancestral"):
        run = lambda lat: cf.nodes.KSampler().sample(student, 5, 3, 3.0, builtin, "karras", cond(1), cond(2), lat)[0]
        kinds[builtin] = run(batch)["samples"][2:], run(one)["samples"]
    for renoise in ("random", "deterministic", "guidance"):
        run = lambda lat: ksampler(cf, student, lat, teacher=teacher, renoise=renoise, k=2, steps=3)["samples"]
        kinds[renoise] = run(batch)[2:], run(one)
    for kind, (in_batch, alone) in kinds.items():
        same = torch.allclose(alone, in_batch, rtol=1e-4, atol=1e-4 * in_batch.abs().max().item())
        assert same == (kind in ("euler", "deterministic", "guidance")), kind


# --- errors and warnings --------------------------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors(cf, student, teacher):
    with pytest.raises(ValueError, match="sampler_name must be one of .* got 'heun'"):
        kdpp_sampler(cf, "heun")
    with pytest.raises(ValueError, match="Distillation\\+\\+ KSampler: lam=0.5 needs a teacher: connect the "
                                         "pre-trained model to the teacher input, or set lam to 0"):
        ksampler(cf, student, latent())
    sdxl_like = tiny_model(cf, seed=1)
    sdxl_like.model.latent_format = cf.comfy.latent_formats.SDXL()
    with pytest.raises(ValueError, match="teacher MODEL works in the SDXL latent space and the student in SD15"):
        custom_sample(cf, student, kdpp_sampler(cf, "euler", sdxl_like, lam=0.5), schedule(cf, student))
    with pytest.raises(ValueError, match="renoise must be one of"):
        custom_sample(cf, student, kdpp_sampler(cf, "euler", teacher, lam=0.5, renoise="sometimes"), schedule(cf, student))
    with pytest.raises(ValueError, match="add_noise must be 'enable' or 'disable' \\(as in KSamplerAdvanced\\), got True"):
        ksampler(cf, student, latent(), teacher=teacher, advanced=True, add_noise=True)


def test_flow_student_with_eps_teacher_is_refused(cf, student, flow_student):
    for s, t, match in [(flow_student, student, r"teacher MODEL is a diffusion model.*the student a flow \(CONST\)"),
                        (student, flow_student, r"teacher MODEL is a flow \(CONST\) model.*the student a diffusion")]:
        with pytest.raises(ValueError, match=match):
            custom_sample(cf, s, kdpp_sampler(cf, "euler", t, lam=0.5), schedule(cf, s, scheduler="simple"))


def test_teacher_conditioning_of_the_wrong_width_names_the_teacher(cf, student, teacher):
    """A teacher conditioning from another text encoder (context dim 32 for a 16-wide UNet): the error says it came
    from the teacher's model / conditioning, with torch's own error as its cause."""
    wide = comfyui_env.conditioning(1, 2 * CONTEXT)
    sampler = cf.sampling.DistillationSampler("euler", teacher, wide, cond(2), 3.0, 0.5, 1)
    with pytest.raises(RuntimeError, match="the teacher MODEL call failed.*teacher_positive") as info:
        custom_sample(cf, student, sampler, schedule(cf, student))
    assert isinstance(info.value.__cause__, RuntimeError) and "teacher" not in str(info.value.__cause__)


def test_warnings_and_errors_reach_comfyui_users_named_by_node(graph, caplog):
    """kdpp's warnings during a run go to ComfyUI's console log (logging) on every run, prefixed with the node's
    name and id, and not as Python warnings (which name ComfyUI's frame that called kdpp and show once per place);
    a missing teacher is an error in ComfyUI's execution_error message, naming the node and the teacher input."""
    prompt = {
        "1": {"class_type": "KDPPTestTinyModel", "inputs": {"seed": 0, "flow": False, "counted": False}},
        "2": {"class_type": "KDPPTestConditioning", "inputs": {"seed": 1, "width": CONTEXT}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "DistillationPPKSamplerAdvanced",
              "inputs": {"model": ["1", 0], "add_noise": "enable", "noise_seed": 5, "steps": 2, "cfg": 1.0,
                         "sampler_name": "euler", "scheduler": "karras", "positive": ["2", 0], "negative": ["2", 0],
                         "latent_image": ["3", 0], "start_at_step": 0, "end_at_step": 10000,
                         "return_with_leftover_noise": "disable", "teacher": ["1", 0], "teacher_cfg": 1.0, "lam": 5.0,
                         "k": 2, "renoise": "random", "renoise_level": "next"}},
        "5": {"class_type": "KDPPTestCapture", "inputs": {"samples": ["4", 0], "name": "warned"}},
    }
    for run in range(2):
        caplog.clear()
        with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.WARNING):
            warnings.simplefilter("default")
            run_prompt(graph, prompt)
        ours = [r for r in caplog.records if r.name == "kdpp.comfyui.sampling"]
        messages = [r.getMessage() for r in ours]
        assert any(m.startswith("Distillation++ KSampler (Advanced) (node 4): lam=5 is outside 0 .. 2") for m in messages)
        assert any(m.startswith("Distillation++ KSampler (Advanced) (node 4): guided step(s) [1] call no teacher")
                   and "renoise_level='next'" in m and "renoise_sigma" not in m for m in messages), messages
        assert not [w for w in shown if issubclass(w.category, KdppWarning)], [str(w.message) for w in shown]
    missing = json.loads(json.dumps(prompt))
    del missing["4"]["inputs"]["teacher"]
    messages = run_prompt(graph, missing, succeed=False)
    error = next(data for event, data in messages if event == "execution_error")
    assert error["node_id"] == "4" and error["exception_message"].startswith(
        "Distillation++ KSampler (Advanced) (node 4): lam=5.0 needs a teacher: connect the pre-trained model to the "
        "teacher input"), error


# --- Wan 2.1 (CONST, 5-D video latents) -----------------------------------------------------------------------------


def test_wan_model_is_const_flow_with_5d_video_latents(cf, wan):
    """ComfyUI's WAN21_T2V: CONST sampling with Wan's shift 8, latents [B, 16, frames, h, w] from its Wan latent node."""
    ms = wan.get_model_object("model_sampling")
    assert isinstance(wan.model, cf.comfy.model_base.WAN21) and isinstance(ms, cf.comfy.model_sampling.CONST)
    assert ms.shift == 8.0 and wan.model.latent_format.latent_channels == 16
    assert wan_latent(cf)["samples"].shape == (1, 16, 3, 4, 4)


@pytest.mark.parametrize("name", ["euler", "lcm", "euler_cfg_pp", "euler_ancestral_cfg_pp"])
def test_wan_at_lam_zero_equals_comfyui_builtin_sampler(cf, wan, name):
    """On a Wan model the solvers ComfyUI defines the same way on CONST models equal its own at lam = 0 (its
    euler_ancestral / dpmpp_2s_ancestral are flow-specific variants and its dpmpp_2m steps in t: docs/comfyui.md)."""
    sigmas = schedule(cf, wan, steps=4, scheduler="simple")
    lat = wan_latent(cf)
    want = custom_sample(cf, wan, cf.comfy.samplers.sampler_object(name), sigmas, lat=lat, width=WAN_CONTEXT)
    got = custom_sample(cf, wan, kdpp_sampler(cf, name, width=WAN_CONTEXT), sigmas, lat=lat, width=WAN_CONTEXT)
    assert want.shape == (1, 16, 3, 4, 4) and want.std() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_wan_lora_student_on_its_base_holds_one_model(cf):
    """A step-distillation LoRA on Wan (ComfyUI's own key format, as lightx2v's are published) is the student, the
    same model without it the teacher: one WAN21 holds the weights, the teacher is called k times at the renoise
    level, and the result equals the run with a separate copy of the base as teacher."""
    import comfy.sd

    base = comfyui_env.tiny_wan(cf, seed=4)
    lora = comfyui_env.lora_state_dict(base, prefix="diffusion_model.", scale=0.05)
    student, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
    assert student.model is base.model and len(student.patches) == len(lora) // 3
    sigmas = schedule(cf, student, steps=4, scheduler="simple")
    lat = wan_latent(cf)
    run = lambda sampler: custom_sample(cf, student, sampler, sigmas, lat=lat, cfg=1.0, width=WAN_CONTEXT)
    plain = run(kdpp_sampler(cf, "euler", width=WAN_CONTEXT))
    counter = Counter(base)
    sampler = kdpp_sampler(cf, "euler", counter.patcher, lam=0.5, k=2, teacher_cfg=5.0, width=WAN_CONTEXT)
    shared = run(sampler)
    assert counter.timesteps == pytest.approx([float(s) for s in sigmas[1:3]], rel=1e-5)
    assert counter.inputs[0].shape == (1, 16, 3, 4, 4)
    assert sampler.last_switch.shared and sampler.last_switch.needed and sampler.last_switch.switches == 2 * 2 + 1
    separate = run(kdpp_sampler(cf, "euler", comfyui_env.tiny_wan(cf, seed=4), lam=0.5, k=2, teacher_cfg=5.0,
                                width=WAN_CONTEXT))
    torch.testing.assert_close(shared, separate, rtol=1e-5, atol=1e-5 * separate.abs().max().item())
    assert (shared - plain).abs().max() > 1e-3
    assert base.model.current_weight_patches_uuid == student.patches_uuid


def test_wan_split_runs_equal_the_unsplit_run(cf, wan):
    """KSampler (Advanced) stages on a Wan model: the same teacher calls and the same video as one run."""
    counter = Counter(comfyui_env.tiny_wan(cf, seed=1))
    kw = dict(teacher=counter.patcher, k=3, steps=4, scheduler="simple", renoise="random", renoise_level="random",
              width=WAN_CONTEXT, advanced=True)
    full = ksampler(cf, wan, wan_latent(cf), **kw)["samples"]
    assert counter.evaluations == 3 and full.shape == (1, 16, 3, 4, 4)
    counter.timesteps.clear()
    first = ksampler(cf, wan, wan_latent(cf), end_at_step=2, return_with_leftover_noise="enable", **kw)
    two = ksampler(cf, wan, first, add_noise="disable", start_at_step=2, **kw)["samples"]
    assert counter.evaluations == 3
    torch.testing.assert_close(two, full, rtol=1e-5, atol=1e-5 * full.abs().max().item())


def test_wan_workflow_from_checkpoint_files_and_two_loaders_of_one_file(graph):
    """Headless, from files: a Wan checkpoint through CheckpointLoaderSimple, a LoRA through LoraLoaderModelOnly,
    shift through ModelSamplingSD3, latents from EmptyHunyuanLatentVideo. A second CheckpointLoaderSimple of the same
    file is the same cached output (one model object, so the LoRA student's base is the teacher's); a loader of
    another file is a second model."""
    load = lambda name: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}
    prompt = {
        "1": load("tiny_wan.safetensors"), "2": load("tiny_wan.safetensors"), "3": load("tiny_wan_other.safetensors"),
        "4": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": "tiny_wan_lora.safetensors", "strength_model": 1.0}},
        "5": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["4", 0], "shift": 8.0}},
        "6": {"class_type": "KDPPTestConditioning", "inputs": {"seed": 1, "width": WAN_CONTEXT}},
        "7": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 32, "height": 32, "length": 9, "batch_size": 1}},
        "8": {"class_type": "DistillationPPKSamplerAdvanced",
              "inputs": {"model": ["5", 0], "add_noise": "enable", "noise_seed": 5, "steps": 4, "cfg": 1.0,
                         "sampler_name": "euler", "scheduler": "simple", "positive": ["6", 0], "negative": ["6", 0],
                         "latent_image": ["7", 0], "start_at_step": 0, "end_at_step": 10000,
                         "return_with_leftover_noise": "disable", "teacher": ["2", 0], "teacher_cfg": 1.0, "lam": 0.5,
                         "k": 1, "renoise": "random", "renoise_level": "auto"}},
        "9": {"class_type": "KDPPTestCapture", "inputs": {"samples": ["8", 0], "name": "wan"}},
    }
    for key in ("1", "2", "3", "4"):
        prompt[f"model{key}"] = {"class_type": "KDPPTestCapture", "inputs": {"value": [key, 0], "name": f"model{key}"}}
    run_prompt(graph, prompt)
    seen = Capture.seen
    assert seen["model1"] is seen["model2"] and seen["model3"].model is not seen["model1"].model
    assert seen["model4"].is_clone(seen["model2"]) and seen["model4"].model is seen["model2"].model
    assert isinstance(seen["model1"].model, graph.comfy.model_base.WAN21)
    guided = seen["wan"]
    assert guided.shape == (1, 16, 3, 4, 4) and torch.isfinite(guided).all()
    prompt["8"]["inputs"]["lam"] = 0.0
    run_prompt(graph, prompt)
    assert (Capture.seen["wan"] - guided).abs().max() > 1e-3
