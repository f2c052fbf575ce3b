"""The A1111 name table and the sampling registry describe the same samplers; catch either drifting."""

import pytest

from sdserver.api.a1111 import names
from sdserver.sampling import registry


def test_same_ids_in_the_same_order():
    assert [s.id for s in names.SAMPLERS] == list(registry.SAMPLERS)
    assert [s.id for s in names.SCHEDULERS] == list(registry.SCHEDULERS)


@pytest.mark.parametrize("name", names.SAMPLERS, ids=lambda s: s.id)
def test_sampler_facts_agree(name):
    spec = registry.SAMPLERS[name.id]
    assert name.option_scheduler == spec.default_scheduler
    assert bool(name.options.get("uses_ensd")) == spec.uses_ensd
    assert bool(name.options.get("second_order")) == spec.second_order
    assert bool(name.options.get("discard_next_to_last_sigma")) == spec.discard_next_to_last_sigma
    assert bool(name.options.get("brownian_noise")) == spec.brownian_noise
    assert name.uses_eta == spec.uses_eta
    assert (name.kind == "timesteps") == (spec.kind == "timestep")
    assert tuple(name.sigma_params) == tuple(spec.extra_params)


@pytest.mark.parametrize("name", names.SCHEDULERS, ids=lambda s: s.id)
def test_scheduler_facts_agree(name):
    spec = registry.SCHEDULERS[name.id]
    assert name.default_rho == spec.default_rho and name.need_inner_model == spec.need_inner_model
