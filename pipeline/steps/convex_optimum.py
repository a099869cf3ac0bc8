"""Step ``convex_optimum`` (run from experiment files): the model's own limit, and how close tuning came.

For each weight decay of the grid, ``pipeline.core.convex`` computes the exact optimum of the training
objective with full-batch L-BFGS; the optimum with the best validation accuracy is chosen (test is not
looked at to choose), logged as a model and evaluated on test like any other run (95% interval,
per-image predictions). Then, if the file names an Optuna study, its best trial's model is scored on the
same validation and test images and compared: the gaps, and McNemar's paired test on test. A study
trained on other data is refused (its recorded value must match its model's accuracy on these images).

Logged per weight decay (step = its position, strongest first): ``convex_objective``,
``convex_gradient_norm``, ``convex_iterations``, ``convex_train_accuracy``, ``convex_val_accuracy``;
the table ``convex_optimum.csv``; and the summary metrics named in ``compare_with_study``.
"""

from dataclasses import asdict

import mlflow
import numpy as np
import optuna
import pandas as pd

from pipeline.config import ConvexConfig, TuneConfig
from pipeline.core import convex
from pipeline.core.metrics import predict_logits
from pipeline.core.splits import Splits
from pipeline.core.stats import accuracy_with_interval, format_interval, mcnemar
from pipeline.core.training import Tensors
from pipeline.errors import PipelineError
from pipeline.names import CONVEX_SUMMARY_TAG, CONVEX_TABLE, MODEL_URI_ATTR
from pipeline.tracking.evaluation import evaluate_on_test
from pipeline.tracking.logged_models import log_model
from pipeline.tracking.runs import log_new_params, log_series
from pipeline.tracking.safe_loading import load_model
from pipeline.tuning.storage import open_storage, printable_url


def load_best_trial(cfg: ConvexConfig, missing_ok: bool = False) -> optuna.trial.FrozenTrial | None:
    """The named study's best trial (None without a study name, or when missing and ``missing_ok``)."""
    if not cfg.study_name:
        return None
    storage = open_storage(TuneConfig(storage=cfg.study_storage))
    try:
        study = optuna.load_study(study_name=cfg.study_name, storage=storage)
        best = study.best_trial
    except KeyError:
        if missing_ok:
            return None
        raise PipelineError(f"no Optuna study '{cfg.study_name}' in {printable_url(cfg.study_storage)}; run "
                            "the study first (e.g. experiments/tune_softmax.yaml) or set study_name: '' to skip "
                            "the comparison")
    except ValueError:  # best_trial of a study without a finished trial
        raise PipelineError(f"study '{cfg.study_name}' has no finished trial to compare with yet")
    if MODEL_URI_ATTR not in best.user_attrs:
        raise PipelineError(f"trial {best.number} of study '{cfg.study_name}' recorded no model "
                            f"({MODEL_URI_ATTR}); only studies run by this project can be compared")
    return best


def optimum_table(optima: list[convex.Optimum], train64: tuple, val: tuple) -> pd.DataFrame:
    """One row per optimum; ``train64`` is the training split in float64, as the optima were solved on."""
    (x64, y), (vx, vy) = train64, val
    vx64 = vx.double()  # once, not once per optimum
    return pd.DataFrame([{
        "weight_decay": o.weight_decay, "objective": o.objective, "gradient_norm": o.gradient_norm,
        "iterations": o.iterations, "converged": o.converged,
        "train_accuracy": convex.accuracy(o.model, x64, y),
        "val_accuracy": convex.accuracy(o.model, vx64, vy)} for o in optima])


def run_convex_optimum(cfg: ConvexConfig, splits: Splits, tensors: Tensors | None = None,
                       missing_study_ok: bool = False) -> dict:
    """Compute the optima, choose by validation accuracy, evaluate on test, compare with the study."""
    cfg.validate()
    best_trial = load_best_trial(cfg, missing_study_ok)  # a missing study fails before minutes of L-BFGS
    tensors = tensors or Tensors.from_splits(splits)
    log_new_params({**asdict(cfg), "weight_decays": ",".join(f"{w:g}" for w in cfg.weight_decays)})
    x, y = tensors.train_pixels()  # L-BFGS takes the whole split at once, in float64
    x64 = x.double()
    optima = convex.solve_path(x64, y, cfg.weight_decays, cfg.max_iter, cfg.tolerance)
    table = optimum_table(optima, (x64, y), tensors.val)
    log_series(table.drop(columns="weight_decay").astype(float).add_prefix("convex_"), steps=table.index)
    mlflow.log_text(table.to_csv(index=False), CONVEX_TABLE)
    chosen = int(table["val_accuracy"].idxmax())  # the first (strongest decay) among equals
    model = optima[chosen].model.float()  # the project's models compute in float32
    model_info = log_model(model, splits.val_x[:4], step=0)
    test = evaluate_on_test(model_info.model_uri, splits, model)
    summary = {"optimum_weight_decay": table.loc[chosen, "weight_decay"],
               "optimum_val_accuracy": table.loc[chosen, "val_accuracy"],
               "optimum_test_accuracy": test["test_accuracy"],
               "optimum_converged": float(table.loc[chosen, "converged"])}
    lines = [f"optimum: weight decay {summary['optimum_weight_decay']:g}, val {summary['optimum_val_accuracy']:.4f}, "
             f"test {format_interval(test)}"
             f" (gradient norm {table.loc[chosen, 'gradient_norm']:.1e} after {table.loc[chosen, 'iterations']} "
             "L-BFGS iterations)"]
    if best_trial is not None:
        comparison, line = compare_with_study(cfg, best_trial, splits, summary, test["predictions"])
        summary.update(comparison)
        lines.append(line)
    elif cfg.study_name:
        lines.append(f"no study '{cfg.study_name}' to compare with (smoke run)")
    mlflow.log_metrics(summary)
    mlflow.set_tag(CONVEX_SUMMARY_TAG, "; ".join(lines))
    print("\n".join(f"[convex_optimum] {line}" for line in lines))
    return {"table": table, "summary": summary, "model_uri": model_info.model_uri, "lines": lines}


def compare_with_study(cfg: ConvexConfig, trial, splits: Splits, summary: dict,
                       optimum_predictions: np.ndarray) -> tuple[dict, str]:
    """The best trial's model on the same validation and test images as the optimum, and the gaps."""
    model = load_model(trial.user_attrs[MODEL_URI_ATTR])
    val_accuracy = float(np.mean(predict_logits(model, splits.val_x).argmax(1).numpy() == splits.val_y))
    if abs(val_accuracy - trial.value) > 1e-6:
        raise PipelineError(f"study '{cfg.study_name}' recorded val accuracy {trial.value:.4f} for trial "
                            f"{trial.number}, but its model scores {val_accuracy:.4f} on these validation images: "
                            "the study ran on other data; compare with a study on the same prepare settings")
    predicted = predict_logits(model, splits.test_x).argmax(1).numpy()
    test = accuracy_with_interval(splits.test_y, predicted)
    paired = mcnemar(splits.test_y, optimum_predictions, predicted)
    comparison = {"study_best_val_accuracy": val_accuracy, "study_best_test_accuracy": test["test_accuracy"],
                  "study_best_test_accuracy_ci_low": test["test_accuracy_ci_low"],
                  "study_best_test_accuracy_ci_high": test["test_accuracy_ci_high"],
                  "val_gap": summary["optimum_val_accuracy"] - val_accuracy,
                  "test_gap": summary["optimum_test_accuracy"] - test["test_accuracy"],
                  "test_gap_p_value": paired.p_value}
    verdict = ("tuning left accuracy on the table" if paired.significant and paired.only_a > paired.only_b else
               "the tuned model is better than the optimum" if paired.significant else
               "no significant difference: the model class is the limit")
    line = (f"study '{cfg.study_name}' best trial {trial.number} ({trial_settings(trial)}): "
            f"val {val_accuracy:.4f}, test {format_interval(test)}; "
            f"optimum - study: val {comparison['val_gap']:+.4f}, test {comparison['test_gap']:+.4f} (McNemar: "
            f"{paired.only_a} test images only the optimum gets right, {paired.only_b} only the trial, "
            f"p={paired.p_value:.2g}): {verdict}")
    return comparison, line


def trial_settings(trial) -> str:
    """The trial's sampled settings that acted: a weight decay sampled but switched off is left out."""
    params = {k: v for k, v in trial.params.items() if not isinstance(v, bool)}
    if trial.params.get("use_weight_decay") is False:
        params.pop("weight_decay", None)
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
