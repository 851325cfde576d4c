"""Batched embedding of a dataset with the evaluation transforms and no gradients."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dcml.train import Progress


@torch.no_grad()
def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device,
    num_learners: int = 1,
    features: bool = False,
    batch_size: int = 128,
    num_workers: int = 0,
    bf16: bool = False,
    channels_last: bool = False,
    progress: Progress = lambda iterable, total: iterable,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embed every item of ``dataset`` (which yields ``(image, label, index)``).

    Returns ``(embeddings (n, D) float32, labels (n,) int64, indices (n,) int64)`` in
    dataset order. ``features=True`` returns pooled backbone features instead; with
    ``num_learners=K`` the embedding is the concatenation of the K normalised slices.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    chunks, all_labels, all_indices = [], [], []
    try:
        for images, labels, indices in progress(loader, len(loader)):
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            with autocast:
                output = model(images, num_learners=num_learners, features=features)
            chunks.append(output.float().cpu().numpy())
            all_labels.append(labels.numpy())
            all_indices.append(indices.numpy())
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("cannot embed an empty dataset")
    return (
        np.concatenate(chunks).astype(np.float32, copy=False),
        np.concatenate(all_labels).astype(np.int64, copy=False),
        np.concatenate(all_indices).astype(np.int64, copy=False),
    )
