"""Every setting of the pipeline, written once: name, type, default and help.

Each command's options are generated from these dataclasses (``pipeline.cli.options_from``), and a test
checks every MLproject entry point against them, so a setting added here shows up everywhere. The
defaults are the book's seed recipe (d2l §3.7): SGD, lr 0.1, batch 256, 10 epochs.
This module imports neither torch, MLflow nor Optuna: the ``main`` process reads it without them.
"""

import math
from dataclasses import MISSING, asdict, dataclass, field, fields

from pipeline.errors import short_repr
from pipeline.faults import HTTP_RETRIES, HTTP_TIMEOUT

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


def field_names(cls) -> set[str]:
    return {f.name for f in fields(cls)}
