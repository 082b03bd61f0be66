"""Prefect settings for in-process runs: a temporary local API, no telemetry, a patient start-up."""

from __future__ import annotations

import atexit
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes via a proxy


def configure_local_prefect() -> None:
    """Set before Prefect starts its ephemeral server; explicit user settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's client-side usage telemetry (and its first-run notice on a terminal): offline here.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The first ephemeral start migrates a SQLite database and can take ~20 s on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")


# What the curation flows' tasks import when they first run (stages, selectors, exports, report).
# Imported while the temporary server boots, when this process would otherwise only wait; inside
# the flow they cost ~1 s of an all-unchanged run.
STAGE_MODULES = (
    "pipeline.steps", "pipeline.stages.embeddings", "pipeline.stages.index", "pipeline.stages.concepts",
    "pipeline.stages.instruction_annotations", "pipeline.select.protocol", "pipeline.curate.mig_pool",
    "pipeline.curate.cabs_plan", "pipeline.curate.materialise", "pipeline.curate.webdataset_export",
    "pipeline.report.page", "pipeline.query", "pyarrow.dataset", "prefect.flow_engine", "prefect.task_engine",
)


class LocalPrefectServer:
    """Start the temporary Prefect API server at once, beside the caller's own imports.

    Without ``PREFECT_API_URL`` Prefect starts a server subprocess at the first flow call, after
    the caller has imported everything, and the parent imports the whole server package (~3.7 CPU-s
    here) just to launch it. Started here, first thing, the subprocess boots on the other core
    while the parent imports Beam, the flows and ``preload`` (the modules their tasks import),
    which takes most of Prefect's ~6.5 s start off an all-unchanged run. It is the same server
    Prefect would start (uvicorn on 127.0.0.1, same SQLite database, UI off). Use it as a context
    manager around the flow calls: entering imports ``preload`` and waits for the server; inside,
    flow-run heartbeats are off (they let a long-lived server notice crashed runs; this server dies
    with the process, and each flow's exit waited up to 1 s for the heartbeat thread); leaving
    waits until the server has recorded every task run, then stops it. With ``PREFECT_API_URL``
    already set (a real server) or ephemeral mode disabled it does nothing.
    """

    def __init__(self, preload: tuple[str, ...] = STAGE_MODULES) -> None:
        self.preload = preload
        self.api_url: str | None = None
        self._proc: subprocess.Popen | None = None
        self._settings = None
        if os.environ.get("PREFECT_API_URL") or os.environ.get(
                "PREFECT_SERVER_EPHEMERAL_ENABLED", "true").lower() in ("0", "false"):
            return
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        # Its own logs go to a private file, shown only if it fails to start: the user's terminal
        # is for the flows' output, and a throwaway server's shutdown chatter is not theirs.
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._started = datetime.now(timezone.utc)
        atexit.register(self.stop)
        self.api_url = f"http://127.0.0.1:{port}/api"
        os.environ["PREFECT_API_URL"] = self.api_url  # Prefect reads it at its first settings access

    def wait(self) -> None:
        if self._proc is None:
            return
        deadline = time.monotonic() + float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {self._proc.returncode}:\n"
                                   f"{self._log_tail()}")
            try:
                with _NO_PROXY.open(f"{self.api_url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        print(self._log_tail(), file=sys.stderr)
        raise RuntimeError(f"the temporary Prefect server did not answer at {self.api_url} within the start-up timeout "
                           "(raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def _log_tail(self, limit: int = 4000) -> str:
        self._log.flush()
        self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, self._log.tell() - limit))
        return self._log.read().decode("utf-8", "replace")

    def __enter__(self) -> "LocalPrefectServer":
        for module in self.preload:
            importlib.import_module(module)
        self.wait()
        if self._proc is not None:
            from prefect.settings import (
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
                temporary_settings,
            )

            self._settings = temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
            self._settings.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._settings is not None:
            self._settings.__exit__(*exc)
            self._settings = None
        if self._proc is not None and self._proc.poll() is None:
            self._await_recorded()
        self.stop()

    def _await_recorded(self, timeout: float = 5.0, settle: float = 0.15) -> None:
        """Let the server record every task-run state before it stops.

        Task-run states travel as events: the client sends them in the background and the server
        writes them a little later, one by one. Stopped before that, it cancels its recorder
        mid-write and the last task runs are missing or stay "Running" in its database. So: send
        them all, then wait (up to ``timeout``) until the task runs started since this server did
        are all finished and their number is the same in three polls ``settle`` seconds apart.
        A server that stops answering ends the wait: the flow's own outcome is what to report.
        """
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout)
        deadline = time.monotonic() + timeout
        seen: list[tuple[int, int]] = []
        while time.monotonic() < deadline:
            try:
                seen.append((self._count_task_runs(),
                             self._count_task_runs({"type": {"any_": ["PENDING", "RUNNING"]}})))
            except (OSError, ValueError):
                return
            if len(seen) >= 3 and len(set(seen[-3:])) == 1 and seen[-1][1] == 0:
                return
            time.sleep(settle)

    def _count_task_runs(self, state: dict | None = None) -> int:
        """Task runs started since this server did (and in ``state``), from its REST API."""
        task_runs = {"start_time": {"after_": self._started.isoformat()}, **({"state": state} if state else {})}
        request = urllib.request.Request(f"{self.api_url}/task_runs/count", method="POST",
                                         data=json.dumps({"task_runs": task_runs}).encode(),
                                         headers={"Content-Type": "application/json"})
        with _NO_PROXY.open(request, timeout=5) as response:
            return int(json.load(response))

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
