"""Every setting of the pipeline, written once: name, type, default and help.

Each command's options are generated from these dataclasses (``pipeline.cli.options_from``), and a test
checks every MLproject entry point against them, so a setting added here shows up everywhere. The
defaults are the book's seed recipe (d2l §3.7): SGD, lr 0.1, batch 256, 10 epochs.
This module imports neither torch, MLflow nor Optuna: the ``main`` process reads it without them.
"""

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from urllib.parse import parse_qs, urlsplit

from pipeline.errors import HTTP_RETRIES, HTTP_TIMEOUT, printable_url, short_repr

CLASS_NAMES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28
TRAIN_IMAGES = 60_000  # Fashion-MNIST's training file; the validation split is taken from it

SAMPLERS = ("tpe", "random", "gp")
PRUNERS = ("median", "hyperband", "none")
DEFAULT_STORAGE = "sqlite:///optuna.db"
JOURNAL_SCHEME = "journal:///"  # like sqlite:///: journal:///optuna.log is relative, journal:////tmp/x.log absolute
JOURNAL_SUFFIXES = (".log", ".journal")
# A PostgreSQL storage's waits, as libpq's own connection parameters; a URL that names one keeps its value
# (postgresql://user@host/db?connect_timeout=30). A server that never answers fails the connection after
# STORAGE_CONNECT_TIMEOUT_S (and Ctrl-C waits at most that long); a statement stuck behind a lock ends
# after STORAGE_STATEMENT_TIMEOUT_S, as a sqlite writer stops waiting for a lock after a minute; TCP
# keepalives and an unanswered-write timeout notice a server or a network that is gone.
STORAGE_CONNECT_TIMEOUT_S = 10
STORAGE_STATEMENT_TIMEOUT_S = 60
POSTGRES_CONNECT_ARGS = {
    "connect_timeout": STORAGE_CONNECT_TIMEOUT_S,
    "options": f"-c statement_timeout={STORAGE_STATEMENT_TIMEOUT_S}s",
    "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,  # seconds, seconds, probes
    "tcp_user_timeout": STORAGE_STATEMENT_TIMEOUT_S * 1000,  # milliseconds
}
# An MLflow tracking server that never answers: MLflow's own defaults (120 s per request, 7 retries with
# growing pauses) wait about 20 minutes before failing; these wait about 2. A value set in the
# environment is kept.
MLFLOW_HTTP_DEFAULTS = {HTTP_TIMEOUT: "30", HTTP_RETRIES: "3"}
# MLflow's switches, which it reads from the environment only, set once by every command at its start
# (pipeline.cli): MLflow checks that a model's pt2 archive holds no pickled record before loading it, whatever
# the environment says (pipeline.tracking.safe_loading); and downloads draw no progress bar between the
# command's own lines, unless the environment asks for one.
MLFLOW_PICKLE_SWITCH = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
MLFLOW_SWITCH_DEFAULTS = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


FLOAT32_MAX = 3.4028234663852886e38  # the model computes in float32: a larger setting overflows to inf


@dataclass(frozen=True)
class ModelChoice:
    """What the settings know of a model that ``model`` chooses; its builder is the function of the same
    name in ``pipeline/core/models.py`` (a test checks that the two agree)."""

    title: str  # in figures and messages
    settings: tuple[str, ...] = ()  # TrainConfig fields that act for this model alone; tune searches them for it
    # Trials a tune worker trains at once as one stacked model (pipeline/core/stacked.py), for models that
    # have stacked training; 1: one at a time. The softmax regression's is where its cost per trial-epoch
    # stops falling fast, as `python -m bench --only side_by_side` measures it (docs/benchmarks.md).
    side_by_side: int = 1


# The models, by the name `--model` takes. Adding one: its builder in pipeline/core/models.py and its line here.
MODELS = {
    "softmax": ModelChoice("softmax regression", side_by_side=8),  # d2l §3.7, the seed recipe
    "mlp": ModelChoice("MLP", settings=("hidden_units", "dropout")),  # d2l §4.3 (concise), dropout as in §4.6
}
DEFAULT_MODEL = "softmax"


def setting(default=MISSING, help: str = "", **checks):
    """A dataclass field with its command-line help and the checks ``field_problems`` applies to it:
    ``minimum`` (>=), ``maximum`` (<=), ``above`` (>), ``below`` (<), ``choices``, and ``why`` to explain a
    bound."""
    return field(default=default, metadata={"help": help, **checks})


def model_setting():
    """The ``model`` field, the same in every config that has one (training, tuning)."""
    return setting(DEFAULT_MODEL, f"The model: {', '.join(MODELS)} (pipeline/core/models.py; docs/models.md).",
                   choices=MODELS)


def field_problems(config) -> list[str]:
    """What is wrong with ``config``'s fields, by the checks each field declares; numbers must be finite
    and within float32."""
    problems = []
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        why = f" ({meta['why']})" if "why" in meta else ""
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            problems.append(f"{f.name} must be a finite number within float32's range, got {value}")
        elif "minimum" in meta and value < meta["minimum"]:
            problems.append(f"{f.name} must be >= {meta['minimum']}{why}, got {short_repr(value)}")
        elif "maximum" in meta and value > meta["maximum"]:
            problems.append(f"{f.name} must be <= {meta['maximum']}{why}, got {short_repr(value)}")
        elif "above" in meta and not value > meta["above"]:
            problems.append(f"{f.name} must be > {meta['above']}{why}, got {short_repr(value)}")
        elif "below" in meta and not value < meta["below"]:
            problems.append(f"{f.name} must be < {meta['below']}{why}, got {short_repr(value)}")
        elif "choices" in meta and value not in meta["choices"]:
            problems.append(f"{f.name} must be one of {', '.join(meta['choices'])}, got {short_repr(value)}")
    return problems


def check(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = setting("", "Folder with the four raw IDX files (.gz or not); empty: $FASHION_MNIST_DIR, "
                                "./data, the Debian package, then download. A relative path is taken from here.")
    val_size: int = setting(10_000, "Training images held out for validation (stratified).", minimum=1,
                            below=TRAIN_IMAGES)
    split_seed: int = setting(0, "Seeds the stratified train/validation split.")
    limit: int = setting(0, "Keep at most this many images per split (0 = all): quick smoke runs.", minimum=0,
                         why="0 means all images")

    def validate(self) -> None:
        check(field_problems(self))


MAX_HIDDEN_UNITS = 4096  # keeps a logged model well below what the loader accepts (safe_loading.MAX_MODEL_BYTES)


def settings_of_other_models(config, model: str) -> list[str]:
    """A problem for each setting of another model that ``config`` sets away from its default: it would
    not act for ``model``, and is refused rather than ignored."""
    own = set(MODELS[model].settings) if model in MODELS else set()
    problems = []
    for other, choice in MODELS.items():
        for name in choice.settings:
            f = config.__dataclass_fields__.get(name)
            if name not in own and f is not None and getattr(config, name) != f.default:
                problems.append(f"{name} is a setting of model {other}; model {model} has none: drop it, "
                                f"or pass --model {other}")
    return problems


def acting_settings(config) -> dict:
    """``config``'s fields as a dict, less the settings of models other than ``config.model`` (they do
    not act, so they are not logged)."""
    own = set(MODELS[config.model].settings)
    idle = {name for choice in MODELS.values() for name in choice.settings} - own
    return {k: v for k, v in asdict(config).items() if k not in idle}


@dataclass(frozen=True)
class TrainConfig:
    lr: float = setting(0.1, "SGD learning rate.", above=0)
    epochs: int = setting(10, "Maximum epochs (early stopping may stop sooner).", minimum=1)
    weight_decay: float = setting(0.0, "L2 penalty (SGD weight_decay).", minimum=0)
    batch_size: int = setting(256, "Images per SGD step.", minimum=1)
    patience: int = setting(5, "Stop after this many epochs without a better val accuracy; 0 = never.", minimum=0,
                            why="0 disables early stopping")
    seed: int = setting(0, "Seeds the initial weights and the batch order.")
    shuffle_offset: int = setting(0, "Start at this epoch of the seed's batch orders (a trial that joined a "
                                  "side-by-side stack late; 0 = from the first).", minimum=0)
    log_test_curve: bool = setting(False, "Also log test accuracy each epoch (the book's plot; never used to choose).")
    input_dropout: float = setting(0.0, "Fraction of input pixels dropped while training (overfitting remedy).",
                                   minimum=0, below=1)
    augment: bool = setting(False, "Random flips and shifts of whole batches (overfitting remedy).")
    keep_last: bool = setting(False, "Keep the last epoch's weights, not the best validation epoch's: training "
                                     "with no remedy at all (its best_* metrics are then the last epoch's).")
    model: str = model_setting()
    hidden_units: int = setting(256, "mlp: units of the hidden layer.", minimum=1, maximum=MAX_HIDDEN_UNITS)
    dropout: float = setting(0.0, "mlp: fraction of the hidden units dropped while training (d2l §4.6).",
                             minimum=0, below=1)

    def validate(self) -> None:
        problems = field_problems(self)
        check(problems or settings_of_other_models(self, self.model))


@dataclass(frozen=True)
class ThreadsConfig:
    """How many threads PyTorch uses, set once by each command that trains, at its start."""

    # One per process: a step of the softmax regression is some twenty tiny ops on a 784x10 matrix, which
    # more threads do not speed up, and threads that wait for each other run far slower when the cores are
    # shared (tune's workers, other processes). More cores pay through processes: tune --workers.
    threads: int = setting(1, "PyTorch threads of this process (and of each tune worker).", minimum=1)

    def validate(self) -> None:
        check(field_problems(self))


@dataclass(frozen=True)
class DataInput:
    data: str = setting("", "Prepared data: runs:/<id>/prepared or a folder; empty = prepare the default split.")


@dataclass(frozen=True)
class ModelInput:
    model_uri: str = setting(help="runs:/<id>/model, models:/<name>@<alias>, models:/<name>/<version>, "
                                  "models:/<model_id> or a model folder.")


@dataclass(frozen=True)
class ServeConfig:
    host: str = setting("127.0.0.1", "Address to listen on: 127.0.0.1 answers this machine only.")
    port: int = setting(5001, "Port to listen on.", minimum=1, below=65536)

    def validate(self) -> None:
        check(field_problems(self))


@dataclass(frozen=True)
class UiConfig:
    """Where the MLflow UI answers (``make ui``, ``make server``): the address the printed links open."""

    host: str = setting("127.0.0.1", "Address of the MLflow UI (make server HOST=...).")
    port: int = setting(5000, "Port of the MLflow UI (make server PORT=...).", minimum=1, below=65536)
    wait: int = setting(0, "Seconds to wait for the tracking server at MLFLOW_TRACKING_URI=http://... to "
                        "answer (make server starts it alongside).", minimum=0)

    def validate(self) -> None:
        check(field_problems(self))


# ---------------------------------------------------------------------------------------------------
# Tuning (pipeline/steps/tune.py)


def is_journal(url: str) -> bool:
    return url.startswith(JOURNAL_SCHEME) or ("://" not in url and url.endswith(JOURNAL_SUFFIXES))


def password_problem(name: str, url: str) -> str | None:
    """Why the storage URL of setting ``name`` is refused: it holds a password, which would be recorded in
    clear (every setting is an MLflow param, and ``mlflow run`` logs its -P values before a command starts).
    The database's own client reads the password from the environment or a file instead."""
    parts = urlsplit(url)
    if parts.password is None and not {"password", "passwd"} & {k.lower() for k in parse_qs(parts.query)}:
        return None
    return (f"{name} {printable_url(url)} holds a password, which would be recorded in clear with the run's "
            "settings: give the URL without it, and the password in PGPASSWORD or ~/.pgpass (PostgreSQL), or in "
            "a MySQL option file (?read_default_file=PATH)")


@dataclass(frozen=True)
class SearchSpace:
    """The ranges searched; learning rate and weight decay on a log scale."""

    lr_low: float = setting(1e-3, "Learning rate range (log scale).")
    lr_high: float = setting(1.0, "Upper end of the learning rate range.")
    epochs_low: int = setting(5, "Range of the maximum epochs of a trial (early stopping works inside it).")
    epochs_high: int = setting(100, "Upper end of the epochs range.")
    wd_low: float = setting(1e-6, "Weight decay range (log scale); 0 is always reachable as well.")
    wd_high: float = setting(1e-2, "Upper end of the weight decay range.")
    # searched only for the models that have them (ModelChoice.settings)
    hidden_units_low: int = setting(32, "mlp: hidden units range (log scale).", minimum=1, maximum=MAX_HIDDEN_UNITS)
    hidden_units_high: int = setting(1024, "mlp: upper end of the hidden units range.", minimum=1,
                                     maximum=MAX_HIDDEN_UNITS)
    dropout_low: float = setting(0.0, "mlp: dropout range.", minimum=0, below=1)
    dropout_high: float = setting(0.5, "mlp: upper end of the dropout range.", minimum=0, below=1)

    def validate(self) -> None:
        problems = field_problems(self)
        for name in ("hidden_units", "dropout"):
            low, high = getattr(self, f"{name}_low"), getattr(self, f"{name}_high")
            if low > high:
                problems.append(f"--{name.replace('_', '-')}-low {low} is above --{name.replace('_', '-')}-high {high}")
        for name, low, high in (("lr", self.lr_low, self.lr_high), ("wd", self.wd_low, self.wd_high)):
            if not (low > 0 and high > 0):
                problems.append(f"{name} bounds are searched on a log scale and must be > 0, got "
                                f"--{name}-low {low} --{name}-high {high}")
            elif low > high:
                problems.append(f"--{name}-low {low} is above --{name}-high {high}")
        if self.epochs_low < 1:
            problems.append(f"--epochs-low must be >= 1, got {self.epochs_low}")
        elif self.epochs_low > self.epochs_high:
            problems.append(f"--epochs-low {self.epochs_low} is above --epochs-high {self.epochs_high}")
        check(problems)


@dataclass(frozen=True)
class TuneConfig:
    model: str = model_setting()
    trials: int = setting(20, "Trials the study holds when done; its finished trials (earlier runs, other "
                              "machines) count.", minimum=1)
    workers: int = setting(1, "Processes on this machine working on the study.", minimum=1)
    storage: str = setting(DEFAULT_STORAGE, "Optuna storage: a database URL (sqlite:///optuna.db, "
                           "postgresql://user@host/db, its password in PGPASSWORD or ~/.pgpass, never in the URL) "
                           "or a journal file (journal:///optuna.log, *.log, *.journal).")
    study_name: str = setting("", "Created if new, resumed if it exists (never overwritten); empty: "
                              "fashion-mnist-<model>.")
    sampler: str = setting("tpe", "Optuna sampler.", choices=SAMPLERS)
    pruner: str = setting("median", "Stops unpromising trials early, from their per-epoch val accuracy.",
                          choices=PRUNERS)
    seed: int = setting(0, "Seeds the sampler and every trial's training.")
    # Longer than training's 5: SGD's val accuracy is noisy, and a short patience stops good trials while
    # their val accuracy is still climbing (docs/tuning.md)
    patience: int = setting(15, "Early stopping inside each trial; 0 = never.", minimum=0,
                            why="0 disables early stopping")
    batch_size: int = setting(256, "Images per SGD step in every trial.", minimum=1)
    # Stacked trials cost little more per epoch than one, so a study runs more trials per minute; a larger
    # K leaves more trials sampled and pruned before the first ones finish (docs/benchmarks.md measures both)
    side_by_side: int = setting(0, "Trials trained at once in each worker, as one stacked model on the same "
                                   "batches (each as it would train alone); 1 = one at a time; 0 = the model's own "
                                   "(softmax: 8; a model without stacked training: 1).", minimum=0,
                                why="0 takes the model's own")
    test_best: bool = setting(True, "Test the best trial's model and register it.")
    heartbeat_interval: int = setting(10, "Seconds; SQL storages only: a trial silent for 2 intervals is failed.",
                                      minimum=1)

    def resolved(self) -> "TuneConfig":
        """With the values the empty settings stand for: the study ``fashion-mnist-<model>``, and the
        model's own number of trials side by side."""
        own = MODELS[self.model].side_by_side if self.model in MODELS else 1  # (an unknown model: validate says)
        return replace(self, study_name=self.study_name or f"fashion-mnist-{self.model}",
                       side_by_side=self.side_by_side or own)

    def validate(self) -> None:
        problems = field_problems(self)
        if not problems and self.side_by_side > 1 and MODELS[self.model].side_by_side == 1:
            problems.append(f"side_by_side {self.side_by_side}: model {self.model} has no stacked training and "
                            "trains one trial at a time; pass --side-by-side 1 or leave it out")
        if secret := password_problem("storage", self.storage):
            problems.append(secret)
        elif not (is_journal(self.storage) or "://" in self.storage):
            problems.append(
                f"storage {short_repr(self.storage)} is neither a database URL (sqlite:///optuna.db, "
                "postgresql://user@host/db, mysql://user@host/db) nor a journal file "
                f"({JOURNAL_SCHEME}optuna.log, or a path ending in {' or '.join(JOURNAL_SUFFIXES)})")
        check(problems)


@dataclass(frozen=True)
class MainConfig:
    """``main``'s own settings; it also takes every DataConfig and TrainConfig setting."""

    trials: int = setting(20, "Optuna trials; 0 = train once with the train options (refused with a study, "
                              "which chooses lr, epochs and weight decay itself).", minimum=0)
    storage: str = setting(DEFAULT_STORAGE, "Optuna storage URL, as tune's (a relative sqlite or journal path is "
                                            "taken from here).")
    study_name: str = setting("", "Optuna study to create or resume; empty: one per prepared split.")
    force: bool = setting(False, "Re-run every step even if an identical finished run exists.")

    def validate(self) -> None:
        problems = field_problems(self)
        if secret := password_problem("storage", self.storage):
            problems.append(secret)
        check(problems)


# main's settings that act in one mode only. With trials > 0 the study chooses lr, epochs and weight
# decay and its trials use tune's patience; with trials = 0 no study runs. MLproject's main does not
# declare them, so `mlflow run` logs one only when it is given (-P), and main refuses one given in the
# mode where it would not act (pipeline.steps.main.refuse_idle_settings) instead of ignoring it.
MAIN_TRAIN_ONLY = ("lr", "epochs", "weight_decay", "patience", "shuffle_offset", "log_test_curve", "input_dropout",
                   "augment", "hidden_units", "dropout", "keep_last")
MAIN_STUDY_ONLY = ("storage", "study_name")


# ---------------------------------------------------------------------------------------------------
# Experiment files (pipeline/steps/experiment.py) and the stability experiment


@dataclass(frozen=True)
class ExperimentOptions:
    smoke: bool = setting(False, "Cap epochs, data, trials and steps for a quick check; the runs go to the "
                                 "experiment '<name>-smoke'.")
    max_runs: int = setting(1000, "Refuse a file whose grid and seeds make more runs than this (a typo in a grid "
                                  "can make millions); raise it to run a larger file.", minimum=1)

    def validate(self) -> None:
        check(field_problems(self))


@dataclass(frozen=True)
class StabilityConfig:
    images: int = setting(500, "Validation images whose logits are scaled.", minimum=1)
    scales: tuple[float, ...] = setting((1, 2, 5, 10, 20, 50, 100, 1000, 10000), "Logit scale factors.")
    fit_epochs: int = setting(2, "Seed-recipe epochs that produce realistic logits; 0 = a fresh model.", minimum=0)
    lr: float = setting(1.0, "The large learning rate of the side-by-side training (10x the seed recipe).", above=0)
    steps: int = setting(100, "SGD steps of the side-by-side training.", minimum=1)
    batch_size: int = setting(256, "Images per SGD step.", minimum=1)
    seed: int = setting(0, "Seeds the model and the batch order.")

    def validate(self) -> None:
        problems = field_problems(self)
        if not self.scales or not all(math.isfinite(s) and s > 0 for s in self.scales):
            problems.append(f"scales must be a non-empty list of positive numbers, got {short_repr(list(self.scales))}")
        check(problems)


@dataclass(frozen=True)
class ConvexConfig:
    """The convex optimum experiment (pipeline/steps/convex_optimum.py): full-batch L-BFGS per weight decay."""

    weight_decays: tuple[float, ...] = setting((1e-2, 1e-3, 1e-4, 1e-5, 1e-6), "Weight decays (SGD's convention: "
                                               "objective mean CE + wd/2 ||params||^2) whose optimum is computed.")
    max_iter: int = setting(4000, "L-BFGS iterations per weight decay, at most (each warm-starts from the nearest "
                            "stronger one solved).", minimum=1)
    tolerance: float = setting(1e-6, "An optimum counts (converged) once the objective's gradient norm is at "
                               "most this.", above=0)
    finer_per_decade: int = setting(3, "Then solve this many weight decays per decade between the grid's best and "
                                    "its neighbours (0 = none).", minimum=0, why="0 skips the finer pass")
    study_storage: str = setting(DEFAULT_STORAGE, "Optuna storage of the study to compare with.")
    study_name: str = setting("", "Optuna study whose best trial is compared with the optimum; empty = none.")

    def validate(self) -> None:
        problems = field_problems(self)
        if not self.weight_decays or not all(math.isfinite(w) and w >= 0 for w in self.weight_decays):
            problems.append("weight_decays must be a non-empty list of numbers >= 0, got "
                            f"{short_repr(list(self.weight_decays))}")
        elif len(set(self.weight_decays)) != len(self.weight_decays):
            problems.append(f"weight_decays lists a value twice: {short_repr(list(self.weight_decays))}")
        if secret := password_problem("study_storage", self.study_storage):
            problems.append(secret)
        check(problems)


def field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}
