"""The one exception type the pipeline raises for problems a user can fix.

It is a ``click.ClickException``, so the CLI prints just the message (no traceback) and exits with
status 1; inside ``mlflow.start_run`` the run is marked FAILED before the message is shown.
"""

import click


class PipelineError(click.ClickException):
    pass
