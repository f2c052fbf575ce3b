"""Image and latent upscalers: built-in resamplers, ESRGAN-family model files, latent interpolation modes.

`registry.UpscalerRegistry` lists and runs the pixel upscalers by their A1111 names; `latent` holds the latent
upscale modes hires fix uses. Nothing here holds global state: loaded models live in a registry instance.
"""
