"""The caption-embedding store and the extraction job that fills it (stage 2a, docs/METHOD.md 2).

    store = FeatureStore.open("features/cc3m", identity=encoder.identity())
    vecs = store.get_by_ids(["img1/short", "img1/long"])      # np.ndarray [2, D]

Names load on first use: readers of a store need only numpy, the job pulls in the text encoders
(torch, transformers), and building the command line needs neither.
"""

from ..lazy import lazy_exports

__getattr__, _ = lazy_exports(__name__, {
    "store": ["FeatureStore", "StoreError", "IdentityMismatchError", "MissingIdError", "write_store"],
    "extract": ["EmbedConfig", "run_embedding", "load_embed_config", "read_captions", "plan_sources"],
})
__all__ = ["FeatureStore", "StoreError", "IdentityMismatchError", "MissingIdError", "write_store", "EmbedConfig",
           "run_embedding"]
