"""A catalog on object storage (``s3://``, ``gs://``, ``memory://`` ... any fsspec URL).

Object stores have no atomic folder rename, so a URL catalog commits through one small manifest
object instead (see ``docs/object_storage.md``)::

    <url>/_manifest.json                                 which version of every folder is current
    <url>/<folder>/_v/<run_id>/part-00000-of-00002.parquet   the files of one committed version
    <url>/runs/<run_id>.json                             the ledger (one object per run)
    <url>/state/<stage>/<key>.json                       completion markers

A commit uploads a stage's staged folders to fresh ``_v/<run_id>/`` prefixes (invisible: nothing
names them yet), then replaces ``_manifest.json`` with one PUT, which object stores apply
atomically; readers resolve every folder through the manifest, so they see the whole old or the
whole new output set. The PUT is conditional on the manifest being the one read just before
(``If-Match`` on S3; ``If-None-Match: *`` for the first one), and the commit refuses to go on
when one of its folders was committed by another run since this run started: on S3 two writers
on different machines can never silently overwrite each other (see :class:`CommitConflict`).
Before computing, a run takes a lease object per output set (:class:`Lease`), so a second run
elsewhere stops at once instead of computing in vain. :func:`publish_export` uploads a finished
trainer export with its ``.manifest.json`` last.

Where the endpoint and credentials come from: fsspec's usual sources (for S3: the AWS
environment variables and config files, including ``AWS_ENDPOINT_URL``), plus
``THRESHER_STORAGE_OPTIONS``, a JSON object of fsspec storage options (e.g.
``{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

MANIFEST = "_manifest.json"
VERSIONS = "_v"
MANIFEST_FORMAT = 1
# Folders keep this many replaced versions after a commit, so that a query that resolved the
# manifest just before the switch can finish reading; older ones are deleted.
KEEP_VERSIONS_ENV = "THRESHER_KEEP_VERSIONS"
OPTIONS_ENV = "THRESHER_STORAGE_OPTIONS"
CACHE_ENV = "THRESHER_CACHE_DIR"
CAS_ATTEMPTS = 20

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class CommitConflict(RuntimeError):
    """Another run committed one of this run's output folders while this run was computing."""


class ObjectStorageUnsupported(NotImplementedError):
    """A stage or command that does not work on an object-storage catalog yet."""


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations other than ``file://`` (those are local folders)."""
    text = os.fspath(location)
    return bool(_URL.match(text)) and not text.startswith("file://")


def storage_options() -> dict[str, Any]:
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{OPTIONS_ENV} must be a JSON object of fsspec storage options: {exc}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{OPTIONS_ENV} must be a JSON object of fsspec storage options")
    return options


def cache_dir(url: str) -> Path:
    """The local working folder of a URL catalog: staging areas, locks, downloaded inputs."""
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "thresher" / "catalogs")
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "_", url.split("://", 1)[-1]).strip("._")[-60:]
    return (base / f"{tail}-{hashlib.sha1(url.encode()).hexdigest()[:10]}").expanduser().resolve()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass
class Storage:
    """The object-storage side of one URL catalog."""

    url: str

    def __post_init__(self) -> None:
        import fsspec

        self.url = self.url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.url, **storage_options())
        self.base = self.base.rstrip("/")
        protocol = self.fs.protocol
        self.protocol = protocol[0] if isinstance(protocol, (tuple, list)) else protocol
        # Only S3 (s3fs) takes conditional-write arguments; elsewhere the manifest is re-read
        # just before the PUT (a narrow window, documented).
        self.conditional = self.protocol in ("s3", "s3a")

    # ------------------------------------------------------------ paths
    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def uri(self, path: str) -> str:
        """A full URL (``s3://bucket/key``) for DuckDB and messages."""
        return self.fs.unstrip_protocol(path)

    def version_prefix(self, rel: str, version: str) -> str:
        return self.path(f"{rel}/{VERSIONS}/{version}")

    # ------------------------------------------------------------ small objects
    def read_json(self, rel: str) -> Any | None:
        try:
            return json.loads(self.fs.cat_file(self.path(rel)))
        except FileNotFoundError:
            return None

    def write_json(self, rel: str, obj: Any) -> None:
        # One PUT: an object appears whole or not at all.
        self.fs.pipe_file(self.path(rel), json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def check_reachable(self) -> None:
        """Fail before any work when the bucket is missing (credentials fail here too)."""
        if self.protocol in ("s3", "s3a", "gs", "gcs") and not self.fs.exists(self.base.split("/", 1)[0]):
            raise FileNotFoundError(f"bucket {self.base.split('/', 1)[0]} does not exist (catalog {self.url});"
                                    " create it first")

    def _ls(self, path: str) -> list[dict[str, Any]]:
        self.fs.invalidate_cache(path)
        try:
            return self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------ the manifest
    def read_manifest(self) -> tuple[dict[str, Any] | None, str | None]:
        """(manifest or None, the token a conditional PUT compares against)."""
        path = self.path(MANIFEST)
        self.fs.invalidate_cache(path)
        try:
            if self.conditional:
                # s3fs reads an opened object with If-Match on the ETag it saw when opening, so
                # the token belongs to exactly the bytes read.
                with self.fs.open(path, "rb") as fh:
                    token = fh.details.get("ETag")
                    data = fh.read()
            else:
                data = self.fs.cat_file(path)
                token = hashlib.sha256(data).hexdigest()
        except FileNotFoundError:
            return None, None
        return json.loads(data), token

    def _find(self, prefix: str) -> dict[str, dict[str, Any]]:
        """``{name relative to prefix: info}`` of every object under ``prefix``, uncached."""
        self.fs.invalidate_cache(prefix)
        try:
            found = self.fs.find(prefix, detail=True, withdirs=False)
        except FileNotFoundError:
            return {}
        return {info["name"][len(prefix) + 1:]: info for info in found.values()}

    def current(self) -> dict[str, dict[str, Any]]:
        """``{folder: {"version", "files": {name: {"size", "etag"}}}}`` as committed now."""
        manifest, _ = self.read_manifest()
        return (manifest or {}).get("folders", {})

    def folder_files(self, rel: str, entry: dict[str, Any] | None = None) -> list[str]:
        """Full paths (no protocol) of the current files of folder ``rel``, sorted."""
        entry = entry if entry is not None else self.current().get(rel)
        if not entry:
            return []
        prefix = self.version_prefix(rel, entry["version"])
        return [f"{prefix}/{name}" for name in sorted(entry["files"])]

    # ------------------------------------------------------------ commit
    def upload(self, rel: str, version: str, local: Path) -> dict[str, Any]:
        """Upload every file under ``local`` to ``rel``'s version ``version``; its manifest entry."""
        prefix = self.version_prefix(rel, version)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        names = [p.relative_to(local).as_posix() for p in files]
        if files:
            self.fs.put([str(p) for p in files], [f"{prefix}/{n}" for n in names])
        listed = self._find(prefix)
        out = {}
        for name, path in zip(names, files):
            info = listed.get(name)
            if info is None or int(info["size"]) != path.stat().st_size:
                raise OSError(f"upload of {path} to {self.uri(prefix + '/' + name)} did not complete")
            out[name] = {"size": int(info["size"]), "etag": info.get("ETag") or info.get("etag")}
        return {"version": version, "files": out}

    def switch(self, run_id: str, base: dict[str, str | None], changes: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
        """Make ``changes`` (folder -> new entry, or None to remove it) current in one manifest PUT.

        ``base`` is each folder's version when the run started: if any differs now, another run
        committed it meanwhile and this commit is refused (:class:`CommitConflict`). A concurrent
        commit of *other* folders only makes the conditional PUT fail, and it is retried on the
        manifest that commit wrote.
        """
        from pipeline.io.runs import failpoint

        for _attempt in range(CAS_ATTEMPTS):
            manifest, token = self.read_manifest()
            folders = dict((manifest or {}).get("folders", {}))
            for rel, version in base.items():
                now = (folders.get(rel) or {}).get("version")
                if now != version:
                    raise CommitConflict(
                        f"{self.uri(self.path(rel))} was committed by run {now or '(a removal)'} while run {run_id}"
                        " was computing it; nothing was committed. On object storage one writer per output is"
                        " the user's responsibility: re-run once the other run has finished")
            previous = {}
            for rel, entry in changes.items():
                if entry is None:
                    folders.pop(rel, None)
                    continue
                kept = list((folders.get(rel) or {}).get("previous", []))
                if folders.get(rel):
                    kept.insert(0, folders[rel]["version"])
                previous[rel] = kept[:keep_versions()]
                folders[rel] = {**entry, "previous": previous[rel], "committed_at": _now()}
            new = {"format": MANIFEST_FORMAT, "generation": int((manifest or {}).get("generation", 0)) + 1,
                   "run_id": run_id, "committed_at": _now(), "folders": dict(sorted(folders.items()))}
            failpoint("commit:before_manifest")
            if self._put_manifest(new, token):
                failpoint("commit:after_manifest")
                for rel in changes:
                    keep = set(previous.get(rel, []))
                    if changes[rel] is not None:
                        keep.add(changes[rel]["version"])
                    self._prune(rel, keep)
                return new
            time.sleep(0.05 * (1 + _attempt))
        raise CommitConflict(f"the manifest of {self.url} kept changing under run {run_id}; nothing was committed")

    def _put_manifest(self, manifest: dict[str, Any], token: str | None) -> bool:
        """One conditional PUT; False when the manifest changed since ``token`` was read."""
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        path = self.path(MANIFEST)
        if self.conditional:
            try:
                if token is None:
                    self.fs.pipe_file(path, data, mode="create")
                else:
                    self.fs.pipe_file(path, data, IfMatch=token)
            except (FileExistsError, OSError) as exc:
                text = str(exc)
                # 412 (the manifest changed) or 409 (a concurrent conditional write won the race)
                if isinstance(exc, FileExistsError) or any(k in text for k in ("pre-condition", "PreconditionFailed",
                                                                                "ConditionalRequestConflict")):
                    return False
                raise
            return True
        # No conditional write: compare right before the PUT (documented: a narrow window).
        if self.read_manifest()[1] != token:
            return False
        self.fs.pipe_file(path, data)
        return True

    def _prune(self, rel: str, keep: set[str]) -> None:
        """Delete versions of ``rel`` that are neither current nor kept (and orphans of crashed
        commits); a failure here leaves garbage, never a wrong answer, so it only warns."""
        import logging

        root = self.path(f"{rel}/{VERSIONS}")
        for info in self._ls(root):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if name in keep:
                continue
            try:
                self.fs.rm(info["name"], recursive=True)
            except OSError as exc:
                logging.getLogger("thresher").warning("could not delete old version %s: %s", self.uri(info["name"]), exc)

    # ------------------------------------------------------------ verify and read
    def verify(self, rel: str, recorded: dict[str, Any] | None,
               current: dict[str, dict[str, Any]] | None = None) -> str | None:
        """None when folder ``rel`` still holds what ``recorded`` (its entry at commit) says."""
        if recorded is None:
            return None
        entry = (current if current is not None else self.current()).get(rel)
        where = self.uri(self.path(rel))
        if entry is None:
            return f"{where} is missing from the catalog manifest"
        if entry.get("version") != recorded.get("version"):
            return f"{where} was replaced by run {entry.get('version')}"
        prefix = self.version_prefix(rel, entry["version"])
        now = self._find(prefix)
        for name, want in sorted(recorded["files"].items()):
            have = now.get(name)
            if have is None:
                return f"{self.uri(prefix + '/' + name)} is missing"
            etag = have.get("ETag") or have.get("etag")
            if int(have["size"]) != want["size"] or (want.get("etag") and etag and etag != want["etag"]):
                return f"{self.uri(prefix + '/' + name)} changed since it was committed"
        extra = sorted(set(now) - set(recorded["files"]))
        if extra:
            return f"{self.uri(prefix + '/' + extra[0])} was added after the commit"
        return None

    def download(self, rel: str, dest_root: Path) -> Path | None:
        """The current version of folder ``rel``, downloaded once into ``dest_root/<version>/<rel>``.

        The version is in the path, so a later commit never mixes with an earlier download.
        None when the folder has no committed version.
        """
        entry = self.current().get(rel)
        if not entry:
            return None
        dest = dest_root / entry["version"] / rel
        todo = [(name, meta) for name, meta in sorted(entry["files"].items())
                if not ((dest / name).is_file() and (dest / name).stat().st_size == meta["size"])]
        if todo:
            prefix = self.version_prefix(rel, entry["version"])
            for name, meta in todo:
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                self.fs.get_file(f"{prefix}/{name}", str(tmp))
                if tmp.stat().st_size != meta["size"]:
                    tmp.unlink()
                    raise OSError(f"download of {self.uri(prefix + '/' + name)} is incomplete")
                # The commit time as mtime: a re-download has the same path, size and mtime, so
                # a stage fingerprinting its input files (shard_fingerprint) still skips.
                stamp = int(datetime.fromisoformat(entry.get("committed_at", "1970-01-01T00:00:00+00:00"))
                            .timestamp() * 1e9)
                os.utime(tmp, ns=(stamp, stamp))
                os.replace(tmp, target)
        return dest


def keep_versions() -> int:
    try:
        return max(0, int(os.environ.get(KEEP_VERSIONS_ENV, "1")))
    except ValueError:
        raise ValueError(f"{KEEP_VERSIONS_ENV} must be a whole number of versions") from None


_STORAGES: dict[str, Storage] = {}


def storage_for(url: str) -> Storage:
    """One :class:`Storage` per URL per process (fsspec caches the filesystem itself too)."""
    url = url.rstrip("/")
    if url not in _STORAGES:
        _STORAGES[url] = Storage(url)
    return _STORAGES[url]


# ------------------------------------------------------------------------ exports to a URL

EXPORT_MANIFEST = ".manifest.json"  # written by every Thresher export, last (pipeline.curate.export_card)
LEGACY_EXPORT_MANIFEST = "manifest.json"  # its name before it moved out of the trainers' data globs
PUBLISHING = "_PUBLISHING.json"  # present while a publish is under way (or was cut short)


def publish_export(local: Path, url: str, overwrite: bool = False) -> list[str]:
    """Upload a finished local export folder (data files, card, ``.manifest.json``) to ``url``.

    There is no atomic folder swap on object storage, so ``.manifest.json`` marks completeness: it
    is uploaded last, after every other file (sub-folders included) was checked, and removed first
    when an export is replaced. A trainer that starts from it sees one whole export or none. A
    non-empty target is refused unless ``overwrite``; a target holding neither a Thresher export
    (``.manifest.json``, or ``manifest.json`` of the older layout) nor an interrupted publish
    (``_PUBLISHING.json``) is never replaced. Returns the uploaded URLs, the manifest last.
    """
    import fsspec

    if not (local / EXPORT_MANIFEST).is_file():
        raise FileNotFoundError(f"{local} holds no finished export ({EXPORT_MANIFEST} is missing)")
    fs, base = fsspec.core.url_to_fs(url.rstrip("/"), **storage_options())
    base = base.rstrip("/")
    fs.invalidate_cache(base)
    try:
        existing = sorted(fs.find(base))
    except FileNotFoundError:
        existing = []
    if existing:
        names = {p[len(base) + 1:] for p in existing}
        if not overwrite:
            raise FileExistsError(f"{url} is not empty; pass --overwrite to replace the export there")
        if not names & {EXPORT_MANIFEST, LEGACY_EXPORT_MANIFEST, PUBLISHING}:
            raise FileExistsError(f"{url} holds objects but no Thresher export ({EXPORT_MANIFEST}); refusing to"
                                  " replace it: choose another --out")
    fs.pipe_file(f"{base}/{PUBLISHING}", json.dumps({"started_at": _now()}).encode())
    if existing:
        # The old manifest goes first: from here on the target reads as "no complete export".
        manifests = [f"{base}/{m}" for m in (EXPORT_MANIFEST, LEGACY_EXPORT_MANIFEST)]
        for m in manifests:
            if m in existing:
                fs.rm_file(m)
        rest = [p for p in existing if p not in (*manifests, f"{base}/{PUBLISHING}")]
        if rest:
            fs.rm(rest)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != EXPORT_MANIFEST)
    names = [p.relative_to(local).as_posix() for p in files]
    if files:
        fs.put([str(p) for p in files], [f"{base}/{n}" for n in names])
    fs.invalidate_cache(base)
    for name, path in zip(names, files):
        if fs.size(f"{base}/{name}") != path.stat().st_size:
            raise OSError(f"upload of {path} to {url}/{name} did not complete; {EXPORT_MANIFEST} was not written")
    fs.put_file(str(local / EXPORT_MANIFEST), f"{base}/{EXPORT_MANIFEST}")
    fs.rm_file(f"{base}/{PUBLISHING}")
    return [fs.unstrip_protocol(f"{base}/{n}") for n in [*names, EXPORT_MANIFEST]]


# ----------------------------------------------------------------------------------- leases

LEASE_TTL_ENV = "THRESHER_LEASE_TTL"
LOCKS = "_locks"


def lease_ttl() -> float:
    try:
        return max(5.0, float(os.environ.get(LEASE_TTL_ENV, "60")))
    except ValueError:
        raise ValueError(f"{LEASE_TTL_ENV} must be a number of seconds") from None


class Lease:
    """One writer per output set across machines: ``<url>/_locks/<key>.lock``, created with a
    conditional PUT (``If-None-Match: *``) and renewed by a heartbeat thread.

    A lease expires ``THRESHER_LEASE_TTL`` seconds (default 60) after its last renewal, so a
    killed run blocks others on other machines for at most that long; on the same machine a lease
    whose process is gone is taken over at once. A lease is taken over only with ``If-Match`` on
    the expired holder's ETag, so two runs can never both take it. Only on filesystems with
    conditional writes (S3); elsewhere ``active`` is False and the manifest check alone protects
    the commit (docs/object_storage.md).
    """

    def __init__(self, storage: Storage, key: str):
        self.storage, self.key = storage, key
        self.path = storage.path(f"{LOCKS}/{key.replace('/', '~')}.lock")
        self.active = storage.conditional
        self.ttl = lease_ttl()
        self.lost: str | None = None
        self._etag: str | None = None
        self._run_id, self._since = "", ""
        self._stop = None
        self._thread = None

    # ------------------------------------------------------------ holder records
    def _body(self) -> bytes:
        import socket

        return json.dumps({"run_id": self._run_id, "pid": os.getpid(), "host": socket.gethostname(),
                           "since": self._since, "expires_at": time.time() + self.ttl}).encode()

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        fs = self.storage.fs
        fs.invalidate_cache(self.path)
        try:
            with fs.open(self.path, "rb") as fh:
                etag = fh.details.get("ETag")
                return json.loads(fh.read() or b"{}"), etag
        except FileNotFoundError:
            return None, None
        except ValueError:
            return {}, None

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        import socket

        if float(holder.get("expires_at", 0)) < time.time():
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # its process is gone: no need to wait for the expiry
            except PermissionError:
                return False
        return False

    # ------------------------------------------------------------ acquire / renew / release
    def acquire(self, run_id: str, timeout: float = 0.0) -> None:
        from pipeline.io.runs import CatalogBusy, _busy_message

        if not self.active:
            return
        self._run_id, self._since = run_id, _now()
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            holder = self._try()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise CatalogBusy(_busy_message(self.key, holder) + f" (lease {self.storage.uri(self.path)}, expires"
                                  f" {datetime.fromtimestamp(float(holder.get('expires_at', 0)), timezone.utc):%H:%M:%S} UTC"
                                  " unless renewed)")
            time.sleep(0.5)
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.key}", daemon=True)
        self._thread.start()

    def _try(self) -> dict[str, Any] | None:
        """None when the lease is now ours, else its live holder."""
        fs = self.storage.fs
        for _ in range(5):
            try:
                self._etag = fs.pipe_file(self.path, self._body(), mode="create").get("ETag")
                return None
            except FileExistsError:
                pass
            holder, etag = self._read()
            if holder is not None:
                break  # else it was released between the two calls: create it again
        else:
            return {"run_id": "(several runs in turn)"}
        if etag is None or not self._stale(holder):
            return holder
        try:
            self._etag = fs.pipe_file(self.path, self._body(), IfMatch=etag).get("ETag")
        except OSError as exc:
            if "pre-condition" in str(exc) or "PreconditionFailed" in str(exc) or "Conflict" in str(exc):
                return holder  # another run took it over first
            raise
        import logging

        logging.getLogger("thresher").warning("took over the lease of %s from run %s (expired or its process is gone)",
                                              self.key, holder.get("run_id"))
        return None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._etag = self.storage.fs.pipe_file(self.path, self._body(), IfMatch=self._etag).get("ETag")
            except Exception as exc:  # noqa: BLE001 - any failure means we can no longer prove we hold it
                if "pre-condition" in str(exc) or "PreconditionFailed" in str(exc):
                    self.lost = f"the lease {self.storage.uri(self.path)} was taken over by another run"
                    return
                # a transient error: try again at the next beat, while the lease still runs

    def check(self) -> None:
        """Raise :class:`CommitConflict` when this run no longer holds its lease."""
        if self.lost:
            raise CommitConflict(f"{self.lost} (this run stalled longer than {LEASE_TTL_ENV}={self.ttl:g} s);"
                                 " nothing was committed")

    def release(self) -> None:
        if not self.active or self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        if self.lost:
            return
        try:
            holder, _ = self._read()
            if holder is not None and holder.get("run_id") == self._run_id:
                self.storage.fs.rm_file(self.path)
        except Exception as exc:  # noqa: BLE001 - never mask the run's outcome: the lease expires by itself
            import logging

            logging.getLogger("thresher").warning("could not release the lease %s (it expires in %g s): %s",
                                                  self.storage.uri(self.path), self.ttl, exc)
