"""The steps of ``main`` as MLflow runs: each launched as its MLproject entry point inside the parent run, or a
finished one reused when it ran the same entry point, parameters and code (``code_version``) as this one
would; steps with the same identity wait for each other rather than run twice."""

import contextlib
import functools
import getpass
import hashlib
import json
import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import filelock
import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import ExecutionException

from pipeline.errors import PipelineError
from pipeline.names import CODE_VERSION_TAG, FAILURE_TAG, STEP_TAG
from pipeline.runtime.signals import interrupt_reason

PROJECT_DIR = Path(__file__).resolve().parents[2]
# Where a new file not yet committed is code that the steps run; elsewhere are the stores, their journals
# and the data that commands write and remove as they run, which must not change the code version.
CODE_PATHS = ("pipeline", "MLproject", "conda.yaml", "experiments")


def code_version() -> str:
    """The git commit, with a hash of uncommitted changes to the code when there are some.

    Two runs with the same code version ran the same code, which is what makes reusing a finished
    step safe. Changes: edits to tracked files, and new files under ``CODE_PATHS``. Outside a git
    checkout, a hash of the package's source files stands in.
    """
    root = PROJECT_DIR
    try:
        git = functools.partial(subprocess.run, cwd=root, capture_output=True, check=True)
        commit = git(["git", "rev-parse", "HEAD"]).stdout.decode().strip()
        changes = git(["git", "diff", "HEAD"]).stdout  # edits to tracked files
        untracked = git(["git", "ls-files", "--others", "--exclude-standard", "-z", "--", *CODE_PATHS]).stdout
        h, dirty = hashlib.sha256(changes), bool(changes)
        for name in filter(None, untracked.split(b"\0")):  # new files not yet committed count as changes too
            try:
                content = (root / os.fsdecode(name)).read_bytes()
            except FileNotFoundError:  # removed since git listed it: not part of the code any more
                continue
            h.update(name + b"\0" + content)
            dirty = True
        return f"{commit}-dirty-{h.hexdigest()[:12]}" if dirty else commit
    except (OSError, subprocess.CalledProcessError):
        h = hashlib.sha256()
        for path in sorted((root / "pipeline").rglob("*.py")):
            h.update(path.read_bytes())
        return f"nogit-{h.hexdigest()[:12]}"


def entry_point_defaults(entry_point: str) -> dict[str, str]:
    """The parameters an entry point declares in MLproject, with their defaults as strings."""
    spec = yaml.safe_load((PROJECT_DIR / "MLproject").read_text())["entry_points"]
    if entry_point not in spec:
        raise PipelineError(f"MLproject has no entry point '{entry_point}'")
    return {name: str(p.get("default", "")) for name, p in spec[entry_point].get("parameters", {}).items()}


def step_parameters(entry_point: str, overrides: dict) -> dict[str, str]:
    """All of an entry point's parameters, as strings: the way MLflow stores and we compare them."""
    params = entry_point_defaults(entry_point)
    unknown = set(overrides) - set(params)
    if unknown:
        raise PipelineError(f"entry point '{entry_point}' has no parameter(s) {sorted(unknown)}")
    params.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in overrides.items()})
    return params


def find_finished_run(experiment_id: str, entry_point: str, params: dict, tags: dict) -> Run | None:
    """The newest finished run of ``entry_point`` with exactly these parameters and tags (code version, and
    for prepare the raw files' digest)."""
    wanted = " ".join(f"and tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.`mlflow.project.entryPoint` = '{entry_point}' {wanted} "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
    )
    # MLflow shell-quotes each value for the entry point's command and logs it quoted ("" -> "''")
    expected = {k: shlex.quote(v) for k, v in params.items()}
    for run in runs:
        if all(run.data.params.get(k) == v for k, v in expected.items()):
            return run
    return None


@contextlib.contextmanager
def identical_steps_one_at_a_time(experiment_id: str, entry_point: str, params: dict, tags: dict):
    """Hold a lock named after the step (store, experiment, entry point, parameters, tags).

    Two identical ``main`` runs started together would otherwise both miss a finished step, and both
    train and register twins: now the second waits for the first's step, then reuses it. The lock
    lives in a temporary folder of the user's: this holds for one user's ``main`` runs on one machine.
    """
    key = json.dumps([mlflow.get_tracking_uri(), experiment_id, entry_point, params, tags], sort_keys=True)
    folder = Path(tempfile.gettempdir()) / f"fashion-mnist-pipeline-steps-{getpass.getuser()}"
    folder.mkdir(exist_ok=True)
    lock = filelock.FileLock(folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        print(f"[main] waiting for an identical {entry_point} step that another main is running")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def run_step(entry_point: str, params: dict, force: bool, tags: dict | None = None) -> Run:
    """Reuse a finished identical step, or launch it as a child run of the active run.

    Identical: the same entry point, parameters and code version, and the ``tags`` the step itself
    records about its inputs (prepare: the raw files' digest).
    """
    parent = mlflow.active_run()
    tags = {CODE_VERSION_TAG: code_version(), **(tags or {})}
    experiment_id = parent.info.experiment_id
    with identical_steps_one_at_a_time(experiment_id, entry_point, params, tags):
        return reuse_or_launch(entry_point, params, force, experiment_id, tags)


def reuse_or_launch(entry_point: str, params: dict, force: bool, experiment_id: str, tags: dict) -> Run:
    reused = None if force else find_finished_run(experiment_id, entry_point, params, tags)
    if reused is not None:
        print(f"[main] reusing {entry_point} run {reused.info.run_id}")
        run_id = reused.info.run_id
    else:
        print(f"[main] running {entry_point} with {params}")
        try:
            submitted = mlflow.projects.run(str(PROJECT_DIR), entry_point, parameters=params,
                                            env_manager="local", experiment_id=experiment_id)
        except ExecutionException as e:
            raise PipelineError(f"step '{entry_point}' failed: {e}; its output is above")
        except KeyboardInterrupt as e:
            step_run_killed(experiment_id, entry_point, interrupt_reason(e))
            raise
        run_id = submitted.run_id
        MlflowClient().set_tag(run_id, CODE_VERSION_TAG, tags[CODE_VERSION_TAG])
    step = STEP_TAG.format(entry_point)
    mlflow.set_tags({step: run_id, step + ".reused": reused is not None})
    return MlflowClient().get_run(run_id)


def step_run_killed(experiment_id: str, entry_point: str, reason: str) -> None:
    """End the interrupted step's run KILLED, as the step itself did (or would have, had it started).

    MLflow, having stopped the step, marks its run FAILED over what the step recorded (mlflow.projects
    compares the run's status, a string, with RunStatus's numbers, so it never sees that the run ended).
    """
    client = MlflowClient()
    for run in client.search_runs([experiment_id], filter_string=(
            f"tags.`mlflow.parentRunId` = '{mlflow.active_run().info.run_id}' and "
            f"tags.`mlflow.project.entryPoint` = '{entry_point}' and attributes.status != 'FINISHED'")):
        if FAILURE_TAG not in run.data.tags:  # stopped before it could say why
            client.set_tag(run.info.run_id, FAILURE_TAG, reason)
        client.set_terminated(run.info.run_id, status="KILLED")
