"""Queries -> ranked neighbours from an index folder, in the full embedding or one learner's sub-space."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image

from dcml.data.folder import to_rgb
from dcml.inference import LoadedModel
from dcml.retrieval import RetrievalError
from dcml.retrieval.index import IndexFolder, learner_of, normalized, project


class Searcher:
    """Search one index folder; ``model`` (the index's own, :func:`dcml.inference.load_model`)
    is needed only for image queries.

    ``search(vectors, k, learner)`` returns per query a list of hits ``{"rank", "id",
    "path", "label", "score"}`` (score = cosine similarity). With ``learner`` the query and
    every indexed vector are projected onto that learner's sub-space (its slice, or its
    mask; see ``info.json``'s ``learners``) and searched exactly there.
    """

    def __init__(self, index: IndexFolder, model: LoadedModel | None = None, device: torch.device | None = None):
        self.index = index
        self.model = model
        self.device = device or torch.device("cpu")
        self._learner_indexes: dict[int, faiss.Index] = {}
        if model is not None:
            check_model(index, model)
            model.embedder.to(self.device).eval()

    def search(self, vectors: np.ndarray, k: int = 10, learner: int | None = None) -> list[list[dict[str, Any]]]:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[1] != self.index.dimension:
            raise RetrievalError(
                f"query embeddings have shape {vectors.shape}; the index {self.index.path} has dimension "
                f"{self.index.dimension}"
            )
        if k < 1:
            raise RetrievalError(f"-k must be >= 1, got {k}")
        if learner is None:
            scores, positions = self.index.search(vectors, k)
        else:
            space = learner_of(self.index.info, learner)
            sub_index = self._learner_index(learner, space)
            scores, positions = sub_index.search(project(normalized(vectors), space), min(k, sub_index.ntotal))
        return [
            self._hits(row_scores, row_positions) for row_scores, row_positions in zip(scores, positions, strict=True)
        ]

    def _learner_index(self, learner: int, space: dict[str, Any]) -> faiss.Index:
        if learner not in self._learner_indexes:
            vectors = project(self.index.vectors(), space)
            sub_index = faiss.IndexFlatIP(vectors.shape[1])
            sub_index.add(vectors)
            self._learner_indexes[learner] = sub_index
        return self._learner_indexes[learner]

    def _hits(self, scores: np.ndarray, positions: np.ndarray) -> list[dict[str, Any]]:
        hits = []
        for score, position in zip(scores.tolist(), positions.tolist(), strict=True):
            if position < 0:
                continue
            hits.append(
                {
                    "rank": len(hits) + 1,
                    "id": int(self.index.ids[position]),
                    "path": self.index.paths[position],
                    "label": self.index.labels[position],
                    "score": float(score),
                }
            )
        return hits

    @torch.no_grad()
    def embed_images(self, images: Sequence[bytes | str | Path]) -> np.ndarray:
        """Embed image files or encoded image bytes with the index's model (its eval transform)."""
        if self.model is None:
            raise RetrievalError("image queries need the index's model; none was loaded")
        tensors = [self.model.transform(decode_image(image)) for image in images]
        channels_last = self.model.params.train.channels_last  # as dcml embed feeds the model
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        batch = torch.stack(tensors).to(self.device, memory_format=memory_format)
        return self.model.embedder(batch).float().cpu().numpy()


def decode_image(image: bytes | str | Path) -> Image.Image:
    """Encoded bytes or a file -> RGB PIL image (as training decodes it); :class:`RetrievalError`
    naming the file when it cannot be read."""
    name = "the request's image" if isinstance(image, bytes) else str(image)
    try:
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        with Image.open(io.BytesIO(data)) as decoded:
            decoded.load()
            return to_rgb(decoded)
    except Exception as error:  # noqa: BLE001 - any failure to read or decode
        raise RetrievalError(f"cannot read query image {name}: {error}") from None


def check_model(index: IndexFolder, model: LoadedModel) -> None:
    """The model must be the one the index's embeddings came from."""
    want = index.info["model"].get("sha256")
    if model.digest != want:
        raise RetrievalError(
            f"model {model.checkpoint} (sha256 {model.digest[:12]}) is not the model of the index {index.path} "
            f"({index.info['model'].get('checkpoint')}, sha256 {str(want)[:12]})"
        )
    if model.dimension != index.dimension:
        raise RetrievalError(f"model dimension {model.dimension} != index dimension {index.dimension}")
