"""The retrieval chain as one Prefect flow: embed images with a model, build a faiss index,
evaluate it. The DVC stages ``embed``, ``index`` and ``index-eval`` run the same three
tasks one command each; this flow is what a Prefect deployment schedules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from tasks import retrieval


@flow(name="dcml-retrieval", flow_run_name="retrieval")
def retrieval_chain(
    model: str = "outputs/best.json",
    out_dir: str = "outputs/retrieval",
    images: str | None = None,
    split: str | None = "test",
    factory: str = "Flat",
    ks: list[int] | None = None,
    device: str = "auto",
    params_path: str = "params.yaml",
) -> dict[str, Any]:
    """``model`` embeds ``images`` (or its dataset's ``split``) into ``<out_dir>/embeddings``,
    indexed with ``factory`` into ``<out_dir>/index``, evaluated (queries: the same
    embeddings, each excluding itself) into ``<out_dir>/index-metrics.json``."""
    out = Path(out_dir)
    embeddings = retrieval.embed_images(
        model, str(out / "embeddings"), images, None if images else split, device, params_path=params_path
    )
    index = retrieval.build_index(embeddings, str(out / "index"), factory, device)
    return retrieval.evaluate_index(
        index, embeddings, list(ks) if ks else None, str(out / "index-metrics.json"), params_path=params_path
    )
