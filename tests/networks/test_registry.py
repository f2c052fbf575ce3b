"""NetworkLibrary: the /loras listing, name and alias lookup, A1111's short hashes, refresh, parsed-file cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdserver.errors import InvalidRequest
from sdserver.networks import NetworkLibrary


def write_lora(path: Path, metadata: dict[str, str] | None = None, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "lora_unet_conv_in.lora_down.weight": torch.randn((2, 4, 3, 3), generator=gen),
        "lora_unet_conv_in.lora_up.weight": torch.randn((32, 2, 1, 1), generator=gen),
        "lora_unet_conv_in.alpha": torch.tensor(1.0),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata=metadata)
    else:
        torch.save(tensors, path)
    return path


def test_listing_has_a1111s_shape_with_alias_and_decoded_metadata(tmp_path: Path) -> None:
    tags = {"cat": 3}
    write_lora(tmp_path / "Lora" / "sub" / "catStyle_v2.safetensors",
               {"ss_output_name": "catStyle", "ss_tag_frequency": json.dumps(tags), "ss_network_dim": "4",
                "ssmd_cover_images": "[...]"})
    write_lora(tmp_path / "Lora" / "plain.pt")
    listing = NetworkLibrary([tmp_path / "Lora"]).list()
    assert [item["name"] for item in listing] == ["catStyle_v2", "plain"]
    cat, plain = listing
    assert set(cat) == {"name", "alias", "path", "metadata"}
    assert cat["alias"] == "catStyle"
    assert cat["path"] == str((tmp_path / "Lora" / "sub" / "catStyle_v2.safetensors").resolve())
    # JSON objects decoded, cover images dropped, A1111's known keys first (the rest keep header order, which
    # safetensors doesn't fix).
    assert cat["metadata"] == {"ss_tag_frequency": tags, "ss_network_dim": "4", "ss_output_name": "catStyle"}
    assert next(iter(cat["metadata"])) == "ss_tag_frequency"
    assert plain == {"name": "plain", "alias": "plain", "path": str((tmp_path / "Lora" / "plain.pt").resolve()),
                     "metadata": {}}


def test_find_by_name_then_unique_alias(tmp_path: Path) -> None:
    write_lora(tmp_path / "a.safetensors", {"ss_output_name": "shared"})
    write_lora(tmp_path / "b.safetensors", {"ss_output_name": "shared"})
    write_lora(tmp_path / "c.safetensors", {"ss_output_name": "unique"})
    write_lora(tmp_path / "d.safetensors", {"ss_output_name": "None"})
    library = NetworkLibrary([tmp_path])
    assert library.find("a").name == "a"
    assert library.find("unique").name == "c"
    for ambiguous in ("shared", "None"):  # A1111 forbids aliases two files share, and "none"
        with pytest.raises(InvalidRequest, match=ambiguous):
            library.find(ambiguous)


def test_unknown_name_is_refused_and_new_files_are_found_without_refresh(tmp_path: Path) -> None:
    library = NetworkLibrary([tmp_path])
    with pytest.raises(InvalidRequest, match="later") as info:
        library.find("later")
    assert info.value.field == "prompt"
    write_lora(tmp_path / "later.safetensors")
    assert library.find("later").name == "later"


def test_refresh_drops_removed_files(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "gone.safetensors")
    library = NetworkLibrary([tmp_path])
    assert [i["name"] for i in library.list()] == ["gone"]
    path.unlink()
    library.refresh()
    assert library.list() == []


def test_safetensors_hash_is_the_addnet_hash_of_the_data_after_the_header(tmp_path: Path) -> None:
    path = write_lora(tmp_path / "x.safetensors", {"ss_output_name": "x"})
    raw = path.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    expected = hashlib.sha256(raw[8 + header_length :]).hexdigest()[:12]
    library = NetworkLibrary([tmp_path])
    assert library.hash("x") == expected
    # Metadata edits don't change it: the same tensors with other metadata hash the same.
    write_lora(tmp_path / "y.safetensors", {"ss_output_name": "y", "note": "edited"})
    assert library.hash("y") == expected


def test_stored_sshs_hash_wins_and_pt_files_hash_whole(tmp_path: Path) -> None:
    write_lora(tmp_path / "meta.safetensors", {"sshs_model_hash": "abcdef0123456789" * 4})
    pt = write_lora(tmp_path / "old.pt")
    library = NetworkLibrary([tmp_path])
    assert library.hash("meta") == "abcdef012345"
    assert library.hash("old") == hashlib.sha256(pt.read_bytes()).hexdigest()[:12]


def test_parsed_files_are_cached_bounded_and_reloaded_when_changed(tmp_path: Path) -> None:
    for i in range(3):
        write_lora(tmp_path / f"n{i}.safetensors", seed=i)
    library = NetworkLibrary([tmp_path], cache_limit=2)
    first = library.load(library.find("n0"))
    assert library.load(library.find("n0")) is first
    assert set(first.modules) == {"lora_unet_conv_in"}
    assert set(first.modules["lora_unet_conv_in"]) == {"lora_down.weight", "lora_up.weight", "alpha"}
    library.load(library.find("n1"))
    library.load(library.find("n2"))
    assert library.load(library.find("n0")) is not first  # evicted
    again = library.load(library.find("n0"))
    path = write_lora(tmp_path / "n0.safetensors", seed=7)
    os.utime(path, (again.mtime + 5, again.mtime + 5))
    changed = library.load(library.find("n0"))
    assert not torch.equal(changed.modules["lora_unet_conv_in"]["lora_up.weight"],
                           again.modules["lora_unet_conv_in"]["lora_up.weight"])


def test_unreadable_files_are_reported_not_listed(tmp_path: Path) -> None:
    (tmp_path / "broken.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad")
    write_lora(tmp_path / "fine.safetensors")
    library = NetworkLibrary([tmp_path])
    assert [i["name"] for i in library.list()] == ["fine"]
    assert list(library.scan_errors) == [str(tmp_path / "broken.safetensors")]
