"""faiss device selection: GPU when one is visible, CPU otherwise.

Every faiss consumer in ``dcml`` takes ``use_gpu: bool | None`` with one meaning:
``None`` = automatic (GPU if :func:`gpu_available`), ``True`` = GPU required (error if
none), ``False`` = CPU.
"""

from __future__ import annotations

import faiss

# faiss GPU brute-force k-selection is limited to k <= 2048; larger k falls back to CPU.
GPU_MAX_K = 2048


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
        raise RuntimeError("use_gpu=True but faiss sees no GPU (faiss-cpu build or no device)")
    return bool(use_gpu)


def flat_l2_index(dim: int, *, use_gpu: bool | None = None, k: int | None = None) -> faiss.Index:
    """Empty exact (brute-force) squared-L2 index of dimension ``dim``.

    Args:
        dim: vector dimension.
        use_gpu: see module docstring.
        k: number of neighbours that will be searched; when larger than :data:`GPU_MAX_K`
            the CPU index is returned even if a GPU is available (auto mode only).
    """
    index = faiss.IndexFlatL2(dim)
    on_gpu = resolve_use_gpu(use_gpu)
    if on_gpu and k is not None and k > GPU_MAX_K:
        if use_gpu:
            raise ValueError(f"faiss GPU search supports k <= {GPU_MAX_K}, got k={k}; use use_gpu=None/False")
        on_gpu = False
    if on_gpu:
        # index_cpu_to_all_gpus keeps its GpuResources referenced by the returned index.
        index = faiss.index_cpu_to_all_gpus(index)
    return index
