"""One module per solver; each calls the teacher refinement at the point the method names (docs/method.md)."""
from .dpmpp_2m import sample_dpmpp_2m_cfg_pp_guided_history_distpp, sample_dpmpp_2m_distpp
from .dpmpp_2s_ancestral import sample_dpmpp_2s_ancestral_cfg_pp_per_stage_distpp, sample_dpmpp_2s_ancestral_distpp
from .euler import sample_euler_cfg_pp_distpp, sample_euler_distpp
from .euler_ancestral import sample_euler_ancestral_cfg_pp_distpp, sample_euler_ancestral_distpp
from .lcm import sample_lcm_distpp

SAMPLERS = {
    "euler": sample_euler_distpp,
    "euler_ancestral": sample_euler_ancestral_distpp,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral_distpp,
    "dpmpp_2m": sample_dpmpp_2m_distpp,
    "lcm": sample_lcm_distpp,
    "euler_cfg_pp": sample_euler_cfg_pp_distpp,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp_distpp,
    "dpmpp_2s_ancestral_cfg_pp_per_stage": sample_dpmpp_2s_ancestral_cfg_pp_per_stage_distpp,
    "dpmpp_2m_cfg_pp_guided_history": sample_dpmpp_2m_cfg_pp_guided_history_distpp,
}
"""Every kdpp sampler by its short name (``"sample_" + name + "_distpp"`` is the function)."""
