"""Sampling: pure math over torch. Samplers, sigma schedules, seeded noise, denoiser wrappers.

Every A1111 1.10 sampler and scheduler, with A1111's numerics (float32 schedules, its sampler quirks) so the
same request gives the same latent. Modules:

- `discrete`: `DiscreteSchedule(alphas_cumprod)` (sigmas, sigma <-> t), `Denoiser(model_fn, schedule, "eps"|"v")`,
  the LCM variants, and the `DenoiserFn` / `GuidedDenoiserFn` protocols.
- `schedules`: one function per scheduler; `registry`: `SAMPLERS`, `SCHEDULERS` (internal ids, A1111 order).
- `noise`: `randn`, `ImageRNG` (per-image generators, variation seeds, seed resize, ENSD; sources cpu/gpu/nv),
  `BrownianTreeNoiseSampler`.
- `samplers_k`, `dpm_solver`, `samplers_timestep`, `unipc`: the sampler functions.
- `run`: the entry point below.

How the pipeline runs one batch (txt2img)::

    from sdserver.sampling import run
    from sdserver.sampling.discrete import DiscreteSchedule
    from sdserver.sampling.noise import ImageRNG

    schedule = DiscreteSchedule(model.alphas_cumprod)                  # once per model
    plan = run.plan_txt2img(sampler_id, scheduler_id, steps, schedule,
                            sigma_min=..., sigma_max=..., rho=..., family="sd1" | "sdxl",
                            always_discard_next_to_last_sigma=...)
    rng = ImageRNG((4, h // 8, w // 8), seeds, subseeds, subseed_strength,
                   seed_resize_from_h, seed_resize_from_w, source="cpu", device=device, ensd=ensd)
    x = run.initial_latent(rng.next(), plan, sgm_noise_multiplier=...)
    unet_denoiser = run.make_denoiser(sampler_id, unet_fn, schedule, prediction="eps" | "v")
    cfg = YourCFGDenoiser(unet_denoiser, ...)                          # (x, sigma[B], **extra) -> denoised
    latent = run.sample(plan, cfg, x, rng=rng, seeds=seeds, eta=request_eta,
                        eta_ancestral=opts_eta_ancestral, eta_ddim=opts_eta_ddim,
                        s_churn=..., s_tmin=..., s_tmax=..., s_noise=..., callback=on_step)

img2img / hires: `plan = run.plan_img2img(sampler_id, scheduler_id, steps, denoising_strength, schedule,
fix_steps=img2img_fix_steps_or_hires, ...)`, `x = run.noised_latent(init_latent, rng.next(), plan)`, then
`run.sample` as above (a new `ImageRNG` per pass, as A1111).

Contracts:
- `unet_fn(x_t, t, **extra)` is the UNet call on the scaled ("VP") latent and float timesteps [B] (integer
  timesteps for LCM, as A1111); it returns eps or v. The CFG denoiser wraps the `Denoiser`, mixes
  cond/uncond in denoised space, and returns denoised.
- DDIM CFG++ needs the unconditional prediction: give the CFG denoiser a method
  `denoise_with_uncond(x, sigma, *, cond_scale_multiplier, **extra) -> (guided, uncond)` that computes the
  guided result with `cond_scale * cond_scale_multiplier` (1/12.5 here) and also returns the uncond
  branch's denoised value (see `discrete.GuidedDenoiserFn`). Without it, DDIM CFG++ runs unguided.
- `callback(dict(i=, x=, sigma=, sigma_hat=, denoised=))` runs once per step (per accepted or rejected
  attempt for DPM adaptive); exceptions it raises propagate, which is how interrupt / skip work.
- `run.sample` returns the latent to decode: x0 for schedules ending in 0; for KL Optimal the latent at
  sigma_min; for DDIM / PLMS / UniPC the VP latent at their last timestep (t = 1, resp. t_model = 0), as A1111.
- The timestep samplers call the denoiser with sigma = the sigma of their timestep. A1111's CFG compares
  s_min_uncond with the raw timestep for them: `run.uncond_skip_level(sampler_id, schedule)` maps the sigma a
  CFG layer receives to the quantity to compare (the pipeline's CFGDenoiser takes it as `skip_level`).
- UniPC converts a v-prediction UNet's output like A1111 (alphas at the truncated timestep); `run.sample`
  reads the prediction type off the denoiser's `prediction` attribute (or its `prediction=` keyword).
- All randomness enters through `rng` (ancestral, churn, DDIM noise: `rng.next()`) or the Brownian trees
  seeded by `seeds`; nothing here calls the global torch RNG, so image i of a batch equals a single run.
"""
