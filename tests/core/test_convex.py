"""The convex optimum: the same objective as SGD's weight decay, truly optimal, and compared with a real study.

Oracles: torch.optim.SGD (what weight_decay means), torch.autograd on a separately written objective
(the gradient at the optimum), SGD's own training (the optimum's objective can only be lower), and the
study's own trial models and Optuna records in a real sqlite storage.
"""

import textwrap

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from pipeline.config import DataConfig, TrainConfig
from pipeline.core import convex
from pipeline.core.metrics import predict_logits
from pipeline.core.models import build_model
from pipeline.core.splits import array_digest, prepare_splits
from pipeline.core.stats import accuracy_with_interval
from pipeline.core.training import Tensors, fit
from pipeline.errors import PipelineError
from pipeline.experiment_files.spec import load_spec
from pipeline.names import CONVEX_SUMMARY_TAG, CONVEX_TABLE, MODEL_URI_ATTR, VAL_DIGEST_TAG
from pipeline.steps.convex_optimum import choose, doubts, optimum_line, optimum_table
from pipeline.steps.experiment import run_experiment
from pipeline.study_config import ConvexConfig
from pipeline.tracking.safe_loading import load_model

WD = 1e-3


@pytest.fixture(scope="module")
def slice_tensors(real_slice):
    return Tensors.from_splits(real_slice[0])


def test_the_objective_is_what_sgd_weight_decay_minimises():
    """One SGD step with weight_decay=wd on plain cross-entropy = one gradient step on our objective."""
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (64,))
    sgd_model, ours = convex.zero_model(), convex.zero_model()
    for p in sgd_model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    ours.load_state_dict(sgd_model.state_dict())
    optimizer = torch.optim.SGD(sgd_model.parameters(), lr=0.5, weight_decay=WD)
    F.cross_entropy(sgd_model(x), y).backward()
    optimizer.step()
    grads = torch.autograd.grad(convex.objective(ours, x, y, WD), list(ours.parameters()))
    with torch.no_grad():
        for p, g in zip(ours.parameters(), grads):
            p -= 0.5 * g
    for a, b in zip(sgd_model.parameters(), ours.parameters()):  # biases are decayed too
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_lbfgs_finds_the_optimum_and_beats_sgd(slice_tensors):
    x, y = slice_tensors.train_pixels()
    x64 = x.double()
    start_norm = convex.gradient_norm(convex.zero_model(), x64, y, WD)
    optimum = convex.solve(x64, y, WD, max_iter=600, tolerance=1e-5)

    # the oracle gradient: the objective written out here, differentiated by torch.autograd
    model = optimum.model
    weight, bias = model[1].weight, model[1].bias
    loss = F.cross_entropy(x64.flatten(1) @ weight.T + bias, y) + WD / 2 * (weight.pow(2).sum() + bias.pow(2).sum())
    grads = torch.autograd.grad(loss, [weight, bias])
    norm = torch.cat([g.flatten() for g in grads]).norm().item()
    assert norm <= 1e-5 and optimum.converged and norm < start_norm * 1e-4
    assert optimum.objective == pytest.approx(loss.item(), rel=1e-12)

    # SGD with the same weight decay, trained for real, ends with a higher objective
    sgd = build_model(TrainConfig())
    fit(sgd, slice_tensors, TrainConfig(lr=0.1, epochs=20, weight_decay=WD, patience=0))
    sgd64 = convex.zero_model()
    sgd64.load_state_dict({k: v.double() for k, v in sgd.state_dict().items()})
    with torch.no_grad():
        sgd_objective = convex.objective(sgd64, x64, y, WD).item()
    assert optimum.objective <= sgd_objective


@pytest.mark.slow
def test_the_solve_reaches_a_tight_tolerance_and_leaves_the_thread_count_alone(slice_tensors):
    """Near the optimum the mean loss's curvature pairs fall below torch's fixed s.y threshold: L-BFGS
    must still reach 1e-8 (the oracle: autograd on the objective written out here), well within its cap."""
    x, y = slice_tensors.train_pixels()
    x64 = x.double()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # a count the solver has no reason to choose
    try:
        optimum = convex.solve(x64, y, 1e-2, max_iter=300, tolerance=1e-8)
        assert torch.get_num_threads() == threads + 1  # the command's business, not the solver's
    finally:
        torch.set_num_threads(threads)
    weight, bias = optimum.model[1].weight, optimum.model[1].bias
    loss = F.cross_entropy(x64.flatten(1) @ weight.T + bias, y) + 1e-2 / 2 * (weight.pow(2).sum() + bias.pow(2).sum())
    grads = torch.autograd.grad(loss, [weight, bias])
    norm = torch.cat([g.flatten() for g in grads]).norm().item()
    assert optimum.converged and norm <= 1e-8 and optimum.gradient_norm == pytest.approx(norm, rel=1e-6)
    assert optimum.iterations < 300


@pytest.mark.slow
def test_a_capped_solve_is_not_converged_and_never_the_limit(slice_tensors):
    """Stopped early, L-BFGS regularises like early stopping and can validate higher than a true optimum:
    it is reported as not converged, and the converged optimum is chosen all the same."""
    x, y = slice_tensors.train_pixels()
    x64 = x.double()
    converged = convex.solve(x64, y, 1e-2, max_iter=300, tolerance=1e-6)
    capped = convex.solve(x64, y, 1e-3, max_iter=40, tolerance=1e-6)
    assert converged.converged and not capped.converged and capped.iterations == 40
    assert capped.gradient_norm > 1e-6
    table = optimum_table([converged, capped], (x64, y), slice_tensors.val, "grid")
    assert table.loc[1, "val_accuracy"] > table.loc[0, "val_accuracy"]  # the trap: the capped one looks better
    chosen = table.loc[choose(table)]
    assert chosen["weight_decay"] == 1e-2 and chosen["converged"]
    cfg = ConvexConfig(weight_decays=(1e-2, 1e-3), max_iter=40, tolerance=1e-6)
    unconverged, edge = doubts(cfg, table, chosen)
    assert unconverged.startswith("weight decay 0.001 did not converge") and "raise max_iter" in unconverged
    assert edge.startswith("the chosen weight decay 0.01 is at the end of the grid")  # the stronger side is unknown

    # with no converged optimum, the best unconverged one is chosen, and plainly not called the limit
    table = optimum_table([capped], (x64, y), slice_tensors.val, "grid")
    chosen = table.loc[choose(table)]
    test_x, test_y = slice_tensors.test
    test = accuracy_with_interval(test_y.numpy(), capped.model(test_x.double()).argmax(1).numpy())
    line = optimum_line(cfg, chosen, test)
    assert line.startswith("NOT CONVERGED, no limit") and "the model class's limit" not in line


def test_the_finer_grid_has_three_points_a_decade_around_the_best():
    grid = [1e-2, 1e-3, 1e-4, 1e-5]
    # the oracle: numpy's log-spaced grid, 3 to a decade, from the best's weaker to its stronger neighbour
    expected = [w for w in np.logspace(-4, -2, 7)[1:-1] if not np.isclose(w, 1e-3)]  # new ones only
    np.testing.assert_allclose(sorted(convex.finer_grid(grid, 1e-3, 3)), expected, rtol=1e-12)
    # at the grid's end, only the side inside it; uneven neighbours get as many points as they need
    np.testing.assert_allclose(sorted(convex.finer_grid(grid, 1e-2, 3)), np.logspace(-3, -2, 4)[1:-1], rtol=1e-12)
    np.testing.assert_allclose(sorted(convex.finer_grid([1e-1, 1e-3], 1e-1, 3)), np.logspace(-3, -1, 7)[1:-1],
                               rtol=1e-12)
    assert convex.finer_grid(grid, 1e-3, 0) == [] and convex.finer_grid([0.0, 1e-3], 0.0, 3) == []


@pytest.mark.slow
def test_the_path_is_solved_strongest_decay_first(slice_tensors):
    x, y = slice_tensors.train_pixels()
    optima = convex.solve_path(x.double(), y, [1e-4, 1e-2, 1e-3], max_iter=300, tolerance=1e-6)
    assert [o.weight_decay for o in optima] == [1e-2, 1e-3, 1e-4]
    # a weaker penalty fits the training data at least as well
    train = [convex.accuracy(o.model, x.double(), y) for o in optima]
    assert train[0] <= train[1] <= train[2]


def test_bad_weight_decays_are_refused():
    for bad in [(), (1e-3, -1.0), (1e-3, 1e-3)]:
        with pytest.raises(ValueError, match="weight_decays"):
            ConvexConfig(weight_decays=bad).validate()


TUNE = """
    experiment: small-tune
    entry_point: tune
    data: {{limit: {limit}}}
    study: {{study_name: small, trials: 2, epochs_low: 1, epochs_high: 2, patience: 0, test_best: false,
             storage: "sqlite:///optuna.db"}}
"""
CONVEX = """
    experiment: small-convex
    entry_point: convex_optimum
    data: {{limit: {limit}}}
    params: {{weight_decays: [1.0e-1, 1.0e-2, 1.0e-3], max_iter: 300, study_name: small,
              study_storage: "sqlite:///optuna.db"}}
"""


def run_file(tmp_path, name, text, limit):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text.format(limit=limit)))
    return run_experiment(load_spec(path))


@pytest.mark.slow
def test_the_optimum_against_a_real_study(tmp_path, mlflow_store, real_data_dir):
    run_file(tmp_path, "tune", TUNE, 400)
    result = run_file(tmp_path, "convex", CONVEX, 400)
    (run_id,) = result["run_ids"]
    run = MlflowClient().get_run(run_id)
    metrics = run.data.metrics
    assert run.info.status == "FINISHED"

    best = optuna.load_study(study_name="small", storage="sqlite:///optuna.db").best_trial
    splits = prepare_splits(DataConfig(limit=400))[0]
    trial_model = load_model(best.user_attrs[MODEL_URI_ATTR])
    trial_test = float(np.mean(predict_logits(trial_model, splits.test_x).argmax(1).numpy() == splits.test_y))
    assert metrics["study_best_val_accuracy"] == pytest.approx(best.value)
    assert metrics["study_best_test_accuracy"] == pytest.approx(trial_test)
    # the chosen optimum is the logged model; its accuracies and the gaps are recomputed from it
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    (model_info,) = [m for m in logged if m.source_run_id == run_id]
    chosen = load_model(f"models:/{model_info.model_id}")
    val = float(np.mean(predict_logits(chosen, splits.val_x).argmax(1).numpy() == splits.val_y))
    test = float(np.mean(predict_logits(chosen, splits.test_x).argmax(1).numpy() == splits.test_y))
    assert metrics["optimum_val_accuracy"] == pytest.approx(val)
    assert metrics["optimum_test_accuracy"] == pytest.approx(test) == metrics["test_accuracy"]
    assert metrics["val_gap"] == pytest.approx(val - best.value)
    assert metrics["test_gap"] == pytest.approx(test - trial_test)
    history = MlflowClient().get_metric_history(run_id, "convex_val_accuracy")
    assert metrics["optimum_val_accuracy"] == max(m.value for m in history)  # chosen by validation
    assert f"study 'small' best trial {best.number}" in run.data.tags[CONVEX_SUMMARY_TAG]

    # every optimum converged, so the chosen one is the limit; the finer pass put 3 weight decays a decade
    # between the best of the grid and its neighbours
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CONVEX_TABLE))
    assert table["converged"].all() and (table["gradient_norm"] <= ConvexConfig().tolerance).all()
    assert metrics["optimum_converged"] == 1
    assert "the model class's limit: weight decay" in run.data.tags[CONVEX_SUMMARY_TAG]
    grid = table[table["grid"] == "grid"]
    best_wd = grid.loc[grid["val_accuracy"].idxmax(), "weight_decay"]
    decays = table["weight_decay"]
    around = np.log10(decays[(decays >= best_wd / 10) & (decays <= best_wd * 10)])
    assert len(around) >= 5 and (np.abs(np.diff(around)) <= 1 / 3 + 1e-9).all()
    # the limit holds on this validation split, and the study's trials above it are counted (oracle: Optuna)
    assert run.data.tags[VAL_DIGEST_TAG] == array_digest(splits.val_x, splits.val_y)
    finished = optuna.load_study(study_name="small", storage="sqlite:///optuna.db").get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    assert metrics["study_trials_above_limit"] == sum(t.value > val + 1e-6 for t in finished)

    # a study on other data (400 images per split, here 401) is refused, and the run ends FAILED
    with pytest.raises(PipelineError, match="the study ran on other data"):
        run_file(tmp_path, "convex", CONVEX, 401)
    # and a study that does not exist, before any L-BFGS
    with pytest.raises(PipelineError, match="no Optuna study 'missing'"):
        run_file(tmp_path, "convex", CONVEX.replace("study_name: small", "study_name: missing"), 400)
    runs = MlflowClient().search_runs([run.info.experiment_id], "attributes.run_name = 'convex'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED", "FINISHED"]
