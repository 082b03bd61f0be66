"""One contract for every stage that writes to the catalog: lock, verified skip, staging,
journaled multi-output commit, ledger entry (success or failure), completion marker.

    with StageRun(cat, "embed", dataset, outputs={"out": part}, parameters=p, inputs=fp) as run:
        if run.skipped:
            return ...run.state...
        write files into run.staging["out"]
        run.commit(counts={...})

Where things live, all out of reach of user-chosen names (dataset, selection and model names
become ``dataset=<name>`` or ``<table>/<name>`` folders; nothing a user names starts with ``_``):

    <root>/_locks/<key>.lock          one flock per output set; holder written inside for messages
    <root>/_staging/<run_id>/         a run's private work area: owner.json, its staged outputs,
                                      COMMIT.json while its commit is being applied, and the
                                      folders its commit replaced (removed once committed)

Commit protocol. When every output is staged, the run writes ``COMMIT.json`` (the list of
``final <- staged`` swaps) atomically, then applies it: each old folder is renamed into the run's
staging area and the staged one renamed into place. A crash before the journal exists leaves the
old state (the staging area is an orphan, removed by the next run on the same key). A crash after
it is rolled *forward* by whoever opens the catalog next (``recover``): every step is a rename
that can be replayed, so readers end up with either the whole old or the whole new output set.

On an object-storage catalog (``Catalog.at("s3://...")``) the run stages locally exactly the same
way (in the catalog's local working folder), and the commit uploads the staged folders to fresh
version prefixes and then switches one manifest object with a conditional PUT
(``pipeline.io.storage``): there is no journal to replay, a crash before the switch leaves the old
version current. Runs on other machines are kept apart by a lease object renewed by a heartbeat
(``pipeline.io.storage.Lease``). Only the stages in ``REMOTE_STAGES`` run there; others stop at
once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import time
import traceback
import uuid
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.io.catalog import write_json_atomic

log = logging.getLogger("thresher")

STAGING = "_staging"
LOCKS = "_locks"
JOURNAL = "COMMIT.json"
OWNER = "owner.json"
REPLACED = "_replaced"
# A staging folder with no owner record (a run that died between mkdir and writing it) is
# removed once it is this old.
OWNERLESS_GRACE_S = 3600.0
TAIL_BYTES = 1 << 16  # holds a Parquet footer; what a verified skip re-reads per file
# Stages that run on an object-storage catalog: those whose inputs are read through
# ``Catalog.local_input`` (ingest reads local files). Any other stops before doing anything.
REMOTE_STAGES = frozenset({"ingest", "annotate_quality", "annotate_tags"})


class CatalogBusy(BlockingIOError):
    """Another live run holds the lock of the outputs this run wants to write."""

    def __str__(self) -> str:  # BlockingIOError would prefix an errno
        return str(self.args[0]) if self.args else "catalog busy"


def failpoint(name: str) -> None:
    """Die here with SIGKILL when ``THRESHER_FAILPOINT`` names this point (fault-injection tests)."""
    if os.environ.get("THRESHER_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def new_run_id(stage: str) -> str:
    return f"{stage}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


# ------------------------------------------------------------------------------------ locks


class Lock:
    """An exclusive ``flock`` on ``<root>/_locks/<key>.lock``.

    The kernel drops a flock when its process dies, so a lock left by a killed run is never
    stale; the holder record (run id, pid, host, start time) only serves the error message.
    flock needs a local (or lock-capable network) filesystem.
    """

    def __init__(self, root: Path, key: str):
        self.key = key
        self.path = root / LOCKS / (key.replace("/", "~") + ".lock")
        self._fd: int | None = None

    def acquire(self, run_id: str, timeout: float = 0.0) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise CatalogBusy(_busy_message(self.key, holder)) from None
                time.sleep(0.2)
        holder = json.dumps({"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                             "since": _now()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder, 0)
        self._fd = fd

    def try_acquire(self) -> bool:
        try:
            self.acquire("recover", 0.0)
            return True
        except CatalogBusy:
            return False

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def _busy_message(key: str, holder: dict[str, Any]) -> str:
    who = (f"run {holder.get('run_id', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')},"
           f" since {holder.get('since', '?')})")
    return (f"{key} is being written by {who}; wait for it to finish, or set THRESHER_LOCK_TIMEOUT="
            "SECONDS to wait for it")


def lock_timeout() -> float:
    try:
        return float(os.environ.get("THRESHER_LOCK_TIMEOUT", "0"))
    except ValueError:
        raise ValueError("THRESHER_LOCK_TIMEOUT must be a number of seconds") from None


# ------------------------------------------------------------------------- output manifests


def folder_manifest(folder: Path) -> dict[str, list[int]]:
    """``{relative path: [size, crc32 of the last 64 KiB]}`` of every file under ``folder``.

    The tail holds a Parquet file's footer (and a FAISS file's last structures), so a truncated,
    replaced or rewritten file is caught without reading whole files.
    """
    out: dict[str, list[int]] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        size = path.stat().st_size
        with open(path, "rb") as fh:
            fh.seek(max(0, size - TAIL_BYTES))
            crc = zlib.crc32(fh.read())
        out[path.relative_to(folder).as_posix()] = [size, crc]
    return out


def verify_folder(folder: Path, manifest: dict[str, list[int]] | None) -> str | None:
    """None when ``folder`` still holds exactly what ``manifest`` recorded, else what changed."""
    if manifest is None:
        return None  # this output was (and may stay) absent
    if not folder.is_dir():
        return f"{folder} is missing"
    now = folder_manifest(folder)
    missing = sorted(set(manifest) - set(now))
    if missing:
        return f"{folder / missing[0]} is missing" + (f" (and {len(missing) - 1} more files)" if len(missing) > 1 else "")
    changed = sorted(k for k in manifest if now[k] != manifest[k])
    if changed:
        return f"{folder / changed[0]} changed since it was committed (truncated or rewritten)"
    extra = sorted(set(now) - set(manifest))
    if extra:
        return f"{folder / extra[0]} was added after the commit"
    return None


# --------------------------------------------------------------------------- commit journal


def apply_journal(root: Path, journal: Path) -> None:
    """Replay a commit journal; every step is idempotent, so a cut-short replay can be redone."""
    ops = json.loads(journal.read_text())["ops"]
    for op in ops:
        final, backup = root / op["final"], root / op["backup"]
        staged = root / op["staged"] if op["staged"] else None
        if staged is not None and not staged.exists():
            continue  # this swap is done
        if final.exists():
            backup.parent.mkdir(parents=True, exist_ok=True)
            if backup.exists():  # a replay after the old folder had been moved once already
                shutil.rmtree(backup)
            os.replace(final, backup)
        failpoint("commit:between_renames")
        if staged is not None:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
        failpoint("commit:after_op")
    # Committed: what was replaced goes; the journal goes last (its absence means "done").
    shutil.rmtree(journal.parent / REPLACED, ignore_errors=True)
    journal.unlink()


def recover(root: Path) -> None:
    """Finish the commits of dead runs and remove their staging areas.

    Live runs hold their lock, so their staging areas are left alone.
    """
    area = root / STAGING
    if not area.is_dir():
        return
    for run_dir in sorted(p for p in area.iterdir() if p.is_dir()):
        owner_file = run_dir / OWNER
        if not owner_file.is_file():
            if time.time() - run_dir.stat().st_mtime > OWNERLESS_GRACE_S:
                shutil.rmtree(run_dir, ignore_errors=True)
            continue
        try:
            owner = json.loads(owner_file.read_text())
        except ValueError:
            continue
        lock = Lock(root, owner["key"])
        if not lock.try_acquire():
            continue  # its run is alive
        try:
            if (run_dir / JOURNAL).is_file():
                apply_journal(root, run_dir / JOURNAL)
                log.warning("recovered: finished the interrupted commit of run %s (%s)",
                            owner.get("run_id"), owner["key"])
            shutil.rmtree(run_dir, ignore_errors=True)
        finally:
            lock.release()
    try:
        area.rmdir()
    except OSError:
        pass


# ------------------------------------------------------------------------------- the stage


def check_remote_stage(catalog: Any, stage: str) -> None:
    """Stop at once when ``stage`` cannot run on ``catalog`` (an object-storage one) yet."""
    if getattr(catalog, "url", None) is not None and stage not in REMOTE_STAGES:
        catalog.require_local(f"stage {stage}")


def stored_parameters(catalog: Any, stage: str, dataset: str, output: Path) -> dict[str, Any] | None:
    """The parameters of the last completed run of ``stage`` that wrote ``output`` (None: none)."""
    state = catalog.read_state(stage, _state_key(dataset, output.relative_to(catalog.root).as_posix()))
    return None if state is None else state.get("parameters")


def _state_key(dataset: str, key: str) -> str:
    return f"{dataset}@{key.replace('/', '~')}"


class StageRun:
    """One run of one stage over one output set: see the module docstring."""

    def __init__(self, catalog: Any, stage: str, dataset: str, outputs: dict[str, Path],
                 parameters: dict[str, Any], inputs: Any, *, force: bool = False,
                 key: str | None = None, ledger_parameters: dict[str, Any] | None = None):
        self.cat = catalog
        self.remote = getattr(catalog, "url", None) is not None
        check_remote_stage(catalog, stage)
        self.root: Path = catalog.root
        self.stage, self.dataset = stage, dataset
        self.outputs = outputs
        self.parameters, self.inputs, self.force = parameters, inputs, force
        self.ledger_parameters = ledger_parameters or {}
        first = next(iter(outputs.values()))
        self.key = key or first.relative_to(self.root).as_posix()
        self.state_key = _state_key(dataset, self.key)
        self.run_id = new_run_id(stage)
        self.area = self.root / STAGING / self.run_id
        self.staging = {name: self.area / "out" / name for name in outputs}
        self.skipped = False
        self.state: dict[str, Any] | None = None
        self.rebuild_reason: str | None = None
        self.started = _now()
        self.t0 = time.perf_counter()
        # The local lock keeps runs on this machine apart; on object storage a lease object does
        # so across machines, and the commit also compares each output's version with the one
        # seen when the run started (pipeline.io.storage.switch).
        self._lock = Lock(self.root, self.key)
        self._lease = None
        if self.remote:  # across machines: a lease object with conditional PUTs (pipeline.io.storage.Lease)
            from pipeline.io.storage import Lease

            self._lease = Lease(catalog.storage, self.key)
        self._committed = False
        self._base: dict[str, str | None] = {}
        self._current: dict[str, Any] | None = None  # the manifest's folders when the run started

    # ---------------------------------------------------------------- enter / exit
    def __enter__(self) -> "StageRun":
        # Catalog.at has finished other runs' interrupted commits; this key's are finished below.
        self._lock.acquire(self.run_id, lock_timeout())
        try:
            self._clean_orphans()
            if self.remote:
                self.cat.storage.check_reachable()
                self._lease.acquire(self.run_id, lock_timeout())
                self._current = self.cat.storage.current()
                self._base = {self._rel(p): (self._current.get(self._rel(p)) or {}).get("version")
                              for p in self.outputs.values()}
            self._check_skip()
            if not self.skipped:
                self.area.mkdir(parents=True)
                write_json_atomic({"run_id": self.run_id, "key": self.key, "pid": os.getpid(),
                                   "host": socket.gethostname(), "started_at": self.started}, self.area / OWNER)
                for folder in self.staging.values():
                    folder.mkdir(parents=True)
        except BaseException:
            if self._lease is not None:
                self._lease.release()
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is not None and not self.skipped and not self._committed:
                try:
                    self._ledger("failed", {}, {"total": round(time.perf_counter() - self.t0, 3)},
                                 error=f"{exc_type.__name__}: {exc}",
                                 trace="".join(traceback.format_exception(exc_type, exc, tb))[-4000:])
                except Exception as ledger_exc:  # noqa: BLE001 - e.g. the object store is unreachable:
                    # the run's own error is the one to report, not the ledger's
                    log.warning("%s: could not record the failed run %s in the ledger: %s",
                                self.stage, self.run_id, ledger_exc)
            if not (self.area / JOURNAL).exists():  # a journal left by a crash is recovered, not dropped
                shutil.rmtree(self.area, ignore_errors=True)
            try:
                self.area.parent.rmdir()
            except OSError:
                pass
        finally:
            if self._lease is not None:
                self._lease.release()
            self._lock.release()
        return False

    # ---------------------------------------------------------------- skip
    def _check_skip(self) -> None:
        state = self.cat.read_state(self.stage, self.state_key)
        if self.force or not state:
            return
        if state.get("inputs") != self.inputs or state.get("parameters") != self.parameters:
            return
        manifests = state.get("outputs")
        if manifests is None:
            self.rebuild_reason = "the completion marker predates output verification"
        else:
            for name, final in self.outputs.items():
                if self.remote:
                    recorded = manifests.get(name)
                    if recorded is not None and "version" not in recorded:
                        problem = "the completion marker is not an object-storage one"
                    else:
                        problem = self.cat.storage.verify(self._rel(final), recorded, self._current)
                else:
                    problem = verify_folder(final, manifests.get(name))
                if problem:
                    self.rebuild_reason = problem
                    break
        if self.rebuild_reason:
            log.warning("%s: rebuilding %s: %s", self.stage, self.key, self.rebuild_reason)
            return
        self.skipped, self.state = True, state

    def _clean_orphans(self) -> None:
        """Staging areas of earlier runs on this key: we hold the key, so their runs are dead."""
        area = self.root / STAGING
        if not area.is_dir():
            return
        for run_dir in area.iterdir():
            try:
                owner = json.loads((run_dir / OWNER).read_text())
            except (OSError, ValueError):
                continue
            if owner.get("key") == self.key and run_dir != self.area:
                if (run_dir / JOURNAL).is_file():
                    apply_journal(self.root, run_dir / JOURNAL)
                shutil.rmtree(run_dir, ignore_errors=True)

    # ---------------------------------------------------------------- commit
    def commit(self, counts: dict[str, Any], extra: dict[str, Any] | None = None,
               timings: dict[str, float] | None = None, absent: tuple[str, ...] = ()) -> dict[str, Any]:
        """Swap every staged output into place at once, then write the ledger and the marker.

        Outputs named in ``absent`` (or whose staging folder was removed) are deleted instead:
        e.g. a re-ingest with no rejects must not keep an earlier run's rejects.
        """
        if self.remote:
            manifests = self._commit_remote(absent)
            return self._finish(counts, extra, timings, manifests)
        ops, manifests = [], {}
        for k, (name, final) in enumerate(self.outputs.items()):
            staged = self.staging[name]
            present = name not in absent and staged.is_dir()
            manifests[name] = folder_manifest(staged) if present else None
            ops.append({"final": final.relative_to(self.root).as_posix(),
                        "staged": staged.relative_to(self.root).as_posix() if present else None,
                        "backup": (self.area / REPLACED / str(k)).relative_to(self.root).as_posix()})
        journal = self.area / JOURNAL
        failpoint("commit:before_journal")
        write_json_atomic({"run_id": self.run_id, "ops": ops}, journal)
        apply_journal(self.root, journal)
        self._committed = True
        failpoint("commit:after_swap")
        return self._finish(counts, extra, timings, manifests)

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _commit_remote(self, absent: tuple[str, ...]) -> dict[str, Any]:
        """Upload every staged output to a new version, then switch the manifest (one PUT)."""
        storage = self.cat.storage
        changes, manifests = {}, {}
        for name, final in self.outputs.items():
            staged = self.staging[name]
            present = name not in absent and staged.is_dir()
            entry = storage.upload(self._rel(final), self.run_id, staged) if present else None
            changes[self._rel(final)] = entry
            manifests[name] = entry and {"version": entry["version"], "files": entry["files"]}
        failpoint("commit:before_journal")  # the same fault points as a local commit, for the tests
        self._lease.check()
        storage.switch(self.run_id, self._base, changes)
        self._committed = True
        failpoint("commit:after_swap")
        return manifests

    def _finish(self, counts: dict[str, Any], extra: dict[str, Any] | None, timings: dict[str, float] | None,
                manifests: dict[str, Any]) -> dict[str, Any]:
        timings = {**(timings or {}), "total": round(time.perf_counter() - self.t0, 3)}
        self._ledger("succeeded", counts, timings)
        state = {"run_id": self.run_id, "inputs": self.inputs, "parameters": self.parameters,
                 "counts": counts, "extra": extra or {}, "outputs": manifests}
        self.cat.write_state(self.stage, self.state_key, state)
        self.state = state
        return state

    def _ledger(self, status: str, counts: dict[str, Any], timings: dict[str, float], **more: Any) -> None:
        self.cat.write_ledger({
            "run_id": self.run_id, "stage": self.stage, "dataset": self.dataset,
            "started_at": self.started, "finished_at": _now(), "code_version": __version__,
            "parameters": {**self.parameters, **self.ledger_parameters,
                           "outputs": {n: p.relative_to(self.root).as_posix() for n, p in self.outputs.items()}},
            "inputs": self.inputs, "counts": counts, "timings_s": timings, "status": status, **more,
        })
