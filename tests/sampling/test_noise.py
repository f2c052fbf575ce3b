import numpy as np
import pytest
import torch

from sdserver.errors import InvalidRequest
from sdserver.sampling.noise import (
    BrownianTreeNoiseSampler,
    ImageRNG,
    PhiloxGenerator,
    philox4x32,
    randn,
    rng_noise_sampler,
    slerp,
)

SHAPE = (4, 8, 8)


def cpu_randn(seed, shape, draws=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(draws)]


def test_cpu_randn_parity():
    assert torch.equal(randn(1234, SHAPE, "cpu"), torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234)))


def test_nv_matches_published_cuda_values():
    # The expected output documented in A1111's rng_philox for seed 0, i.e. torch.randn((3, 4), device="cuda")
    # after torch.manual_seed(0) on an NVIDIA GPU. The float64 Box-Muller agrees with CUDA's float32 one to a
    # few float32 ulps (A1111's own implementation gives the same numbers as this one).
    published = np.array(
        [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
         [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
         [-1.07454231, -0.36314407, -1.67105067, 2.26550497]],
        dtype=np.float32,
    )
    got = PhiloxGenerator(0).randn((3, 4))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, published, rtol=0, atol=3e-7)
    assert torch.equal(randn(0, (3, 4), "nv"), torch.from_numpy(got))


def test_philox_known_answer():
    # Random123's published known-answer test for philox4x32-10: counter = key = 0.
    out = philox4x32(np.zeros((4, 1), dtype=np.uint32), 0)
    assert [hex(int(v)) for v in out[:, 0]] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


def test_nv_successive_draws_use_new_offsets():
    g = PhiloxGenerator(7)
    a, b = g.randn((16,)), g.randn((16,))
    assert not np.array_equal(a, b)
    assert np.array_equal(a, PhiloxGenerator(7).randn((16,)))
    # element k of a draw depends only on (seed, offset, k): a longer draw extends a shorter one
    assert np.array_equal(PhiloxGenerator(7).randn((32,))[:16], a)


def test_nv_is_roughly_standard_normal():
    x = PhiloxGenerator(123).randn((200_000,))
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01


def test_image_rng_first_draw_is_per_image_seed():
    rng = ImageRNG(SHAPE, [10, 11, 12])
    first = rng.next()
    assert first.shape == (3, *SHAPE)
    for i, seed in enumerate([10, 11, 12]):
        assert torch.equal(first[i], randn(seed, SHAPE))


def test_image_rng_next_continues_each_generator():
    rng = ImageRNG(SHAPE, [5, 6])
    rng.next()
    second = rng.next()
    assert torch.equal(second[0], cpu_randn(5, SHAPE, 2)[1])
    assert torch.equal(second[1], cpu_randn(6, SHAPE, 2)[1])


def test_batch_equals_singles_over_many_draws():
    batch = ImageRNG(SHAPE, [3, 4, 5], source="nv")
    singles = [ImageRNG(SHAPE, [s], source="nv") for s in (3, 4, 5)]
    for _ in range(3):
        b = batch.next()
        assert torch.equal(b, torch.cat([r.next() for r in singles]))


def test_same_seed_twice_is_identical():
    a, b = ImageRNG(SHAPE, [99], ensd=31337), ImageRNG(SHAPE, [99], ensd=31337)
    for _ in range(3):
        assert torch.equal(a.next(), b.next())


def test_ensd_reseeds_after_the_first_draw():
    rng = ImageRNG(SHAPE, [100], ensd=31337)
    assert torch.equal(rng.next()[0], randn(100, SHAPE))
    assert torch.equal(rng.next()[0], randn(100 + 31337, SHAPE))
    assert torch.equal(rng.next()[0], cpu_randn(100 + 31337, SHAPE, 2)[1])


def test_subseed_strength_endpoints():
    noise, subnoise = randn(1, SHAPE), randn(2, SHAPE)
    full = ImageRNG(SHAPE, [1], subseeds=[2], subseed_strength=1.0).next()[0]
    assert torch.allclose(full, subnoise, atol=1e-5)
    slight = ImageRNG(SHAPE, [1], subseeds=[2], subseed_strength=1e-4).next()[0]
    assert torch.allclose(slight, noise, atol=1e-3)
    half = ImageRNG(SHAPE, [1], subseeds=[2], subseed_strength=0.5).next()[0]
    assert torch.allclose(half, slerp(0.5, noise, subnoise))
    assert not torch.allclose(half, noise, atol=0.1) and not torch.allclose(half, subnoise, atol=0.1)


def test_subseed_does_not_advance_the_image_generator():
    rng = ImageRNG(SHAPE, [1], subseeds=[2], subseed_strength=0.3)
    rng.next()
    assert torch.equal(rng.next()[0], cpu_randn(1, SHAPE, 2)[1])


def test_slerp_keeps_unit_scale_and_falls_back_when_parallel():
    a, b = randn(1, SHAPE), randn(2, SHAPE)
    mid = slerp(0.5, a, b)
    assert mid.std().item() == pytest.approx(1.0, abs=0.15)  # slerp, unlike lerp, keeps the norm
    # parallel vectors take A1111's linear branch, whose weights are swapped: low * val + high * (1 - val)
    assert torch.allclose(slerp(0.25, a, 2 * a), a * 0.25 + 2 * a * 0.75)


def test_seed_resize_pastes_the_small_noise_in_the_centre():
    # target 128x128 px (16x16 latent) made to look like a 64x64 px (8x8) image of the same seed
    rng = ImageRNG((4, 16, 16), [42], seed_resize_from_h=64, seed_resize_from_w=64)
    out = rng.next()[0]
    small, big = randn(42, (4, 8, 8)), randn(42, (4, 16, 16))
    assert torch.equal(out[:, 4:12, 4:12], small)
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[4:12, 4:12] = False
    assert torch.equal(out[:, mask], big[:, mask])
    assert torch.equal(rng.next()[0], cpu_randn(42, (4, 16, 16), 2)[1])  # the generator moved on once


def test_seed_resize_from_larger_crops_the_centre():
    out = ImageRNG((4, 8, 8), [42], seed_resize_from_h=128, seed_resize_from_w=128).next()[0]
    assert torch.equal(out, randn(42, (4, 16, 16))[:, 4:12, 4:12])


def test_rng_noise_sampler_calls_next():
    rng = ImageRNG(SHAPE, [8])
    sampler = rng_noise_sampler(rng)
    first = sampler(torch.tensor(2.0), torch.tensor(1.0))
    assert torch.equal(first[0], randn(8, SHAPE))


def test_unknown_source():
    with pytest.raises(InvalidRequest):
        ImageRNG(SHAPE, [1], source="quantum")
    with pytest.raises(InvalidRequest):
        randn(1, SHAPE, "quantum")


def _brownian(seeds, lo=0.1, hi=10.0):
    x = torch.zeros(len(seeds), 2, 4, 4)
    return BrownianTreeNoiseSampler(x, torch.tensor(lo), torch.tensor(hi), seeds)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_brownian_batch_equals_singles_and_repeats():
    batch = _brownian([1, 2, 3])
    singles = [_brownian([s]) for s in (1, 2, 3)]
    for a, b in [(9.0, 5.0), (5.0, 1.0), (1.0, 0.2)]:
        got = batch(torch.tensor(a), torch.tensor(b))
        assert torch.equal(got, torch.cat([s(torch.tensor(a), torch.tensor(b)) for s in singles]))
    again = _brownian([1, 2, 3])
    assert torch.equal(again(torch.tensor(9.0), torch.tensor(5.0)), batch(torch.tensor(9.0), torch.tensor(5.0)))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_brownian_increments_are_unit_normal_and_additive():
    tree = BrownianTreeNoiseSampler(torch.zeros(1, 64, 64, 16), torch.tensor(0.1), torch.tensor(10.0), [5])
    n1 = tree(torch.tensor(8.0), torch.tensor(4.0))
    assert n1.std().item() == pytest.approx(1.0, abs=0.03)
    # W(8)-W(2) = (W(8)-W(4)) + (W(4)-W(2)): a Brownian path, not independent draws
    n2 = tree(torch.tensor(4.0), torch.tensor(2.0))
    whole = tree(torch.tensor(8.0), torch.tensor(2.0))
    assert torch.allclose(whole * 6**0.5, n1 * 2 + n2 * 2**0.5, atol=1e-4)


def test_brownian_needs_a_seed_per_image():
    with pytest.raises(ValueError):
        _brownian([1, 2]).__class__(torch.zeros(3, 1, 2, 2), 0.1, 10.0, [1, 2])
