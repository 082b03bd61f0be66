"""flows.settings.LocalPrefectServer: the temporary API server the CLI starts for demo and run.

Each part runs in a fresh interpreter, as the CLI does: the server must be started (and
``PREFECT_API_URL`` set) before Prefect is imported, which this test process already did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUN_FLOW = """
import json
from flows.settings import LocalPrefectServer, configure_local_prefect
configure_local_prefect()
server = LocalPrefectServer(preload=("json",))
from prefect import flow, task
from prefect.runtime import flow_run

@task
def square(x):
    return x * x

@flow
def many_tasks():
    return flow_run.id, [square(i) for i in range(12)]

with server:
    run_id, squares = many_tasks()
print(json.dumps({"run": run_id, "squares": squares, "alive": server._proc.poll() is None}))
"""

READ_RUNS = """
import json, sys
from flows.settings import LocalPrefectServer, configure_local_prefect
configure_local_prefect()
with LocalPrefectServer(preload=()):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sys.argv[1]])))
print(json.dumps(sorted(r.state.type.value for r in runs)))
"""


def _python(code: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_task_run_is_recorded_before_the_server_stops_and_it_prints_nothing(tmp_path):
    ran = _python(RUN_FLOW, tmp_path)
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout.strip().splitlines()[-1])
    assert out["squares"] == [i * i for i in range(12)]
    # the server's own logs (start-up, shutdown) stay out of the user's terminal
    assert "Traceback" not in ran.stderr and "ERROR" not in ran.stderr, ran.stderr

    # the same database, read through a new server: all twelve task runs finished as completed
    read = _python(READ_RUNS, tmp_path, out["run"])
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout.strip().splitlines()[-1]) == ["COMPLETED"] * 12
