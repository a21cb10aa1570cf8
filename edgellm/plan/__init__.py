"""`edgellm plan`: a calibrated performance planner (cost model in edgellm.perf; measuring and the command here)."""

from edgellm.plan.command import add_arguments, run_plan

__all__ = ["add_arguments", "run_plan"]
