"""The metadata every Thresher export folder carries: a dataset card and a hidden manifest.

An export folder holds only data files plus two metadata files, placed so that trainers' folder
loaders never mistake them for data:

- ``README.md``: a Hugging Face dataset card whose YAML header lists ``configs`` naming the data
  files, so ``datasets.load_dataset(folder)`` (and everything built on it: TRL, LLaMA-Factory,
  axolotl) loads the export with one call;
- ``.manifest.json`` (:data:`MANIFEST`): parameters, counts, per-file sha256 checksums and the
  lineage of the inputs. Its name starts with a dot because ``datasets`` skips hidden files when it
  globs a folder (``load_dataset("json", data_dir=...)`` would otherwise read the manifest as a
  data row and fail). It is written last and so marks a finished export.

Exports written before the move kept ``manifest.json`` beside the data (:data:`LEGACY_MANIFEST`);
:func:`read_manifest` still reads those, so ``--overwrite`` can replace them.

Used by the instruction exports (``materialise``) and the WebDataset export.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.io.catalog import write_json_atomic

MANIFEST = ".manifest.json"
LEGACY_MANIFEST = "manifest.json"
MANIFEST_NAMES = (MANIFEST, LEGACY_MANIFEST)
CARD = "README.md"
UNKNOWN_LICENCE = "unknown"
# Files next to the inputs that list their licences as a markdown table (file | ... | licence).
ATTRIBUTION_FILES = ("ATTRIBUTION.md", "README.md")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_records(folder: Path, names: Iterable[str]) -> list[dict[str, Any]]:
    """``[{"path", "bytes", "sha256"}]`` for the data files ``names`` (relative to ``folder``)."""
    return [{"path": n, "bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names]


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The export manifest in ``folder`` (current or legacy name), or None when there is none."""
    for name in MANIFEST_NAMES:
        try:
            doc = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            return doc
    return None


def config(name: str, files: Sequence[str], split: str = "train") -> dict[str, Any]:
    """One ``configs`` entry of a dataset card: ``name`` reads the files ``files`` as ``split``."""
    return {"config_name": name, "data_files": [{"split": split, "path": list(files)}]}


def card_text(title: str, configs: Sequence[Mapping[str, Any]], body: str, *,
              tags: Sequence[str] = (), licences: Sequence[str] = (),
              features: Sequence[Mapping[str, Any]] | None = None) -> str:
    """A dataset card: YAML header (``configs``, optional ``tags`` / ``license`` /
    ``dataset_info.features``, in the ``datasets`` YAML form) + markdown body.

    ``license`` is set only when every input has the same known licence; mixed or unknown inputs
    are listed in the body instead (a card must not claim one licence for a mix).
    """
    header: dict[str, Any] = {}
    known = sorted({lic for lic in licences if lic and lic != UNKNOWN_LICENCE})
    if len(known) == 1 and UNKNOWN_LICENCE not in licences and _spdx_like(known[0]):
        header["license"] = known[0].lower()
    if tags:
        header["tags"] = list(tags)
    if features:
        # Copied through JSON: shared sub-lists would become YAML anchors, and datasets edits the
        # parsed features in place, so an alias read twice fails (KeyError: 'name').
        header["dataset_info"] = {"features": json.loads(json.dumps(list(features)))}
    header["configs"] = [dict(c) for c in configs]
    front = yaml.safe_dump(header, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n# {title}\n\n{body.rstrip()}\n"


def _spdx_like(licence: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9.\-+]+", licence) is not None


def write_export_metadata(folder: Path, manifest: Mapping[str, Any], *, title: str,
                          configs: Sequence[Mapping[str, Any]], body: str, tags: Sequence[str] = (),
                          features: Sequence[Mapping[str, Any]] | None = None) -> None:
    """Write the card, then the manifest (last: its presence marks a finished export)."""
    licences = [s.get("licence", UNKNOWN_LICENCE) for s in manifest.get("inputs", {}).get("sources", [])]
    (folder / CARD).write_text(card_text(title, configs, body, tags=tags, licences=licences,
                                                  features=features), encoding="utf-8")
    write_json_atomic(dict(manifest), folder / MANIFEST)


# ------------------------------------------------------------------------ input lineage


def _table_licences(doc: Path) -> dict[str, str]:
    """``{file or folder name: licence}`` from the markdown tables of an attribution file whose
    header has a first column ``file``/``folder`` and a ``licence``/``license`` column."""
    out: dict[str, str] = {}
    try:
        lines = doc.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return out
    col = None
    for line in lines:
        if not line.startswith("|"):
            col = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        low = [c.lower() for c in cells]
        if low and low[0] in ("file", "folder") and ("licence" in low or "license" in low):
            col = low.index("licence") if "licence" in low else low.index("license")
            continue
        if col is None or set(line.replace("|", "").strip()) <= set("-: ") or len(cells) <= col:
            continue
        # A first cell may name several paths (`a/`, `b/x.png` … `c.jpg`); each one maps.
        for name in re.findall(r"`([^`]+)`", cells[0]) or [cells[0]]:
            out.setdefault(name.strip().rstrip("/").split("/")[0] if "/" in name else name.strip(), cells[col])
    return out


def licence_of(source: str, max_up: int = 3) -> str:
    """The licence recorded for input file ``source`` in an attribution table beside it (the
    file's folder or up to ``max_up`` parents), matched by file name or top folder name;
    :data:`UNKNOWN_LICENCE` when none names it. Never guessed."""
    if "://" in source and not source.startswith("file://"):
        return UNKNOWN_LICENCE
    path = Path(source.removeprefix("file://"))
    for depth, folder in enumerate(path.parents):
        if depth > max_up:
            break
        rel = path.relative_to(folder).parts
        for doc in ATTRIBUTION_FILES:
            if (folder / doc).is_file():
                table = _table_licences(folder / doc)
                for key in (rel[0], path.name):
                    if key in table:
                        return table[key]
    return UNKNOWN_LICENCE


def input_sources(rows_per_source: Mapping[str, int]) -> list[dict[str, Any]]:
    """``[{"source_uri", "rows", "licence"}]`` for the input files an export's rows came from."""
    return [{"source_uri": uri, "rows": n, "licence": licence_of(uri)} for uri, n in sorted(rows_per_source.items())]
