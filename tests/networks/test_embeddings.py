"""Textual-inversion embeddings: file formats, the /embeddings listing, name lookup in token lists, and the
vectors spliced into the text encoder's input (through the real chunking and conditioning code)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdserver.models.sd_model import SDModel
from sdserver.models.tokenizer import CLIPTokenizer
from sdserver.networks import EmbeddingDatabase, ModelEmbeddings
from sdserver.pipeline.chunking import chunk_prompt
from sdserver.pipeline.conditioning import ConditioningOptions, encode_texts


def vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn((n, width), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "embeddings"
    (root / "sub").mkdir(parents=True)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(2, 32, 1)}, "name": "whatever",
                "step": 1500, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny"}, root / "sks_dog.pt")
    save_file({"emb_params": vectors(3, 32, 2)}, str(root / "sub" / "sks_dog_style.safetensors"))
    torch.save({"<wug>": vectors(1, 32, 3)[0]}, root / "wug.bin")  # diffusers: one 1-D vector
    save_file({"clip_l": vectors(2, 768, 4), "clip_g": vectors(2, 1280, 5)}, str(root / "xl_thing.safetensors"))
    torch.save({"string_to_param": {"*": vectors(4, 768, 6)}}, root / "Big768.pt")
    (root / "empty.pt").write_bytes(b"")
    torch.save({"string_to_param": {"*": vectors(1, 32, 7), "#": vectors(1, 32, 8)}}, root / "two_terms.pt")
    (root / "notes.txt").write_text("not an embedding")
    return root


def test_listing_has_a1111s_shape_split_by_the_models_width(folder: Path, model: SDModel) -> None:
    db = EmbeddingDatabase([folder])
    listing = db.listing(model)
    assert list(listing["loaded"]) == ["sks_dog", "sks_dog_style", "wug"]
    assert listing["loaded"]["sks_dog"] == {"step": 1500, "sd_checkpoint": "0123456789", "sd_checkpoint_name": "tiny",
                                            "shape": 32, "vectors": 2}
    assert listing["loaded"]["sks_dog_style"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                  "shape": 32, "vectors": 3}
    assert listing["loaded"]["wug"]["vectors"] == 1
    assert listing["skipped"] == {
        "Big768": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 768, "vectors": 4},
        "xl_thing": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 2048, "vectors": 2},
    }
    assert list(db.errors) == [str(folder / "two_terms.pt")]
    # Without a model A1111 has no expected shape and loads them all.
    assert set(db.listing()["loaded"]) == {"sks_dog", "sks_dog_style", "wug", "xl_thing", "Big768"}


def test_refresh_sees_new_and_removed_files(folder: Path) -> None:
    db = EmbeddingDatabase([folder])
    assert "late" not in db.all()
    torch.save({"string_to_param": {"*": vectors(1, 32, 9)}}, folder / "late.pt")
    (folder / "wug.bin").unlink()
    db.refresh()
    assert "late" in db.all() and "wug" not in db.all()


def test_pickles_with_foreign_classes_are_refused(folder: Path) -> None:
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors(1, 32, 1))})},
               folder / "old_style.pt")
    db = EmbeddingDatabase([folder])
    assert "old_style" not in db.all()
    assert "ParameterDict" in db.errors[str(folder / "old_style.pt")]


def test_hash_is_the_whole_files_sha256(folder: Path) -> None:
    db = EmbeddingDatabase([folder])
    expected = hashlib.sha256((folder / "sks_dog.pt").read_bytes()).hexdigest()[:12]
    assert db.hash("sks_dog") == expected


@pytest.fixture
def embeddings(folder: Path, model: SDModel) -> ModelEmbeddings:
    return EmbeddingDatabase([folder]).for_model(model)


def test_names_are_found_at_their_offset_longest_first(embeddings: ModelEmbeddings, tokenizer: CLIPTokenizer) -> None:
    short, long = tokenizer.encode("sks_dog"), tokenizer.encode("sks_dog_style")
    assert long[: len(short)] == short and len(long) > len(short)  # one name's tokens prefix the other's
    lead = tokenizer.encode("a photo of")
    tokens = lead + long + tokenizer.encode("and") + short + tokenizer.encode("wug")
    match = embeddings.find_at(tokens, len(lead))
    assert (match.name, match.n_tokens, match.n_vectors) == ("sks_dog_style", len(long), 3)
    second = len(lead) + len(long) + 1
    assert embeddings.find_at(tokens, second) == ("sks_dog", len(short), 2)
    wug = tokenizer.encode("wug")
    assert embeddings.find_at(tokens, len(tokens) - len(wug)) == ("wug", len(wug), 1)
    assert [embeddings.find_at(tokens, i) for i in range(len(lead))] == [None] * len(lead)
    assert embeddings.find_at(tokenizer.encode("big768"), 0) is None  # skipped for this model


def test_vectors_and_splice(embeddings: ModelEmbeddings, model: SDModel, tokenizer: CLIPTokenizer) -> None:
    assert torch.equal(embeddings.vectors("sks_dog"), vectors(2, 32, 1))
    encoder = model.text_encoders[0]
    tokens = torch.tensor([[tokenizer.bos_id, 0, 0, 0, tokenizer.eos_id], [tokenizer.bos_id, 0, 0, 0, tokenizer.eos_id]])

    class Slot:
        def __init__(self, name: str, offset: int) -> None:
            self.name, self.offset = name, offset

    embeds = embeddings.token_embeds(tokens, [[Slot("sks_dog", 2)], [Slot("sks_dog_style", 3)]], encoder)
    plain = encoder.embeddings.token_embedding(tokens)
    assert torch.equal(embeds[0, 2:4], vectors(2, 32, 1)) and torch.equal(embeds[0, :2], plain[0, :2])
    assert torch.equal(embeds[1, 3:5], vectors(3, 32, 2)[:2])  # cut at the row's end
    assert torch.equal(embeds[0, 4], plain[0, 4])


def test_embedding_in_a_prompt_changes_the_text_encoding(
    embeddings: ModelEmbeddings, model: SDModel, tokenizer: CLIPTokenizer
) -> None:
    chunks = chunk_prompt([("a photo of sks_dog_style", 1.0)], tokenizer, embeddings=embeddings)
    slot = chunks[0].embeddings[0]
    assert (slot.name, slot.offset, slot.n_vectors) == ("sks_dog_style", 1 + len(tokenizer.encode("a photo of")), 3)
    options = ConditioningOptions()
    with_vectors = encode_texts(model, ("a photo of sks_dog_style",), options, embeddings, embeddings.embed_chunks)
    without = encode_texts(model, ("a photo of sks_dog_style",), options)
    placeholder_only = encode_texts(model, ("a photo of sks_dog_style",), options, embeddings)
    assert with_vectors[0].context.shape == without[0].context.shape == (77, 32)
    assert not torch.allclose(with_vectors[0].context, without[0].context)
    assert not torch.allclose(with_vectors[0].context, placeholder_only[0].context)
    # Positions before the embedding can't see it (causal attention): they match the placeholder encoding.
    assert torch.allclose(with_vectors[0].context[: slot.offset], placeholder_only[0].context[: slot.offset])
    # No embedding in the batch: the embedder hands back None and encoding takes the plain lookup.
    plain_chunks = chunk_prompt([("a photo", 1.0)], tokenizer, embeddings=embeddings)
    assert embeddings.embed_chunks(model, torch.tensor([plain_chunks[0].tokens]), plain_chunks) is None


def test_model_view_is_reused_until_refresh(folder: Path, model: SDModel) -> None:
    db = EmbeddingDatabase([folder])
    view = db.for_model(model)
    assert db.for_model(model) is view
    torch.save({"string_to_param": {"*": vectors(1, 32, 9)}}, folder / "late.pt")
    db.refresh()
    fresh = db.for_model(model)
    assert fresh is not view and "late" in fresh.loaded and "late" not in view.loaded
