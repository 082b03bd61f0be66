"""Prefect settings for in-process runs: a temporary local API, no telemetry, a patient start-up."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 never goes via a proxy


def configure_local_prefect() -> None:
    """Set before Prefect starts its ephemeral server; explicit user settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The first ephemeral start migrates a SQLite database and can take ~20 s on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")


class LocalPrefectServer:
    """Start the temporary Prefect API server at once, beside the caller's own imports.

    Without ``PREFECT_API_URL`` Prefect starts a server subprocess at the first flow call, after
    the caller has imported everything, and the parent imports the whole server package (~3.7 CPU-s
    here) just to launch it. Started here, first thing, the subprocess boots on the other core
    while the parent imports Beam and the flows, which takes most of Prefect's ~6.5 s start off an
    all-unchanged run. It is the same server Prefect would start (uvicorn on 127.0.0.1, same
    SQLite database, UI off). Use it as a context manager around the flow calls: entering waits
    for the server; inside, flow-run heartbeats are off (they let a long-lived server notice crashed
    runs; this server dies with the process, and each flow's exit waited up to 1 s for the
    heartbeat thread); leaving stops it. With ``PREFECT_API_URL`` already set (a real server) or
    ephemeral mode disabled it does nothing.
    """

    def __init__(self) -> None:
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
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            env=env)
        atexit.register(self.stop)
        self.api_url = f"http://127.0.0.1:{port}/api"
        os.environ["PREFECT_API_URL"] = self.api_url  # Prefect reads it at its first settings access

    def wait(self) -> None:
        if self._proc is None:
            return
        deadline = time.monotonic() + float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {self._proc.returncode}")
            try:
                with _NO_PROXY.open(f"{self.api_url}/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the temporary Prefect server did not answer at {self.api_url} within the start-up timeout "
                           "(raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def __enter__(self) -> "LocalPrefectServer":
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
        self.stop()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
