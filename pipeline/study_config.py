"""The settings of studies and experiment files: the search space, ``tune``, ``main`` and the experiments'
own steps, as dataclasses checked like those in ``pipeline.config`` (same helpers: ``setting``, ``check``).

This module imports neither torch, MLflow nor Optuna: the CLI builds its options from these classes.
"""

import math
from dataclasses import dataclass, replace
from urllib.parse import parse_qs, urlsplit

from pipeline.config import (
    DEFAULT_STORAGE,
    JOURNAL_SCHEME,
    JOURNAL_SUFFIXES,
    MAX_HIDDEN_UNITS,
    MODELS,
    PRUNERS,
    SAMPLERS,
    check,
    field_problems,
    model_setting,
    setting,
)
from pipeline.errors import printable_url, short_repr

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


