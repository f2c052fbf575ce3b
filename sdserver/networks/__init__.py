"""Extra networks: LoRA-family weight patches (LoRA/LoCon, LoHa, LoKr, full/diff) and textual-inversion
embeddings.

Usage from the pipeline:

    library = NetworkLibrary([settings.lora_folder])
    with apply_networks(model, lora_calls, library) as applied:   # weights patched in place
        ...                                                      # sample; applied.hashes → "Lora hashes"
    # weights are bit-identical to before here

    embeddings = EmbeddingDatabase([settings.embeddings_folder]).for_model(model)
    TextEncoderCache(model, options, embeddings, embeddings.embed_chunks)   # find_at + TokenEmbedder
"""

from sdserver.networks.apply import AppliedNetworks, NetworkCall, apply_networks
from sdserver.networks.embeddings import Embedding, EmbeddingDatabase, EmbeddingMatch, ModelEmbeddings
from sdserver.networks.lora_keys import Target, TargetTable, build_target_table
from sdserver.networks.registry import NetworkData, NetworkFile, NetworkLibrary

__all__ = [
    "AppliedNetworks",
    "Embedding",
    "EmbeddingDatabase",
    "EmbeddingMatch",
    "ModelEmbeddings",
    "NetworkCall",
    "NetworkData",
    "NetworkFile",
    "NetworkLibrary",
    "Target",
    "TargetTable",
    "apply_networks",
    "build_target_table",
]
