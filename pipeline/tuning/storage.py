"""Optuna storages: a journal file or a database (sqlite, PostgreSQL, MySQL), and the study inside it.

Several workers, on this machine or others, share one study through its storage; the helpers here open
it robustly (concurrent creation, locked sqlite files, dropped connections, servers that never answer)
and never show a password. A storage that fails is named, with the cause seen, in one line.
"""

import contextlib
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

from pipeline.config import DEFAULT_MODEL, JOURNAL_SCHEME, POSTGRES_CONNECT_ARGS
from pipeline.errors import PipelineError, printable_url
from pipeline.faults import causes, fault_of, file_fault, from_optuna_storage
from pipeline.names import FAILURE_TAG, RECIPE_ATTR, RUN_ID_ATTR, STUDY_DATA_ATTRS, STUDY_MODEL_ATTR, TRIAL_STATE_TAG
from pipeline.runtime.store_files import create_if_new, creation_lock
from pipeline.study_config import SearchSpace, TuneConfig, is_journal
from pipeline.tuning.search import seed_recipe_params


def close_stale_run(study: optuna.Study, trial: optuna.trial.FrozenTrial,
                    reason: str = "its worker stopped sending heartbeats (killed or lost)") -> None:
    """Heartbeat callback: Optuna has failed a trial whose worker died silently; end its MLflow run too."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id:
        client = MlflowClient()
        client.set_tag(run_id, TRIAL_STATE_TAG, TrialState.FAIL.name)
        # a run its worker ended FAILED (its storage failed, so the trial could not be told) keeps that
        # end and its reason
        if client.get_run(run_id).info.status != "FAILED":
            client.set_tag(run_id, FAILURE_TAG, reason)
            client.set_terminated(run_id, status="KILLED")


def with_installed_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare postgresql:// as the psycopg 3 driver; the project installs psycopg2."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def engine_kwargs(url: str) -> dict:
    """How SQLAlchemy connects to the storage at ``url`` (after ``with_installed_driver``).

    A sqlite writer waits up to a minute for another's lock instead of failing "database is locked".
    PostgreSQL: a connection check, so that a dropped connection is reopened, and bounded waits
    (``config.POSTGRES_CONNECT_ARGS``; the URL's own parameters win: SQLAlchemy passes them to libpq).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": 60}}
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("psycopg2", "psycopg"):
        defaults = {k: v for k, v in POSTGRES_CONNECT_ARGS.items() if k not in parsed.query}
        return {"pool_pre_ping": True, "connect_args": defaults}
    return {"pool_pre_ping": True}


def open_database_storage(cfg: TuneConfig, attempts: int = 3) -> RDBStorage:
    url = with_installed_driver(cfg.storage)
    for attempt in range(1, attempts + 1):
        try:
            # a new sqlite file is created by one process at a time (the others wait, then open it)
            with warnings.catch_warnings(), creation_lock(cfg.storage):
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                create_if_new(cfg.storage, lambda staging: RDBStorage(staging).engine.dispose())
                return RDBStorage(url, engine_kwargs=engine_kwargs(url), heartbeat_interval=cfg.heartbeat_interval,
                                  heartbeat_stale_trial_callback=close_stale_run)
        # Workers that open a new database server at the same moment all create Optuna's tables, and
        # the losers fail on a duplicate table or key. The tables exist by then: opening again works.
        # A fault (a server that refuses or never answers, a full disk) would only fail again.
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as e:
            if attempt == attempts or fault_of(e) is not None:
                raise
            time.sleep(attempt)


def why_not_opened(error: Exception) -> str | None:
    """What kept a storage from opening, and what to do; None for anything else (a bug: its traceback)."""
    if fault := fault_of(error):
        return f"{fault.cause}; {fault.remedy}"
    missing = [e for e in causes(error) if isinstance(e, ImportError)]
    if missing:  # the innermost names the module (Optuna's own message does not)
        return (f"its driver is not installed ({missing[-1]}); install it: psycopg2 for postgresql://, pymysql "
                "for mysql+pymysql://")
    for e in causes(error):
        if line := file_fault(e):  # a journal file
            return line
        if isinstance(e, OSError) and e.filename:
            return f"{e.strerror} ({e.filename})"
        if isinstance(e, sqlalchemy.exc.NoSuchModuleError):
            return f"SQLAlchemy knows no such database ({e}); use sqlite:///, postgresql:// or mysql+pymysql://"
        if isinstance(e, sqlalchemy.exc.ArgumentError):
            return f"not a database URL ({e}); see --help for the forms a storage takes"
    return None


def open_storage(cfg: TuneConfig) -> optuna.storages.BaseStorage:
    """A journal file, or a database through SQLAlchemy (sqlite, PostgreSQL, MySQL...)."""
    try:
        if is_journal(cfg.storage):
            path = cfg.storage.removeprefix(JOURNAL_SCHEME)
            return JournalStorage(JournalFileBackend(path))
        return open_database_storage(cfg)
    except Exception as e:
        problem = why_not_opened(e)
        if problem is None:
            raise
        raise PipelineError(f"cannot open the Optuna storage {printable_url(cfg.storage)}: {problem}") from e


def storage_problem(url: str, error: BaseException) -> str | None:
    """One line for a fault of the Optuna storage at ``url`` behind ``error``; None for any other error."""
    fault = fault_of(error) if from_optuna_storage(error) else None
    return f"the Optuna storage {printable_url(url)} failed: {fault.cause}; {fault.remedy}" if fault else None


@contextlib.contextmanager
def storage_faults_named(url: str):
    """Name the Optuna storage at ``url`` in the one line of a fault it raises during the block (the CLI
    can tell an Optuna storage's error, not its URL); every other error passes unchanged."""
    try:
        yield
    except Exception as e:
        problem = storage_problem(url, e)
        if problem is None:
            raise
        raise PipelineError(f"{problem}. The finished trials are kept: run the same command again to resume") from e


def open_study(cfg: TuneConfig, space: SearchSpace, storage, data: dict[str, str]) -> optuna.Study:
    """Create the study with the seed recipe as its first trial, or resume it if it exists.

    ``data``: the model and the digests of the training and validation splits (``STUDY_MODEL_ATTR``,
    ``STUDY_DATA_ATTRS``). A new study records them; an existing one must have recorded the same, or its
    trials are not comparable.
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
    study.enqueue_trial(seed_recipe_params(space, cfg.model), user_attrs={RECIPE_ATTR: f"seed ({cfg.model})"})
    return study


def described(digests: dict) -> str:
    return ", ".join(f"{k} {v or 'not recorded'}" for k, v in digests.items())


def check_same_data(study: optuna.Study, data: dict[str, str], where: str, wait_s: float = 10) -> None:
    """Refuse to resume ``study`` on data other than its own (digests of the train and val splits), or for
    another model."""
    recorded = {k: study.user_attrs.get(k) for k in data}
    deadline = time.monotonic() + wait_s
    # A study created a moment ago by another worker records its data right after creation, and
    # queues its first trial after that: an empty study without the record is waited for.
    while not any(recorded.values()) and not study.trials and time.monotonic() < deadline:
        time.sleep(0.2)
        recorded = {k: study.user_attrs.get(k) for k in data}
    if recorded.get(STUDY_MODEL_ATTR) is None and study.user_attrs.get(STUDY_DATA_ATTRS[0]):
        recorded[STUDY_MODEL_ATTR] = DEFAULT_MODEL  # a study from before models were a setting: softmax
    if recorded == data:
        return
    raise PipelineError(
        f"study {study.study_name!r} in {where} was run on other data or another model ({described(recorded)}) "
        f"than this ({described(data)}): its trials' val accuracies are not comparable with new ones. Pick "
        "another --study-name, or pass the data and the model the study was run with"
    )
