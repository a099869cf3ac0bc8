"""Evaluation, registry aliases and predict, on models trained on a slice of the real data."""

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient
from PIL import Image
from scipy.stats import binomtest

from pipeline.cli import cli
from pipeline.config import CLASS_NAMES, TrainConfig
from pipeline.core.metrics import predict_logits
from pipeline.core.splits import array_digest
from pipeline.names import CHAMPION, MODEL_NAME
from pipeline.tracking.evaluation import evaluate_on_test
from pipeline.tracking.registry import promote_if_better
from pipeline.tracking.training import train


def train_model(splits, **cfg):
    with mlflow.start_run():
        result, info = train(TrainConfig(**cfg), splits, progress=False)
    return result, info


@pytest.fixture
def trained(mlflow_store, data_slice):
    return train_model(data_slice[0], epochs=3)


def test_evaluate_on_test_logs_metrics_table_and_figures(trained, data_slice):
    splits = data_slice[0]
    result, info = trained
    with mlflow.start_run() as run:
        evaluation = evaluate_on_test(info.model_uri, splits)
    # oracle: the in-memory model's own predictions
    expected_pred = predict_logits(result.model, splits.test_x).argmax(1).numpy()
    np.testing.assert_array_equal(evaluation["predictions"], expected_pred)
    assert evaluation["test_accuracy"] == pytest.approx((expected_pred == splits.test_y).mean())
    table = evaluation["per_class"]
    assert list(table["class"]) == list(CLASS_NAMES) and table["support"].sum() == len(splits.test_y)
    for c in range(10):
        recall = (expected_pred[splits.test_y == c] == c).mean()
        precision = (splits.test_y[expected_pred == c] == c).mean() if (expected_pred == c).any() else 0.0
        assert table["recall"][c] == pytest.approx(recall) and table["precision"][c] == pytest.approx(precision)
    client = MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"per_class.json", "per_class.csv", "confusion_matrix.png", "confident_mistakes.png"} <= artifacts
    assert client.get_run(run.info.run_id).data.metrics["test_accuracy"] == pytest.approx(evaluation["test_accuracy"])
    # linked to the logged model: the UI shows test accuracy beside it
    model_metrics = {m.key: m.value for m in mlflow.get_logged_model(info.model_id).metrics}
    assert model_metrics["test_accuracy"] == pytest.approx(evaluation["test_accuracy"])
    # the 95% interval: scipy's Wilson interval of the counted accuracy, on the run and printed by the CLI
    correct = int((expected_pred == splits.test_y).sum())
    ci = binomtest(correct, len(splits.test_y)).proportion_ci(method="wilson")
    metrics = client.get_run(run.info.run_id).data.metrics
    assert (metrics["test_accuracy_ci_low"], metrics["test_accuracy_ci_high"]) == pytest.approx((ci.low, ci.high))
    # the per-image predictions, for paired tests, and which test images they are for
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="test_predictions.npz")
    with np.load(path) as saved:
        np.testing.assert_array_equal(saved["predicted"], expected_pred)
        np.testing.assert_array_equal(saved["labels"], splits.test_y)
    digest = client.get_run(run.info.run_id).data.tags["pipeline.test_digest"]
    assert digest == array_digest(splits.test_x, splits.test_y)


def test_evaluate_command_prints_the_interval(trained, data_slice):
    _, info = trained
    result = CliRunner().invoke(cli, ["evaluate", "--model-uri", info.model_uri, "--data", str(data_slice[1])])
    assert result.exit_code == 0, result.output
    accuracy = float(result.output.split("test accuracy ")[1].split()[0])
    correct = round(accuracy * len(data_slice[0].test_y))
    ci = binomtest(correct, len(data_slice[0].test_y)).proportion_ci(method="wilson")
    assert f"test accuracy {accuracy:.4f} (95% CI {ci.low:.4f}-{ci.high:.4f}) on 2000 images" in result.output


def test_bad_model_uri_is_a_clear_error(mlflow_store):
    result = CliRunner().invoke(cli, ["evaluate", "--model-uri", "models:/no-such-model@champion"])
    assert result.exit_code == 1 and "cannot load model 'models:/no-such-model@champion'" in result.output
    assert mlflow.search_runs(search_all_experiments=True).empty


def val_digest(splits) -> str:
    return array_digest(splits.val_x, splits.val_y)


def test_champion_moves_only_on_better_validation_accuracy(mlflow_store, data_slice):
    splits = data_slice[0]
    promote = lambda info, result: promote_if_better(info.model_uri, result.best_val_accuracy,  # noqa: E731
                                                     val_digest(splits), default_split=True)
    good, good_info = train_model(splits, epochs=3)
    worse, worse_info = train_model(splits, epochs=1, lr=0.001)
    assert worse.best_val_accuracy < good.best_val_accuracy
    first = promote(good_info, good)
    assert first["promoted"] and first["version"] == 1
    second = promote(worse_info, worse)
    assert not second["promoted"] and "does not beat" in second["reason"]
    client = MlflowClient()
    assert int(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == 1
    # registering the same model again reuses its version instead of adding one
    again = promote(good_info, good)
    assert again["version"] == 1 and len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == 2
    better, better_info = train_model(splits, epochs=6, lr=0.3)
    assert better.best_val_accuracy > good.best_val_accuracy
    assert promote(better_info, better)["promoted"]
    assert int(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == 3


def test_predict_images_of_any_size_and_colour(trained, data_slice, tmp_path):
    splits = data_slice[0]
    result, info = trained
    logits = predict_logits(result.model, splits.test_x)
    probs = logits.softmax(1).max(1).values.numpy()
    confident = np.flatnonzero(probs > 0.9)[:4]
    paths = []
    for i in confident:  # light background, colour, 4x larger: what a photo of clothing looks like
        grey = 255 - splits.test_x[i]
        img = Image.fromarray(grey).resize((112, 112), Image.Resampling.NEAREST).convert("RGB")
        path = tmp_path / f"item{i}.{'png' if i % 2 else 'jpg'}"
        img.save(path)
        paths.append(path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = CliRunner().invoke(cli, ["predict", "--model-uri", info.model_uri, *map(str, paths), str(broken)])
    assert out.exit_code == 1  # one file failed...
    assert "broken.png: cannot read the image" in out.output
    for i, path in zip(confident, paths):  # ...and every other one was predicted, as the original
        line = next(line for line in out.output.splitlines() if line.startswith(str(path)))
        assert line.split(": ")[1].startswith(CLASS_NAMES[int(logits[i].argmax())])


def test_predict_on_test_split(trained, data_slice):
    _, prepared = data_slice
    out = CliRunner().invoke(cli, ["predict", "--model-uri", trained[1].model_uri, "--test", "3",
                                   "--data", str(prepared)])
    assert out.exit_code == 0, out.output
    assert len([line for line in out.output.splitlines() if line.startswith("test[")]) == 3
