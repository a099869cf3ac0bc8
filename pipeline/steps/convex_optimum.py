"""Step ``convex_optimum`` (run from experiment files): the model's own limit, and how close tuning came.

For each weight decay of the grid, ``pipeline.core.convex`` computes the exact optimum of the training
objective with full-batch L-BFGS; an optimum counts only when its gradient norm reached the tolerance
(``converged``). A finer pass then solves ``finer_per_decade`` weight decays per decade between the best
one and its neighbours, and the converged optimum with the best validation accuracy is chosen (test is
not looked at to choose): the model class's limit on this validation split. It is logged as a model and
evaluated on test like any other run (95% interval, per-image predictions). Then, if the file names an
Optuna study, its best trial's model is scored on the same validation and test images and compared: the
gaps, McNemar's paired test on test, and how many of its trials validate above the limit (a limit that a
trial beats is wrong: the grid is too coarse or the solves stopped short). A study trained on other data
is refused (its recorded value must match its model's accuracy on these images).

When no optimum converged, the best unconverged one is still evaluated, and the summary says that it is
not the limit. Logged per weight decay (step = its position, strongest first): ``convex_objective``,
``convex_gradient_norm``, ``convex_iterations``, ``convex_converged``, ``convex_train_accuracy``,
``convex_val_accuracy``; the table ``convex_optimum.csv``; the tag ``pipeline.val_digest`` (the split the
limit holds on: ``report`` flags runs above it); and the summary metrics named below.
"""

from dataclasses import asdict

import mlflow
import numpy as np
import optuna
import pandas as pd

from pipeline.config import DEFAULT_MODEL
from pipeline.core import convex
from pipeline.core.metrics import predict_logits
from pipeline.core.splits import Splits, array_digest
from pipeline.core.stats import above, accuracy_with_interval, format_interval, mcnemar
from pipeline.core.training import Tensors
from pipeline.errors import PipelineError
from pipeline.names import CONVEX_SUMMARY_TAG, CONVEX_TABLE, MODEL_URI_ATTR, STUDY_MODEL_ATTR, VAL_DIGEST_TAG
from pipeline.study_config import ConvexConfig, TuneConfig
from pipeline.tracking.evaluation import evaluate_on_test
from pipeline.tracking.logged_models import log_model
from pipeline.tracking.runs import log_new_params, log_series
from pipeline.tracking.safe_loading import load_model
from pipeline.tuning.storage import open_storage, printable_url


def load_study(cfg: ConvexConfig, missing_ok: bool = False) -> optuna.Study | None:
    """The named study, with a best trial that recorded its model (None without a study name, or when
    missing and ``missing_ok``)."""
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
    model = study.user_attrs.get(STUDY_MODEL_ATTR, DEFAULT_MODEL)
    if model != "softmax":  # the objective is convex in the weights of a linear model only
        raise PipelineError(f"study '{cfg.study_name}' tunes model {model}; the convex optimum exists for the "
                            "softmax regression only (its objective is convex): name a study of model softmax, "
                            "or set study_name: '' to skip the comparison")
    if MODEL_URI_ATTR not in best.user_attrs:
        raise PipelineError(f"trial {best.number} of study '{cfg.study_name}' recorded no model "
                            f"({MODEL_URI_ATTR}); only studies run by this project can be compared")
    return study


def optimum_table(optima: list[convex.Optimum], train64: tuple, val: tuple, grid: str) -> pd.DataFrame:
    """One row per optimum; ``train64`` is the training split in float64, as the optima were solved on;
    ``grid`` says which pass solved them."""
    (x64, y), (vx, vy) = train64, val
    vx64 = vx.double()  # once, not once per optimum
    return pd.DataFrame([{
        "weight_decay": o.weight_decay, "grid": grid, "objective": o.objective, "gradient_norm": o.gradient_norm,
        "iterations": o.iterations, "converged": o.converged,
        "train_accuracy": convex.accuracy(o.model, x64, y),
        "val_accuracy": convex.accuracy(o.model, vx64, vy)} for o in optima])


def choose(table: pd.DataFrame) -> int:
    """The row with the best validation accuracy among the converged ones (among all when none is), the
    strongest weight decay among equals."""
    candidates = table[table["converged"]] if table["converged"].any() else table
    best = candidates["val_accuracy"].max()
    return int(candidates[candidates["val_accuracy"] == best]["weight_decay"].idxmax())


def progress(optimum: convex.Optimum) -> None:
    state = "converged" if optimum.converged else "NOT converged"
    print(f"[convex_optimum] weight decay {optimum.weight_decay:.3g}: {state}, gradient norm "
          f"{optimum.gradient_norm:.1e} after {optimum.iterations} iterations", flush=True)


def solve_grids(cfg: ConvexConfig, x64, y, val) -> pd.DataFrame:
    """The grid's optima, then the finer pass's around the best, in one table (strongest first) with a
    column ``optimum`` holding the models."""
    coarse = convex.solve_path(x64, y, cfg.weight_decays, cfg.max_iter, cfg.tolerance, on_solved=progress)
    table = optimum_table(coarse, (x64, y), val, "grid").assign(optimum=coarse)
    best = table.loc[choose(table), "weight_decay"]
    finer = convex.finer_grid(cfg.weight_decays, best, cfg.finer_per_decade)
    refined = convex.solve_path(x64, y, finer, cfg.max_iter, cfg.tolerance, solved=coarse, on_solved=progress)
    table = pd.concat([table, optimum_table(refined, (x64, y), val, "finer").assign(optimum=refined)])
    return table.sort_values("weight_decay", ascending=False).reset_index(drop=True)


def run_convex_optimum(cfg: ConvexConfig, splits: Splits, tensors: Tensors | None = None,
                       missing_study_ok: bool = False) -> dict:
    """Compute the optima, choose by validation accuracy, evaluate on test, compare with the study."""
    cfg.validate()
    study = load_study(cfg, missing_study_ok)  # a missing study fails before minutes of L-BFGS
    tensors = tensors or Tensors.from_splits(splits)
    log_new_params({**asdict(cfg), "weight_decays": ",".join(f"{w:g}" for w in cfg.weight_decays)})
    mlflow.set_tag(VAL_DIGEST_TAG, array_digest(splits.val_x, splits.val_y))  # the split the limit holds on
    x, y = tensors.train_pixels()  # L-BFGS takes the whole split at once, in float64
    x64 = x.double()
    solved = solve_grids(cfg, x64, y, tensors.val)
    table = solved.drop(columns="optimum")
    log_series(table.drop(columns=["weight_decay", "grid"]).astype(float).add_prefix("convex_"),
                        steps=table.index)
    mlflow.log_text(table.to_csv(index=False), CONVEX_TABLE)
    chosen = table.loc[choose(table)]
    model = solved.loc[chosen.name, "optimum"].model.float()  # the project's models compute in float32
    model_info = log_model(model, splits.val_x[:4], step=0)
    test = evaluate_on_test(model_info.model_uri, splits, model)
    summary = {"optimum_weight_decay": chosen["weight_decay"], "optimum_val_accuracy": chosen["val_accuracy"],
               "optimum_test_accuracy": test["test_accuracy"], "optimum_converged": float(chosen["converged"])}
    lines = [optimum_line(cfg, chosen, test)] + doubts(cfg, table, chosen)
    if study is not None:
        comparison, line = compare_with_study(cfg, study, splits, chosen, test)
        summary.update(comparison)
        lines.append(line)
    elif cfg.study_name:
        lines.append(f"no study '{cfg.study_name}' to compare with (smoke run)")
    mlflow.log_metrics(summary)
    mlflow.set_tag(CONVEX_SUMMARY_TAG, "; ".join(lines))
    print("\n".join(f"[convex_optimum] {line}" for line in lines))
    return {"table": table, "summary": summary, "model_uri": model_info.model_uri, "lines": lines}


def optimum_line(cfg: ConvexConfig, chosen: pd.Series, test: dict) -> str:
    """The chosen optimum in words: the limit when it converged, and plainly not the limit otherwise."""
    tested = (f"weight decay {chosen['weight_decay']:.3g}, val {chosen['val_accuracy']:.4f}, test "
              f"{format_interval(test)} (gradient norm {chosen['gradient_norm']:.1e} after "
              f"{chosen['iterations']} L-BFGS iterations)")
    if chosen["converged"]:
        return f"the model class's limit: {tested}"
    return (f"NOT CONVERGED, no limit: no weight decay's gradient norm reached the tolerance {cfg.tolerance:g} "
            f"within max_iter={cfg.max_iter} (raise max_iter); the best unconverged one: {tested}")


def doubts(cfg: ConvexConfig, table: pd.DataFrame, chosen: pd.Series) -> list[str]:
    """What makes the limit doubtful: unconverged weight decays that validate higher, a best at the grid's end."""
    lines = []
    if chosen["converged"]:
        higher = table[~table["converged"] & (table["val_accuracy"] > chosen["val_accuracy"])]
        lines += [f"weight decay {row.weight_decay:.3g} did not converge (gradient norm {row.gradient_norm:.1e}) and "
                  f"already validates higher ({row.val_accuracy:.4f}): the limit may be higher; raise max_iter"
                  for row in higher.itertuples()]
    grid = sorted(cfg.weight_decays)
    if len(grid) > 1 and chosen["weight_decay"] in (grid[0], grid[-1]):
        lines.append(f"the chosen weight decay {chosen['weight_decay']:.3g} is at the end of the grid: the best may "
                     "lie beyond it; extend weight_decays")
    return lines


def compare_with_study(cfg: ConvexConfig, study: optuna.Study, splits: Splits, chosen: pd.Series,
                       test: dict) -> tuple[dict, str]:
    """The best trial's model on the same validation and test images as the optimum, the gaps, and the
    study's trials that validate above the limit."""
    trial = study.best_trial
    model = load_model(trial.user_attrs[MODEL_URI_ATTR])
    val_accuracy = float(np.mean(predict_logits(model, splits.val_x).argmax(1).numpy() == splits.val_y))
    if abs(val_accuracy - trial.value) > 1e-6:
        raise PipelineError(f"study '{cfg.study_name}' recorded val accuracy {trial.value:.4f} for trial "
                            f"{trial.number}, but its model scores {val_accuracy:.4f} on these validation images: "
                            "the study ran on other data; compare with a study on the same prepare settings")
    predicted = predict_logits(model, splits.test_x).argmax(1).numpy()
    study_test = accuracy_with_interval(splits.test_y, predicted)
    paired = mcnemar(splits.test_y, test["predictions"], predicted)
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    beating = [t for t in finished if above(t.value, chosen["val_accuracy"])] if chosen["converged"] else []
    comparison = {"study_best_val_accuracy": val_accuracy, "study_best_test_accuracy": study_test["test_accuracy"],
                  "study_best_test_accuracy_ci_low": study_test["test_accuracy_ci_low"],
                  "study_best_test_accuracy_ci_high": study_test["test_accuracy_ci_high"],
                  "val_gap": chosen["val_accuracy"] - val_accuracy,
                  "test_gap": test["test_accuracy"] - study_test["test_accuracy"],
                  "test_gap_p_value": paired.p_value}
    if chosen["converged"]:
        comparison["study_trials_above_limit"] = len(beating)
    limit = "the model class is the limit" if chosen["converged"] else "the optimum did not converge"
    verdict = ("tuning left accuracy on the table" if paired.significant and paired.only_a > paired.only_b else
               "the tuned model is better than the optimum" if paired.significant else
               f"no significant difference ({limit})")
    line = (f"study '{cfg.study_name}' best trial {trial.number} ({trial_settings(trial)}): "
            f"val {val_accuracy:.4f}, test {format_interval(study_test)}; optimum - study: val "
            f"{comparison['val_gap']:+.4f}, test {comparison['test_gap']:+.4f} (McNemar: "
            f"{paired.only_a} test images only the optimum gets right, {paired.only_b} only the trial, "
            f"p={paired.p_value:.2g}): {verdict}")
    if beating:
        line += (f"; {len(beating)} of its {len(finished)} finished trials validate above the limit (trials "
                 f"{', '.join(str(t.number) for t in beating)}): the limit is wrong (a solve stopped short or the "
                 "grid is too coarse)")
    elif chosen["converged"]:
        line += f"; none of its {len(finished)} finished trials validates above the limit"
    return comparison, line


def trial_settings(trial) -> str:
    """The trial's sampled settings that acted: a weight decay sampled but switched off is left out."""
    params = {k: v for k, v in trial.params.items() if not isinstance(v, bool)}
    if trial.params.get("use_weight_decay") is False:
        params.pop("weight_decay", None)
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
