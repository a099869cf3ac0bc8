"""Logging params once: light enough for ``main``'s process, which imports neither torch nor numpy."""

import mlflow


def log_new_params(params: dict) -> None:
    """Log params the active run does not hold yet.

    Under ``mlflow run`` the project has already logged its -P values as typed on the command line
    ("1e-1"), and MLflow refuses to change a param, so ours ("0.1") must not overwrite them.
    """
    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.params
    new = {k: "" if v is None else v for k, v in params.items() if k not in logged}
    if new:
        mlflow.log_params(new)
