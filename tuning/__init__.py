"""The training job's Ray Tune flow: every learning rate is a full Ray Train run."""

from tuning.sweep import is_sweep, run_job

__all__ = ["is_sweep", "run_job"]
