"""Live progress of a Beam job: rows done / total, rate and ETA, on any runner.

A Beam DoFn may run in the driver (FnApiRunner in one process), in SDK-worker subprocesses
(``--workers N``) or on other machines (Dask, Flink), so progress cannot live in a shared Python
object. It travels through the run's staging area instead, which every worker can reach (the
catalog is where they write their outputs):

- worker side, :func:`tick` adds to a per-process counter; a throttled reporter rewrites one
  small JSON file per worker process, ``<run area>/_progress/<pid>-<random>.json``, at most about
  once a second (atomically: write then rename), with the process's cumulative counts. A
  retried bundle may count its rows twice; the driver clamps at the total.
- driver side, :func:`watch` polls those files about twice a second from a daemon thread and
  drives a tqdm bar on stderr (done/total, rate, ETA); inside a Prefect flow or task run it also
  logs a progress line about every 10 s through Prefect's run logger. The bar is shown when
  stderr is a terminal; ``THRESHER_PROGRESS=1`` forces it on, ``THRESHER_PROGRESS=0`` off.

A DoFn finds its progress folder without any constructor argument: :func:`pipeline.stages.runner.
run_pipeline` stamps the folder onto every Thresher DoFn of the pipeline before it runs (the
attribute is pickled with the DoFn, so it reaches every worker). ``tick(self, n)`` in a DoFn's
``process`` is all a stage needs; outside such a run it does nothing.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROGRESS_DIR = "_progress"
DOFN_ATTR = "_thresher_progress_dir"  # set on DoFns by run_pipeline; read by tick()
WRITE_EVERY_S = 1.0  # a worker rewrites its file at most this often
POLL_EVERY_S = 0.5  # the driver reads the files this often
LOG_EVERY_S = 10.0  # a progress line to Prefect's run logger (or the thresher logger) this often
ENV_FORCE = "THRESHER_PROGRESS"  # 1: always draw the bar, 0: never; unset: when stderr is a terminal
VERBOSE_ENV = "THRESHER_VERBOSE"  # set by ``thresher --verbose``; inherited by worker processes

log = logging.getLogger("thresher.progress")


# ------------------------------------------------------------------------------ worker side


class _Reporter:
    """The cumulative counts of one process for one progress folder, written throttled."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.last_write = 0.0
        self.dirty = False
        self.timer: threading.Timer | None = None
        self.dead = False  # the folder is gone (run over) or unwritable: stop reporting

    def add(self, n: int, channel: str) -> None:
        with self.lock:
            if self.dead:
                return
            self.counts[channel] += n
            self.dirty = True
            wait = self.last_write + WRITE_EVERY_S - time.monotonic()
            if wait <= 0:
                self._write()
            elif self.timer is None:  # write the latest counts once the interval has passed
                self.timer = threading.Timer(wait, self.flush)
                self.timer.daemon = True
                self.timer.start()

    def flush(self) -> None:
        with self.lock:
            self.timer = None
            if self.dirty and not self.dead:
                self._write()

    def _write(self) -> None:
        # The folder is made by the driver's watch(); it is never re-created here, so a late
        # write cannot resurrect the staging area of a run that has finished.
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(json.dumps({"pid": os.getpid(), "counts": dict(self.counts)}))
            os.replace(tmp, self.path)
        except OSError:
            self.dead = True
            return
        self.dirty = False
        self.last_write = time.monotonic()


_reporters: dict[tuple[int, str], _Reporter] = {}
_registry_lock = threading.Lock()
_atexit_pid: int | None = None


def _reporter(folder: str) -> _Reporter:
    global _atexit_pid
    key = (os.getpid(), folder)  # a forked child gets its own file
    rep = _reporters.get(key)
    if rep is None:
        with _registry_lock:
            rep = _reporters.get(key)
            if rep is None:
                rep = _reporters[key] = _Reporter(Path(folder))
                if _atexit_pid != os.getpid():
                    atexit.register(flush_all)
                    _atexit_pid = os.getpid()
    return rep


def tick(anchor: Any, n: int = 1, channel: str = "rows") -> None:
    """Count ``n`` more rows (or other ``channel`` units) done for the job ``anchor`` belongs to.

    ``anchor`` is a DoFn (``self``) of a pipeline run by ``run_pipeline(..., progress_dir=...)``
    or a progress folder path. Never raises; a no-op outside a watched run.
    """
    folder = anchor if isinstance(anchor, (str, os.PathLike)) else getattr(anchor, DOFN_ATTR, None)
    if folder is None or not n:
        return
    try:
        _reporter(os.fspath(folder)).add(int(n), channel)
    except Exception:  # noqa: BLE001, S110 - progress must never break a job
        pass


def flush_all(folder: str | os.PathLike | None = None) -> None:
    """Write every pending count of this process now (all folders, or only ``folder``)."""
    pid, want = os.getpid(), None if folder is None else os.fspath(folder)
    for (p, f), rep in list(_reporters.items()):
        if p == pid and (want is None or f == want):
            rep.flush()


def _forget(folder: str) -> None:
    for key in [k for k in _reporters if k[1] == folder]:
        rep = _reporters.pop(key, None)
        if rep is not None and rep.timer is not None:
            rep.timer.cancel()


def read_counts(folder: str | os.PathLike) -> Counter[str]:
    """The sum over all worker files in ``folder`` of their cumulative counts."""
    total: Counter[str] = Counter()
    try:
        paths = list(Path(folder).glob("*.json"))
    except OSError:
        return total
    for path in paths:
        try:
            counts = json.loads(path.read_text()).get("counts", {})
        except (OSError, ValueError, AttributeError):
            continue  # replaced or removed under us: the next poll reads it
        for k, v in counts.items():
            if isinstance(v, int):
                total[k] += v
    return total


# ------------------------------------------------------------------------------ driver side


def bar_setting() -> bool | None:
    """tqdm's ``disable``: False (draw), True (never), None (draw only when stderr is a terminal)."""
    value = os.environ.get(ENV_FORCE, "").strip().lower()
    if value in ("1", "true", "yes", "on", "always"):
        return False
    if value in ("0", "false", "no", "off", "never"):
        return True
    return None


def verbose() -> bool:
    """True when Beam's own logging should be shown (``thresher --verbose`` sets THRESHER_VERBOSE=1).

    Then local multi-process runs start their SDK workers with Beam's own command, start-up
    lines and all (see :func:`pipeline.stages.runner.run_pipeline`).
    """
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _prefect_logger() -> Any | None:
    """Prefect's run logger when called inside a flow or task run, else None (never raises)."""
    if "prefect" not in sys.modules:  # not in a Prefect run, and not worth importing Prefect for
        return None
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return None
        return get_run_logger()
    except Exception:  # noqa: BLE001 - no run logger: no Prefect lines, nothing else changes
        return None


def _fmt_n(n: float, unit: str) -> str:
    if unit == "B":
        from tqdm import tqdm

        return tqdm.format_sizeof(n, "B", 1024)
    return f"{int(n):,}"


class Watch:
    """What :func:`watch` yields: the folder to report into, and the latest count."""

    def __init__(self, folder: Path, total: int | None, desc: str, unit: str, exact: bool,
                 extras: dict[str, int | None] | None, channel: str = "rows"):
        self.folder, self.channel = folder, channel
        self.total, self.desc, self.unit, self.exact = total, desc, unit, exact
        self.extras = dict(extras or {})
        self.n = 0
        self.counts: Counter[str] = Counter()
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._logger = _prefect_logger()
        disable = bar_setting()
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
                        file=sys.stderr, disable=disable, dynamic_ncols=True, mininterval=POLL_EVERY_S,
                        smoothing=0.1)
        if self._logger is None and self.bar.disable:
            self._logger = log  # no bar and no Prefect: lines for whoever shows thresher's INFO logs
        self._last_log = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=f"progress:{desc}", daemon=True)

    # ---------------------------------------------------------------- polling
    def _loop(self) -> None:
        while not self._stop.wait(POLL_EVERY_S):
            try:
                self._poll()
                if time.monotonic() - self._last_log >= LOG_EVERY_S:
                    self._log()
            except Exception:  # noqa: BLE001, S110 - a display problem must not end the watcher, nor the job
                pass

    def _poll(self) -> None:
        self.counts = read_counts(self.folder)
        self._show(self.counts.get(self.channel, 0))

    def _show(self, n: int) -> None:
        if self.total is not None:
            if self.exact:
                n = min(n, self.total)  # a retried bundle may count twice
            elif n > self.total:  # the total was an estimate: it grows to what was really read
                self.total = self.bar.total = n
        if n > self.n:
            self.bar.update(n - self.n)
            self.n = n
        if self.extras:
            self.bar.set_postfix_str(self._extras_text(), refresh=False)

    def _extras_text(self) -> str:
        parts = []
        for name, tot in self.extras.items():
            done = self.counts.get(name, 0)
            parts.append(f"{name} {min(done, tot) if tot else done}" + (f"/{tot}" if tot else ""))
        return ", ".join(parts)

    def line(self, final: bool = False) -> str:
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.n / elapsed
        from tqdm import tqdm

        done = _fmt_n(self.n, self.unit)
        unit = "" if self.unit == "B" else f" {self.unit}"
        if self.total:
            text = f"{self.desc}: {done}/{_fmt_n(self.total, self.unit)}{unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text = f"{self.desc}: {done}{unit}"
        text += f", {_fmt_n(rate, self.unit)}{unit}/s"
        if final:
            text += f", {tqdm.format_interval(elapsed)} elapsed"
        elif self.total and rate > 0:
            text += f", ETA {tqdm.format_interval((self.total - self.n) / rate)}"
        if self.extras:
            text += f" ({self._extras_text()})"
        return text

    def _log(self, final: bool = False, failed: bool = False) -> None:
        self._last_log = time.monotonic()
        if self._logger is None:
            return
        try:
            self._logger.info(self.line(final) + (" — done" if final and not failed else " — stopped" if final else ""))
        except Exception:  # noqa: BLE001, S110 - a logging problem must not fail the job
            pass

    # ---------------------------------------------------------------- start / stop
    def start(self) -> None:
        self._thread.start()

    def close(self, ok: bool) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        flush_all(self.folder)  # rows counted by DoFns that ran in this process (one worker)
        _forget(os.fspath(self.folder))
        try:
            self._poll()
            if ok and self.total is not None and self.n < self.total and self.exact:
                self._show(self.total)  # the job succeeded: every input row was processed
            if ok and not self.exact:
                self.total = self.bar.total = self.n  # an estimated total becomes the true count
        finally:
            self.bar.close()
        self._log(final=True, failed=not ok)


@contextmanager
def watch(staging_dir: str | os.PathLike, total: int | None, desc: str, unit: str = "rows", *,
          exact: bool = True, extras: dict[str, int | None] | None = None,
          channel: str = "rows") -> Iterator[Watch]:
    """Show the progress of the job run inside the ``with`` block; yields a :class:`Watch`.

    ``staging_dir`` is the run's private staging area: progress files go to its ``_progress/``
    folder (pass ``w.folder`` to ``run_pipeline(..., progress_dir=...)``). ``total`` is the count
    expected on ``channel`` (``rows``, what ``tick`` counts by default; None: unknown, and the bar
    shows count and rate only); ``exact=False`` marks it as an estimate that may grow. ``extras`` names further channels
    shown beside the bar, with their totals (e.g. ``{"shards": 16}``). On leaving the block the
    bar shows the final count and closes, whether the job succeeded or failed.
    """
    folder = Path(staging_dir) / PROGRESS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    w = Watch(folder, total, desc, unit, exact, extras, channel)
    if w._logger is not None and w._logger is not log:
        try:
            w._logger.info(f"{desc}: started" + (f", {_fmt_n(total, unit)}{'' if unit == 'B' else ' ' + unit}"
                                                  f"{'' if exact else ' (estimated)'} to process" if total else ""))
        except Exception:  # noqa: BLE001, S110 - a logging problem must not fail the job
            pass
    w.start()
    ok = False
    try:
        yield w
        ok = True
    finally:
        w.close(ok)


# ------------------------------------------------------------------------- ingest totals


def estimate_rows(units: list[Any], sample_bytes: int = 1 << 20) -> int | None:
    """Roughly how many rows (records and rejects) reading ``units`` will yield; None if unknown.

    Cheap: Parquet footers (exact), the first MiB of each JSONL file (scaled to the file's size;
    exact for smaller files), image files counted in image folders. JSON arrays, tar shards and
    NLVR files give None, and so does any read error (the bar then shows count and rate only).
    """
    total = 0
    for unit in units:
        try:
            n = _unit_rows(unit, sample_bytes)
        except Exception:  # noqa: BLE001 - unreadable now: the job rejects it; the bar shows no total
            n = None
        if n is None:
            return None
        total += n
    return total


def _unit_rows(unit: Any, sample_bytes: int) -> int | None:
    path = Path(unit.uri)
    if unit.container == "image_folder":
        from pipeline.io.units import IMAGE_EXTENSIONS

        count = 0
        for _, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            count += sum(1 for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
        return count
    if path.is_file() and path.stat().st_size == 0:
        return 1  # one empty_file reject
    if unit.container == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if unit.container != "jsonl":
        return None
    if unit.start or unit.stop is not None:
        return None  # a line range: planned units are whole files
    size = path.stat().st_size
    head, consumed, whole = bytearray(), 0, False
    with open(path, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        d = zlib.decompressobj(16 + zlib.MAX_WBITS) if gz else None
        while len(head) <= sample_bytes:
            block = raw.read(1 << 14)
            if not block:
                whole = True
                break
            consumed += len(block)
            if d is None:
                head += block
                continue
            head += d.decompress(block)
            while d.eof and d.unused_data:  # the next gzip member
                rest, d = d.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS)
                head += d.decompress(rest)
    if whole:
        return head.count(b"\n") + (1 if head and not head.endswith(b"\n") else 0)
    return max(1, round(head.count(b"\n") * size / consumed))
