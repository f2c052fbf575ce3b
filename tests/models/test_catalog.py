import hashlib
from pathlib import Path

import pytest

from sdserver.errors import ModelNotFound
from sdserver.models import catalog
from sdserver.models.hashing import HashCache


def _file(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture()
def tree(ckpt_dir: Path) -> Path:
    _file(ckpt_dir / "v1-5-pruned-emaonly.safetensors", bytes(range(256)) * 4500)  # past A1111's 1 MiB offset
    _file(ckpt_dir / "sub" / "dir" / "Mine.ckpt", b"B" * 100)
    _file(ckpt_dir / "sub" / "dir" / "Mine.yaml", b"model: {}")
    _file(ckpt_dir / "notes.txt", b"not a model")
    _file(ckpt_dir / "v1-5-pruned-emaonly.vae.safetensors", b"a VAE, listed by the VAE code instead")
    return ckpt_dir


def test_scan_gives_a1111_identities(tree: Path, tmp_path: Path) -> None:
    infos = catalog.scan([tree], cache=HashCache(tmp_path / "cache.json"))
    assert [i.name for i in infos] == ["sub/dir/Mine.ckpt", "v1-5-pruned-emaonly.safetensors"]
    mine, v15 = infos
    sha = hashlib.sha256(b"B" * 100).hexdigest()
    assert mine.sha256 == sha and mine.hash == sha[:10]
    assert mine.title == f"sub/dir/Mine.ckpt [{sha[:10]}]"
    assert mine.model_name == "sub_dir_Mine"
    assert mine.filename == str(tree / "sub" / "dir" / "Mine.ckpt")
    assert mine.config == str(tree / "sub" / "dir" / "Mine.yaml")
    assert v15.config is None and v15.model_name == "v1-5-pruned-emaonly"


def test_unhashed_title_is_the_name(tree: Path, tmp_path: Path) -> None:
    infos = catalog.scan([tree], cache=HashCache(tmp_path / "cache.json"), compute_hashes=False)
    assert all(i.hash is None and i.sha256 is None and i.title == i.name for i in infos)


def test_extra_checkpoint_is_listed_once_and_by_file_name(tree: Path, tmp_path: Path) -> None:
    outside = _file(tmp_path / "elsewhere" / "direct.safetensors", b"C")
    infos = catalog.scan([tree], outside, None, compute_hashes=False)
    assert infos[0].name == "direct.safetensors" and len(infos) == 3
    inside = tree / "sub" / "dir" / "Mine.ckpt"
    infos = catalog.scan([tree], inside, None, compute_hashes=False)
    assert [i.name for i in infos].count("sub/dir/Mine.ckpt") == 1 and infos[0].name == "sub/dir/Mine.ckpt"


def test_missing_folder_is_empty(tmp_path: Path) -> None:
    assert catalog.scan([tmp_path / "nope"], None, None) == []


def test_every_alias_resolves(tree: Path, tmp_path: Path) -> None:
    infos = catalog.scan([tree], cache=HashCache(tmp_path / "cache.json"))
    table = catalog.alias_table(infos)
    v15 = next(i for i in infos if i.name.startswith("v1-5"))
    data = (tree / "v1-5-pruned-emaonly.safetensors").read_bytes()
    old = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    for alias in [
        v15.title,
        "v1-5-pruned-emaonly.safetensors",
        "v1-5-pruned-emaonly",
        v15.hash,
        v15.sha256,
        old,
    ]:
        assert catalog.resolve(table, alias) == v15, alias
    mine = next(i for i in infos if i.name.endswith("Mine.ckpt"))
    stale_title = "sub/dir/Mine.ckpt [0123456789]"
    for alias in ["sub/dir/Mine.ckpt", "sub_dir_Mine", "sub/dir/Mine", "Mine.ckpt", "Mine", stale_title]:
        assert catalog.resolve(table, alias) == mine, alias


def test_unknown_name_raises_naming_it(tree: Path) -> None:
    table = catalog.alias_table(catalog.scan([tree], None, None, compute_hashes=False))
    with pytest.raises(ModelNotFound, match="'nope.safetensors'") as err:
        catalog.resolve(table, "nope.safetensors")
    assert err.value.status_code == 404


def test_first_listed_keeps_a_shared_alias(ckpt_dir: Path) -> None:
    _file(ckpt_dir / "a" / "same.safetensors", b"1")
    _file(ckpt_dir / "b" / "same.safetensors", b"2")
    infos = catalog.scan([ckpt_dir], None, None, compute_hashes=False)
    assert catalog.resolve(catalog.alias_table(infos), "same") == infos[0]
    assert catalog.resolve(catalog.alias_table(infos), "b/same.safetensors") == infos[1]
