"""Use a trained model: embed image collections, build and evaluate faiss indexes, search them.

- :mod:`dcml.retrieval.images` — what to embed: a folder, a list file or a dataset split.
- :mod:`dcml.retrieval.store` — the embedding folder (Parquet shards + ``info.json``).
- :mod:`dcml.retrieval.embedding` — images -> shards, resumable.
- :mod:`dcml.retrieval.index` — faiss index folders (index + ID sidecar + ``info.json``).
- :mod:`dcml.retrieval.evaluate` — label recall@k / MAP@R through a saved index.
- :mod:`dcml.retrieval.search` — :class:`Searcher`: queries (images or embeddings) -> neighbours.
"""


class RetrievalError(ValueError):
    """Bad input to a retrieval command (names the file, folder or setting)."""
