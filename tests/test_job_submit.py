"""``ray job submit`` of the quick job against a real head node and its dashboard API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cluster_support import dashboard_up
from conftest import ROOT, TINY, require_data
from support import free_port


@pytest.mark.slow
def test_job_submit_runs_the_sweep_on_a_head_node(tmp_path: Path) -> None:
    require_data()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # A throwaway loopback head: no token auth, so the CLI and the HTTP polls need no token.
    env["RAY_AUTH_MODE"] = "disabled"
    dash = free_port()
    # Ray Train's placement-group cleaner asks the state API whether a run's controller lives: the
    # head's processes must ask this head, not the latest of the machine's clusters (this test
    # session's own may be up), as on a real head where it is the only one.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dash}"
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # Not the agent's default port: a cluster of this test session may hold it, and an agent
            # without its HTTP server takes no jobs ("No available agent to submit job").
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--include-dashboard=true",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{dash}"
    try:
        if not dashboard_up(api):
            pytest.fail(f"the dashboard at {api} did not come up")
        out_dir = tmp_path / "job"
        overrides = [o for o in TINY if not o.startswith("ray.")]
        command = [
            "python", "ray_jobs/train.py", "--config", "configs/quick.yaml", *overrides,
            "tune.lrs=[1e-3,3e-3]", "tune.max_concurrent_trials=1", "scaling.num_workers=1",
            f"output_dir={out_dir}",
        ]  # fmt: skip
        # `ray job stop` SIGTERMs the driver, then SIGKILLs it after RAY_JOB_STOP_WAIT_TIME_S
        # (Ray's default: 3 s); the job's own runtime env gives it the time to end cleanly.
        stop_wait = json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}})
        first = _submit(bin_dir, api, env, ["--runtime-env-json", stop_wait], command)
        # Stopped once the first trial has finished and the second started: the rerun must keep
        # the first, not train it again.
        deadline = time.time() + 600
        while time.time() < deadline and not (_finished_trials(out_dir) and len(_trials(out_dir)) == 2):
            assert _status(api, first) in ("PENDING", "RUNNING"), _logs(api, first)[-3000:]
            time.sleep(0.5)
        kept = _finished_trials(out_dir)
        assert len(kept) == 1, _logs(api, first)[-3000:]
        stop = subprocess.run(
            [str(bin_dir / "ray"), "job", "stop", "--address", api, first],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert stop.returncode == 0, stop.stderr
        assert _wait(api, first, 120) == "STOPPED"
        logs = _logs(api, first)
        assert logs.strip().splitlines()[-1] == (
            "interrupted (SIGTERM): rerun the same command to resume from the last checkpoint"
        ), logs[-3000:]
        teardown = r"Traceback|Exception ignored|SystemExit|multiple active Ray"
        assert not re.search(teardown, logs), logs[-3000:]
        assert not (out_dir / "best").exists()

        second = _submit(bin_dir, api, env, [], command)
        status = _wait(api, second, 600)
        logs = _logs(api, second)
        assert status == "SUCCEEDED", logs[-3000:]
        assert "exported:" in logs
        assert json.loads((out_dir / "best" / "metrics.json").read_text())["sweep"]["trials"] == 2
        assert {t: _checkpoints(t) for t in kept} == kept  # the finished trial was not trained again
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _submit(bin_dir: Path, api: str, env: dict[str, str], options: list[str], command: list[str]) -> str:
    """``ray job submit --no-wait``; the job's id. The dashboard answers before its job agent has
    registered ("No available agent to submit job"): that answer, and only it, is retried."""
    for _ in range(30):
        submit = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", api, "--working-dir", str(ROOT),
             *options, "--no-wait", "--", *command],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if submit.returncode == 0 or "No available agent" not in submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stderr
    job_id = re.search(r"(raysubmit_\w+)", submit.stdout + submit.stderr)
    assert job_id, submit.stdout
    return job_id.group(1)


def _status(api: str, job_id: str) -> str:
    with urllib.request.urlopen(f"{api}/api/jobs/{job_id}", timeout=10) as r:
        status: str = json.loads(r.read())["status"]
    return status


def _wait(api: str, job_id: str, timeout: float) -> str:
    """The job's status once it ended (or at the deadline)."""
    deadline = time.time() + timeout
    status = _status(api, job_id)
    while time.time() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(2)
        status = _status(api, job_id)
    return status


def _logs(api: str, job_id: str) -> str:
    with urllib.request.urlopen(f"{api}/api/jobs/{job_id}/logs", timeout=10) as r:
        logs: str = json.loads(r.read())["logs"]
    return logs


def _trials(out_dir: Path) -> list[Path]:
    return [d for d in (out_dir / "trials").glob("*") if d.is_dir()]


def _checkpoints(trial: Path) -> list[str]:
    return sorted(p.name for p in trial.glob("checkpoint_*"))


def _finished_trials(out_dir: Path) -> dict[Path, list[str]]:
    """Trials whose single epoch's checkpoint Ray Train has registered, with their checkpoints."""
    done = {}
    for snap in (out_dir / "trials").glob("*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):  # read while being replaced
            continue
        if latest:
            done[snap.parent] = _checkpoints(snap.parent)
    return done
