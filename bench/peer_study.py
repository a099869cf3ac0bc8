"""The peer of ``tune``: the same study written as optuna-examples' ``pytorch/pytorch_simple.py`` writes it.

That example trains on Fashion-MNIST as well: a torch ``DataLoader`` per split, an ``objective(trial)`` that
builds the model, trains it epoch by epoch and reports each epoch's validation accuracy to the pruner, and
``study.optimize`` running one trial at a time. Its MLflow variant logs each trial with
``optuna_integration.MLflowCallback``: one MLflow run per trial, with the trial's parameters and its value.

What is changed so that like is compared with like (``bench/peer.py`` runs this against ``tune``):

- the data: a ``TensorDataset`` over the same prepared train/validation split that ``tune`` reads
  (``--data``), pixels in [0, 1] as torchvision's ``ToTensor`` gives, not the example's small subset;
- the model: the book's softmax regression (one linear layer, weights drawn from N(0, 0.01)) and SGD, with
  the search space of ``tune``'s default (learning rate, epochs, weight decay:
  ``pipeline.tuning.search.suggest_params``), the same batch size, the same sampler kind, the same pruner;
- the threads: the number each ``tune`` process trains with, so that both use the machine alike;
- the logging: ``MLflowCallback`` is deprecated in Optuna 5 (removed in 6), so ``log_trial`` below does by
  hand what it did after each trial: a run named after the trial's number in an experiment named after the
  study, the trial's parameters, its value and its state.

As in the example, the study lives in memory and a trial's value is its last epoch's validation accuracy.
Run: ``python -m bench.peer_study --data <prepared dir> --trials 100 --seed 0``; prints one JSON line.
"""

import json

import click
import mlflow
import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config import ThreadsConfig
from pipeline.core.splits import Splits, to_tensor
from pipeline.study_config import SearchSpace, TuneConfig
from pipeline.tuning.search import make_pruner, suggest_params


def get_loaders(data: str, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """The example's ``get_mnist``, over the prepared split: shuffled training batches, then validation."""
    splits = Splits.load(data)
    train = TensorDataset(to_tensor(splits.train_x), torch.from_numpy(splits.train_y))
    valid = TensorDataset(to_tensor(splits.val_x), torch.from_numpy(splits.val_y))
    return (DataLoader(train, batch_size=batch_size, shuffle=True),
            DataLoader(valid, batch_size=batch_size, shuffle=False))


def define_model() -> nn.Module:
    """The book's softmax regression: flatten, one linear layer, weights from N(0, 0.01)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    nn.init.normal_(model[1].weight, std=0.01)
    nn.init.zeros_(model[1].bias)
    return model


def make_objective(train_loader: DataLoader, valid_loader: DataLoader, space: SearchSpace):
    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, space)
        model = define_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
        loss_fn = nn.CrossEntropyLoss()
        for epoch in range(params["epochs"]):
            model.train()
            for data, target in train_loader:
                optimizer.zero_grad()
                loss_fn(model(data), target).backward()
                optimizer.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for data, target in valid_loader:
                    correct += (model(data).argmax(dim=1) == target).sum().item()
            accuracy = correct / len(valid_loader.dataset)
            trial.report(accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return accuracy

    return objective


def log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """After each trial, what ``MLflowCallback(metric_name="val_accuracy")`` logged: one run per trial."""
    mlflow.set_experiment(study.study_name)
    with mlflow.start_run(run_name=str(trial.number)):
        if trial.value is not None:  # a pruned trial has no value
            mlflow.log_metric("val_accuracy", trial.value)
        mlflow.log_params(trial.params)
        mlflow.set_tags({"number": str(trial.number), "state": trial.state.name,
                         "datetime_start": str(trial.datetime_start),
                         "datetime_complete": str(trial.datetime_complete), "direction": "MAXIMIZE"})


@click.command()
@click.option("--data", required=True, help="Folder (or file) of the prepared split, as `tune --data` reads it.")
@click.option("--trials", type=int, default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sampler and the weights.")
@click.option("--epochs-low", type=int, default=SearchSpace().epochs_low, show_default=True)
@click.option("--epochs-high", type=int, default=SearchSpace().epochs_high, show_default=True)
def main(data, trials, seed, epochs_low, epochs_high):
    torch.set_num_threads(ThreadsConfig().threads)
    torch.manual_seed(seed)
    space = SearchSpace(epochs_low=epochs_low, epochs_high=epochs_high)
    train_loader, valid_loader = get_loaders(data, TuneConfig().batch_size)
    study = optuna.create_study(study_name="peer", direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=make_pruner(TuneConfig().pruner, space))
    study.optimize(make_objective(train_loader, valid_loader, space), n_trials=trials, callbacks=[log_trial])
    states = [t.state for t in study.trials]
    logged = len(mlflow.search_runs(experiment_names=[study.study_name]))
    print(json.dumps({"best_val_accuracy": study.best_value, "mlflow_runs": logged,
                      "completed": states.count(optuna.trial.TrialState.COMPLETE),
                      "pruned": states.count(optuna.trial.TrialState.PRUNED)}))


if __name__ == "__main__":
    main()
