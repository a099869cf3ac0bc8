"""What a finished study leaves on its parent MLflow run: the trials table, figures and the best trial."""

from collections import Counter

import mlflow
import optuna
import pandas as pd
from optuna.trial import TrialState

from pipeline.core import figures
from pipeline.core.stats import format_interval
from pipeline.errors import PipelineError
from pipeline.names import (
    BEST_MODEL_TAG,
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    MODEL_URI_ATTR,
    RUN_ID_ATTR,
    STUDY_BEST_MODEL_ATTR,
    STUDY_FOLDER,
)
from pipeline.tracking.experiments import study_filter
from pipeline.tuning.search import training_params

SEARCHED = ["lr", "epochs", "weight_decay", "hidden_units", "dropout"]  # the figures show those the study drew
LOG_SCALE = {"lr", "weight_decay", "hidden_units"}


def log_trials_table(study: optuna.Study) -> None:
    """Every trial as a row: params, value, state, duration, MLflow run id (CSV and an MLflow table)."""
    table = study.trials_dataframe()
    for column in table.columns:  # timestamps and durations as text, which JSON can hold
        if table[column].dtype.kind in "mM":
            table[column] = table[column].astype(str)
    mlflow.log_table(table, artifact_file=f"{STUDY_FOLDER}/trials.json")
    mlflow.log_text(table.to_csv(index=False), f"{STUDY_FOLDER}/trials.csv")


def log_figures(study: optuna.Study) -> None:
    """The study's figures as PNGs under study/; importances need two finished trials, else are skipped."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return
    finished = pd.DataFrame([{"number": t.number, "value": t.value,
                              **{k: v for k, v in t.params.items() if k in SEARCHED}} for t in complete])
    curves = {t.number: t.intermediate_values for t in study.get_trials(deepcopy=False) if t.intermediate_values}
    searched = [p for p in SEARCHED if p in finished]
    drawn = {"optimization_history": figures.optimization_history(finished),
             "intermediate_values": figures.intermediate_values(curves),
             "slice": figures.param_slices(finished, searched, LOG_SCALE),
             "parallel_coordinate": figures.parallel_coordinate(finished, searched, LOG_SCALE)}
    if len(complete) >= 2:
        try:
            drawn["param_importances"] = figures.param_importances(optuna.importance.get_param_importances(study))
        except (ValueError, RuntimeError) as e:  # e.g. every trial drew the same value
            print(f"tune: figure param_importances skipped: {e}")
    for name, figure in drawn.items():
        mlflow.log_figure(figure, f"{STUDY_FOLDER}/{name}.png")


def record_best(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """Log the best trial on the parent run and return it."""
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    mlflow.log_metrics({f"trials_{state}": n for state, n in counts.items()})
    try:
        best = study.best_trial
    except ValueError:
        raise PipelineError(f"no trial of study {study.study_name!r} completed ({counts}); see the "
                            "failure reasons in the trials table, then widen or move the search space")
    model_uri = best.user_attrs[MODEL_URI_ATTR]
    study.set_user_attr(STUDY_BEST_MODEL_ATTR, model_uri)
    mlflow.log_params({f"best_{k}": v for k, v in training_params(best.params).items()})
    mlflow.log_metric("best_val_accuracy", best.value)
    mlflow.set_tags({BEST_MODEL_TAG: model_uri, BEST_TRIAL_TAG: best.number,
                     BEST_RUN_TAG: best.user_attrs[RUN_ID_ATTR]})
    return best


def describe(study: optuna.Study, tested: dict | None, runs_url: str) -> str:
    """The study's summary for the terminal: its size, its best trial, that trial's test accuracy and the
    registry's decision (``tested``: ``final_test``'s result, None if the best was not tested), and
    where its runs are in the MLflow UI."""
    best = study.best_trial
    params = ", ".join(f"{k} {v:.4g}" for k, v in training_params(best.params).items())
    states = Counter(t.state.name.lower() for t in study.trials)  # e.g. a killed trial shows as failed
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    lines = [f"study {study.study_name!r}: {len(study.trials)} trials ({counts})",
             f"best trial {best.number}: val accuracy {best.value:.4f} with {params}",
             f"  model {best.user_attrs[MODEL_URI_ATTR]}"]
    if tested is None:
        lines.append("  not tested or registered here (--test-best false)")
    else:
        decision = tested["registry"]
        verdict = "promoted" if decision["promoted"] else "not promoted"
        lines += [f"  test accuracy {format_interval(tested)}",
                  f"  registry: {decision['model_name']} version {decision['version']} {verdict}: "
                  f"{decision['reason']}"]
    lines += [f"runs: {runs_url}", f"  (search: {study_filter(study.study_name)})"]
    return "\n".join(lines)
