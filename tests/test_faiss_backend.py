"""dcml.faiss_backend: device choice, the one shared GPU resources object, the build report.

The CPU tests run everywhere; the GPU tests run only where a faiss GPU build sees a GPU
(``pip install -e '.[gpu]'``, docs/gpu.md) and compare against CPU / exact results.
"""

from __future__ import annotations

import subprocess
import sys

import faiss
import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from dcml import clustering, faiss_backend, metrics

needs_gpu = pytest.mark.skipif(not faiss_backend.gpu_available(), reason="needs a faiss GPU build and a GPU")
cpu_build_only = pytest.mark.skipif(faiss_backend.gpu_compiled(), reason="checks the faiss-cpu build")


def separated_points(n: int, dim: int, k: int, seed: int) -> np.ndarray:
    """Random points whose k + 1 nearest (self included) differ by far more than float32 error."""
    x = np.random.default_rng(seed).uniform(0, 10, size=(n, dim)).astype(np.float32)
    d = np.sort(exact_sq_distances(x, x), axis=1)[:, : k + 2]
    assert np.diff(d, axis=1).min() > 1e-3, "pick another seed: near-tied distances"
    return x


def exact_sq_distances(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    q, g = queries.astype(np.float64), gallery.astype(np.float64)
    return ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)


def blobs(num_blobs: int = 6, per_blob: int = 50, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(num_blobs), per_blob)
    centres = rng.standard_normal((num_blobs, dim)) * 10
    return (rng.standard_normal((len(truth), dim)) * 0.05 + centres[truth]).astype(np.float32), truth


def resources_calls() -> int:
    info = faiss_backend.gpu_resources.cache_info()
    return info.hits + info.misses


# ---------------------------------------------------------------- CPU (everywhere)


def test_missing_faiss_gives_the_install_hint():
    # a None entry in sys.modules makes `import faiss` raise ImportError, as when it is not installed
    code = "import sys; sys.modules['faiss'] = None; import dcml.faiss_backend"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "ImportError: faiss is not installed: pip install -e '.[cpu]'" in result.stderr
    assert "'.[gpu]' on a CUDA machine" in result.stderr


@cpu_build_only
def test_cpu_build_refuses_gpu_clearly():
    assert not faiss_backend.gpu_available()
    assert faiss_backend.resolve_use_gpu(None) is False and faiss_backend.resolve_use_gpu(False) is False
    with pytest.raises(RuntimeError, match=r"no GPU: the installed faiss is a CPU build \(faiss-cpu\).*'\.\[gpu\]'"):
        faiss_backend.resolve_use_gpu(True)
    with pytest.raises(RuntimeError, match=r"CPU build \(faiss-cpu\)"):
        faiss_backend.gpu_resources()
    with pytest.raises(RuntimeError, match="no GPU"):
        clustering.kmeans(blobs()[0], 6, use_gpu=True)
    with pytest.raises(RuntimeError, match="no GPU"):
        metrics.knn(blobs()[0], blobs()[0], 3, use_gpu=True)


@cpu_build_only
def test_build_info_reports_the_cpu_build():
    info = faiss_backend.build_info()
    assert info["version"] == faiss.__version__
    assert info["distributions"] == ["faiss-cpu"]
    assert info["gpu_compiled"] is False and info["num_gpus"] == 0
    assert isinstance(info["compile_options"], str)
    summary = faiss_backend.build_summary()
    assert summary == f"faiss {faiss.__version__} (faiss-cpu): CPU build, 0 GPUs"


def test_cpu_paths_never_touch_gpu_resources():
    x, truth = blobs()
    choices = [False] if faiss_backend.gpu_available() else [False, None]
    before = resources_calls()
    for use_gpu in choices:
        clustering.kmeans(x, 6, nredo=2, seed=1, use_gpu=use_gpu)
        metrics.knn(x, x, 5, exclude_self=True, use_gpu=use_gpu)
        metrics.evaluate_retrieval(x, truth, [1, 2], use_gpu=use_gpu)
        assert isinstance(faiss_backend.flat_l2_index(8, use_gpu=use_gpu, k=4096), faiss.IndexFlatL2)
    assert resources_calls() == before


def test_cpu_kmeans_is_plain_faiss_kmeans():
    # the CPU path is faiss.Kmeans with its own IndexFlatL2, bit for bit
    x = np.random.default_rng(3).standard_normal((600, 6)).astype(np.float32)
    reference = faiss.Kmeans(
        6, 9, niter=11, nredo=3, seed=5, max_points_per_centroid=40, min_points_per_centroid=1, verbose=False
    )
    reference.train(x)
    _, expected = reference.index.search(x, 1)
    model = clustering.build_kmeans(6, 9, niter=11, nredo=3, seed=5, max_points_per_centroid=40, use_gpu=False)
    assert type(model.index) is faiss.IndexFlatL2 and model.gpu is False
    np.testing.assert_array_equal(
        clustering.kmeans(x, 9, niter=11, nredo=3, seed=5, max_points_per_centroid=40, use_gpu=False),
        expected[:, 0].astype(np.int64),
    )


def test_gpu_device_is_zero_without_torch_cuda():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        assert faiss_backend.gpu_device() == torch.cuda.current_device()
    else:
        assert faiss_backend.gpu_device() == 0


# ---------------------------------------------------------------- GPU (skipped without one)


@needs_gpu
def test_one_gpu_resources_object_serves_every_gpu_index():
    x, truth = blobs()
    first = faiss_backend.gpu_resources()
    assert faiss_backend.gpu_resources() is first
    index = faiss_backend.flat_l2_index(8, use_gpu=True)
    assert isinstance(index, faiss.GpuIndexFlatL2) and index.getDevice() == faiss_backend.gpu_device()
    before = faiss_backend.gpu_resources.cache_info()
    clustering.kmeans(x, 6, use_gpu=True)  # k-means
    metrics.knn(x, x, 5, use_gpu=True)  # kNN
    metrics.nmi(x, truth, use_gpu=True)  # NMI's k-means
    after = faiss_backend.gpu_resources.cache_info()
    assert after.misses == before.misses == 1 and after.hits >= before.hits + 3
    assert faiss_backend.build_info()["gpu_compiled"] and faiss_backend.build_info()["num_gpus"] >= 1


@needs_gpu
def test_gpu_knn_matches_exact_brute_force():
    x = separated_points(200, 4, k=10, seed=8)
    exact = np.sort(exact_sq_distances(x, x), axis=1)[:, 1:11]
    distances, indices = metrics.knn(x, x, 10, exclude_self=True, use_gpu=True, chunk_size=64)
    cpu_distances, cpu_indices = metrics.knn(x, x, 10, exclude_self=True, use_gpu=False)
    np.testing.assert_array_equal(indices, cpu_indices)
    np.testing.assert_allclose(distances, exact, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(distances, cpu_distances, rtol=1e-4, atol=1e-3)


@needs_gpu
def test_gpu_kmeans_matches_cpu_kmeans():
    x, truth = blobs(num_blobs=8, per_blob=60)
    gpu = clustering.kmeans(x, 8, nredo=5, seed=0, use_gpu=True)
    cpu = clustering.kmeans(x, 8, nredo=5, seed=0, use_gpu=False)
    assert normalized_mutual_info_score(truth, gpu) == pytest.approx(1.0)
    assert normalized_mutual_info_score(cpu, gpu) == pytest.approx(1.0)
    gpu_model = clustering.build_kmeans(8, 8, nredo=5, seed=0, use_gpu=True)
    cpu_model = clustering.build_kmeans(8, 8, nredo=5, seed=0, use_gpu=False)
    assert isinstance(gpu_model.index, faiss.GpuIndexFlatL2)
    assert gpu_model.train(x) == pytest.approx(cpu_model.train(x), rel=1e-3)
    # NMI's single k-means run (nredo=1) need not find the blobs, but does what the CPU does
    assert metrics.nmi(x, truth, seed=3, use_gpu=True) == pytest.approx(metrics.nmi(x, truth, seed=3, use_gpu=False))
