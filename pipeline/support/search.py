"""The Optuna search: the space of learning rate, epochs and weight decay, samplers and pruners.

Weight decay and zero: Optuna's log-uniform range cannot contain 0, so every trial draws two parameters,
``use_weight_decay`` (True/False) and ``weight_decay`` (log-uniform), and trains with
``weight_decay if use_weight_decay else 0``. Both are drawn in every trial, not one inside the other,
so that parameter importances and the parallel-coordinate plot see them in every trial.
"""

import warnings

import optuna

from pipeline.config import SearchSpace, TrainConfig


def seed_recipe_params(space: SearchSpace) -> dict:
    """The book's recipe (TrainConfig's defaults) as trial parameters: the study's first trial."""
    seed = TrainConfig()
    return {"lr": seed.lr, "epochs": seed.epochs, "use_weight_decay": seed.weight_decay > 0,
            "weight_decay": seed.weight_decay or space.wd_low}  # unused while use_weight_decay is False


def suggest_params(trial: optuna.Trial, space: SearchSpace) -> dict:
    """Draw one trial's hyperparameters; returns the values training uses."""
    lr = trial.suggest_float("lr", space.lr_low, space.lr_high, log=True)
    epochs = trial.suggest_int("epochs", space.epochs_low, space.epochs_high)
    use_weight_decay = trial.suggest_categorical("use_weight_decay", [False, True])
    weight_decay = trial.suggest_float("weight_decay", space.wd_low, space.wd_high, log=True)
    return {"lr": lr, "epochs": epochs, "weight_decay": weight_decay if use_weight_decay else 0.0}


def training_params(params: dict) -> dict:
    """What a finished trial trained with, from its Optuna parameters."""
    return {"lr": params["lr"], "epochs": params["epochs"],
            "weight_decay": params["weight_decay"] if params["use_weight_decay"] else 0.0}


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(name: str, space: SearchSpace) -> optuna.pruners.BasePruner:
    if name == "median":
        # Compare trials only after a few epochs: a small learning rate starts slowly but may end best.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=space.epochs_high)
    return optuna.pruners.NopPruner()
