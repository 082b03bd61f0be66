"""Prefect settings for in-process runs: an ephemeral API, no telemetry, a patient start-up."""

from __future__ import annotations

import os


def configure_local_prefect() -> None:
    """Set before Prefect starts its ephemeral server; explicit user settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The first ephemeral start migrates a SQLite database and can take ~20 s on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
