"""Checkpoints → runnable Stable Diffusion models.

    manager = ModelManager([models_dir / "Stable-diffusion"], None, data_dir / "cache.json", device, dtype)
    manager.checkpoints()            # [CheckpointInfo(title="v1-5.safetensors [6ce0161689]", ...)], A1111 identities
    model = manager.load("v1-5")     # any A1111 alias; LRU-cached; a failed load keeps the previous model
    enc = model.encode_tokens(tokens, clip_skip=1)
    eps = model.apply_unet(x, t, enc.context)

Modules, in dependency order:
- `files` (shapes/metadata/tensors of .safetensors and .ckpt), `unpickler` (the .ckpt allow-list), `hashing`
  (sha256 + A1111's cache.json), `tokenizer` (CLIP BPE, offline);
- `shapes` (configs from tensor shapes), `config_metadata` (`sdserver.config` metadata), `openclip` (key
  conversion), `prediction` (eps/v), `family_base` + `family_sd1`/`family_sd2`/`family_sdxl`, `families` (the
  registry and `detect`);
- `sd_model` (`SDModel`), `build` (meta-device construction + checked loading), `loader` (one file → SDModel),
  `vae_files` (separate VAEs), `catalog` (A1111 names and aliases), `manager` (`ModelManager`);
- `synthetic` (random checkpoints in the original layouts, for tests and benchmarks); `nn` (the modules).
"""
