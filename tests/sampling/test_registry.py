import dataclasses

import pytest

from sdserver.errors import UnknownSampler
from sdserver.sampling.registry import SAMPLERS, SCHEDULERS, get_sampler

# docs/architecture.md, in A1111 1.10's /samplers and /schedulers order
SAMPLER_IDS = ["dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_2s_a", "dpmpp_3m_sde", "euler_a",
               "euler", "lms", "heun", "dpm2", "dpm2_a", "dpm_fast", "dpm_adaptive", "restart", "ddim", "ddim_cfgpp",
               "plms", "unipc", "lcm"]
SCHEDULER_IDS = ["automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
                 "align_your_steps", "simple", "normal", "ddim", "beta"]


def test_ids_and_order():
    assert list(SAMPLERS) == SAMPLER_IDS
    assert list(SCHEDULERS) == SCHEDULER_IDS


def test_tables_are_immutable():
    with pytest.raises(TypeError):
        SAMPLERS["new"] = SAMPLERS["euler"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLERS["euler"].second_order = True  # type: ignore[misc]


def test_a1111_options():
    defaults = {k: v.default_scheduler for k, v in SAMPLERS.items()}
    assert defaults["dpmpp_2m"] == "karras" and defaults["dpmpp_3m_sde"] == "exponential"
    assert defaults["euler"] is None and defaults["restart"] == "karras"
    assert {k for k, v in SAMPLERS.items() if v.discard_next_to_last_sigma} == {"dpm2", "dpm2_a", "dpmpp_3m_sde"}
    assert {k for k, v in SAMPLERS.items() if v.brownian_noise} == {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
                                                                   "dpmpp_3m_sde"}
    assert {k for k, v in SAMPLERS.items() if v.second_order} == {"dpmpp_sde", "dpmpp_2s_a", "heun", "dpm2", "dpm2_a",
                                                                 "restart"}
    assert {k for k, v in SAMPLERS.items() if v.kind == "timestep"} == {"ddim", "ddim_cfgpp", "plms", "unipc"}
    assert SAMPLERS["euler"].extra_params == ("s_churn", "s_tmin", "s_tmax", "s_noise")
    assert SAMPLERS["euler_a"].extra_params == () and SAMPLERS["dpm_fast"].extra_params == ("s_noise",)
    assert SAMPLERS["ddim"].eta_option == "ddim" and SAMPLERS["ddim"].eta_default == 0.0
    assert SAMPLERS["euler_a"].uses_eta and not SAMPLERS["dpmpp_2m"].uses_eta
    assert SCHEDULERS["karras"].default_rho == 7.0 and SCHEDULERS["polyexponential"].default_rho == 1.0
    assert SCHEDULERS["automatic"].function is None


def test_unknown_sampler():
    with pytest.raises(UnknownSampler):
        get_sampler("Euler a")
