"""The run's model for applications: encoded image files in, the test embedding out.

Beside the pt2 tensor model (``model``: float32 ``(B, 3, H, W) -> (B, d)``, the caller
preprocesses), every run logs ``image-model``, an MLflow pyfunc with the preprocessing
inside: its input is a DataFrame with one ``binary`` column ``image`` holding encoded
files (JPEG, PNG, ...; in JSON base64, which MLflow's scoring server decodes for a
``binary`` column), its output the float32 ``(n, d)`` embedding. It embeds exactly as
``dcml embed`` does (:mod:`dcml.retrieval.embedding`): decoded to RGB as training decodes
(:func:`dcml.data.folder.to_rgb`), the run's evaluation transform, batches of
``eval.batch_size`` — so on the CPU its embeddings are bit-identical to ``dcml embed``'s.

Served with ``mlflow models serve -m models:/<experiment>@best --env-manager local``
(the pyfunc is a reference to :class:`ImageEmbeddingModel`: dcml must be installed).
Only :mod:`tasks.tracking` calls :func:`log_image_model`, inside its active run.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, Schema, TensorSpec
from PIL import Image

from dcml.data.folder import to_rgb
from dcml.inference import LoadedModel, load_model

NAME = "image-model"
COLUMN = "image"
CHECKPOINT = "checkpoint"  # the artifact key


def decode(data: Any, row: int) -> Image.Image:
    """One cell of the ``image`` column -> RGB image, as ``dcml embed`` decodes a file.
    Bytes are the encoded file; a string is taken as its base64 text."""
    try:
        if isinstance(data, str):
            data = base64.b64decode(data)
        elif isinstance(data, bytearray | memoryview | np.bytes_):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise TypeError(f"expected the encoded image file as bytes, got {type(data).__name__}")
        with Image.open(io.BytesIO(data)) as decoded:
            decoded.load()  # truncation is caught here
            return to_rgb(decoded)
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds (SyntaxError included)
        message = f"{type(error).__name__}: {error}".replace("\n", " ")
        raise MlflowException.invalid_parameter_value(
            f"row {row} of '{COLUMN}': cannot read the image ({message})"
        ) from None


@torch.no_grad()
def embed_images(model: LoadedModel, images: list[Any]) -> np.ndarray:
    """Encoded images -> float32 ``(n, d)``, in batches of ``eval.batch_size`` (as ``dcml embed``)."""
    embedder = model.embedder.eval()
    memory_format = torch.channels_last if model.params.train.channels_last else torch.contiguous_format
    device = next(embedder.parameters()).device
    chunks = [np.empty((0, model.dimension), np.float32)]
    for start in range(0, len(images), model.batch_size):
        rows = enumerate(images[start : start + model.batch_size], start)
        batch = torch.stack([model.transform(decode(data, row)) for row, data in rows])
        chunks.append(embedder(batch.to(device, memory_format=memory_format)).float().cpu().numpy())
    return np.concatenate(chunks)


class ImageEmbeddingModel(mlflow.pyfunc.PythonModel):
    """``predict(DataFrame[image: bytes]) -> float32 (n, d)``: the checkpoint's test
    embedding (:func:`dcml.inference.load_model`, on the CPU) of each row's image."""

    def load_context(self, context) -> None:
        self.model = load_model(context.artifacts[CHECKPOINT], torch.device("cpu"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        if isinstance(model_input, pd.DataFrame):
            if COLUMN not in model_input.columns:
                raise MlflowException.invalid_parameter_value(
                    f"the input needs a column '{COLUMN}' (the encoded image files); got {list(model_input.columns)}"
                )
            images = model_input[COLUMN].tolist()
        elif isinstance(model_input, list | tuple):
            images = list(model_input)
        else:
            raise MlflowException.invalid_parameter_value(
                f"expected a DataFrame with a column '{COLUMN}', got {type(model_input).__name__}"
            )
        return embed_images(self.model, images)


def example_png(size: int, seed: int = 0) -> bytes:
    """A real PNG file: ``size`` x ``size`` RGB noise (the logged input example)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def signature(dimension: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("binary", COLUMN)]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, dimension))]),
    )


def log_image_model(
    checkpoint: str | Path,
    *,
    step: int,
    pip_requirements: list[str],
    params: dict[str, str] | None = None,
) -> ModelInfo:
    """Log ``checkpoint`` as the pyfunc :data:`NAME` into the active MLflow run, at ``step``
    (the LoggedModel carries that step's metrics), with ``params`` on the LoggedModel.
    The signature's dimension, the example's size and the metadata come from the
    checkpoint's own params; MLflow checks the example through the model before logging."""
    model = load_model(checkpoint, torch.device("cpu"))
    example = pd.DataFrame({COLUMN: [example_png(model.params.data.image_size)]})
    return mlflow.pyfunc.log_model(
        name=NAME,
        python_model=ImageEmbeddingModel(),
        artifacts={CHECKPOINT: str(checkpoint)},
        signature=signature(model.dimension),
        input_example=example,
        pip_requirements=pip_requirements,
        metadata={"num_slices": model.embedder.num_slices, "dimension": model.dimension},
        step=step,
        params=params,
    )
