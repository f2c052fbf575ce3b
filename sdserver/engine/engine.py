"""The local engine: resolves the model for a request and runs the matching pipeline on this process's device."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image

from sdserver.engine.devices import cpu_has_native_bf16, pick_device, pick_dtype
from sdserver.engine.offload import Offload, offload_mode
from sdserver.engine.refiner import (
    ModelSlot, refined_hires, refined_img2img, refined_txt2img, refiner_job, refiner_route, resolve_refiner,
)
from sdserver.engine.types import (
    CheckpointInfo, GeneratedImage, GenerationRequest, GenerationResult, JobControl, RefinerUse,
)
from sdserver.errors import InvalidRequest, NoModelAvailable
from sdserver.models.manager import ModelManager, free_memory, validate_file
from sdserver.models.sd_model import SDModel
from sdserver.networks import EmbeddingDatabase, NetworkLibrary, apply_networks
from sdserver.pipeline.conditioning import TextEncoderCache
from sdserver.pipeline.extras import ExtrasParams, run_extras
from sdserver.pipeline.extra_networks import LoraCall, lora_calls, parse_extra_networks
from sdserver.pipeline.hires import txt2img_hires
from sdserver.pipeline.img2img import img2img
from sdserver.pipeline.prompt_parser import strip_comments
from sdserver.pipeline.txt2img import conditioning_options, txt2img
from sdserver.settings import Settings
from sdserver.upscalers.builtin import BUILTIN_NAMES, resize_builtin
from sdserver.upscalers.latent import LATENT_MODES, is_latent_mode
from sdserver.upscalers.registry import RealESRGANModel, UpscalerInfo, UpscalerRegistry

DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "demo" / "data" / "sdserver-demo.safetensors"


def models_dir(settings: Settings) -> Path:
    return settings.models_dir or settings.data_dir / "models"


def checkpoint_dirs(settings: Settings) -> list[Path]:
    return [settings.ckpt_dir or models_dir(settings) / "Stable-diffusion"]


def upscaler_dirs(settings: Settings) -> dict[str, list[Path]]:
    root = models_dir(settings)
    esrgan = [settings.esrgan_models_path] if settings.esrgan_models_path else [root / "ESRGAN"]
    return {"ESRGAN": esrgan, "RealESRGAN": [root / "RealESRGAN"], "SwinIR": [root / "SwinIR"], "DAT": [root / "DAT"]}


def has_checkpoints(dirs: list[Path]) -> bool:
    return any(p.suffix in (".safetensors", ".ckpt") for d in dirs if d.is_dir() for p in d.rglob("*"))


def fallback_checkpoint(settings: Settings, dirs: list[Path], demo: Path = DEMO_CHECKPOINT) -> Path | None:
    """The checkpoint given by `--ckpt`, else the shipped demo model when the folders hold none."""
    if settings.ckpt is not None:
        return settings.ckpt
    if not has_checkpoints(dirs) and demo.is_file():
        return demo
    return None


@contextlib.contextmanager
def seamless(model: SDModel, enabled: bool) -> Iterator[None]:
    """Circular padding in every conv of the UNet and VAE for tileable images, restored afterwards."""
    if not enabled:
        yield
        return
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    modes = [c.padding_mode for c in convs]
    try:
        for conv in convs:
            conv.padding_mode = "circular"
        yield
    finally:
        for conv, mode in zip(convs, modes):
            conv.padding_mode = mode


def network_calls(request: GenerationRequest) -> list[LoraCall]:
    """The `<lora:...>` tags of the prompt and negative prompt (A1111 reads only the prompt; Forge both)."""
    if request.disable_extra_networks:
        return []
    calls = []
    for field, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        calls += lora_calls(parse_extra_networks(strip_comments(text))[1], field=field)
    return calls


@dataclass
class Libraries:
    """Files besides checkpoints that requests draw on: upscaler models, LoRAs, embeddings."""

    upscalers: UpscalerRegistry
    networks: NetworkLibrary
    embeddings: EmbeddingDatabase


class LocalEngine:
    """Implements sdserver.engine.types.Engine over a ModelManager. Runs on the job worker's thread."""

    def __init__(self, manager: ModelManager, libraries: Libraries) -> None:
        self.manager = manager
        self.libraries = libraries
        self.upscalers = libraries.upscalers

    def pixel_upscale(self, image: Image.Image, width: int, height: int, name: str, field: str = "hr_upscaler") -> Image.Image:
        """`image` at exactly width × height through the named upscaler (a model runs at its own scale first)."""
        if name in BUILTIN_NAMES:
            return resize_builtin(image, width, height, name)
        scale = max(width / image.width, height / image.height)
        device = self.manager.device
        big = self.upscalers.upscale(image, scale, name, device=device, field=field)
        return big if big.size == (width, height) else resize_builtin(big, width, height, "Lanczos")

    def _model_for(self, request: GenerationRequest) -> tuple[SDModel, CheckpointInfo]:
        model = self.manager.load(request.checkpoint) if request.checkpoint else self.manager.ensure_loaded()
        info = self.manager.current_info
        assert info is not None
        if model.device.type == "cpu" and model.dtype == torch.bfloat16:
            # oneDNN's bf16 convolutions run fastest on channels-last weights; a no-op once converted.
            model.unet.to(memory_format=torch.channels_last)
        return model, info

    def generate(self, request: GenerationRequest, control: JobControl) -> GenerationResult:
        self._check_upscaler(request)
        refiner = resolve_refiner(self.manager, request)
        calls = network_calls(request)
        model, info = self._model_for(request)
        refined, refiner = refiner_route(model, info, refiner, request)
        used: RefinerUse | None = None
        vae = self.manager.set_vae(request.vae)
        embeddings = self.libraries.embeddings.for_model(model)
        cache = TextEncoderCache(model, conditioning_options(request), embeddings, embeddings.embed_chunks)
        with apply_networks(model, calls, self.libraries.networks) as applied, seamless(model, request.tiling):
            if refined:
                images, interrupted, used = self._refined(model, info, refiner, request, control, cache)
            elif request.is_img2img:
                images, interrupted = img2img(
                    model, request, control, cache, inpainting_mask_weight=request.inpainting_mask_weight
                )
            elif request.hires is not None:
                images, interrupted = self._hires(model, info, request, control, cache)
            else:
                images, interrupted = txt2img(model, request, control, cache)
        return GenerationResult(
            images=tuple(images), model_name=Path(info.filename).stem, model_hash=info.hash,
            network_hashes=tuple(applied.hashes.items()),
            embedding_hashes=tuple((n, embeddings.hash(n)) for n in cache.used_embeddings),
            vae_name=vae.name if vae else None, vae_hash=vae.hash if vae else None,
            interrupted=interrupted, is_using_inpainting_conditioning=model.is_inpainting and request.is_img2img,
            refiner=used,
        )

    def _refined(
        self, model: SDModel, info: CheckpointInfo, refiner: CheckpointInfo | None, request: GenerationRequest,
        control: JobControl, cache: TextEncoderCache,
    ) -> tuple[list[GeneratedImage], bool, RefinerUse | None]:
        """Sampling that may switch to the refiner checkpoint (sdserver.engine.refiner); the base is current
        again afterwards."""

        def make_cache(other: SDModel) -> TextEncoderCache:
            found = self.libraries.embeddings.for_model(other)
            return TextEncoderCache(other, conditioning_options(request), found, found.embed_chunks)

        with refiner_job(self.manager, ModelSlot(model, cache), info, refiner, request.refiner, make_cache,
                         lambda other: seamless(other, request.tiling)) as job:
            if request.is_img2img:
                images, interrupted = refined_img2img(job, request, control, request.inpainting_mask_weight)
            elif request.hires is not None:
                images, interrupted = refined_hires(job, request, control, self.pixel_upscale)
            else:
                images, interrupted = refined_txt2img(job, request, control)
        return images, interrupted, job.use(hires=request.hires is not None)

    def _hires(
        self, model: SDModel, info: CheckpointInfo, request: GenerationRequest, control: JobControl,
        cache: TextEncoderCache,
    ) -> tuple[list[GeneratedImage], bool]:
        """Hires fix; with hr_checkpoint_name the second pass runs on that model, then the first comes back."""
        assert request.hires is not None
        name = request.hires.checkpoint
        if name is None or self.manager.resolve(name).filename == info.filename:
            return txt2img_hires(model, request, control, self.pixel_upscale, cache)
        second = self.manager.resolve(name)
        try:
            hires_model = self.manager.load(second)
            return txt2img_hires(model, request, control, self.pixel_upscale, cache, hires_model)
        finally:
            self.manager.load(info)

    def _check_upscaler(self, request: GenerationRequest) -> None:
        """Refuse an unknown hires upscaler before the first pass runs, not after."""
        if request.hires is None:
            return
        name = request.hires.upscaler
        if not (is_latent_mode(name) or name in BUILTIN_NAMES or self.upscalers.has(name)):
            allowed = ", ".join([*LATENT_MODES, *self.upscalers.names()])
            raise InvalidRequest(f"unknown upscaler '{name}'; allowed: {allowed}", field="hr_upscaler")

    def checkpoints(self) -> list[CheckpointInfo]:
        return self.manager.checkpoints()

    def refresh_checkpoints(self) -> None:
        self.manager.refresh()

    def current_checkpoint(self) -> CheckpointInfo | None:
        return self.manager.current_info

    def load_checkpoint(self, name: str) -> CheckpointInfo:
        self.manager.load(name)
        info = self.manager.current_info
        assert info is not None
        return info

    def unload(self) -> None:
        self.manager.unload()

    def set_checkpoints_limit(self, limit: int) -> None:
        """A1111's `sd_checkpoints_limit`: how many checkpoints stay loaded (least recently used evicted)."""
        self.manager.set_limit(limit)

    def reload(self) -> None:
        self.manager.reload()

    def default_size(self) -> tuple[int, int]:
        model = self.manager.current
        if model is not None:
            return model.default_size
        try:
            info = self.manager.default_checkpoint()
        except NoModelAvailable:
            return (512, 512)
        return validate_file(Path(info.filename)).spec.default_size

    # Listings of the files requests draw on besides checkpoints (read from the HTTP thread: each library
    # guards its own state).

    def upscaler_list(self) -> list[UpscalerInfo]:
        return self.libraries.upscalers.list()

    def realesrgan_models(self) -> list[RealESRGANModel]:
        return self.libraries.upscalers.realesrgan_models()

    def refresh_upscalers(self) -> None:
        self.libraries.upscalers.refresh()

    def lora_list(self) -> list[dict[str, Any]]:
        return self.libraries.networks.list()

    def refresh_loras(self) -> None:
        self.libraries.networks.refresh()

    def embedding_listing(self) -> dict[str, dict[str, Any]]:
        return self.libraries.embeddings.listing(self.manager.current)

    def refresh_embeddings(self) -> None:
        self.libraries.embeddings.refresh()

    def extras(self, image: Image.Image, params: ExtrasParams) -> tuple[Image.Image, str]:
        """The extras tab's postprocessing (upscalers, blend) of one image, and its html_info."""
        return run_extras(image, params, self.libraries.upscalers, device=self.manager.device)

    def vae_list(self) -> list[Path]:
        return self.manager.vae_files()

    def free_caches(self) -> None:
        """Called by the job layer after an out-of-memory error."""
        free_memory()


def create_engine(settings: Settings) -> LocalEngine:
    # torchsde checks its Brownian-tree interval in float32 and warns about harmless boundary rounding.
    warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
    device = pick_device(settings.use_cpu, settings.device_id)
    dtype = pick_dtype(device, settings.precision, settings.no_half, cpu_has_native_bf16())
    dirs = checkpoint_dirs(settings)
    root = models_dir(settings)
    offload = Offload(offload_mode(
        device, medvram=settings.medvram, lowvram=settings.lowvram, medvram_sdxl=settings.medvram_sdxl), device)
    manager = ModelManager(
        dirs, fallback_checkpoint(settings, dirs), settings.data_dir / "cache.json", device, dtype,
        hashing=not settings.no_hashing, vae_dirs=[settings.vae_dir or root / "VAE"],
        vae_dtype=torch.float32 if settings.no_half_vae else None, vae_path=settings.vae_path,
        storage_device=offload.storage_device, prepare_model=offload.prepare,
    )
    libraries = Libraries(
        upscalers=UpscalerRegistry(upscaler_dirs(settings)),
        networks=NetworkLibrary([settings.lora_dir or root / "Lora", root / "LyCORIS"]),
        embeddings=EmbeddingDatabase([settings.embeddings_dir or settings.data_dir / "embeddings"]),
    )
    engine = LocalEngine(manager, libraries)
    if not settings.skip_load_model_at_start:
        with contextlib.suppress(NoModelAvailable):
            manager.ensure_loaded()
    return engine
