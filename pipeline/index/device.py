"""Where FAISS runs: GPU when a GPU build and a device are present, CPU otherwise.

The same wheel name cannot serve both worlds (``faiss-gpu`` on GPU machines, ``faiss-cpu``
elsewhere), and the CPU wheel still ships Python helpers such as ``index_cpu_to_all_gpus``.
So GPU support is judged by the compiled GPU classes, not by the helper names, and every move
to a GPU is wrapped so that a failure leaves a working CPU index behind.

``THRESHER_FAISS_DEVICE`` (``auto`` | ``cpu`` | ``gpu``) overrides the automatic choice made
when a caller passes ``use_gpu=None``.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import faiss

log = logging.getLogger(__name__)

# Classes that only exist in a FAISS build compiled with CUDA/ROCm support.
_GPU_SYMBOLS = ("StandardGpuResources", "GpuMultipleClonerOptions", "index_gpu_to_cpu")

_DEVICE_ENV = "THRESHER_FAISS_DEVICE"


@dataclass(frozen=True)
class FaissDevice:
    """What this process can use: ``gpu_build`` (GPU classes compiled in) and ``num_gpus``."""

    faiss_version: str
    gpu_build: bool
    num_gpus: int

    @property
    def gpu_available(self) -> bool:
        return self.gpu_build and self.num_gpus > 0

    @property
    def name(self) -> str:
        return f"gpu x{self.num_gpus}" if self.gpu_available else "cpu"


def gpu_build() -> bool:
    """True when the installed FAISS was compiled with GPU support."""
    return all(hasattr(faiss, symbol) for symbol in _GPU_SYMBOLS)


def num_gpus() -> int:
    """Visible GPUs as FAISS counts them; 0 on CPU builds or when the driver is unusable."""
    if not gpu_build():
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception as exc:  # a broken driver must not take CPU users down with it
        log.warning("faiss.get_num_gpus() failed (%s); using CPU", exc)
        return 0


def describe_device() -> FaissDevice:
    return FaissDevice(faiss_version=faiss.__version__, gpu_build=gpu_build(), num_gpus=num_gpus())


def gpu_available() -> bool:
    return gpu_build() and num_gpus() > 0


def resolve_use_gpu(use_gpu: bool | None) -> bool:
    """Turn a caller's wish into a decision.

    ``None`` means "GPU if there is one" unless ``THRESHER_FAISS_DEVICE`` says otherwise.
    ``True`` without a GPU warns and returns False: pipelines written on a GPU box must still
    run on CPU-only CI and laptops.
    """
    if use_gpu is None:
        forced = os.environ.get(_DEVICE_ENV, "auto").strip().lower()
        if forced not in ("auto", "cpu", "gpu"):
            raise ValueError(f"{_DEVICE_ENV}={forced!r}: expected one of auto, cpu, gpu")
        if forced == "cpu":
            return False
        use_gpu = forced == "gpu" or gpu_available()
        if not use_gpu:
            return False
    if use_gpu and not gpu_available():
        warnings.warn(
            "GPU FAISS requested but not available "
            f"(gpu_build={gpu_build()}, num_gpus={num_gpus()}); running on CPU. "
            "Install faiss-gpu on a machine with a CUDA device to use the GPU.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return bool(use_gpu)


def index_to_device(index: faiss.Index, use_gpu: bool | None = None) -> tuple[faiss.Index, bool]:
    """Return ``(index, on_gpu)``: a GPU copy on all GPUs when wanted and possible, else ``index``.

    HNSW and other index types without a GPU implementation, out-of-memory errors and driver
    errors all end on the CPU index with a warning, so callers never need a second code path.
    """
    if not resolve_use_gpu(use_gpu):
        return index, False
    try:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = False  # replicas: every GPU answers every query, simplest to reason about
        gpu_index = faiss.index_cpu_to_all_gpus(index, co=options)
    except Exception as exc:
        warnings.warn(
            f"could not move {type(index).__name__} to GPU ({exc}); staying on CPU",
            RuntimeWarning,
            stacklevel=2,
        )
        return index, False
    return gpu_index, True


def index_to_cpu(index: faiss.Index, on_gpu: bool) -> faiss.Index:
    """CPU copy of a GPU index (needed before ``faiss.write_index``); a CPU index is returned as is."""
    if not on_gpu:
        return index
    return faiss.index_gpu_to_cpu(index)


def set_search_params(
    index: faiss.Index,
    on_gpu: bool,
    *,
    kind: str,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> None:
    """Apply query-time knobs through FAISS's parameter spaces, which reach through wrappers
    (IndexReplicas on GPU) that plain attribute access would miss. ``kind`` is the
    ``IndexSpec.kind`` the index was built from; knobs that do not apply to it are ignored."""
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    if nprobe is not None and kind in ("ivf_flat", "ivf_pq"):
        space.set_index_parameter(index, "nprobe", int(nprobe))
    if ef_search is not None and kind == "hnsw":
        space.set_index_parameter(index, "efSearch", int(ef_search))
