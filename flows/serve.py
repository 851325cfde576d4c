"""``dcml serve IDX``: an HTTP search service over one index folder (FastAPI + uvicorn).

- ``GET /health`` -> ``{"status": "ok", "count", "dimension", "factory", "learners", "model"}``
- ``POST /knn`` with ``{"image": "<base64 file bytes>"}`` or ``{"embedding": [...]}``
  (or ``"images"`` / ``"embeddings"`` lists for a batch), optional ``"k"`` (10) and
  ``"learner"``, -> ``{"neighbors": [{"rank", "id", "path", "label", "score"}, ...]}``
  (for a batch ``{"results": [[...], ...]}``). Bad input answers 400 with the reason.

The index and the model stay loaded; images are embedded with the index's own model,
exactly as ``dcml embed`` does. Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from dcml.retrieval import RetrievalError
from dcml.retrieval.search import Searcher


class KnnRequest(BaseModel):
    image: str | None = Field(None, description="base64 of an image file (JPEG, PNG, ...)")
    images: list[str] | None = Field(None, description="a batch of base64 image files")
    embedding: list[float] | None = Field(None, description="a query embedding of the index's dimension")
    embeddings: list[list[float]] | None = Field(None, description="a batch of query embeddings")
    k: int = Field(10, ge=1, description="neighbours per query")
    learner: int | None = Field(None, ge=0, description="search in this learner's sub-space")


def create_app(searcher: Searcher) -> FastAPI:
    """The FastAPI app over ``searcher`` (see the module docstring)."""
    app = FastAPI(title="dcml search", description="nearest neighbours in a dcml faiss index")
    info = searcher.index.info

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "count": info["count"],
            "dimension": info["dimension"],
            "factory": info["factory"],
            "search_parameters": info.get("search_parameters", ""),
            "learners": len(info["learners"]),
            "model": {key: info["model"].get(key) for key in ("checkpoint", "sha256", "source")},
            "images": searcher.model is not None,
        }

    @app.post("/knn")
    def knn(request: KnnRequest) -> dict[str, Any]:
        given = [name for name in ("image", "images", "embedding", "embeddings") if getattr(request, name) is not None]
        if len(given) != 1:
            raise HTTPException(400, "give exactly one of image, images, embedding, embeddings")
        try:
            if request.image is not None or request.images is not None:
                encoded = [request.image] if request.image is not None else request.images
                vectors = searcher.embed_images([_decode(text, i) for i, text in enumerate(encoded)])
            else:
                rows = [request.embedding] if request.embedding is not None else request.embeddings
                vectors = np.asarray(rows, dtype=np.float32)
            results = searcher.search(vectors, request.k, request.learner)
        except RetrievalError as error:
            raise HTTPException(400, str(error)) from None
        single = request.image is not None or request.embedding is not None
        return {"neighbors": results[0]} if single else {"results": results}

    return app


def _decode(text: str, position: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RetrievalError(f"image {position} is not valid base64") from None


def serve(
    index_path: str, host: str, port: int, device: str, params_path: str, search_parameters: str | None = None
) -> None:
    """Load the index (and its model), then serve until interrupted."""
    import uvicorn

    from flows.cli_retrieval import searcher_for

    searcher = searcher_for(index_path, device, True, params_path, search_parameters)
    print(f"dcml serve: {index_path} ({searcher.index.info['count']} items) on http://{host}:{port}", flush=True)
    uvicorn.run(create_app(searcher), host=host, port=port, log_level="warning")
