"""CI where users look for it: the GitHub workflow is valid and runs ``.ci/run`` in the right tier.

Checked offline against GitHub's workflow schema as vendored in ``check-jsonschema`` (a dev
dependency), with that tool's own YAML reading (``on:`` stays a key, not YAML 1.1's ``true``).
"""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import yaml
from support import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def _schema() -> Path:
    schema = Path(str(files("check_jsonschema") / "builtin_schemas" / "vendor" / "github-workflows.json"))
    assert schema.is_file(), f"check-jsonschema no longer vendors {schema.name}"
    return schema


def _check(workflow: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--schemafile", str(_schema()), str(workflow)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _workflow() -> dict[str, object]:
    data = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(data, dict)
    data["on"] = data.pop(True, data.get("on"))  # PyYAML reads the bare key `on` as true
    return data


def test_workflow_matches_githubs_schema(tmp_path: Path) -> None:
    result = _check(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok -- validation done" in result.stdout
    # Written back unchanged it still passes, so the broken copies below fail for their breakage.
    copy = tmp_path / "ci.yml"
    copy.write_text(yaml.safe_dump(_workflow(), sort_keys=False))
    assert _check(copy).returncode == 0


@pytest.mark.parametrize(
    ("breakage", "reported"),
    [
        (lambda wf: wf["jobs"]["test"].pop("runs-on"), "runs-on"),
        (lambda wf: wf.update({"on": {"pull_requests": None}}), "pull_requests"),
        (
            lambda wf: wf["jobs"]["test"]["steps"].append({"run": "true", "uses": "actions/cache@v4"}),
            "$.jobs",
        ),
    ],
    ids=["job without runs-on", "unknown event", "step with run and uses"],
)
def test_schema_check_rejects_a_broken_workflow(tmp_path: Path, breakage: object, reported: str) -> None:
    """The check above can fail: the same workflow, broken in one place, is rejected."""
    wf = _workflow()
    assert callable(breakage)
    breakage(wf)
    broken = tmp_path / "ci.yml"
    broken.write_text(yaml.safe_dump(wf, sort_keys=False))
    result = _check(broken)
    assert result.returncode == 1, result.stdout
    assert "Schema validation errors" in result.stdout and reported in result.stdout, result.stdout


def test_workflow_runs_ci_run_everyday_tier_on_prs_full_suite_on_main() -> None:
    wf = _workflow()
    on = wf["on"]
    assert isinstance(on, dict) and on["push"] == {"branches": ["main"]} and "pull_request" in on
    job = wf["jobs"]["test"]  # type: ignore[index]
    tier = job["env"]["RAYVIT_TEST_TIER"]
    assert tier == "${{ github.event_name == 'pull_request' && 'everyday' || 'full' }}"
    steps = job["steps"]
    assert [s["run"] for s in steps if ".ci/run" in s.get("run", "")] == ['bash .ci/run "$RAYVIT_TEST_TIER"']
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert python["with"]["cache"] == "pip"
    # The data tests' CIFAR-10 copy: cached, else downloaded into the hub layout.
    assert job["env"]["RAYVIT_TEST_DATA"].endswith("/shared/data/cifar10")
    cache = next(s for s in steps if s.get("uses", "").startswith("actions/cache@"))
    assert cache["with"]["path"] == "shared/data/cifar10"
    assert any("uoft-cs/cifar10" in s.get("run", "") for s in steps)


def test_ci_run_refuses_an_unknown_tier_in_one_line() -> None:
    out = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "nightly"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert out.stderr == "error: unknown test tier 'nightly' (expected everyday, slow or full)\n"
