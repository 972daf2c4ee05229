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
    env.pop("RAY_API_SERVER_ADDRESS", None)  # the head's processes must ask the head, not another cluster
    # A throwaway loopback head: no token auth, so the CLI and the HTTP polls need no token.
    env["RAY_AUTH_MODE"] = "disabled"
    dash = free_port()
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
        # The dashboard answers before its job agent has registered ("No available agent to
        # submit job, please try again later"): retry that answer, and only that, for a minute.
        for _ in range(30):
            submit = subprocess.run(
                [
                    str(bin_dir / "ray"), "job", "submit", "--address", api, "--working-dir", str(ROOT),
                    "--no-wait", "--", "python", "ray_jobs/train.py", "--config", "configs/quick.yaml",
                    *overrides, "tune.lrs=[1e-3,3e-3]", "scaling.num_workers=1", f"output_dir={out_dir}",
                ],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if submit.returncode == 0 or "No available agent" not in submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stderr
        job_id = re.search(r"(raysubmit_\w+)", submit.stdout + submit.stderr)
        assert job_id, submit.stdout
        status = "PENDING"
        deadline = time.time() + 600
        while time.time() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
            time.sleep(3)
            with urllib.request.urlopen(f"{api}/api/jobs/{job_id.group(1)}", timeout=10) as r:
                status = json.loads(r.read())["status"]
        logs = urllib.request.urlopen(f"{api}/api/jobs/{job_id.group(1)}/logs", timeout=10).read().decode()
        assert status == "SUCCEEDED", logs[-3000:]
        assert "exported:" in logs
        assert json.loads((out_dir / "best" / "metrics.json").read_text())["sweep"]["trials"] == 2
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
