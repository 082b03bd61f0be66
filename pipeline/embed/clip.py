"""open_clip models for image and caption embeddings, loaded without surprises.

Three ways to get weights, and none downloads unless the caller explicitly allows it:

* ``pretrained=None``: the architecture with random weights, drawn from a seeded generator so
  that every Beam worker builds the *same* model (otherwise shards embedded by different
  processes would live in different spaces). Useful for plumbing and throughput, not meaning.
* ``pretrained=<path>``: a local checkpoint (``.pt``/``.pth``/``.bin`` via
  ``torch.load(..., weights_only=True)``, never a general unpickle; or ``.safetensors``).
* ``pretrained=<tag>`` (e.g. ``laion2b_s34b_b79k``): resolved in the local caches only (the
  Hugging Face hub cache, or ``~/.cache/clip`` for URL-only tags). Absent weights raise
  :class:`PretrainedWeightsUnavailable` at once instead of hanging on a network that is not there.

:data:`TINY_MODEL` is a registered few-million-parameter ViT config for tests and benchmarks.
Every loaded model carries :func:`weights_digest`, the sha256 of its state dict, which the
embedding tables record so that vectors from different weights are never mixed unknowingly.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

TINY_MODEL = "thresher-tiny-vit"

# Small enough for CPU tests (about 3.4M parameters, most of them the 49k-token text embedding
# table that the BPE tokenizer requires), yet the same code path as a real ViT CLIP.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")

_register_lock = threading.Lock()


class PretrainedWeightsUnavailable(FileNotFoundError):
    """A pretrained tag whose weights are not in any local cache (and downloading is off)."""


@dataclass
class ClipModel:
    """A loaded open_clip model with what is needed to embed images and captions."""

    model: Any  # open_clip CLIP / CustomTextCLIP, in eval mode on ``device``
    preprocess: Callable[[Any], Any]  # PIL image -> (3, H, W) tensor
    tokenizer: Callable[[Sequence[str]], Any]  # captions -> (n, context_length) token tensor
    model_name: str
    pretrained: str | None  # as given: None, a tag, or a checkpoint path
    source: str  # how the weights were obtained, e.g. "random(seed=0)", "file:/x.pt"
    device: str
    embed_dim: int
    image_size: tuple[int, int]
    seed: int
    _digest: str | None = field(default=None, repr=False)

    @property
    def weights_digest(self) -> str:
        """sha256 over the state dict (computed once; weights never change after loading)."""
        if self._digest is None:
            self._digest = weights_digest(self.model)
        return self._digest


# --------------------------------------------------------------------------------------------
# Config registration
# --------------------------------------------------------------------------------------------


def register_tiny_config() -> str:
    """Make :data:`TINY_MODEL` known to open_clip in this process; returns its name.

    open_clip only reads configs from JSON files, so the config is written once to a
    per-user temp folder and added with ``open_clip.add_model_config``. Idempotent and safe to
    call from every Beam worker process.
    """
    import open_clip

    with _register_lock:
        if TINY_MODEL in open_clip.list_models():
            return TINY_MODEL
        folder = Path(tempfile.gettempdir()) / f"thresher-open-clip-configs-{os.getuid()}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{TINY_MODEL}.json"
        text = json.dumps(TINY_CONFIG, indent=2, sort_keys=True)
        if not path.is_file() or path.read_text() != text:
            tmp = folder / f".{TINY_MODEL}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_text(text)
            os.replace(tmp, path)  # atomic: concurrent workers never read half a file
        open_clip.add_model_config(path)
        if TINY_MODEL not in open_clip.list_models():
            raise RuntimeError(f"open_clip did not register {TINY_MODEL} from {path}")
        return TINY_MODEL


def _check_model_name(model_name: str) -> None:
    import open_clip

    if model_name == TINY_MODEL:
        register_tiny_config()
        return
    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"model_name={model_name!r}: hub and local-dir schemas are not supported here; pass a "
            "built-in architecture name (e.g. ViT-B-32) and the weights as pretrained=<tag or file>"
        )
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip architecture {model_name!r}; use {TINY_MODEL!r} for tests or one of "
            f"open_clip.list_models() (e.g. ViT-B-32, ViT-B-16, ViT-L-14)"
        )


# --------------------------------------------------------------------------------------------
# Weights: resolution and safe loading
# --------------------------------------------------------------------------------------------


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(("~", ".")) or value.lower().endswith(CHECKPOINT_SUFFIXES)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_pretrained_tag(
    model_name: str, tag: str, *, cache_dir: str | os.PathLike[str] | None = None, allow_download: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Local file holding the weights of ``model_name``/``tag``, and the tag's config.

    Looks in the Hugging Face hub cache (``cache_dir`` or the default hub cache) for tags
    published on the hub, and in ``cache_dir`` or ``~/.cache/clip`` for URL-only tags. With
    ``allow_download=False`` (the default) nothing touches the network; a miss raises
    :class:`PretrainedWeightsUnavailable` naming the file to fetch on a connected machine.
    """
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"pretrained={tag!r} is neither an existing checkpoint file nor a pretrained tag of "
            f"{model_name!r}; known tags: {known or 'none'}"
        )
    tried: list[str] = []
    hub = cfg.get("hf_hub") or ""
    if hub:
        from huggingface_hub import hf_hub_download

        repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        local_only = not allow_download or _hub_offline()
        for name in names:
            tried.append(f"hf://{repo_id}/{name}")
            try:
                path = hf_hub_download(
                    repo_id=repo_id, filename=name, cache_dir=cache_dir, local_files_only=local_only
                )
                return Path(path), cfg
            except Exception:  # noqa: BLE001 - any miss moves on to the next candidate
                continue
    url = cfg.get("url") or ""
    if url:
        folder = Path(cache_dir).expanduser() if cache_dir else Path("~/.cache/clip").expanduser()
        target = folder / os.path.basename(url)
        tried.append(str(target))
        if target.is_file():
            return target, cfg
        if allow_download and not _hub_offline():
            from open_clip.pretrained import download_pretrained_from_url

            return Path(download_pretrained_from_url(url, cache_dir=str(folder))), cfg
    raise PretrainedWeightsUnavailable(
        f"weights for {model_name}/{tag} are not in the local cache (looked for: {', '.join(tried)}) "
        f"and downloading is {'disabled by HF_HUB_OFFLINE' if _hub_offline() else 'off'}. Fetch them "
        f"on a connected machine (e.g. open_clip.create_model('{model_name}', pretrained='{tag}')) and "
        "copy the cache here, or pass the checkpoint file path as pretrained=."
    )


def load_state_dict_safely(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint's tensors, without executing pickled code.

    ``.safetensors`` through safetensors; anything else through
    ``torch.load(weights_only=True)``, which refuses arbitrary objects. A wrapper dict with a
    ``state_dict`` key and DataParallel ``module.`` prefixes are unwrapped.
    """
    import pickle

    import torch

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {file} does not exist")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file), device="cpu")
    else:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{file} holds objects other than tensors, so it was not loaded (weights_only=True "
                "refuses to run pickled code). Re-save just the weights: "
                "torch.save(model.state_dict(), path)."
            ) from exc
        except RuntimeError as exc:
            raise ValueError(
                f"{file} is not a torch checkpoint that torch.load(weights_only=True) can read "
                f"({exc}); TorchScript archives are not supported - convert to a state dict."
            ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{file} does not contain a state dict (got {type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{file}: entries {bad[:5]} are not tensors; expected a plain state dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_weights_into(model: Any, state: dict[str, Any], origin: str) -> None:
    """Load ``state`` strictly, after open_clip's own key/shape conversions for older layouts."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import (
        convert_to_custom_text_state_dict,
        resize_pos_embed,
        resize_text_pos_embed,
    )

    state = convert_state_dict(model, dict(state))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for name in ("logit_scale", "logit_bias"):
        target = getattr(model, name, None)
        if name in state and target is not None and state[name].ndim != target.ndim:
            state[name] = state[name].reshape(target.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        import torch

        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights from {origin} do not fit this architecture: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def pick_device(device: str | None = None) -> str:
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_clip(
    model_name: str,
    pretrained: str | os.PathLike[str] | None = None,
    device: str | None = None,
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_download: bool = False,
) -> ClipModel:
    """Build ``model_name`` and load its weights (see the module docstring for ``pretrained``).

    ``device=None`` picks cuda when available, else cpu. The model is built on the CPU first
    so that random initialisation is identical whatever the device.
    """
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    _check_model_name(model_name)
    dev = pick_device(device)
    state: dict[str, Any] | None = None
    tag_cfg: dict[str, Any] = {}
    if pretrained is None:
        source = f"random(seed={seed})"
    else:
        text = os.fspath(pretrained)
        candidate = Path(text).expanduser()
        if candidate.is_file():
            state, source = load_state_dict_safely(candidate), f"file:{candidate.resolve()}"
        elif _looks_like_path(text):
            raise FileNotFoundError(f"checkpoint {candidate} does not exist (pretrained={text!r})")
        else:
            path, tag_cfg = resolve_pretrained_tag(model_name, text, cache_dir=cache_dir, allow_download=allow_download)
            state, source = load_state_dict_safely(path), f"tag:{text}:{path}"
    # open_clip warns "No pretrained weights loaded" for pretrained=None, which is always what it is
    # given here: the weights (if any) are loaded below, from a checked file. The warning is wrong
    # for those, and for random weights the CLI says so itself.
    root = logging.getLogger()
    root.addFilter(_no_weights_warning)
    try:
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(seed)
            model = open_clip.create_model(
                model_name,
                pretrained=None,
                device="cpu",
                force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
                force_preprocess_cfg=tag_cfg or None,
                pretrained_text=False,  # hf text towers would otherwise fetch their base weights
            )
    finally:
        root.removeFilter(_no_weights_warning)
    if state is not None:
        _load_weights_into(model, state, source)
        del state
    model = model.to(dev).eval()
    pp_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    size = pp_cfg.size if isinstance(pp_cfg.size, (tuple, list)) else (pp_cfg.size, pp_cfg.size)
    with torch.no_grad():
        embed_dim = int(model.encode_text(open_clip.get_tokenizer(model_name)([""]).to(dev)).shape[-1])
    return ClipModel(
        model=model,
        preprocess=image_transform_v2(pp_cfg, is_train=False),
        tokenizer=open_clip.get_tokenizer(model_name),
        model_name=model_name,
        pretrained=None if pretrained is None else os.fspath(pretrained),
        source=source,
        device=dev,
        embed_dim=embed_dim,
        image_size=(int(size[0]), int(size[1])),
        seed=seed,
    )


def _no_weights_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("No pretrained weights loaded")


_CACHE: OrderedDict[tuple, ClipModel] = OrderedDict()
_CACHE_SIZE = 2
_cache_lock = threading.Lock()


def shared_clip(
    model_name: str,
    pretrained: str | None = None,
    device: str | None = None,
    *,
    seed: int = 0,
    cache_dir: str | None = None,
    allow_download: bool = False,
) -> ClipModel:
    """:func:`load_clip` with a small per-process cache.

    The image and caption RunInference steps of one job, and the driver that computed the
    digest, then share one copy of the weights instead of loading them three times.
    """
    key = (model_name, None if pretrained is None else os.fspath(pretrained), pick_device(device), seed,
           cache_dir, allow_download)
    with _cache_lock:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        clip = load_clip(model_name, pretrained, device, seed=seed, cache_dir=cache_dir, allow_download=allow_download)
        _CACHE[key] = clip
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return clip


def weights_digest(model: Any) -> str:
    """sha256 over a torch module's state dict: every tensor's name, dtype, shape and bytes.

    Names and shapes are hashed too, so two layouts that happen to share raw bytes differ.
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------


def decode_image(data: bytes) -> Any:
    """Encoded image bytes (as stored in the catalog) -> an RGB PIL image."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")


def embed_images(
    clip: ClipModel, images: Sequence[bytes | Any], batch_size: int = 64, normalize: bool = True
) -> np.ndarray:
    """Embed encoded image bytes (or PIL images) as float32 (n, embed_dim)."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = np.empty((len(images), clip.embed_dim), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = torch.stack([clip.preprocess(decode_image(x) if isinstance(x, (bytes, bytearray, memoryview))
                                              else x.convert("RGB")) for x in chunk])
        with torch.inference_mode():
            feats = clip.model.encode_image(pixels.to(clip.device), normalize=normalize)
        out[start : start + len(chunk)] = feats.float().cpu().numpy()
    return out


def embed_captions(
    clip: ClipModel, captions: Sequence[str], batch_size: int = 256, normalize: bool = True
) -> np.ndarray:
    """Embed captions with the model's text tower as float32 (n, embed_dim)."""
    import torch

    if isinstance(captions, str):
        raise TypeError("embed_captions expects a sequence of strings, got one string; wrap it in a list")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = np.empty((len(captions), clip.embed_dim), dtype=np.float32)
    for start in range(0, len(captions), batch_size):
        chunk = [c if c is not None else "" for c in captions[start : start + batch_size]]
        tokens = clip.tokenizer(chunk).to(clip.device)
        with torch.inference_mode():
            feats = clip.model.encode_text(tokens, normalize=normalize)
        out[start : start + len(chunk)] = feats.float().cpu().numpy()
    return out


def clip_key(model_name: str, pretrained: str | None, seed: int = 0, digest: str | None = None) -> str:
    """Folder-friendly name of a model + weights, e.g. ``ViT-B-32-laion2b_s34b_b79k``.

    Random weights get ``-random`` (plus the seed when not 0) so they are never mistaken for
    trained ones; a checkpoint file gets the first 12 hex digits of its weights digest.
    """
    if pretrained is None:
        return f"{model_name}-random" + (f"{seed}" if seed else "")
    text = os.fspath(pretrained)
    if Path(text).expanduser().is_file() or _looks_like_path(text):
        if not digest:
            raise ValueError("a checkpoint file needs its weights digest to name the embeddings folder")
        return f"{model_name}-ckpt{digest[:12]}"
    return f"{model_name}-{text}"
