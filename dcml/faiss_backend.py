"""faiss device selection, the shared GPU resources, and the installed build.

Every faiss consumer in ``dcml`` takes ``use_gpu: bool | None`` with one meaning:
``None`` = automatic (GPU if :func:`gpu_available`), ``True`` = GPU required (error if
none), ``False`` = CPU.

faiss comes from an extra, never from the base dependencies, because the CPU and GPU
wheels both ship the same ``faiss`` module: ``.[cpu]`` (faiss-cpu, the default) or
``.[gpu]`` (faiss-gpu, see ``docs/gpu.md``). Every GPU index (kNN, k-means, NMI's
k-means) is built on the one process-wide :func:`gpu_resources` object, on the current
CUDA device (:func:`gpu_device`).
"""

from __future__ import annotations

import functools
import sys
from importlib import metadata

import numpy as np

FAISS_MISSING = "faiss is not installed: pip install -e '.[cpu]' (or '.[gpu]' on a CUDA machine)"

try:
    import faiss
except ImportError as error:
    raise ImportError(FAISS_MISSING) from error

# faiss GPU brute-force k-selection is limited to k <= 2048; larger k falls back to CPU.
GPU_MAX_K = 2048


def gpu_compiled() -> bool:
    """True when the installed faiss was built with GPU support (a faiss-gpu wheel)."""
    return hasattr(faiss, "StandardGpuResources")


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus is not None and get_num_gpus() > 0


def resolve_use_gpu(use_gpu: bool | None) -> bool:
    """Resolve the tri-state ``use_gpu`` argument to a concrete choice.

    Raises:
        RuntimeError: ``use_gpu=True`` but no GPU is usable by faiss.
    """
    if use_gpu is None:
        return gpu_available()
    if use_gpu and not gpu_available():
        if not gpu_compiled():
            raise RuntimeError(
                "use_gpu=True but faiss sees no GPU: the installed faiss is a CPU build (faiss-cpu); "
                "install the GPU build with pip install -e '.[gpu]' (see docs/gpu.md)"
            )
        raise RuntimeError(
            "use_gpu=True but faiss sees no GPU: faiss has GPU support but finds no CUDA device "
            "(check the NVIDIA driver and CUDA_VISIBLE_DEVICES)"
        )
    return bool(use_gpu)


def gpu_device() -> int:
    """CUDA device for faiss GPU indexes: torch's current device if torch already uses CUDA, else 0.

    torch is never imported here; without it (or before it initialised CUDA) the current
    device is 0 of those visible (``CUDA_VISIBLE_DEVICES`` applies to both libraries).
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return int(torch.cuda.current_device())
    return 0


@functools.cache
def gpu_resources() -> faiss.StandardGpuResources:
    """The process-wide ``faiss.StandardGpuResources``, created on first use and reused by
    every GPU index (its cuBLAS handle, streams and temporary-memory pool live until exit).

    Raises:
        RuntimeError: the installed faiss has no GPU support.
    """
    if not gpu_compiled():
        raise RuntimeError(
            "faiss GPU resources requested but the installed faiss is a CPU build (faiss-cpu); "
            "install the GPU build with pip install -e '.[gpu]' (see docs/gpu.md)"
        )
    return faiss.StandardGpuResources()


def flat_l2_index(dim: int, *, use_gpu: bool | None = None, k: int | None = None) -> faiss.Index:
    """Empty exact (brute-force) squared-L2 index of dimension ``dim``.

    On GPU: a ``GpuIndexFlatL2`` (float32 storage) on :func:`gpu_device`, built on the
    shared :func:`gpu_resources`.

    Args:
        dim: vector dimension.
        use_gpu: see module docstring.
        k: number of neighbours that will be searched; when larger than :data:`GPU_MAX_K`
            the CPU index is returned even if a GPU is available (auto mode only).
    """
    on_gpu = resolve_use_gpu(use_gpu)
    if on_gpu and k is not None and k > GPU_MAX_K:
        if use_gpu:
            raise ValueError(f"faiss GPU search supports k <= {GPU_MAX_K}, got k={k}; use use_gpu=None/False")
        on_gpu = False
    if not on_gpu:
        return faiss.IndexFlatL2(dim)
    config = faiss.GpuIndexFlatConfig()
    config.device = gpu_device()
    return faiss.GpuIndexFlatL2(gpu_resources(), dim, config)


def normalized_rows(vectors: np.ndarray) -> np.ndarray:
    """A float32 C-contiguous copy of ``vectors`` (n, d) with unit-norm rows (faiss
    ``normalize_L2``; zero rows stay zero): clustering backbone features, index vectors."""
    out = np.array(vectors, dtype=np.float32, copy=True, order="C")
    faiss.normalize_L2(out)
    return out


def _faiss_distributions() -> list[str]:
    """Installed pip distributions that provide the ``faiss`` module (more than one = clobbered)."""
    return sorted(set(metadata.packages_distributions().get("faiss", [])))


def build_info() -> dict[str, object]:
    """What faiss this process uses, for benchmarks and logs to print.

    Returns:
        ``version`` (faiss.__version__), ``distributions`` (pip distributions providing
        the ``faiss`` module; two of them means one overwrote the other's files),
        ``gpu_compiled`` (GPU support built in), ``num_gpus`` (GPUs faiss sees, 0 for a
        CPU build) and ``compile_options`` (faiss.get_compile_options()).
    """
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return {
        "version": faiss.__version__,
        "distributions": _faiss_distributions(),
        "gpu_compiled": gpu_compiled(),
        "num_gpus": int(get_num_gpus()) if get_num_gpus is not None else 0,
        "compile_options": faiss.get_compile_options().strip(),
    }


def build_summary() -> str:
    """One line from :func:`build_info`, e.g. ``faiss 1.15.1 (faiss-cpu): CPU build, 0 GPUs``."""
    info = build_info()
    dists = ", ".join(info["distributions"]) or "unknown distribution"
    kind = "GPU build" if info["gpu_compiled"] else "CPU build"
    line = f"faiss {info['version']} ({dists}): {kind}, {info['num_gpus']} GPUs"
    if len(info["distributions"]) > 1:
        line += " - WARNING: several faiss distributions share one module, reinstall exactly one"
    return line
