"""What ``main``'s run records about the model it delivers: the settings that trained it, read from the
run that trained it (the train step's run, or a study's best trial), never from main's own options."""

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from pipeline.config import TrainConfig, field_names
from pipeline.names import BEST_RUN_TAG, DELIVERED_PREFIX, DELIVERED_RUN_TAG, VAL_DIGEST_TAG


def training_run(model_run: Run) -> Run:
    """The run that trained the model: ``model_run`` itself (train), or the best trial's run (tune)."""
    best_run_id = model_run.data.tags.get(BEST_RUN_TAG)
    return MlflowClient().get_run(best_run_id) if best_run_id else model_run


def record_delivered(model_run: Run) -> dict:
    """Log the delivered model's training settings on the active run as ``delivered_<setting>`` params.

    Returns what main needs besides: the best epoch and the digest of the validation split that chose
    it. A study's best trial trained with its own lr, epochs and weight decay, which main's options
    never set, so they are read from the trial's run.
    """
    trained = training_run(model_run)
    settings = {k: v for k, v in trained.data.params.items() if k in field_names(TrainConfig)}
    digest = trained.data.tags[VAL_DIGEST_TAG]
    mlflow.log_params({DELIVERED_PREFIX + k: v for k, v in settings.items()})
    mlflow.set_tag(DELIVERED_RUN_TAG, trained.info.run_id)
    return {"best_epoch": trained.data.metrics["best_epoch"], "val_digest": digest}
