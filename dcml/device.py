"""Resolve the compute device and its settings once, at the edge of the program."""

from __future__ import annotations

import os

import torch

from dcml.config import TrainConfig

# cuBLAS needs this before its first call for deterministic results (CUDA >= 10.2).
CUBLAS_WORKSPACE = ":4096:8"
MAX_AUTO_WORKERS = 16


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, e.g. a container's or Slurm's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_num_workers(setting: int | str, device: torch.device, processes: int = 1) -> int:
    """``data.num_workers``: an integer as given; ``"auto"`` from the CPU count.

    On CUDA the CPUs decode JPEGs while the GPU computes: one CPU stays with the main
    process, the others (at most 16) become loader workers. On CPU the same cores run
    the network, so only a quarter of them decode (0 on a 2-core machine). With
    ``processes`` data-parallel processes on the machine each gets its share of the CPUs.
    """
    if setting != "auto":
        return int(setting)
    cpus = max(1, available_cpus() // processes)
    if device.type == "cuda":
        return max(1, min(MAX_AUTO_WORKERS, cpus - 1))
    return cpus // 4


def configure_backend(config: TrainConfig, device: torch.device) -> None:
    """Apply ``train.cudnn_benchmark``/``tf32``/``deterministic`` to torch's global switches.

    Process-wide by nature (torch keeps them globally); called by the trainer when it is
    built for a run. No effect on CPU except ``deterministic``, which also makes torch
    refuse CPU ops without a deterministic implementation.
    """
    if config.deterministic:
        # must be in the environment before cuBLAS initialises; harmless if already set
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(config.deterministic)
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = config.cudnn_benchmark and not config.deterministic
    torch.backends.cudnn.deterministic = config.deterministic
    precision = "tf32" if config.tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision
