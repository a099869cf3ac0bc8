"""The Optuna search: the space of learning rate, epochs, weight decay and the model's own settings, samplers
and pruners.

Weight decay and zero: Optuna's log-uniform range cannot contain 0, so every trial draws
``use_weight_decay`` (True/False), and only a trial that drew True draws ``weight_decay`` (log-uniform).
The study then records what each trial trained with: a trial without weight decay has no
``weight_decay`` parameter, rather than a value it never used (figures show it only for trials that
used it).
"""

import hashlib
import warnings

import optuna

from pipeline.config import DEFAULT_MODEL, MODELS, TrainConfig
from pipeline.study_config import SearchSpace, TuneConfig

# How tune draws each model's own settings (config.MODELS), for the models that have them
MODEL_SETTINGS = {
    "hidden_units": lambda trial, space: trial.suggest_int("hidden_units", space.hidden_units_low,
                                                           space.hidden_units_high, log=True),
    "dropout": lambda trial, space: trial.suggest_float("dropout", space.dropout_low, space.dropout_high),
}


def seed_recipe_params(space: SearchSpace, model: str = DEFAULT_MODEL) -> dict:
    """The book's recipe (TrainConfig's defaults) as trial parameters: the study's first trial.

    Its epochs are capped to the space's ``epochs_high``: a study searching at most 2 epochs (a smoke
    run) must not spend 10 on its first trial.
    """
    seed = TrainConfig()
    params = {"lr": seed.lr, "epochs": min(seed.epochs, space.epochs_high), "use_weight_decay": seed.weight_decay > 0}
    if seed.weight_decay > 0:
        params["weight_decay"] = seed.weight_decay
    # the model's own settings, each held within the space's range as epochs are
    own = {name: min(max(getattr(seed, name), getattr(space, f"{name}_low")), getattr(space, f"{name}_high"))
           for name in MODELS[model].settings}
    return {**params, **own}


def suggest_params(trial: optuna.Trial, space: SearchSpace, model: str = DEFAULT_MODEL) -> dict:
    """Draw one trial's hyperparameters, the model's own settings among them; returns the values training
    uses."""
    lr = trial.suggest_float("lr", space.lr_low, space.lr_high, log=True)
    epochs = trial.suggest_int("epochs", space.epochs_low, space.epochs_high)
    use_weight_decay = trial.suggest_categorical("use_weight_decay", [False, True])
    weight_decay = 0.0
    if use_weight_decay:  # drawn only when used, so the study records what the trial trained with
        weight_decay = trial.suggest_float("weight_decay", space.wd_low, space.wd_high, log=True)
    own = {name: MODEL_SETTINGS[name](trial, space) for name in MODELS[model].settings}
    return {"lr": lr, "epochs": epochs, "weight_decay": weight_decay, **own}


def training_params(params: dict) -> dict:
    """What a finished trial trained with, from its Optuna parameters (``weight_decay`` is drawn only by
    the trials that use it; a model's own settings only for that model)."""
    own = {name: params[name] for name in MODEL_SETTINGS if name in params}
    return {"lr": params["lr"], "epochs": params["epochs"], "weight_decay": params.get("weight_decay", 0.0), **own}


def sampler_for(cfg: TuneConfig, key: str) -> optuna.samplers.BaseSampler:
    """A fresh ``cfg.sampler`` whose seed comes from the study's seed and ``key``."""
    digest = hashlib.sha256(f"{cfg.seed}/{key}".encode()).digest()
    return make_sampler(cfg.sampler, int.from_bytes(digest[:4], "big"))


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
