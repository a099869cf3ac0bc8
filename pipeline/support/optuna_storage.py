"""Optuna storages: a journal file or a database (sqlite, PostgreSQL, MySQL), and the study inside it.

Several workers, on this machine or others, share one study through its storage; the helpers here open
it robustly (concurrent creation, locked sqlite files, dropped connections) and never show a password.
"""

import importlib.util
import time
import warnings

import optuna
import sqlalchemy.exc
from mlflow import MlflowClient
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from pipeline.config import JOURNAL_SCHEME, SearchSpace, TuneConfig, is_journal
from pipeline.errors import PipelineError
from pipeline.names import FAILURE_TAG, RECIPE_ATTR, RUN_ID_ATTR, TRIAL_STATE_TAG
from pipeline.support.search import seed_recipe_params
from pipeline.support.stores import create_if_new, creation_lock


def printable_url(url: str) -> str:
    """The storage URL without its password, for logs and errors."""
    if is_journal(url):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy understands; the error that follows says so
        return url


def close_stale_run(study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    reason: str = "its worker stopped sending heartbeats (killed or lost)") -> None:
    """Heartbeat callback: Optuna has failed a trial whose worker died silently; end its MLflow run too."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        client = MlflowClient()
        client.set_tag(run_id, TRIAL_STATE_TAG, TrialState.FAIL.name)
        client.set_tag(run_id, FAILURE_TAG, reason)
        client.set_terminated(run_id, status="KILLED")


def with_installed_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare postgresql:// as the psycopg 3 driver; the project installs psycopg2."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def open_database_storage(cfg: TuneConfig, attempts: int = 3) -> RDBStorage:
    # A sqlite writer waits up to a minute for another's lock instead of failing "database is
    # locked"; other databases get a connection check so that a dropped connection is reopened.
    is_sqlite = cfg.storage.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 60}} if is_sqlite else {"pool_pre_ping": True}
    for attempt in range(1, attempts + 1):
        try:
            # a new sqlite file is created by one process at a time (the others wait, then open it)
            with warnings.catch_warnings(), creation_lock(cfg.storage):
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                create_if_new(cfg.storage, lambda staging: RDBStorage(staging).engine.dispose())
                return RDBStorage(with_installed_driver(cfg.storage), engine_kwargs=engine_kwargs,
                                  heartbeat_interval=cfg.heartbeat_interval,
                                  heartbeat_stale_trial_callback=close_stale_run)
        # Workers that open a new database server at the same moment all create Optuna's tables, and
        # the losers fail on a duplicate table or key. The tables exist by then: opening again works.
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError):
            if attempt == attempts:
                raise
            time.sleep(attempt)


def open_storage(cfg: TuneConfig) -> optuna.storages.BaseStorage:
    """A journal file, or a database through SQLAlchemy (sqlite, PostgreSQL, MySQL...)."""
    try:
        if is_journal(cfg.storage):
            path = cfg.storage.removeprefix(JOURNAL_SCHEME)
            return JournalStorage(JournalFileBackend(path))
        return open_database_storage(cfg)
    except Exception as e:
        raise PipelineError(
            f"cannot open the Optuna storage {printable_url(cfg.storage)} ({type(e).__name__}: {e}); "
            "check the URL, that the database server is running and reachable, and that its driver "
            "is installed (psycopg2 for postgresql://, pymysql for mysql+pymysql://)"
        )


def open_study(cfg: TuneConfig, space: SearchSpace, storage, data: dict[str, str]) -> optuna.Study:
    """Create the study with the seed recipe as its first trial, or resume it if it exists.

    ``data``: the digests of the training and validation splits (``STUDY_DATA_ATTRS``). A new study
    records them; an existing one must have recorded the same, or its trials are not comparable.
    """
    try:
        study = optuna.create_study(study_name=cfg.study_name, storage=storage, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:  # resume: never overwrite a study
        study = optuna.load_study(study_name=cfg.study_name, storage=storage)
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise PipelineError(f"study {cfg.study_name!r} exists but minimizes; pick another --study-name")
        check_same_data(study, data, printable_url(cfg.storage))
        return study
    # Only the process that created the study gets here (the database enforces unique names), so
    # the seed trial is queued exactly once even when several machines start together.
    for key, digest in data.items():
        study.set_user_attr(key, digest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_accuracy"])  # the objective, named in optuna-dashboard and trials.csv
    study.enqueue_trial(seed_recipe_params(space), user_attrs={RECIPE_ATTR: "seed (d2l 3.7)"})
    return study


def described(digests: dict) -> str:
    return ", ".join(f"{k} {v or 'not recorded'}" for k, v in digests.items())


def check_same_data(study: optuna.Study, data: dict[str, str], where: str, wait_s: float = 10) -> None:
    """Refuse to resume ``study`` on data other than its own (digests of the train and val splits)."""
    recorded = {k: study.user_attrs.get(k) for k in data}
    deadline = time.monotonic() + wait_s
    # A study created a moment ago by another worker records its data right after creation, and
    # queues its first trial after that: an empty study without the record is waited for.
    while not any(recorded.values()) and not study.trials and time.monotonic() < deadline:
        time.sleep(0.2)
        recorded = {k: study.user_attrs.get(k) for k in data}
    if recorded == data:
        return
    raise PipelineError(
        f"study {study.study_name!r} in {where} was run on other data ({described(recorded)}) than this "
        f"({described(data)}): its trials' val accuracies are not comparable with new ones. Pick another "
        "--study-name, or pass the data the study was run on"
    )
