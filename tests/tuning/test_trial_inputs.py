"""Every trial's run records the data it learnt from and chose by, however it ended: completed, pruned by a
real Optuna pruner or diverged, trained side by side or one at a time (real sqlite stores)."""

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from pipeline.core.splits import array_digest
from pipeline.core.training import Tensors
from pipeline.names import RUN_ID_ATTR, VAL_DIGEST_TAG
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tuning.stacked_trials import work_side_by_side
from pipeline.tuning.storage import open_storage
from pipeline.tuning.trial_state import Heartbeats, Worker
from pipeline.tuning.trials import work_one_at_a_time

SPACE = SearchSpace(lr_low=0.01, lr_high=1e38, epochs_low=1, epochs_high=4)
# One trial of each ending: it completes (one epoch, before the pruner looks), it diverges (loss NaN at
# epoch 1), it is pruned at epoch 2 (the pruner stops any trial below accuracy 1.0 from there)
TRIALS = [{"lr": 0.1, "epochs": 1, "use_weight_decay": False},
          {"lr": 1e38, "epochs": 2, "use_weight_decay": False},
          {"lr": 0.1, "epochs": 4, "use_weight_decay": False}]
ENDINGS = [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]


def study_of_three(splits, tmp_path, side_by_side: int) -> optuna.Study:
    cfg = TuneConfig(trials=3, storage=f"sqlite:///{tmp_path / f'optuna-{side_by_side}.db'}", study_name="s",
                     test_best=False, patience=0, side_by_side=side_by_side)
    storage = open_storage(cfg)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=1.0, n_warmup_steps=2))
    for params in TRIALS:
        study.enqueue_trial(params)
    with mlflow.start_run() as parent, Heartbeats(storage, cfg.heartbeat_interval) as heartbeats:
        worker = Worker(study, storage, cfg, SPACE, splits, Tensors.from_splits(splits), parent.info,
                        lambda: None, heartbeats)
        (work_side_by_side if side_by_side > 1 else work_one_at_a_time)(worker)
    return study


def inputs_of(trial) -> dict:
    """What the trial's run records of its data: its dataset inputs and the validation digest."""
    run = mlflow.get_run(trial.user_attrs[RUN_ID_ATTR])
    datasets = {(d.dataset.name, d.dataset.digest, tuple(t.value for t in d.tags))
                for d in run.inputs.dataset_inputs}
    return {"datasets": datasets, "val_digest": run.data.tags.get(VAL_DIGEST_TAG)}


@pytest.mark.slow
def test_pruned_and_diverged_trials_record_their_data_side_by_side_as_alone(data_slice, mlflow_store, tmp_path):
    splits, _ = data_slice
    together = study_of_three(splits, tmp_path, side_by_side=3)
    alone = study_of_three(splits, tmp_path, side_by_side=1)

    for study in (together, alone):
        assert [t.state for t in study.trials] == ENDINGS
    expected = {"datasets": {("fashion-mnist-train", array_digest(*splits.arrays("train")), ("training",)),
                             ("fashion-mnist-val", array_digest(*splits.arrays("val")), ("validation",))},
                "val_digest": array_digest(splits.val_x, splits.val_y)}
    for ours, theirs in zip(together.trials, alone.trials):
        assert inputs_of(ours) == expected == inputs_of(theirs), ours.state
