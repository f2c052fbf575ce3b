import hashlib
import json
import os
from pathlib import Path

import pytest

from sdserver.models import hashing
from sdserver.models.hashing import HashCache, cached_sha256, legacy_hash, sha256_file


@pytest.fixture()
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    return path


def test_streamed_sha256_matches_hashlib(blob: Path) -> None:
    assert sha256_file(blob, chunk_size=4096) == hashlib.sha256(blob.read_bytes()).hexdigest()


def test_legacy_hash_is_a1111s_8_digits(blob: Path) -> None:
    data = blob.read_bytes()
    assert legacy_hash(blob) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    small = blob.with_name("small.ckpt")
    small.write_bytes(b"x" * 1000)
    assert legacy_hash(small) is None


def test_cache_avoids_rereading_and_survives_restart(
    tmp_path: Path, blob: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_path = tmp_path / "data" / "cache.json"
    first = cached_sha256(blob, "checkpoint/model.safetensors", HashCache(cache_path))
    assert first == hashlib.sha256(blob.read_bytes()).hexdigest()

    reads: list[Path] = []
    monkeypatch.setattr(hashing, "sha256_file", lambda p, *a, **k: reads.append(p) or "0" * 64)
    # A new cache object reads the file back, as after a restart.
    again = cached_sha256(blob, "checkpoint/model.safetensors", HashCache(cache_path))
    assert again == first and reads == []

    stored = json.loads(cache_path.read_text())
    entry = stored["hashes"]["checkpoint/model.safetensors"]
    assert entry == {"mtime": os.path.getmtime(blob), "sha256": first}


def test_changed_mtime_rehashes(tmp_path: Path, blob: Path) -> None:
    cache = HashCache(tmp_path / "cache.json")
    old = cached_sha256(blob, "checkpoint/m", cache)
    stat = blob.stat()
    blob.write_bytes(b"new content")
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # Same mtime: the cache is trusted, as in A1111.
    assert cached_sha256(blob, "checkpoint/m", cache) == old
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cached_sha256(blob, "checkpoint/m", cache) == hashlib.sha256(b"new content").hexdigest()


def test_compute_false_only_consults_cache(tmp_path: Path, blob: Path) -> None:
    cache = HashCache(tmp_path / "cache.json")
    assert cached_sha256(blob, "checkpoint/m", cache, compute=False) is None
    value = cached_sha256(blob, "checkpoint/m", cache)
    assert cached_sha256(blob, "checkpoint/m", cache, compute=False) == value


def test_other_sections_are_kept_and_bad_files_tolerated(tmp_path: Path, blob: Path) -> None:
    cache_path = tmp_path / "cache.json"
    cache_path.write_text(json.dumps({"hashes-addnet": {"x": 1}, "hashes": {"lora/x": {"mtime": 1, "sha256": "a"}}}))
    cached_sha256(blob, "checkpoint/m", HashCache(cache_path))
    stored = json.loads(cache_path.read_text())
    assert stored["hashes-addnet"] == {"x": 1} and "lora/x" in stored["hashes"] and "checkpoint/m" in stored["hashes"]

    cache_path.write_text("{not json")
    assert cached_sha256(blob, "checkpoint/m", HashCache(cache_path)) == sha256_file(blob)
