"""The owner tag on every run a process of this project starts, through MLflow's run-context plugins.

Registered as an ``mlflow.run_context_provider`` entry point in ``pyproject.toml``: MLflow loads it while
``mlflow`` itself is being imported, so this module imports nothing of MLflow but the plugin's base class.
"""

from mlflow.tracking.context.abstract_context import RunContextProvider

from pipeline.names import OWNER_TAG
from pipeline.runtime.processes import this_process


class OwnerContext(RunContextProvider):
    """Adds the owner tag (``pipeline.runtime.processes``): which process runs the run."""

    def in_context(self):
        return True

    def tags(self):
        return {OWNER_TAG: this_process()}
