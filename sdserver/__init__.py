"""sdserver: a local Stable Diffusion server speaking the AUTOMATIC1111 webui HTTP API."""

__version__ = "0.1.0"
