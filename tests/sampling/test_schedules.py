"""Pinned scheduler values, computed by hand from each published formula."""

import math

import pytest
import torch

from sdserver.sampling import schedules
from sdserver.sampling.schedules import ScheduleInputs


def inputs(schedule, lo=0.1, hi=10.0, **kw):
    return ScheduleInputs(sigma_min=lo, sigma_max=hi, schedule=schedule, **kw)


def close(tensor, values, rel=1e-6):
    assert len(tensor) == len(values)
    for got, want in zip(tensor.tolist(), values):
        assert got == pytest.approx(want, rel=rel, abs=1e-12)


def test_karras_n4_matches_eq5(schedule):
    rho = 7.0
    lo, hi = 0.1 ** (1 / rho), 10.0 ** (1 / rho)
    want = [(hi + r * (lo - hi)) ** rho for r in (0, 1 / 3, 2 / 3, 1)] + [0.0]
    close(schedules.karras(4, inputs(schedule)), want)
    assert want[1] == pytest.approx(2.9341, rel=1e-4)  # a hand-checked anchor of the formula itself


def test_karras_rho_override(schedule):
    want = [(10 ** 0.5 + r * (0.1 ** 0.5 - 10 ** 0.5)) ** 2 for r in (0, 0.5, 1)] + [0.0]
    close(schedules.karras(3, inputs(schedule, rho=2.0)), want)


def test_exponential_is_geometric(schedule):
    close(schedules.exponential(4, inputs(schedule)), [10.0, 10 ** (1 / 3), 10 ** (-1 / 3), 0.1, 0.0])


def test_polyexponential(schedule):
    close(schedules.polyexponential(4, inputs(schedule)), schedules.exponential(4, inputs(schedule)).tolist())
    want = [math.exp(r**2 * (math.log(10) - math.log(0.1)) + math.log(0.1)) for r in (1, 0.5, 0)] + [0.0]
    close(schedules.polyexponential(3, inputs(schedule, rho=2.0)), want)


def test_kl_optimal_ends_at_sigma_min(schedule):
    mid = math.tan((math.atan(0.1) + math.atan(10.0)) / 2)
    close(schedules.kl_optimal(2, inputs(schedule)), [10.0, mid, 0.1])


def test_align_your_steps_tables(schedule):
    close(schedules.align_your_steps(11, inputs(schedule)), list(schedules.AYS_SD15) + [0.0])
    close(schedules.align_your_steps(11, inputs(schedule, family="sdxl")), list(schedules.AYS_SDXL) + [0.0])
    got = schedules.align_your_steps(4, inputs(schedule))
    # log-linear: the value at 1/3 of the way lies 1/3 between table entries 6 (0.963) and 7 (0.652), in log
    close(got, [14.615, 1.886 ** (1 / 3) * 2.697 ** (2 / 3), 0.652 ** (2 / 3) * 0.963 ** (1 / 3), 0.029, 0.0], rel=1e-5)


def test_uniform_with_every_timestep_is_the_table(schedule):
    got = schedules.uniform(1000, inputs(schedule))
    assert torch.allclose(got[:-1], schedule.sigmas.flip(0), rtol=1e-6)
    assert got[-1] == 0


def test_simple_takes_every_kth_sigma_from_the_top(schedule):
    s = schedule.sigmas
    close(schedules.simple(4, inputs(schedule)), [s[999].item(), s[749].item(), s[499].item(), s[249].item(), 0.0])


def test_ddim_scheduler_timesteps(schedule):
    s = schedule.sigmas
    got = schedules.ddim(20, inputs(schedule))
    close(got, [s[t].item() for t in range(951, 0, -50)] + [0.0])
    # 12 does not divide 999: every 83rd from 1 gives 13 sigmas, so 13 steps (A1111 does the same)
    got12 = schedules.ddim(12, inputs(schedule))
    assert len(got12) == 14 and got12[0].item() == s[997].item()


def test_normal_and_sgm_uniform(schedule):
    s = schedule.sigmas
    lo, hi = schedule.sigma_min, schedule.sigma_max
    close(schedules.normal(2, inputs(schedule, lo, hi)), [s[999].item(), s[0].item(), 0.0], rel=1e-5)
    mid = math.exp(0.5 * (math.log(s[499].item()) + math.log(s[500].item())))
    close(schedules.sgm_uniform(2, inputs(schedule, lo, hi)), [s[999].item(), mid, 0.0], rel=1e-5)


def test_beta_symmetric_quantiles(schedule):
    # alpha = beta = 0.6 is symmetric, so the median quantile maps to the middle of the range
    close(schedules.beta(3, inputs(schedule)), [10.0, 5.05, 0.1, 0.0], rel=1e-6)
    got = schedules.beta(6, inputs(schedule))
    assert all(a > b for a, b in zip(got.tolist(), got.tolist()[1:]))
    # symmetric around the middle of the range
    assert got[1].item() + got[4].item() == pytest.approx(10.1, rel=1e-6)


def test_discard_next_to_last():
    assert schedules.discard_next_to_last(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])).tolist() == [4.0, 3.0, 2.0, 0.0]


@pytest.mark.parametrize("name", ["uniform", "karras", "exponential", "polyexponential", "sgm_uniform",
                                  "align_your_steps", "simple", "normal", "beta"])
def test_n_plus_one_values_ending_in_zero(schedule, name):
    fn = getattr(schedules, name)
    got = fn(7, inputs(schedule, schedule.sigma_min, schedule.sigma_max))
    assert len(got) == 8 and got[-1] == 0 and got.dtype == torch.float32
    assert all(a > b for a, b in zip(got.tolist(), got.tolist()[1:]))
