"""Training with MLflow around it: the settings as params, one metrics call per epoch, the curves, the model.

The loop itself is plain PyTorch (``pipeline.core.training.fit``). The ``train`` command, Optuna's trials
and experiment files all train through ``train`` here, so every training run logs the same things.
"""


import mlflow
from tqdm import tqdm

from pipeline.config import MODELS, TrainConfig, acting_settings
from pipeline.core import figures
from pipeline.core.models import build_model, parameter_count
from pipeline.core.splits import Splits
from pipeline.core.training import DivergedError, FitResult, Tensors, fit
from pipeline.names import CURVES_FIGURE, FAILURE_TAG, MODEL_URI_TAG, PARAMETER_COUNT, STOPPED_EARLY_TAG, VAL_DIGEST_TAG
from pipeline.runtime.signals import held_during_write
from pipeline.tracking.datasets import log_datasets, split_digest
from pipeline.tracking.logged_models import log_model, model_name
from pipeline.tracking.runs import log_epoch, log_new_params


def train(cfg: TrainConfig, splits: Splits, tensors: Tensors | None = None,
          progress: bool = True, on_epoch=None) -> tuple[FitResult, object]:
    """Train the model ``cfg`` names with ``cfg`` and log params, curves, best epoch and the model.

    ``on_epoch`` lets a caller (Optuna's pruner) see each epoch after it is logged. Returns the fit
    result and MLflow's ModelInfo. A diverging run is tagged with the reason and raises, so the run
    ends FAILED with a clear message.
    """
    tensors = tensors or Tensors.from_splits(splits)
    log_training_inputs(cfg, splits)
    bar = tqdm(total=cfg.epochs, desc="train", unit="epoch", disable=not progress, leave=False)

    def after_epoch(metrics: dict) -> None:
        # synchronous, so that a crash loses no finished epoch
        with held_during_write():  # Ctrl-C comes after the write, not inside its sqlite transaction
            log_epoch(metrics)
        bar.update()
        bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k in ("train_loss", "val_accuracy")})
        if on_epoch is not None:
            on_epoch(metrics)

    try:
        result = fit(build_model(cfg), tensors, cfg, on_epoch=after_epoch)
    except DivergedError as e:
        log_epoch(e.metrics)  # the NaN/inf epoch shows in the curves too
        mlflow.set_tag(FAILURE_TAG, e.message)
        raise
    finally:
        bar.close()
    return result, log_fit_result(result, splits, cfg)


def log_training_inputs(cfg: TrainConfig, splits: Splits) -> None:
    """Before training, on the active run: the settings, the model's size, and the data it learns from and
    chooses by."""
    log_new_params({**acting_settings(cfg), PARAMETER_COUNT: parameter_count(build_model(cfg))})
    # the validation split that chooses the best epoch: the registry compares only models chosen on the same one
    mlflow.set_tag(VAL_DIGEST_TAG, split_digest(splits, "val"))
    log_datasets(splits, which=("train", "val"))  # what this run learnt from and chose its epoch by


def log_fit_result(result: FitResult, splits: Splits, cfg: TrainConfig):
    """After training, on the active run: the curves figure, the best epoch's model and the summary.

    Trials trained side by side (``pipeline.tuning.stacked_trials``) log through here too.
    """
    mlflow.log_figure(figures.training_curves(result.history, MODELS[cfg.model].title, kept_epoch=result.best_epoch),
                      CURVES_FIGURE)
    result.model.eval()  # exported as it predicts: dropout off
    model_info = log_model(result.model, splits.val_x[:4], step=result.best_epoch, name=model_name(cfg),
                           family=cfg.model)
    summary = {"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy,
               "epochs_run": len(result.history)}
    mlflow.log_metrics(summary, model_id=model_info.model_id)
    mlflow.set_tags({STOPPED_EARLY_TAG: result.stopped_early, MODEL_URI_TAG: model_info.model_uri})
    return model_info
