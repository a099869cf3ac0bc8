"""The seed model and loss against PyTorch's own functions, training, early stopping, reproducibility."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainConfig
from pipeline.core.models import build_model
from pipeline.core.splits import pixels
from pipeline.core.training import DivergedError, Tensors, fit, score


@pytest.fixture(scope="module")
def tensors(data_slice):
    return Tensors.from_splits(data_slice[0])


def test_model_is_the_books_seed_model():
    model = build_model(TrainConfig())
    assert [type(m) for m in model] == [nn.Flatten, nn.Linear]
    assert model[1].in_features == 784 and model[1].out_features == 10
    # weights ~ N(0, 0.01^2): 7,840 draws pin the std down to about 1%
    assert model[1].weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert model[1].weight.mean().abs().item() < 0.001
    torch.testing.assert_close(build_model(TrainConfig())[1].weight, model[1].weight)
    assert not torch.equal(build_model(TrainConfig(seed=1))[1].weight, model[1].weight)


def test_forward_and_loss_match_pytorch_functions():
    model = build_model(TrainConfig())
    x = torch.rand(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    logits = model(x)
    torch.testing.assert_close(logits, F.linear(x.reshape(16, -1), model[1].weight, model[1].bias))
    # the loss the training uses == mean negative log of softmax probability of the true class
    expected = -F.log_softmax(logits, dim=1).gather(1, y[:, None]).mean()
    torch.testing.assert_close(nn.CrossEntropyLoss()(logits, y), expected)


def test_pixels_are_scaled_like_to_tensor(data_slice):
    from PIL import Image
    from torchvision.transforms import ToTensor

    splits = data_slice[0]
    tensors = Tensors.from_splits(splits)
    assert tensors.train[0].dtype == torch.uint8  # held as bytes, made pixels a batch at a time
    ours = tensors.train_pixels()[0][:3]
    theirs = torch.stack([ToTensor()(Image.fromarray(img)) for img in splits.train_x[:3]])
    assert torch.equal(ours, theirs)  # bit for bit: training by batches sees exactly ToTensor's pixels
    with pytest.raises(TypeError, match="uint8"):
        pixels(ours)  # pixels already in [0, 1] are refused, not shrunk 255-fold


def test_training_learns_and_is_reproducible(tensors):
    cfg = TrainConfig(epochs=3)
    first = fit(build_model(cfg), tensors, cfg)
    again = fit(build_model(cfg), tensors, cfg)
    assert first.history == again.history  # same seed, same inputs: identical metrics
    assert first.best_val_accuracy > 0.6  # 2,000 real images, 3 epochs: well above chance (0.1)
    other = fit(build_model(TrainConfig(seed=1)), tensors, TrainConfig(epochs=3, seed=1))
    assert other.history != first.history


def test_early_stopping_keeps_the_best_epochs_weights(tensors):
    # lr 5 makes SGD bounce around, so val accuracy soon stops improving
    cfg = TrainConfig(lr=5.0, epochs=40, patience=2)
    result = fit(build_model(TrainConfig()), tensors, cfg)
    val_accs = [m["val_accuracy"] for m in result.history]
    assert result.stopped_early and len(val_accs) == result.best_epoch + cfg.patience < cfg.epochs
    assert result.best_val_accuracy == max(val_accs) == val_accs[result.best_epoch - 1]
    # the returned model is the best epoch's, not the last epoch's
    assert score(result.model, *tensors.val)[1] == pytest.approx(result.best_val_accuracy)
    assert val_accs[-1] < result.best_val_accuracy


def test_patience_zero_runs_every_epoch(tensors):
    result = fit(build_model(TrainConfig()), tensors, TrainConfig(lr=5.0, epochs=6, patience=0))
    assert len(result.history) == 6 and not result.stopped_early


def test_test_curve_only_when_asked(tensors):
    assert "test_accuracy" not in fit(build_model(TrainConfig()), tensors, TrainConfig(epochs=1)).history[0]
    with_curve = TrainConfig(epochs=1, log_test_curve=True)
    assert "test_accuracy" in fit(build_model(TrainConfig()), tensors, with_curve).history[0]


def test_diverging_loss_raises(tensors):
    with pytest.raises(DivergedError, match="diverged at epoch 1.*lower the learning rate"):
        fit(build_model(TrainConfig()), tensors, TrainConfig(lr=1e38, epochs=3))


@pytest.mark.parametrize("field, value", [("lr", 0.0), ("epochs", 0), ("batch_size", 0),
                                          ("weight_decay", -1e-3), ("patience", -1)])
def test_invalid_config_is_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value}).validate()


def test_remedies_change_training(tensors):
    base = fit(build_model(TrainConfig()), tensors, TrainConfig(epochs=2)).history
    for cfg in (TrainConfig(epochs=2, input_dropout=0.2), TrainConfig(epochs=2, augment=True),
                TrainConfig(epochs=2, weight_decay=1e-2)):
        history = fit(build_model(TrainConfig()), tensors, cfg).history
        assert history != base and np.isfinite(history[-1]["train_loss"])
        assert history == fit(build_model(TrainConfig()), tensors, cfg).history  # still reproducible


def test_keep_last_delivers_the_last_epoch_not_the_best(tensors):
    cfg = TrainConfig(lr=10.0, epochs=6, patience=0)  # so large a step overshoots: the last epoch is not the best
    best = fit(build_model(cfg), tensors, cfg)
    last = fit(build_model(cfg), tensors, replace(cfg, keep_last=True))
    assert best.history == last.history  # the same training, only another epoch kept
    assert best.best_epoch < 6 and (last.best_epoch, last.best_val_accuracy) == (6, last.history[-1]["val_accuracy"])
    assert score(last.model, *tensors.val)[1] == last.history[-1]["val_accuracy"]
    assert score(best.model, *tensors.val)[1] == best.best_val_accuracy
