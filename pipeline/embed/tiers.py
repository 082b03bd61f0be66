"""Cheaper tiers of the text embedder (all-MiniLM-L6-v2), all behind :class:`spans.TokenEncoder`.

* ``fp32``   — the sentence-transformers model's transformer in torch
  (:class:`pipeline.embed.spans.TorchTokenEncoder`); the reference.
* ``int8``   — the same transformer as an ONNX Runtime graph with dynamic int8 quantisation:
  exported from the bundled fp32 weights (eager attention, so ONNX Runtime's BERT optimiser can
  fuse attention, GELU and layer norms), then ``quantize_dynamic(per_channel=True,
  weight_type=QInt8)``. Same tokenizer, same 256-token limit, same 384-d output space.
* ``static`` — a model2vec static embedding distilled from the same weights: one fixed vector per
  vocabulary token (the transformer's mean output for ``[CLS] token [SEP]``, SIF-weighted), no
  attention at all. Its "token states" are those vectors, so span pooling works the same way.

Both derived tiers are built offline from the local fp32 model (nothing is fetched from a hub) the
first time they are asked for, and cached under ``$THRESHER_CACHE`` (default ``~/.cache/thresher``)
in ``embed_tiers/<build>-<fp32 digest>``: a new build recipe or new fp32 weights get a new folder.
A build is made in a temporary folder beside the target and renamed into place, so a reader never
sees half a model, and two processes building at once end with one valid folder (the second one
waits on a lock and reuses the first one's result; without working locks the loser of the rename
drops its copy). ``docs/embedding_tiers.md`` has the measured speed and agreement of each tier.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.embed.spans import TokenEncoder

log = logging.getLogger(__name__)

TIERS = ("fp32", "int8", "static")

# Bump a build string whenever its recipe changes: the cache folder name includes it, so an old
# build is never mistaken for a new one.
INT8_BUILD = "int8-onnx-qint8-pc-v2"
STATIC_BUILD = "static-m2v-v4"
MANIFEST = "manifest.json"

# Texts a fresh build is checked on (against fp32 torch) before it is published to the cache.
_CHECK_TEXTS = [
    "How many apples are left if Tom eats three of the twelve he bought?",
    "Write a Python function that reverses a linked list in place.\n\ndef reverse(head):\n    prev = None",
    "You are a pirate captain. Greet the new crew!\n\nArr, welcome aboard, ye scallywags!",
    "Translate to French: the weather is nice today.",
]

# How many builds this process made (the tests check that a warm cache builds nothing).
build_counts: dict[str, int] = {"int8": 0, "static": 0}


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$THRESHER_CACHE`` or ``~/.cache/thresher``."""
    return Path(os.environ.get("THRESHER_CACHE") or "~/.cache/thresher").expanduser()


def tier_folder(build: str, fp32_digest: str) -> Path:
    return cache_root() / "embed_tiers" / f"{build}-{fp32_digest[:16]}"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder: Path, salt: str = "") -> str:
    """sha256 over ``salt`` and every file of a built tier (names and contents), the manifest and
    README aside. The builds salt it with their build string and token limit (:func:`_salt`), so
    the digest names the tier, the recipe and the files."""
    h = hashlib.sha256(salt.encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, "README.md")):
        h.update(f"{path.relative_to(folder).as_posix()}\0{_file_sha256(path)}\0".encode())
    return h.hexdigest()


def _salt(build: str, max_tokens: int) -> str:
    return f"{build}\0max_tokens={max_tokens}\0"


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``<folder>.lock`` (best effort: no lock where flock is unsupported)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    with open(folder.parent / f"{folder.name}.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # e.g. a file system without locks: the atomic rename still protects
            pass
        yield


def _cached_build(folder: Path, build: Any, what: str) -> tuple[Path, dict[str, Any]]:
    """``folder`` with a valid manifest, building it with ``build(tmp_folder) -> manifest`` if absent.

    The build writes into a temporary sibling folder, the manifest last; the folder is then
    renamed into place (atomic on one file system). A folder without a manifest is a leftover of
    an interrupted build and is replaced.
    """
    manifest = _read_manifest(folder)
    if manifest is not None:
        return folder, manifest
    with _build_lock(folder):
        manifest = _read_manifest(folder)  # another process may have finished while we waited
        if manifest is not None:
            return folder, manifest
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        try:
            started = time.perf_counter()
            log.warning("building the %s text-embedding tier in %s (once per cache)", what, folder)
            manifest = dict(build(tmp))
            manifest["build_seconds"] = round(time.perf_counter() - started, 1)
            manifest["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a shared cache must be readable
            if folder.exists() and _read_manifest(folder) is None:
                shutil.rmtree(folder, ignore_errors=True)  # an interrupted build's leftover
            try:
                os.rename(tmp, folder)
            except OSError:
                if _read_manifest(folder) is None:
                    raise
                # lost a race with a process that had no working lock: keep the winner's build
            else:
                build_counts[what] += 1
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise RuntimeError(f"building the {what} tier left no manifest in {folder}")
    return folder, manifest


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _check_build(encoder: TokenEncoder, st_model: Any, floor: float, what: str) -> float:
    """Mean-pooled cosine of a fresh build against fp32 on a few texts; refuse a broken build."""
    from pipeline.embed.spans import TorchTokenEncoder, pool

    spans = [{"user": (0, 0), "answer": (0, 0)}] * len(_CHECK_TEXTS)
    ref = pool(*TorchTokenEncoder(st_model).token_states(_CHECK_TEXTS), spans)["whole"]
    got = pool(*encoder.token_states(_CHECK_TEXTS), spans)["whole"]
    cos = float((got * ref).sum(1).min())
    if not cos >= floor:
        raise RuntimeError(f"the freshly built {what} tier disagrees with fp32 (min cosine {cos:.3f} < {floor})")
    return cos


# --------------------------------------------------------------------------------------------
# int8: ONNX Runtime, dynamic per-channel quantisation
# --------------------------------------------------------------------------------------------


def _export_onnx(st_model: Any, path: Path) -> None:
    """The fp32 transformer as ONNX (input_ids/attention_mask/token_type_ids -> last_hidden_state)."""
    import copy

    import torch

    transformer = copy.deepcopy(next(iter(st_model)).auto_model).to("cpu").float().eval()
    # Eager attention exports as plain MatMul/Softmax, a pattern ONNX Runtime's optimiser fuses
    # into its Attention kernel; sdpa exports as a graph it does not recognise (about 2x slower).
    if hasattr(transformer, "set_attn_implementation"):
        transformer.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        transformer.config._attn_implementation = "eager"

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    enc = st_model.tokenizer(["a short text", "a somewhat longer text to export with"], padding=True,
                             return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Wrapped(transformer), args, str(path), input_names=names, output_names=["last_hidden_state"],
            dynamic_axes={k: {0: "batch", 1: "sequence"} for k in [*names, "last_hidden_state"]},
            opset_version=17, do_constant_folding=True, dynamo=False,
        )


def _no_preprocess_advice(record: logging.LogRecord) -> bool:
    """Drop the quantiser's generic advice to run its pre-processing (shape inference and graph
    optimisation: the fused graph has had both)."""
    return not str(record.msg).startswith("Please consider to run pre-processing before quantization")


def build_int8(st_model: Any, folder: Path) -> dict[str, Any]:
    """Export, fuse and quantise ``st_model``'s transformer into ``folder/model.onnx``; a manifest."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    from pipeline.embed.sentence import sentence_weights_digest

    config = next(iter(st_model)).auto_model.config
    fp32 = folder / "fp32.onnx"
    fused = folder / "fused.onnx"
    _export_onnx(st_model, fp32)
    optimised = optimize_model(str(fp32), model_type="bert", num_heads=int(config.num_attention_heads),
                               hidden_size=int(config.hidden_size), opt_level=1)
    fusions = {k: v for k, v in optimised.get_fused_operator_statistics().items() if v}
    optimised.save_model_to_file(str(fused))
    root = logging.getLogger()
    root.addFilter(_no_preprocess_advice)
    try:
        quantize_dynamic(str(fused), str(folder / "model.onnx"), per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        root.removeFilter(_no_preprocess_advice)
    fp32.unlink()
    fused.unlink()
    st_model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    max_tokens = int(st_model.max_seq_length or 256)
    check = _check_build(Int8OnnxTokenEncoder(folder, dim=int(config.hidden_size), max_tokens=max_tokens, threads=None,
                                              digest="check"), st_model, 0.95, "int8")
    return {
        "tier": "int8", "build": INT8_BUILD, "fp32_digest": sentence_weights_digest(st_model),
        "digest": folder_digest(folder, _salt(INT8_BUILD, max_tokens)), "dim": int(config.hidden_size),
        "max_tokens": max_tokens, "fusions": fusions, "check_min_cosine": round(check, 5),
        "versions": _versions("torch", "transformers", "onnx", "onnxruntime"),
    }


class Int8OnnxTokenEncoder:
    """:class:`TokenEncoder` over the int8 ONNX graph of :func:`build_int8` (CPU execution provider)."""

    tier = "int8"
    precision = "int8"
    fp32_digest: str | None = None  # set by load_token_encoder (from the build manifest)

    def __init__(self, folder: str | os.PathLike[str], *, dim: int | None = None, max_tokens: int | None = None,
                 threads: int | None = None, digest: str | None = None) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        manifest = _read_manifest(self.folder) or {}
        self.dim = int(dim or manifest["dim"])
        self.max_tokens = int(max_tokens or manifest["max_tokens"])
        self.threads = int(threads or os.cpu_count() or 1)
        self.digest = digest or manifest.get("digest") or folder_digest(self.folder, _salt(INT8_BUILD, self.max_tokens))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle threads spinning for work burn CPU that other workers on the machine could use.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.tokenizer = _fast_tokenizer(self.folder / "tokenizer" / "tokenizer.json", self.max_tokens)

    def token_states(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), -1)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(ids.shape)
        offsets = np.array([e.offsets for e in encodings], dtype=np.int64).reshape(*ids.shape, 2)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64).reshape(ids.shape)
        (states,) = self.session.run(["last_hidden_state"], feeds)
        return states.astype(np.float32, copy=False), mask.astype(bool), offsets


def _fast_tokenizer(path: Path, max_tokens: int) -> Any:
    """The model's own fast tokenizer (``tokenizers``, as transformers runs it) with the same
    truncation and batch padding as ``tokenizer(texts, padding=True, truncation=True,
    max_length=max_tokens)``, without importing transformers (which imports torch: ~0.5 GB)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    config = json.loads((path.parent / "tokenizer_config.json").read_text())
    pad_token = config.get("pad_token") or "[PAD]"
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"{path}: pad token {pad_token!r} is not in the vocabulary")
    tokenizer.enable_truncation(max_length=max_tokens, strategy="longest_first",
                                direction=config.get("truncation_side", "right"))
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, direction=config.get("padding_side", "right"))
    return tokenizer


# --------------------------------------------------------------------------------------------
# static: model2vec distillation
# --------------------------------------------------------------------------------------------

# Distillation settings: model2vec's defaults, pinned so that STATIC_BUILD names one recipe.
# PCA to 256 dimensions (centred) gives the static vectors a different space from fp32's 384-d
# one, so they are compared with fp32 by neighbours, not by cosine. Keeping 384 dimensions without
# PCA was tried: cosine to fp32 was still only 0.32 on average (static token vectors are far from
# contextual ones) and neighbour agreement was slightly worse (recall@10 0.55 vs 0.57 on 1,000
# real conversations), so it buys nothing.
STATIC_DISTILL = {"pca_dims": 256, "sif_coefficient": 1e-4, "quantize_to": "float16"}


def build_static(st_model: Any, model_path: str, folder: Path) -> dict[str, Any]:
    """Distil a model2vec static model from the local fp32 model folder into ``folder``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not Path(model_path).is_dir():
        raise ValueError(f"the static tier is distilled from a local model folder; {model_path!r} is not one")
    from model2vec.distill import distill

    from pipeline.embed.sentence import sentence_weights_digest
    from pipeline.embed.spans import pool

    static = distill(model_path, device="cpu", **STATIC_DISTILL)
    # Same token budget as the fp32 model (256, not model2vec's 512), so every tier embeds the
    # same text; saved in the model's config, so StaticModel.encode uses it too.
    max_tokens = int(st_model.max_seq_length or 256)
    static.config["max_length"] = max_tokens
    # distill records the source folder's absolute path; its name alone keeps the built files
    # (and so the digest) independent of where the model happens to be installed.
    static.config["tokenizer_name"] = Path(model_path).name
    static.save_pretrained(str(folder))
    # The token-state path must reproduce StaticModel.encode (its "whole" vector).
    encoder = StaticTokenEncoder(folder, digest="check", max_tokens=max_tokens)
    spans = [{"user": (0, 0), "answer": (0, 0)}] * len(_CHECK_TEXTS)
    ours = pool(*encoder.token_states(_CHECK_TEXTS), spans)["whole"]
    theirs = np.asarray(encoder.model.encode(_CHECK_TEXTS), dtype=np.float32)
    check = float((ours * theirs).sum(1).min())
    if not check >= 0.999:
        raise RuntimeError(f"static token states do not reproduce StaticModel.encode (min cosine {check:.4f})")
    return {
        "tier": "static", "build": STATIC_BUILD, "fp32_digest": sentence_weights_digest(st_model),
        "digest": folder_digest(folder, _salt(STATIC_BUILD, max_tokens)), "dim": int(static.dim),
        "max_tokens": max_tokens, "distill": STATIC_DISTILL,
        "check_min_cosine_to_model2vec_encode": round(check, 6),
        "versions": _versions("model2vec", "torch", "transformers", "tokenizers"),
    }


class StaticTokenEncoder:
    """:class:`TokenEncoder` over a model2vec :class:`~model2vec.StaticModel`.

    Token states are the static token vectors (times the model's token weights, if it has any).
    Tokenisation is model2vec's own: no special tokens, unknown tokens left out of the mask, the
    same truncation as ``StaticModel.encode`` (a character pre-cut, then ``max_length`` tokens;
    ``max_length`` is set to the fp32 model's 256 rather than model2vec's default 512, so that
    every tier sees the same text). So the ``whole`` pool is ``self.model.encode(texts)`` (which
    normalises: ``normalize`` is true in the distilled config) up to float16 rounding.
    """

    tier = "static"
    precision = "fp16"  # the distilled token vectors are stored as float16
    fp32_digest: str | None = None  # set by load_token_encoder (from the build manifest)

    def __init__(self, folder: str | os.PathLike[str], *, digest: str | None = None,
                 max_tokens: int | None = None) -> None:
        from model2vec import StaticModel

        self.folder = Path(folder)
        manifest = _read_manifest(self.folder) or {}
        self.model = StaticModel.from_pretrained(str(self.folder))
        max_tokens = max_tokens or manifest.get("max_tokens")
        if max_tokens is not None and self.model.max_length != int(max_tokens):
            self.model.max_length = int(max_tokens)
        self.dim = int(self.model.dim)
        self.max_tokens = self.model.max_length
        self.digest = digest or manifest.get("digest") or folder_digest(self.folder, _salt(STATIC_BUILD, self.max_tokens or 0))
        vectors = np.asarray(self.model.embedding, dtype=np.float32)
        if self.model.token_mapping is not None:
            vectors = vectors[np.asarray(self.model.token_mapping)]
        if self.model.weights is not None:
            vectors = vectors * np.asarray(self.model.weights, dtype=np.float32)[:, None]
        self.vectors = np.ascontiguousarray(vectors)
        self.unk = self.model.unk_token_id
        self.tokenizer = self.model.tokenizer

    def token_states(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        texts = list(texts)
        if self.max_tokens is not None:  # StaticModel.encode's character pre-cut
            cut = self.max_tokens * self.model.median_token_length
            texts = [t[:cut] for t in texts]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        if self.max_tokens is not None:
            encodings = [e if len(e.ids) <= self.max_tokens else _truncated(e, self.max_tokens) for e in encodings]
        width = max([len(e.ids) for e in encodings] + [1])
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=bool)
        offsets = np.zeros((len(texts), width, 2), dtype=np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            if n:
                ids[row, :n] = e.ids
                offsets[row, :n] = e.offsets
                mask[row, :n] = True
        if self.unk is not None:
            mask &= ids != self.unk
        states = self.vectors[ids]
        states[~mask] = 0.0
        return states, mask, offsets


def _truncated(encoding: Any, limit: int) -> Any:
    class _Cut:  # only ids and offsets are read
        ids = encoding.ids[:limit]
        offsets = encoding.offsets[:limit]

    return _Cut


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class Fp32TokenEncoder:
    """The reference tier: :class:`TorchTokenEncoder` with ``tier`` and ``digest``."""

    tier = "fp32"

    def __init__(self, st_model: Any, precision: str | None = "fp32") -> None:
        from pipeline.embed.sentence import sentence_weights_digest
        from pipeline.embed.spans import TorchTokenEncoder

        self.inner = TorchTokenEncoder(st_model, precision)
        self.precision = self.inner.precision
        self.dim = self.inner.dim
        self.max_tokens = self.inner.max_tokens
        self.digest = sentence_weights_digest(st_model)
        self.fp32_digest = self.digest

    def token_states(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.inner.token_states(texts)


_ENCODERS: dict[tuple[Any, ...], Any] = {}
_encoders_lock = threading.Lock()


def load_token_encoder(tier: str = "fp32", model: str | os.PathLike[str] | None = None,
                       device: str | None = None, threads: int | None = None, *,
                       fp32_digest: str | None = None, precision: str | None = "auto") -> Any:
    """The text encoder of ``tier`` (one of :data:`TIERS`), loaded once per process.

    ``model``: the fp32 sentence-transformers model the tier is derived from (``None``: the bundled
    all-MiniLM-L6-v2); the derived tiers need it to be a local folder on their first build.
    ``device``: fp32 only (int8 and static run on the CPU). ``threads``: this process's share of
    the cores for int8's intra-op pool (default ``os.cpu_count()``); for fp32 it sets torch's
    (process-wide) thread count when given. ``fp32_digest``: the fp32 weights digest when the
    caller already knows it (a Beam worker gets it from the driver): a derived tier already in
    the cache for that digest then loads without loading the fp32 model at all; otherwise the
    fp32 model is loaded, and a digest that differs raises
    :class:`pipeline.stages.model_handlers.WeightsMismatch`.

    ``precision``: the fp32 tier's compute precision (:data:`pipeline.embed.sentence.PRECISIONS`;
    ``auto``: fp16 on a GPU, bf16 on a CPU with native bf16, else fp32); the derived tiers ignore it.

    Every encoder has ``tier``, ``precision`` (resolved), ``dim``, ``digest`` (fp32: the fp32
    weights digest; derived tiers: a sha256 of the built files, which differ per tier and build
    recipe), ``max_tokens`` and ``token_states``.
    """
    if tier not in TIERS:
        raise ValueError(f"unknown embedding tier {tier!r}; choose one of: {', '.join(TIERS)}")
    from pipeline.embed.sentence import resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = resolve_model_path(model)
    fp32 = tier == "fp32"
    key = (tier, path, device if fp32 else "cpu", threads, precision if fp32 else None, str(cache_root()))
    with _encoders_lock:
        encoder = _ENCODERS.get(key)
        if encoder is None:
            encoder = _load(tier, path, device, threads, fp32_digest, precision)
            _ENCODERS[key] = encoder
    if fp32_digest is not None and encoder.fp32_digest != fp32_digest:
        from pipeline.embed.sentence import WeightsMismatch

        raise WeightsMismatch(f"{tier} tier of {path}: derived from fp32 weights {encoder.fp32_digest[:16]}... "
                              f"but {fp32_digest[:16]}... was expected")
    return encoder


_BUILDS = {"int8": INT8_BUILD, "static": STATIC_BUILD}


def _load(tier: str, path: str, device: str | None, threads: int | None, known_digest: str | None,
          precision: str | None = "auto") -> Any:
    if known_digest is not None and tier != "fp32":
        # Lean path: nothing here imports torch or transformers (pipeline.stages.model_handlers does).
        folder = tier_folder(_BUILDS[tier], known_digest)
        manifest = _read_manifest(folder)
        if manifest is not None and manifest.get("fp32_digest") == known_digest:
            return _open(tier, folder, manifest, threads)
    from pipeline.embed.sentence import (
        WeightsMismatch,
        sentence_weights_digest,
        shared_sentence_model,
        shared_span_model,
    )

    if tier == "fp32":
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        # without importing sentence-transformers when the folder allows (see SpanModel)
        encoder = Fp32TokenEncoder(shared_span_model(path, device) or shared_sentence_model(path, device), precision)
        if known_digest is not None and encoder.digest != known_digest:
            raise WeightsMismatch(f"fp32 text model {path}: weights digest {encoder.digest[:16]}... "
                                  f"differs from the expected {known_digest[:16]}...")
        return encoder
    st_model = shared_sentence_model(path, "cpu")
    fp32_digest = sentence_weights_digest(st_model)
    if known_digest is not None and fp32_digest != known_digest:
        raise WeightsMismatch(f"{tier} tier of {path}: the fp32 weights here have digest {fp32_digest[:16]}... "
                              f"but {known_digest[:16]}... was expected")
    if tier == "int8":
        folder, manifest = _cached_build(tier_folder(INT8_BUILD, fp32_digest),
                                         lambda tmp: build_int8(st_model, tmp), "int8")
    else:
        folder, manifest = _cached_build(tier_folder(STATIC_BUILD, fp32_digest),
                                         lambda tmp: build_static(st_model, path, tmp), "static")
    return _open(tier, folder, manifest, threads)


def _open(tier: str, folder: Path, manifest: dict[str, Any], threads: int | None) -> Any:
    if tier == "int8":
        encoder: Any = Int8OnnxTokenEncoder(folder, threads=threads, digest=manifest["digest"])
    else:
        encoder = StaticTokenEncoder(folder, digest=manifest["digest"])
    encoder.fp32_digest = manifest["fp32_digest"]
    return encoder
