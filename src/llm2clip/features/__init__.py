"""The caption-embedding store and the extraction job that fills it (stage 2a, docs/METHOD.md 2).

    store = FeatureStore.open("features/cc3m", identity=encoder.identity())
    vecs = store.get_by_ids(["img1/short", "img1/long"])      # np.ndarray [2, D]
"""

from .store import FeatureStore, IdentityMismatchError, StoreError, write_store

__all__ = ["FeatureStore", "StoreError", "IdentityMismatchError", "write_store", "EmbedConfig", "run_embedding"]


def __getattr__(name):
    # The job pulls in the text encoders (torch, transformers); readers of a store need only numpy.
    if name in ("EmbedConfig", "run_embedding", "load_embed_config", "read_captions"):
        from . import extract

        return getattr(extract, name)
    raise AttributeError(name)
