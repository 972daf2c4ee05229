"""Ray Tune learning-rate sweep over full Ray Train runs."""

from tuning.sweep import is_sweep, run_sweep

__all__ = ["is_sweep", "run_sweep"]
