import json
import threading

import pytest

from sdserver.api.a1111.options import Options, default_options, split_model_keys
from sdserver.errors import InvalidRequest

# Every option key the reference and clients.md name.
REFERENCED_KEYS = {
    "sd_model_checkpoint", "sd_checkpoint_hash", "sd_vae", "CLIP_stop_at_last_layers", "samples_format",
    "jpeg_quality", "enable_pnginfo", "save_txt", "outdir_txt2img_samples", "outdir_img2img_samples",
    "samples_filename_pattern", "eta_noise_seed_delta", "randn_source", "eta_ancestral", "eta_ddim", "s_churn",
    "s_tmin", "s_tmax", "s_noise", "s_min_uncond", "sigma_min", "sigma_max", "rho",
    "always_discard_next_to_last_sigma", "sgm_noise_multiplier", "show_progress_every_n_steps",
    "live_previews_enable", "live_preview_content", "show_progress_type", "live_previews_image_format",
    "img2img_fix_steps", "initial_noise_multiplier", "inpainting_mask_weight", "emphasis", "comma_padding_backtrack",
    "sd_checkpoints_limit", "upscaler_for_img2img", "return_grid", "send_seed", "send_size",
    "add_model_hash_to_info", "add_model_name_to_info", "add_version_to_infotext", "enable_prompt_comments",
    "extra_networks_default_multiplier", "beta_dist_alpha", "beta_dist_beta", "uni_pc_variant",
    "img2img_background_color", "overlay_inpaint", "return_mask", "return_mask_composite", "pad_cond_uncond",
    "use_old_scheduling", "disable_weights_auto_swap", "api_enable_requests", "face_restoration_model",
    "tiling", "webp_lossless", "use_old_karras_scheduler_sigmas", "token_merging_ratio",
}


def test_defaults_cover_referenced_keys_with_sdserver_choices():
    opts = default_options()
    assert REFERENCED_KEYS <= set(opts)
    assert opts["randn_source"] == "CPU" and opts["samples_format"] == "png"
    assert opts["eta_ancestral"] == 1.0 and opts["eta_ddim"] == 0.0
    assert opts["show_progress_every_n_steps"] == 10 and opts["show_progress_type"] == "Approx cheap"
    assert opts["beta_dist_alpha"] == 0.6 and opts["comma_padding_backtrack"] == 20
    json.dumps(opts)
    assert default_options() is not opts  # fresh each call


def test_get_post_round_trip_whole_dict():
    store = Options()
    whole = store.snapshot()
    whole["sd_checkpoint_hash"] = "tampered"
    whole["send_seed"] = False
    store.update(whole)
    after = store.snapshot()
    assert after["send_seed"] is False
    assert after["sd_checkpoint_hash"] == ""  # read-only: ignored, not an error


def test_snapshot_is_a_copy():
    store = Options()
    snap = store.snapshot()
    snap["quicksettings_list"].append("x")
    assert store.get("quicksettings_list") == ["sd_model_checkpoint"]


def test_loose_types_and_unknown_keys():
    store = Options()
    changed = store.update({"jpeg_quality": "90", "send_seed": "false", "s_noise": 1, "my_extension_key": [1]})
    assert changed == {"jpeg_quality": 90, "send_seed": False, "s_noise": 1.0, "my_extension_key": [1]}
    assert store.get("my_extension_key") == [1]
    assert store.update({"samples_format": "JPG"})["samples_format"] == "jpg"


@pytest.mark.parametrize("values,field", [
    ({"jpeg_quality": "high"}, "jpeg_quality"),
    ({"send_seed": "maybe"}, "send_seed"),
    ({"CLIP_stop_at_last_layers": 1.5}, "CLIP_stop_at_last_layers"),
    ({"samples_format": "gif"}, "samples_format"),
    ({"randn_source": "quantum"}, "randn_source"),
])
def test_bad_values_are_refused_atomically(values, field):
    store = Options()
    with pytest.raises(InvalidRequest) as err:
        store.update({"send_size": False, **values})
    assert err.value.field == field
    assert store.get("send_size") is True  # nothing stored


def test_restricted_keys_ignored():
    store = Options()
    assert store.update({"api_enable_requests": False}) == {}
    assert store.get("api_enable_requests") is True
    assert store.update({"sd_checkpoint_hash": "abc"}, read_only=frozenset())["sd_checkpoint_hash"] == "abc"


def test_split_model_keys():
    model, other = split_model_keys({"sd_model_checkpoint": "a", "send_seed": True, "sd_vae": "None"})
    assert model == {"sd_model_checkpoint": "a"} and other == {"send_seed": True, "sd_vae": "None"}


def test_persistence(tmp_path):
    path = tmp_path / "config.json"
    Options(path).update({"jpeg_quality": 70, "custom": "kept"})
    assert json.loads(path.read_text())["jpeg_quality"] == 70
    reopened = Options(path)
    assert reopened.get("jpeg_quality") == 70 and reopened.get("custom") == "kept"
    assert not list(tmp_path.glob(".config-*"))


def test_broken_config_file_falls_back_to_defaults(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    assert Options(path).get("jpeg_quality") == 80


def test_concurrent_updates_are_all_kept():
    store = Options()
    threads = [threading.Thread(target=store.update, args=({f"k{i}": i},)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = store.snapshot()
    assert all(snap[f"k{i}"] == i for i in range(20))
