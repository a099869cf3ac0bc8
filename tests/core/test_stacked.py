"""Models trained side by side: K models as one stacked layer, each exactly as it would train alone.

The oracle is ``pipeline.core.training.fit`` (torch.optim.SGD on one nn.Linear): a model trained side by
side with others must give the same per-epoch metrics and weights as the same model trained alone, up to
float rounding (one (10K)x784 matrix product sums in another order than K 10x784 ones).
"""


import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.core.models import build_model
from pipeline.core.stacked import fit_stacked
from pipeline.core.training import DivergedError, fit

# lr differs by 10x and more, weight decay on and off: the per-model parts of the SGD step are exercised
CONFIGS = [TrainConfig(lr=0.1, epochs=3, patience=0),
           TrainConfig(lr=0.5, weight_decay=1e-3, epochs=3, patience=0),
           TrainConfig(lr=0.01, weight_decay=1e-2, epochs=2, patience=0)]


def assert_same_training(side_by_side, alone) -> None:
    """Same epochs, metrics and best epoch, weights equal to float tolerance."""
    assert len(side_by_side.history) == len(alone.history)
    for ours, theirs in zip(side_by_side.history, alone.history):
        assert ours.keys() == theirs.keys() and ours["epoch"] == theirs["epoch"]
        for name in ("train_loss", "val_loss"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-3), name
        for name in ("train_accuracy", "val_accuracy"):  # a flipped borderline image or two at most
            assert ours[name] == pytest.approx(theirs[name], abs=2e-3), name
    assert side_by_side.best_epoch == alone.best_epoch
    assert side_by_side.stopped_early == alone.stopped_early
    for ours, theirs in zip(side_by_side.model.state_dict().values(), alone.model.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)


def test_each_model_trains_as_it_would_alone(tensors):
    ends = []
    outcomes = fit_stacked(CONFIGS, tensors, on_end=lambda i, outcome: ends.append((i, len(outcome.history))))
    for cfg, outcome in zip(CONFIGS, outcomes):
        assert_same_training(outcome, fit(build_model(cfg), tensors, cfg))
    # the 2-epoch model finished (and was handed over) while the others still trained
    assert ends == [(2, 2), (0, 3), (1, 3)]
    assert type(outcomes[0].model) is type(build_model(TrainConfig()))  # what tracking.log_model logs for a trial


def test_a_stopped_model_drops_out_and_the_others_go_on(tensors):
    """``on_epoch`` raising (Optuna's pruner) stops that model only; early stopping likewise."""
    class Pruned(Exception):
        pass

    def prune_the_first_at_epoch_2(i, metrics):
        if i == 0 and metrics["epoch"] == 2:
            raise Pruned()

    patient = TrainConfig(lr=0.5, epochs=6, patience=1)  # stops at the first epoch without a better val accuracy
    cfgs = [CONFIGS[0], CONFIGS[1], patient]
    outcomes = fit_stacked(cfgs, tensors, on_epoch=prune_the_first_at_epoch_2)
    assert isinstance(outcomes[0], Pruned)
    assert_same_training(outcomes[1], fit(build_model(TrainConfig()), tensors, cfgs[1]))
    alone = fit(build_model(TrainConfig()), tensors, patient)
    assert_same_training(outcomes[2], alone)
    assert len(alone.history) == len(outcomes[2].history) < 6 and outcomes[2].stopped_early


def test_a_diverging_model_fails_alone(tensors):
    huge = TrainConfig(lr=1e38, epochs=3, patience=0)  # the loss becomes NaN in the first epoch
    outcomes = fit_stacked([CONFIGS[0], huge, CONFIGS[1]], tensors)
    with pytest.raises(DivergedError, match="training diverged at epoch 1"):
        fit(build_model(TrainConfig()), tensors, huge)
    assert isinstance(outcomes[1], DivergedError) and outcomes[1].epoch == 1
    for i in (0, 2):  # its NaNs stayed in its own rows
        assert_same_training(outcomes[i], fit(build_model(TrainConfig()), tensors, [CONFIGS[0], huge, CONFIGS[1]][i]))


def test_a_newcomer_takes_a_finished_models_place_and_trains_as_it_would_alone(tensors):
    """``refill``: when a model stops, a new one joins at the next epoch, where the batch orders are;
    trained alone with the ``shuffle_offset`` it records, it gives the same result."""
    joined_at = []

    def refill(epochs_drawn):
        joined_at.append(epochs_drawn)
        if len(joined_at) > 1:
            return None
        return TrainConfig(lr=0.3, weight_decay=1e-4, epochs=2, patience=0, shuffle_offset=epochs_drawn)

    ends = []
    outcomes = fit_stacked(CONFIGS, tensors, on_end=lambda i, outcome: ends.append(i), refill=refill)
    assert ends == [2, 0, 1, 3] and joined_at[0] == 2  # it joined after the 2-epoch model ended, at epoch 3
    assert len(outcomes) == 4
    for cfg, outcome in zip(CONFIGS, outcomes):
        assert_same_training(outcome, fit(build_model(cfg), tensors, cfg))
    late = TrainConfig(lr=0.3, weight_decay=1e-4, epochs=2, patience=0, shuffle_offset=2)
    assert_same_training(outcomes[3], fit(build_model(TrainConfig()), tensors, late))
    # the offset acts: from the first orders the same model ends elsewhere
    from_start = fit(build_model(TrainConfig()), tensors, TrainConfig(lr=0.3, weight_decay=1e-4, epochs=2, patience=0))
    assert from_start.history[0]["train_loss"] != pytest.approx(outcomes[3].history[0]["train_loss"], rel=1e-3)


def test_a_newcomer_that_does_not_record_where_it_joins_is_refused(tensors):
    with pytest.raises(ValueError, match="must have shuffle_offset 2, got 0"):
        fit_stacked(CONFIGS, tensors, refill=lambda epochs_drawn: TrainConfig(epochs=1))


@pytest.mark.parametrize("other, message", [(TrainConfig(batch_size=64), "one batch size and one seed"),
                                            (TrainConfig(seed=1), "one batch size and one seed"),
                                            (TrainConfig(augment=True), "neither input_dropout nor augment")])
def test_models_that_cannot_share_batches_are_refused(other, message):
    with pytest.raises(ValueError, match=message):
        fit_stacked([TrainConfig(), other], data=None)


