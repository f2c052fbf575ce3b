"""Image parity with AUTOMATIC1111's own sampling code: every sampler x {Automatic, Karras, Exponential}.

    python benchmarks/a1111_parity.py --a1111 PATH/TO/stable-diffusion-webui --kdiffusion PATH/TO/site-dir

`--a1111` is an A1111 1.10 checkout (only its `modules/sd_samplers*.py`, `sd_schedulers.py`, `rng.py` and
`modules/models/diffusion/uni_pc/uni_pc.py` are imported); `--kdiffusion` is a directory that holds the
`k_diffusion` package (e.g. `pip install --target DIR k-diffusion==0.1.1.post1 --no-deps`). Nothing of A1111 is
part of this repository: this file holds only the stand-ins (``modules.shared``, ``modules.devices``,
``modules.prompt_parser``, callbacks) and the adapter that lets A1111's samplers drive sdserver's model.

For each pair both sides run the same tiny fp32 SD 1.x checkpoint built by `sdserver.models.synthetic`, the same
prompt conditioning, A1111's CPU noise, and the same VAE decode:
- A1111: its KDiffusionSampler / CompVisSampler / LCMSampler `.sample(p, ...)`, i.e. its CFG denoiser,
  k-diffusion's CompVis(V)Denoiser sigma discretisation, its scheduler functions and sampler functions, with the
  starting noise from its `rng.ImageRNG`;
- sdserver: `sdserver.pipeline.txt2img.txt2img` on a GenerationRequest.
It prints the mean absolute pixel difference (0..255) per pair and PASS / FAIL against `--threshold` (1.0).
`--prompt-set` runs a few SD 1.x prompt / seed pairs instead of one; `--prediction v` reinterprets the UNet
output as v (SD 2.x-v path); `--mode img2img|inpaint` compares A1111's `sample_img2img` (with its latent mask)
with sdserver's img2img sampling phase; `--eta`, `--s-churn`, `--s-noise`, `--s-min-uncond` set the A1111 options of the
same names (defaults as A1111).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import os
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# sdserver sampler id -> A1111 1.10 label
A1111_LABELS = {
    "dpmpp_2m": "DPM++ 2M", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun", "dpmpp_2s_a": "DPM++ 2S a", "dpmpp_3m_sde": "DPM++ 3M SDE",
    "euler_a": "Euler a", "euler": "Euler", "lms": "LMS", "heun": "Heun", "dpm2": "DPM2", "dpm2_a": "DPM2 a",
    "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive", "restart": "Restart", "ddim": "DDIM",
    "ddim_cfgpp": "DDIM CFG++", "plms": "PLMS", "unipc": "UniPC", "lcm": "LCM",
}
SCHEDULER_LABELS = {"automatic": "Automatic", "karras": "Karras", "exponential": "Exponential"}
PROMPT_SET = (
    ("a photograph of an astronaut riding a horse", "blurry, lowres", 1234),
    ("a red circle on a white background", "", 42),
    ("portrait of an old sailor, oil painting, (detailed:1.2)", "cartoon", 3_000_000_123),
)


# --- stand-ins for the parts of A1111 the sampling code imports --------------------------------------------

def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _package(name: str, path: Path) -> types.ModuleType:
    """A package object whose __init__ is not run (A1111's and k-diffusion's import far more than needed)."""
    return _module(name, __path__=[str(path)])


class _Options(types.SimpleNamespace):
    def __getattr__(self, name: str) -> Any:  # an option this file does not set: A1111 code falls back
        raise AttributeError(name)


def a1111_options(args: argparse.Namespace) -> _Options:
    """The A1111 options the sampling path reads, at A1111 1.10's defaults unless given on the command line."""
    return _Options(
        enable_quantization=False, eta_ancestral=1.0, eta_ddim=0.0, eta_noise_seed_delta=0, randn_source="CPU",
        s_churn=args.s_churn, s_tmin=0.0, s_tmax=0.0, s_noise=args.s_noise, always_discard_next_to_last_sigma=False,
        use_old_karras_scheduler_sigmas=False, sigma_min=0.0, sigma_max=0.0, rho=0.0, beta_dist_alpha=0.6,
        beta_dist_beta=0.6, sgm_noise_multiplier=False, no_dpmpp_sde_batch_determinism=False,
        uni_pc_variant="bh1", uni_pc_skip_type="time_uniform", uni_pc_order=3, uni_pc_lower_order_final=True,
        skip_early_cond=0.0, s_min_uncond_all=False, pad_cond_uncond=False, pad_cond_uncond_v0=False,
        batch_cond_uncond=True, live_preview_content="Prompt", live_previews_enable=False,
        show_progress_every_n_steps=0, refiner_switch_by_sample_steps=False, img2img_extra_noise=0.0,
        img2img_fix_steps=False,
    )


class _Params:
    """Fields the A1111 callbacks and denoisers read off their parameter objects."""

    def __init__(self, *values: Any, **named: Any) -> None:
        self.args = values
        self.__dict__.update(named)


def _cfg_denoiser_params(x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                         denoiser=None):  # type: ignore[no-untyped-def]
    return _Params(x=x, image_cond=image_cond, sigma=sigma, sampling_step=sampling_step,
                   total_sampling_steps=total_sampling_steps, text_cond=text_cond, text_uncond=text_uncond,
                   denoiser=denoiser)


def _after_cfg_params(x, sampling_step, total_sampling_steps):  # type: ignore[no-untyped-def]
    return _Params(x=x, sampling_step=sampling_step, total_sampling_steps=total_sampling_steps)


def _noop(*_: Any, **__: Any) -> None:
    return None


def _float64(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type in ("mps", "xpu") else torch.float64


def _multicond_batch(cond: torch.Tensor, step: int) -> tuple[list[list[tuple[int, float]]], torch.Tensor]:
    # One prompt part of weight 1 per image, no prompt editing: what A1111's parser gives for a plain prompt.
    return [[(i, 1.0)] for i in range(cond.shape[0])], cond


class _State:
    interrupted = False
    skipped = False
    sampling_step = 0
    sampling_steps = 0
    current_latent = None


def install_a1111(a1111: Path, kdiffusion: Path, opts: _Options) -> dict[str, types.ModuleType]:
    """Import A1111's sampling modules from `a1111` with this file's stand-ins for everything around them."""
    for name in list(sys.modules):
        if name == "modules" or name.startswith("modules.") or name == "k_diffusion" or name.startswith("k_diffusion."):
            del sys.modules[name]
    root = a1111 / "modules"
    _package("modules", root)
    _package("modules.models", root / "models")
    _package("modules.models.diffusion", root / "models" / "diffusion")
    _package("modules.models.diffusion.uni_pc", root / "models" / "diffusion" / "uni_pc")
    _package("k_diffusion", kdiffusion / "k_diffusion")
    try:
        importlib.import_module("torchvision.transforms.functional")
    except ImportError:  # k_diffusion.utils imports it for image helpers the samplers never call
        _module("torchvision", __path__=[])
        _module("torchvision.transforms", __path__=[])
        _module("torchvision.transforms.functional")
    try:
        importlib.import_module("torchdiffeq")
    except ImportError:  # only k-diffusion's log_likelihood uses it
        _module("torchdiffeq", odeint=_noop)

    for name in ("utils", "sampling", "external"):
        importlib.import_module(f"k_diffusion.{name}")

    cpu = torch.device("cpu")
    devices = _module("modules.devices", cpu=cpu, device=cpu, dtype=torch.float32, dtype_vae=torch.float32,
                      dtype_unet=torch.float32, test_for_nans=_noop, torch_gc=_noop)
    shared = _module("modules.shared", opts=opts, state=_State(), sd_model=None, device=cpu,
                     total_tqdm=types.SimpleNamespace(update=_noop), parallel_processing_allowed=True,
                     cmd_opts=types.SimpleNamespace(disable_console_progressbars=True))
    _module("modules.script_callbacks", CFGDenoiserParams=_cfg_denoiser_params, cfg_denoiser_callback=_noop,
            CFGDenoisedParams=_Params, cfg_denoised_callback=_noop, AfterCFGCallbackParams=_after_cfg_params,
            cfg_after_cfg_callback=_noop, ExtraNoiseParams=_Params, extra_noise_callback=_noop)
    _module("modules.prompt_parser", reconstruct_multicond_batch=_multicond_batch,
            reconstruct_cond_batch=lambda cond, step: cond)
    _module("modules.torch_utils", float64=_float64)
    for name in ("images", "sd_models", "sd_samplers", "sd_vae_approx", "sd_vae_taesd", "lowvram"):
        _module(f"modules.{name}")
    if not (root / "rng_philox.py").exists():  # only the NV noise source needs it
        _module("modules.rng_philox")
    modules = sys.modules["modules"]
    for name in ("devices", "shared"):
        setattr(modules, name, sys.modules[f"modules.{name}"])
    del devices, shared
    loaded = {}
    for name in ("rng", "sd_schedulers", "sd_samplers_common", "sd_samplers_kdiffusion", "sd_samplers_timesteps",
                 "sd_samplers_lcm"):
        loaded[name] = importlib.import_module(f"modules.{name}")
    return loaded


# --- the adapter: sdserver's model as the LatentDiffusion object A1111 wraps -----------------------------

class A1111ModelAdapter:
    """What k-diffusion's CompVis(V)Denoiser, A1111's timestep denoisers and its LCM denoiser read off
    `shared.sd_model`: apply_model(x, t, cond), alphas_cumprod, parameterization."""

    def __init__(self, model: Any) -> None:
        self.sd = model
        self.parameterization = model.prediction_type
        self.alphas_cumprod = model.alphas_cumprod.float()
        self.device = torch.device("cpu")
        self.cond_stage_key = "crossattn"
        self.model = types.SimpleNamespace(conditioning_key="crossattn")
        self.is_sdxl = False
        self.sd_checkpoint_info = None

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        # c_concat is A1111's 5-channel dummy for non-inpainting models; the UNet does not take it.
        return self.sd.apply_unet(x, t, cond["c_crossattn"][0])


# --- the two runs ------------------------------------------------------------------------------------------

class QuietControl:
    def begin_pass(self, batch_index: int, batch_count: int, steps: int) -> None:
        pass

    def step(self, step: int, preview: Any) -> None:
        pass

    def wants_preview(self, step: int) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class Case:
    sampler: str
    scheduler: str
    prompt: str
    negative: str
    seed: int


def build_model(prediction: str) -> Any:
    from sdserver.models.manager import load_checkpoint
    from sdserver.models.synthetic import random_sd1_state_dict, save_checkpoint, tiny_sd1_configs

    unet, vae, text = tiny_sd1_configs()
    path = Path(tempfile.mkdtemp(prefix="a1111-parity-")) / "tiny.safetensors"
    save_checkpoint(random_sd1_state_dict(unet=unet, vae=vae, text=text, seed=0), path)
    model = load_checkpoint(path, torch.float32, torch.device("cpu"))
    if prediction != model.prediction_type:
        model.spec = dataclasses.replace(model.spec, prediction_type=prediction)
    return model.eval()


def request_for(case: Case, args: argparse.Namespace) -> Any:
    from sdserver.engine.types import GenerationRequest, SamplingParams, SeedParams

    sampling = SamplingParams(
        sampler=case.sampler, scheduler=case.scheduler, steps=args.steps, cfg_scale=args.cfg, eta=args.eta,
        s_churn=args.s_churn, s_noise=args.s_noise, s_min_uncond=args.s_min_uncond,
    )
    return GenerationRequest(prompt=case.prompt, negative_prompt=case.negative, width=args.size, height=args.size,
                             batch_size=args.batch_size, seeds=SeedParams(seed=case.seed), sampling=sampling)


def run_sdserver(model: Any, case: Case, args: argparse.Namespace) -> np.ndarray:
    from sdserver.pipeline.txt2img import txt2img

    images, _ = txt2img(model, request_for(case, args), QuietControl())
    return np.stack([np.asarray(image.image) for image in images]).astype(np.float64)


def conditioning(model: Any, case: Case, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt / negative context tensors sdserver computes, to hand both sides the same conditioning."""
    from sdserver.pipeline.conditioning import TextEncoderCache
    from sdserver.pipeline.txt2img import conditioning_options, guidance_for

    request = request_for(case, args)
    cache = TextEncoderCache(model, conditioning_options(request))
    g = guidance_for(cache, (case.prompt,), (case.negative,), args.steps, args.cfg, args.s_min_uncond)
    cond = torch.stack([g.conds[0].parts[0].at(0).context])
    uncond = torch.stack([g.unconds[0].parts[0].at(0).context])
    return cond, uncond


def find_a1111_sampler(a1111: dict[str, types.ModuleType], label: str) -> Any:
    configs = (a1111["sd_samplers_kdiffusion"].samplers_data_k_diffusion
               + a1111["sd_samplers_timesteps"].samplers_data_timesteps
               + a1111["sd_samplers_lcm"].samplers_data_lcm)
    for config in configs:
        if config.name == label:
            return config
    raise KeyError(f"A1111 has no sampler {label!r}")


@torch.no_grad()
def run_a1111(a1111: dict[str, types.ModuleType], model: Any, case: Case, args: argparse.Namespace) -> np.ndarray:
    from sdserver.pipeline.txt2img import decode

    shared = sys.modules["modules.shared"]
    shared.sd_model = A1111ModelAdapter(model)
    config = find_a1111_sampler(a1111, A1111_LABELS[case.sampler])
    sampler = config.constructor(shared.sd_model)
    sampler.config = config
    shape = (4, args.size // 8, args.size // 8)
    n = args.batch_size
    seeds = [case.seed + i for i in range(n)]  # A1111's all_seeds without a variation seed
    p = types.SimpleNamespace(
        steps=args.steps, cfg_scale=args.cfg, eta=args.eta, s_min_uncond=args.s_min_uncond, s_churn=args.s_churn,
        s_tmin=0.0, s_tmax=float("inf"), s_noise=args.s_noise, extra_generation_params={},
        sampler_noise_scheduler_override=None, scheduler=SCHEDULER_LABELS[case.scheduler], hr_scheduler=None,
        is_hr_pass=False, all_seeds=seeds, iteration=0, batch_size=n, scripts=None,
        refiner_checkpoint_info=None, refiner_switch_at=None, image_cfg_scale=None, denoising_strength=1.0,
        rng=a1111["rng"].ImageRNG(shape, seeds, subseeds=list(range(n)), subseed_strength=0.0),
    )
    x = p.rng.next()
    cond, uncond = (c.expand(n, -1, -1) for c in conditioning(model, case, args))
    image_cond = x.new_zeros(x.shape[0], 5, 1, 1)
    with contextlib.redirect_stderr(io.StringIO()):  # k-diffusion and UniPC draw progress bars
        if args.mode == "txt2img":
            samples = sampler.sample(p, x, cond, uncond, image_conditioning=image_cond)
        else:
            init, keep, regen = img2img_inputs(args)
            p.denoising_strength = args.denoising_strength
            if args.mode == "inpaint":
                p.mask, p.nmask = keep, regen
            samples = sampler.sample_img2img(p, init, x, cond, uncond, image_conditioning=image_cond)
            if args.mode == "inpaint":
                samples = samples * regen + init * keep  # what A1111's img2img does after sampling
    return np.stack([np.asarray(image) for image in decode(model, samples)]).astype(np.float64)


def img2img_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed "encoded image" latent and, for inpainting, a latent mask that holds its left half."""
    side = args.size // 8
    init = torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(7)).expand(args.batch_size, -1, -1, -1)
    keep = torch.zeros((1, 1, side, side))
    keep[..., : side // 2] = 1.0
    return init, keep, 1.0 - keep


@torch.no_grad()
def run_sdserver_img2img(model: Any, case: Case, args: argparse.Namespace) -> np.ndarray:
    """sdserver's img2img sampling phase (with a latent mask for inpainting), from the same pieces
    `pipeline.img2img` uses."""
    from sdserver.pipeline.conditioning import TextEncoderCache
    from sdserver.pipeline.denoise import guided_denoiser, make_rng, masked_denoiser, run_sampler
    from sdserver.pipeline.txt2img import conditioning_options, decode, guidance_for, schedule_steps
    from sdserver.sampling import run
    from sdserver.sampling.discrete import DiscreteSchedule

    request = request_for(case, args)
    init, keep, regen = img2img_inputs(args)
    plan = run.plan_img2img(case.sampler, case.scheduler, args.steps, args.denoising_strength,
                            DiscreteSchedule(model.alphas_cumprod), family=model.family)
    seeds = [case.seed + i for i in range(args.batch_size)]
    subseeds = [request.seeds.subseed + i for i in range(args.batch_size)]
    rng = make_rng(request.seeds, seeds, subseeds, tuple(init.shape[1:]), torch.device("cpu"))
    x = run.noised_latent(init, rng.next(), plan)
    cache = TextEncoderCache(model, conditioning_options(request))
    guidance = guidance_for(cache, (case.prompt,) * args.batch_size, (case.negative,) * args.batch_size,
                            schedule_steps(request), args.cfg, args.s_min_uncond)
    denoiser = guided_denoiser(model, case.sampler, guidance)
    if args.mode == "inpaint":
        denoiser = masked_denoiser(denoiser, case.sampler, init, keep, regen)
    latents = run_sampler(request.sampling, plan, x, rng, denoiser, QuietControl(), lambda latent: None).latents
    if args.mode == "inpaint":
        latents = latents * regen + init * keep
    return np.stack([np.asarray(image) for image in decode(model, latents)]).astype(np.float64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a1111", type=Path, required=True, help="A1111 checkout (holds modules/)")
    parser.add_argument("--kdiffusion", type=Path, required=True, help="directory holding the k_diffusion package")
    parser.add_argument("--samplers", default=",".join(A1111_LABELS), help="sdserver sampler ids, comma separated")
    parser.add_argument("--schedulers", default=",".join(SCHEDULER_LABELS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    parser.add_argument("--negative", default="blurry, lowres")
    parser.add_argument("--prompt-set", action="store_true", help="run the built-in SD 1.x prompt / seed set")
    parser.add_argument("--batch-size", type=int, default=1, help="images per batch (seeds seed, seed+1, ...)")
    parser.add_argument("--prediction", choices=("eps", "v"), default="eps")
    parser.add_argument("--eta", type=float, default=None, help="None: the eta option of the sampler's kind")
    parser.add_argument("--s-churn", type=float, default=0.0)
    parser.add_argument("--s-noise", type=float, default=1.0)
    parser.add_argument("--s-min-uncond", type=float, default=0.0)
    parser.add_argument("--mode", choices=("txt2img", "img2img", "inpaint"), default="txt2img",
                        help="img2img / inpaint start from a fixed latent; inpaint holds its left half")
    parser.add_argument("--denoising-strength", type=float, default=0.75)
    parser.add_argument("--threshold", type=float, default=1.0, help="pass when MAD (0..255) is below this")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    # A1111 leaves torchsde's float32 interval-boundary warnings on; they say nothing about parity.
    warnings.filterwarnings("ignore", message="Should have", module="torchsde")
    a1111 = install_a1111(args.a1111.resolve(), args.kdiffusion.resolve(), a1111_options(args))
    model = build_model(args.prediction)
    prompts = PROMPT_SET if args.prompt_set else ((args.prompt, args.negative, args.seed),)
    samplers = [s for s in args.samplers.split(",") if s]
    schedulers = [s for s in args.schedulers.split(",") if s]

    print(f"{'sampler':<18} " + " ".join(f"{SCHEDULER_LABELS[s]:>12}" for s in schedulers) + "   result")
    failures = 0
    for sampler in samplers:
        cells, ok = [], True
        for scheduler in schedulers:
            worst = 0.0
            for prompt, negative, seed in prompts:
                case = Case(sampler, scheduler, prompt, negative, seed)
                ours = run_sdserver(model, case, args) if args.mode == "txt2img" else run_sdserver_img2img(model, case, args)
                mad = float(np.abs(run_a1111(a1111, model, case, args) - ours).mean(axis=(1, 2, 3)).max())
                worst = max(worst, mad)
            ok = ok and worst < args.threshold
            cells.append(f"{worst:12.4f}")
        failures += not ok
        print(f"{sampler:<18} " + " ".join(cells) + ("   PASS" if ok else "   FAIL"), flush=True)
    first = Case(samplers[0], schedulers[0], *prompts[0])
    other_seed = dataclasses.replace(first, seed=first.seed + 1)
    run_ours = run_sdserver if args.mode == "txt2img" else run_sdserver_img2img
    scale = float(np.abs(run_ours(model, first, args) - run_ours(model, other_seed, args)).mean())
    print(f"\nscale: {first.sampler} / {first.scheduler} at seed {first.seed} vs {other_seed.seed}: MAD {scale:.2f}")
    print(f"{len(samplers) - failures}/{len(samplers)} samplers within {args.threshold} (0..255 MAD, worst over "
          f"{len(prompts)} prompt/seed pair(s) x {args.batch_size} image(s)); {args.steps} steps, {args.size}x{args.size}, cfg {args.cfg}, "
          f"{args.prediction}-prediction, {args.mode}"
          + ("" if args.mode == "txt2img" else f" at denoising strength {args.denoising_strength}"))
    return 1 if failures else 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - start:.0f} s)")
    sys.exit(code)
