import pytest

from sdserver.api.a1111 import names
from sdserver.api.a1111.names import (
    default_scheduler_id,
    infotext_schedule_type,
    resolve_hr_sampler,
    resolve_sampler,
    samplers_listing,
    schedulers_listing,
)
from sdserver.errors import UnknownSampler, UnknownScheduler

ARCHITECTURE_SAMPLER_IDS = {
    "dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_2s_a", "dpmpp_3m_sde", "euler_a",
    "euler", "lms", "heun", "dpm2", "dpm2_a", "dpm_fast", "dpm_adaptive", "restart", "ddim", "ddim_cfgpp",
    "plms", "unipc", "lcm",
}
ARCHITECTURE_SCHEDULER_IDS = {
    "automatic", "uniform", "karras", "exponential", "polyexponential", "sgm_uniform", "kl_optimal",
    "align_your_steps", "simple", "normal", "ddim", "beta",
}

LABELS = [
    ("DPM++ 2M", "dpmpp_2m"), ("DPM++ SDE", "dpmpp_sde"), ("DPM++ 2M SDE", "dpmpp_2m_sde"),
    ("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun"), ("DPM++ 2S a", "dpmpp_2s_a"), ("DPM++ 3M SDE", "dpmpp_3m_sde"),
    ("Euler a", "euler_a"), ("Euler", "euler"), ("LMS", "lms"), ("Heun", "heun"), ("DPM2", "dpm2"),
    ("DPM2 a", "dpm2_a"), ("DPM fast", "dpm_fast"), ("DPM adaptive", "dpm_adaptive"), ("Restart", "restart"),
    ("DDIM", "ddim"), ("DDIM CFG++", "ddim_cfgpp"), ("PLMS", "plms"), ("UniPC", "unipc"), ("LCM", "lcm"),
]


def test_tables_cover_the_internal_ids_in_a1111_order():
    assert {s.id for s in names.SAMPLERS} == ARCHITECTURE_SAMPLER_IDS
    assert {s.id for s in names.SCHEDULERS} == ARCHITECTURE_SCHEDULER_IDS
    assert [item["name"] for item in samplers_listing()] == [label for label, _ in LABELS]
    assert schedulers_listing()[0]["name"] == "automatic"


@pytest.mark.parametrize("label,sampler_id", LABELS)
def test_every_label_resolves_with_automatic_scheduler(label, sampler_id):
    assert resolve_sampler(label, None, None) == (sampler_id, "automatic")
    assert resolve_sampler(label.upper(), None, None) == (sampler_id, "automatic")


@pytest.mark.parametrize("sampler", names.SAMPLERS, ids=lambda s: s.id)
def test_every_alias_resolves(sampler):
    for alias in sampler.aliases:
        assert resolve_sampler(alias, None, None)[0] == sampler.id


@pytest.mark.parametrize(
    "name,expected",
    [
        ("DPM++ 2M Karras", ("dpmpp_2m", "automatic")),  # karras is DPM++ 2M's own default since 1.9
        ("DPM++ SDE Karras", ("dpmpp_sde", "automatic")),
        ("DPM++ 2S a Karras", ("dpmpp_2s_a", "automatic")),
        ("DPM2 Karras", ("dpm2", "automatic")),
        ("DPM2 a Karras", ("dpm2_a", "automatic")),
        ("LMS Karras", ("lms", "karras")),
        ("DPM++ 2M SDE Karras", ("dpmpp_2m_sde", "karras")),
        ("DPM++ 2M SDE Heun Karras", ("dpmpp_2m_sde_heun", "karras")),
        ("DPM++ 3M SDE Karras", ("dpmpp_3m_sde", "karras")),
        ("DPM++ 2M SDE Exponential", ("dpmpp_2m_sde", "automatic")),
        ("DPM++ 2M SDE Heun Exponential", ("dpmpp_2m_sde_heun", "automatic")),
        ("DPM++ 3M SDE Exponential", ("dpmpp_3m_sde", "automatic")),
        ("Euler Exponential", ("euler", "exponential")),
        ("Euler SGMUniform", ("euler", "sgm_uniform")),
        ("Euler SGM Uniform", ("euler", "sgm_uniform")),
        ("Euler a Align Your Steps", ("euler_a", "align_your_steps")),
        ("dpm++ 2m karras", ("dpmpp_2m", "automatic")),
        ("k_dpmpp_2m_ka", ("dpmpp_2m", "automatic")),
        ("k_lms_ka", ("lms", "karras")),
        ("k_dpmpp_2m_sde_heun_exp", ("dpmpp_2m_sde_heun", "automatic")),
        ("k_euler_a", ("euler_a", "automatic")),
        ("euler a", ("euler_a", "automatic")),
        ("k_euler_ancestral", ("euler_a", "automatic")),
        ("euler_a", ("euler_a", "automatic")),
    ],
)
def test_legacy_and_alias_names(name, expected):
    assert resolve_sampler(name, None, None) == expected


@pytest.mark.parametrize(
    "scheduler,expected",
    [
        ("automatic", "automatic"), ("Automatic", "automatic"), ("AUTOMATIC", "automatic"),
        ("Karras", "karras"), ("karras", "karras"), ("KARRAS", "karras"),
        ("Simple", "simple"), ("simple", "simple"), ("SGM Uniform", "sgm_uniform"), ("sgm_uniform", "sgm_uniform"),
        ("SGMUniform", "sgm_uniform"), ("sgmuniform", "sgm_uniform"), ("KL Optimal", "kl_optimal"),
        ("align your steps", "align_your_steps"), ("Exponential", "exponential"), ("Beta", "beta"),
        ("polyexponential", "polyexponential"), ("Normal", "normal"), ("DDIM", "ddim"), ("uniform", "uniform"),
        (None, "automatic"), ("", "automatic"),
    ],
)
def test_scheduler_by_name_or_label_in_any_case(scheduler, expected):
    assert resolve_sampler("Euler", None, scheduler) == ("euler", expected)


def test_explicit_scheduler_wins_over_suffix():
    assert resolve_sampler("DPM++ 2M Karras", None, "Exponential") == ("dpmpp_2m", "exponential")
    assert resolve_sampler("Euler SGMUniform", None, "simple") == ("euler", "simple")


def test_explicit_default_scheduler_becomes_automatic():
    assert resolve_sampler("DPM++ 2M", None, "karras") == ("dpmpp_2m", "automatic")
    assert resolve_sampler("Euler", None, "uniform") == ("euler", "uniform")


def test_sampler_name_beats_sampler_index_and_euler_is_the_default():
    assert resolve_sampler("DPM++ 2M", "Euler a", None)[0] == "dpmpp_2m"
    assert resolve_sampler(None, "Euler a", None)[0] == "euler_a"
    assert resolve_sampler("", "Heun", None)[0] == "heun"
    assert resolve_sampler(None, None, None) == ("euler", "automatic")


def test_unknown_sampler_is_422_listing_valid_names():
    with pytest.raises(UnknownSampler) as err:
        resolve_sampler("Euler b", None, None)
    assert err.value.status_code == 422
    assert err.value.field == "sampler_name"
    assert "Euler b" in err.value.message
    for label, _ in LABELS:
        assert label in err.value.message


def test_unknown_sampler_index_names_its_field():
    with pytest.raises(UnknownSampler) as err:
        resolve_sampler(None, "k_nonsense", None)
    assert err.value.field == "sampler_index"


def test_unknown_scheduler_is_422_listing_valid_names():
    with pytest.raises(UnknownScheduler) as err:
        resolve_sampler("Euler", None, "Karas")
    assert err.value.status_code == 422
    assert err.value.field == "scheduler"
    assert "Karras" in err.value.message and "Align Your Steps" in err.value.message


def test_unknown_suffix_is_not_silently_dropped():
    with pytest.raises(UnknownSampler):
        resolve_sampler("DPM++ 2M Sharp", None, None)


def test_default_scheduler_ids():
    assert default_scheduler_id("dpmpp_2m") == "karras"
    assert default_scheduler_id("dpmpp_2m_sde") == "exponential"
    assert default_scheduler_id("euler") == "uniform"
    assert default_scheduler_id("euler_a") == "uniform"
    assert default_scheduler_id("restart") == "karras"


def test_schedule_type_for_the_infotext():
    assert infotext_schedule_type("euler", "automatic") is None
    assert infotext_schedule_type("euler_a", "automatic") is None
    assert infotext_schedule_type("dpmpp_2m", "automatic") == "Karras"
    assert infotext_schedule_type("euler", "karras") == "Karras"
    assert infotext_schedule_type("euler", "uniform") == "Uniform"
    assert infotext_schedule_type("dpmpp_2m", "exponential") == "Exponential"


def test_hr_sampler_resolution():
    base = ("euler_a", "automatic")
    assert resolve_hr_sampler(None, None, base) == (None, None)
    assert resolve_hr_sampler("Use same sampler", "Use same scheduler", base) == (None, None)
    assert resolve_hr_sampler("Euler a", None, base) == (None, None)
    assert resolve_hr_sampler("DPM++ 2M", None, base) == ("dpmpp_2m", None)
    assert resolve_hr_sampler("DPM++ 2M SDE Karras", None, base) == ("dpmpp_2m_sde", "karras")
    assert resolve_hr_sampler(None, "Karras", base) == (None, "karras")
    with pytest.raises(UnknownSampler) as err:
        resolve_hr_sampler("nope", None, base)
    assert err.value.field == "hr_sampler_name"
    with pytest.raises(UnknownScheduler) as err:
        resolve_hr_sampler(None, "nope", base)
    assert err.value.field == "hr_scheduler"


def test_listing_shapes():
    for item in samplers_listing():
        assert set(item) == {"name", "aliases", "options"}
    dpm = next(i for i in samplers_listing() if i["name"] == "DPM++ 2M")
    assert dpm == {"name": "DPM++ 2M", "aliases": ["k_dpmpp_2m"], "options": {"scheduler": "karras"}}
    for item in schedulers_listing():
        assert set(item) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    karras = next(i for i in schedulers_listing() if i["name"] == "karras")
    assert karras == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                      "need_inner_model": False}
    sgm = next(i for i in schedulers_listing() if i["name"] == "sgm_uniform")
    assert sgm["aliases"] == ["SGMUniform"] and sgm["need_inner_model"] is True
