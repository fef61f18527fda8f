"""Deployments with schedules, served by `evit serve` against a real `prefect server start`."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.deploy import SCHEDULES, runner_deployments
from tests.flow_helpers import (VENV_BIN, clean_env, shared_mlflow_db, start_prefect_server,  # noqa: F401
                                stop_process_group, tiny)


def test_deployments_carry_the_schedules_and_an_absolute_params_path(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("{}\n")
    deps = {d.name: d for d in runner_deployments(tmp_path / "params.yaml")}
    assert set(deps) == {"nightly-research", "weekly-retrain"}
    nightly = deps["nightly-research"]
    assert nightly.parameters["params_path"] == str((tmp_path / "params.yaml").resolve())
    assert nightly.parameters["stages"] == ["prepare", "lut", "search", "export"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert [s.schedule.cron for s in deps["weekly-retrain"].schedules] == ["0 3 * * 0"]
    # one active run per deployment, with the documented collision strategy (flows/deploy.py)
    assert {n: (d.concurrency_limit, d.concurrency_options.collision_strategy.value) for n, d in deps.items()} == \
        {"nightly-research": (1, "CANCEL_NEW"), "weekly-retrain": (1, "ENQUEUE")}


@pytest.mark.slow
def test_serve_registers_deployments_and_runs_a_triggered_run(tiny_params: Any, tmp_path_factory: Any,
                                                              shared_mlflow_db: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    path = tiny_params(tiny())
    root = path.parent
    home = tmp_path_factory.mktemp("prefect-server")
    url, server = start_prefect_server(home, home / "server.log")
    serve_log = home / "serve.log"
    env = clean_env({"PREFECT_API_URL": url, "PREFECT_HOME": str(home), "MLFLOW_TRACKING_URI": shared_mlflow_db})
    with open(serve_log, "wb") as fh:
        serve = subprocess.Popen([str(VENV_BIN / "evit"), "serve", "--params", str(path)], cwd=root, env=env,
                                 stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 180
                deployments: dict[str, Any] = {}
                while len(deployments) < len(SCHEDULES) and time.monotonic() < deadline:
                    assert serve.poll() is None, serve_log.read_text()[-4000:]
                    deployments = {d.name: d for d in client.read_deployments()}
                    time.sleep(1)
                assert set(deployments) == {s.name for s in SCHEDULES}, serve_log.read_text()[-4000:]
                weekly = deployments["weekly-retrain"]
                assert weekly.schedules[0].schedule.cron == "0 3 * * 0" and weekly.schedules[0].active
                assert weekly.parameters["params_path"] == str(path)

            # Trigger a run of the weekly deployment limited to the prepare stage (seconds).
            run = run_deployment("evit-pipeline/weekly-retrain", parameters={"stages": ["prepare"], "force": []},
                                 timeout=300)
            assert run.state is not None and run.state.is_completed(), (run.state, serve_log.read_text()[-6000:])
            # The work-pool variant: the same deployments, registered for a process pool's workers.
            from prefect.client.schemas.actions import WorkPoolCreate

            from flows.deploy import register

            with get_client(sync_client=True) as client:
                client.create_work_pool(WorkPoolCreate(name="evit-test-pool", type="process"))
                ids = register(str(path), pool="evit-test-pool")
                pooled = [client.read_deployment(i) for i in ids]
            assert {d.work_pool_name for d in pooled} == {"evit-test-pool"}
            assert {d.name for d in pooled} == {s.name for s in SCHEDULES}
            assert all(d.entrypoint == "flows/pipeline.py:pipeline_flow" for d in pooled)
        assert (root / "data" / "prepared" / "manifest.json").is_file()
        lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
        assert set(lock) == {"prepare"}
    finally:
        code = stop_process_group(serve, signal.SIGINT, timeout=60)  # Ctrl-C: pause schedules, exit
        stop_process_group(server)
    assert code in (0, -signal.SIGINT, 130), serve_log.read_text()[-3000:]
