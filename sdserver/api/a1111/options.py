"""A1111's option dict (`GET/POST /sdapi/v1/options`): keys, defaults, and a thread-safe store.

Defaults are A1111 1.10's (`modules/shared_options.py`) except where sdserver chooses otherwise, each marked:
`randn_source` is "CPU" because CPU noise gives the same image on every machine (A1111's default "GPU" depends
on the vendor), and `show_progress_type` is "Approx cheap" because sdserver ships no approximation network.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from sdserver.errors import InvalidRequest

log = logging.getLogger(__name__)

# A1111 ignores these when set through the API (`restrict_api`): they guard server-side requests.
RESTRICTED_KEYS = frozenset({"api_enable_requests", "api_forbid_local_requests", "api_useragent"})
# Keys that describe server state; clients send them back with GET's whole dict and they must not stick.
SERVER_OWNED_KEYS = frozenset({"sd_checkpoint_hash"})
DEFAULT_READ_ONLY = RESTRICTED_KEYS | SERVER_OWNED_KEYS
# Changing these loads weights: the route turns them into a job instead of storing them directly.
MODEL_KEYS = frozenset({"sd_model_checkpoint"})

# Options the engine acts on the moment they change: option → the engine method given the new value. Engines
# without the method ignore the option.
ENGINE_HOOKS: Mapping[str, str] = MappingProxyType({"sd_checkpoints_limit": "set_checkpoints_limit"})

SAMPLES_FORMATS = ("png", "jpg", "jpeg", "webp")
RANDN_SOURCES = ("GPU", "CPU", "NV")
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


def default_options() -> dict[str, Any]:
    """A fresh dict of every option key with its default."""
    return {
        # Saving images and grids
        "samples_save": True,
        "samples_format": "png",
        "samples_filename_pattern": "",
        "save_images_add_number": True,
        "save_images_replace_action": "Replace",
        "grid_save": True,
        "grid_format": "png",
        "grid_extended_filename": False,
        "grid_only_if_multiple": True,
        "grid_prevent_empty_spots": False,
        "grid_zip_filename_pattern": "",
        "n_rows": -1,
        "font": "",
        "grid_text_active_color": "#000000",
        "grid_text_inactive_color": "#999999",
        "grid_background_color": "#ffffff",
        "save_images_before_face_restoration": False,
        "save_images_before_highres_fix": False,
        "save_images_before_color_correction": False,
        "save_mask": False,
        "save_mask_composite": False,
        "jpeg_quality": 80,
        "webp_lossless": False,
        "export_for_4chan": True,
        "img_downscale_threshold": 4.0,
        "target_side_length": 4000.0,
        "img_max_size_mp": 200.0,
        "use_original_name_batch": True,
        "use_upscaler_name_as_suffix": False,
        "save_selected_only": True,
        "save_init_img": False,
        "temp_dir": "",
        "clean_temp_dir_at_start": False,
        "save_incomplete_images": False,
        "notification_audio": True,
        "notification_volume": 100,
        # Paths for saving
        "outdir_samples": "",
        "outdir_txt2img_samples": "outputs/txt2img-images",
        "outdir_img2img_samples": "outputs/img2img-images",
        "outdir_extras_samples": "outputs/extras-images",
        "outdir_grids": "",
        "outdir_txt2img_grids": "outputs/txt2img-grids",
        "outdir_img2img_grids": "outputs/img2img-grids",
        "outdir_save": "log/images",
        "outdir_init_images": "outputs/init-images",
        "save_to_dirs": True,
        "grid_save_to_dirs": True,
        "use_save_to_dirs_for_ui": False,
        "directories_filename_pattern": "[date]",
        "directories_max_prompt_words": 8,
        # Upscaling and face restoration
        "ESRGAN_tile": 192,
        "ESRGAN_tile_overlap": 8,
        "realesrgan_enabled_models": ["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"],
        "upscaler_for_img2img": None,
        "set_scale_by_when_changing_upscaler": False,
        "face_restoration": False,
        "face_restoration_model": "CodeFormer",
        "code_former_weight": 0.5,
        "face_restoration_unload": False,
        # System
        "auto_launch_browser": "Local",
        "enable_console_prompts": False,
        "show_warnings": False,
        "memmon_poll_rate": 8,
        "samples_log_stdout": False,
        "multiple_tqdm": True,
        "enable_upscale_progressbar": True,
        "list_hidden_files": True,
        "disable_mmap_load_safetensors": False,
        "hide_ldm_prints": True,
        "api_enable_requests": True,
        "api_forbid_local_requests": True,
        "api_useragent": "",
        # Stable Diffusion
        "sd_model_checkpoint": None,
        "sd_checkpoint_hash": "",
        "sd_checkpoints_limit": 1,
        "sd_checkpoints_keep_in_cpu": True,
        "sd_checkpoint_cache": 0,
        "sd_unet": "Automatic",
        "enable_quantization": False,
        "emphasis": "Original",
        "enable_batch_seeds": True,
        "comma_padding_backtrack": 20,
        "sdxl_clip_l_skip": False,
        "CLIP_stop_at_last_layers": 1,
        "upcast_attn": False,
        "randn_source": "CPU",  # sdserver: A1111 says "GPU"; CPU noise is portable (see module docstring)
        "tiling": False,
        "hires_fix_refiner_pass": "second pass",
        "enable_prompt_comments": True,
        "sdxl_crop_top": 0,
        "sdxl_crop_left": 0,
        "sdxl_refiner_low_aesthetic_score": 2.5,
        "sdxl_refiner_high_aesthetic_score": 6.0,
        # VAE
        "sd_vae_checkpoint_cache": 0,
        "sd_vae": "Automatic",
        "sd_vae_overrides_per_model_preferences": True,
        "auto_vae_precision_bfloat16": False,
        "auto_vae_precision": True,
        "sd_vae_encode_method": "Full",
        "sd_vae_decode_method": "Full",
        # img2img
        "inpainting_mask_weight": 1.0,
        "initial_noise_multiplier": 1.0,
        "img2img_extra_noise": 0.0,
        "img2img_color_correction": False,
        "img2img_fix_steps": False,
        "img2img_background_color": "#ffffff",
        "img2img_editor_height": 720,
        "img2img_sketch_default_brush_color": "#ffffff",
        "img2img_inpaint_mask_brush_color": "#ffffff",
        "img2img_inpaint_sketch_default_brush_color": "#ffffff",
        "return_mask": False,
        "return_mask_composite": False,
        "img2img_batch_show_results_limit": 32,
        "overlay_inpaint": True,
        # Optimizations
        "cross_attention_optimization": "Automatic",
        "s_min_uncond": 0.0,
        "token_merging_ratio": 0.0,
        "token_merging_ratio_img2img": 0.0,
        "token_merging_ratio_hr": 0.0,
        "pad_cond_uncond": False,
        "pad_cond_uncond_v0": False,
        "persistent_cond_cache": True,
        "batch_cond_uncond": True,
        "fp8_storage": "Disable",
        "cache_fp16_weight": False,
        # Compatibility
        "auto_backcompat": True,
        "use_old_emphasis_implementation": False,
        "use_old_karras_scheduler_sigmas": False,
        "no_dpmpp_sde_batch_determinism": False,
        "use_old_hires_fix_width_height": False,
        "hires_fix_use_firstpass_conds": False,
        "use_old_scheduling": False,
        "use_downcasted_alpha_bar": False,
        "refiner_switch_by_sample_steps": False,
        # Interrogate
        "interrogate_keep_models_in_memory": False,
        "interrogate_return_ranks": False,
        "interrogate_clip_num_beams": 1,
        "interrogate_clip_min_length": 24,
        "interrogate_clip_max_length": 48,
        "interrogate_clip_dict_limit": 1500,
        "interrogate_clip_skip_categories": [],
        "interrogate_deepbooru_score_threshold": 0.5,
        "deepbooru_sort_alpha": True,
        "deepbooru_use_spaces": True,
        "deepbooru_escape": True,
        "deepbooru_filter_tags": "",
        # Extra networks
        "extra_networks_show_hidden_directories": True,
        "extra_networks_hidden_models": "When searched",
        "extra_networks_default_multiplier": 1.0,
        "extra_networks_card_width": 0,
        "extra_networks_card_height": 0,
        "extra_networks_card_text_scale": 1.0,
        "extra_networks_card_show_desc": True,
        "extra_networks_card_order_field": "Path",
        "extra_networks_card_order": "Ascending",
        "extra_networks_add_text_separator": " ",
        "ui_extra_networks_tab_reorder": "",
        "textual_inversion_print_at_load": False,
        "textual_inversion_add_hashes_to_infotext": True,
        "sd_hypernetwork": "None",
        "sd_lora": "None",
        "lora_preferred_name": "Alias from file",
        "lora_add_hashes_to_infotext": True,
        "lora_bundled_ti_to_infotext": True,
        "lora_show_all": False,
        "lora_hide_unknown_for_versions": [],
        "lora_in_memory_limit": 0,
        "lora_not_found_warning_console": False,
        "lora_not_found_gradio_warning": False,
        # User interface
        "localization": "None",
        "quicksettings_list": ["sd_model_checkpoint"],
        "ui_tab_order": [],
        "hidden_tabs": [],
        "ui_reorder_list": [],
        "gradio_theme": "Default",
        "show_progress_in_title": True,
        "send_seed": True,
        "send_size": True,
        "js_modal_lightbox": True,
        "do_not_show_images": False,
        "return_grid": True,
        # Infotext
        "enable_pnginfo": True,
        "save_txt": False,
        "add_model_name_to_info": True,
        "add_model_hash_to_info": True,
        "add_vae_name_to_info": True,
        "add_vae_hash_to_info": True,
        "add_user_name_to_info": False,
        "add_version_to_infotext": True,
        "disable_weights_auto_swap": True,
        "infotext_skip_pasting": [],
        "infotext_styles": "Apply if any",
        # Live previews
        "show_progressbar": True,
        "live_previews_enable": True,
        "live_previews_image_format": "png",
        "show_progress_grid": True,
        "show_progress_every_n_steps": 10,
        "show_progress_type": "Approx cheap",  # sdserver: no "Approx NN" weights are shipped
        "live_preview_allow_lowvram_full": False,
        "live_preview_content": "Prompt",
        "live_preview_refresh_period": 1000,
        "live_preview_fast_interrupt": False,
        # Sampler parameters
        "hide_samplers": [],
        "eta_ddim": 0.0,
        "eta_ancestral": 1.0,
        "ddim_discretize": "uniform",
        "s_churn": 0.0,
        "s_tmin": 0.0,
        "s_tmax": 0.0,
        "s_noise": 1.0,
        "sigma_min": 0.0,
        "sigma_max": 0.0,
        "rho": 0.0,
        "eta_noise_seed_delta": 0,
        "always_discard_next_to_last_sigma": False,
        "sgm_noise_multiplier": False,
        "uni_pc_variant": "bh1",
        "uni_pc_skip_type": "time_uniform",
        "uni_pc_order": 3,
        "uni_pc_lower_order_final": True,
        "sd_noise_schedule": "Default",
        "skip_early_cond": 0.0,
        "beta_dist_alpha": 0.6,
        "beta_dist_beta": 0.6,
        # Postprocessing
        "postprocessing_enable_in_main_ui": [],
        "postprocessing_disable_in_extras": [],
        "postprocessing_operation_order": [],
        "upscaling_max_images_in_cache": 5,
        "postprocessing_existing_caption_action": "Ignore",
        # Extensions
        "disabled_extensions": [],
        "disable_all_extensions": "none",
        "restore_config_state_file": "",
    }


# Options whose values are a closed set: a wrong value would only fail later, deep in a job.
_CHOICES: dict[str, tuple[str, ...]] = {
    "samples_format": SAMPLES_FORMATS,
    "randn_source": RANDN_SOURCES,
    "emphasis": EMPHASIS_MODES,
}


# Inclusive lower bounds of numeric options that make no sense below them (A1111's slider minimums).
_MINIMUMS: dict[str, int | float] = {"sd_checkpoints_limit": 1}


def _coerce_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise InvalidRequest(f"Option {key!r} expects a boolean, got {value!r}", field=key)


def _coerce_number(key: str, value: Any, kind: type) -> int | float:
    if isinstance(value, bool):
        raise InvalidRequest(f"Option {key!r} expects a number, got {value!r}", field=key)
    try:
        number = float(value) if isinstance(value, str) else value
        if not isinstance(number, (int, float)):
            raise TypeError
    except (TypeError, ValueError):
        raise InvalidRequest(f"Option {key!r} expects a number, got {value!r}", field=key) from None
    if kind is int:
        if float(number) != int(number):
            raise InvalidRequest(f"Option {key!r} expects an integer, got {value!r}", field=key)
        return int(number)
    return float(number)


def coerce_option(key: str, value: Any, default: Any) -> Any:
    """`value` made to fit the type of the option's default, loosely (as A1111's form fields are)."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        return _coerce_bool(key, value)
    if isinstance(default, (int, float)):
        number = _coerce_number(key, value, type(default))
        minimum = _MINIMUMS.get(key)
        if minimum is not None and number < minimum:
            raise InvalidRequest(f"Option {key!r} must be at least {minimum}, got {value!r}", field=key)
        return number
    if isinstance(default, str):
        if isinstance(value, (dict, list)):
            raise InvalidRequest(f"Option {key!r} expects a string, got {value!r}", field=key)
        text = str(value)
        choices = _CHOICES.get(key)
        if choices is not None:
            match = next((c for c in choices if c.lower() == text.lower()), None)
            if match is None:
                raise InvalidRequest(f"Option {key!r} must be one of {', '.join(choices)}; got {text!r}", field=key)
            return match
        return text
    if isinstance(default, list):
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        raise InvalidRequest(f"Option {key!r} expects a list, got {value!r}", field=key)
    return value


def split_model_keys(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(keys that load weights, every other key): the route submits the first as a model-switch job."""
    model = {k: v for k, v in values.items() if k in MODEL_KEYS}
    other = {k: v for k, v in values.items() if k not in MODEL_KEYS}
    return model, other


class Options:
    """The live option values of one server (kept on app.state), optionally persisted to a config.json."""

    def __init__(self, path: Path | str | None = None, defaults: Mapping[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._defaults = dict(defaults) if defaults is not None else default_options()
        self._path = Path(path) if path is not None else None
        self._values = dict(self._defaults)
        if self._path is not None:
            self._values.update(self._load(self._path))
        self._watchers: dict[str, list[Callable[[Any], None]]] = {}

    @staticmethod
    def _load(path: Path) -> dict[str, Any]:
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            # A broken config must not keep the server from starting; defaults are safe.
            log.warning("ignoring unreadable options file %s: %s", path, exc)
            return {}
        if not isinstance(data, dict):
            log.warning("ignoring options file %s: not a JSON object", path)
            return {}
        return data

    def snapshot(self) -> dict[str, Any]:
        """A copy of every option, safe to read while others update."""
        with self._lock:
            return json.loads(json.dumps(self._values))  # deep copy: lists must not be shared

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._values.get(key, default)

    def defaults(self) -> dict[str, Any]:
        return dict(self._defaults)

    def update(self, values: Mapping[str, Any], *, read_only: frozenset[str] = DEFAULT_READ_ONLY) -> dict[str, Any]:
        """Validate and store `values`; returns what was stored. Read-only keys are silently skipped (A1111
        ignores restricted keys, and clients post GET's whole dict back). Unknown keys are stored and echoed.
        Nothing is stored if any value is invalid."""
        if not isinstance(values, Mapping):
            raise InvalidRequest("Options must be a JSON object", field="body")
        with self._lock:
            changes = {
                key: coerce_option(key, value, self._defaults.get(key))
                for key, value in values.items()
                if key not in read_only
            }
            self._values.update(changes)
            if self._path is not None and changes:
                self._save(self._path, self._values)
            watchers = [(w, changes[k]) for k in changes for w in self._watchers.get(k, ())]
        # Outside the lock: a watcher may read the options back.
        for watcher, value in watchers:
            watcher(value)
        return changes

    def watch(self, key: str, callback: Callable[[Any], None], *, now: bool = True) -> None:
        """Call `callback(value)` after every update that sets the option, and (`now`) with its value now."""
        with self._lock:
            self._watchers.setdefault(key, []).append(callback)
            value = self._values.get(key)
        if now:
            callback(value)

    @staticmethod
    def _save(path: Path, values: Mapping[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a crash never leaves a half-written config behind.
        fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(values, fh, indent=4, ensure_ascii=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def bind_engine(options: Options, engine: Any) -> None:
    """Make the engine follow the options in `ENGINE_HOOKS`, starting with their current (persisted) values.
    A saved value the engine refuses is logged and the engine keeps its own."""
    for key, method in ENGINE_HOOKS.items():
        hook = getattr(engine, method, None)
        if not callable(hook):
            continue
        try:
            hook(options.get(key))
        except InvalidRequest as exc:
            log.warning("option %s=%r not applied: %s", key, options.get(key), exc.message)
        options.watch(key, hook, now=False)
