"""Load only the models this project writes: MLflow's ``pt2`` format, checked before anything is unpickled.

``mlflow.pytorch.load_model`` also loads models saved in MLflow's older pickle format (``data/model.pth``),
and MLflow 3.17 allows that by default (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is true): unpickling a
crafted file runs any code its author chose. The project logs every model with ``tracking.log_model``,
which writes an MLmodel file with a ``pytorch`` flavor (no ``code``) and a ``data`` folder holding
exactly one ``model.pt2`` (a ``torch.export`` archive). So a model is loaded in three steps:

1. download its folder into a temporary directory (deleted afterwards);
2. read its MLmodel file as plain YAML and refuse any folder that is not shaped like ours;
3. load it with pickle deserialization switched off, so that MLflow also checks every record inside the
   ``.pt2`` archive is plain tensors or JSON before ``torch.export.load`` reads it.
"""

import contextlib
import os
import tempfile
from pathlib import Path

import mlflow
import yaml
from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError

OUR_DATA_FILES = ["model.pt2"]  # what mlflow.pytorch.log_model(serialization_format="pt2") writes in data/
URI_FORMS = "runs:/<run_id>/model, models:/<name>@<alias>, models:/<name>/<version> or models:/<model_id>"


def refused(model_uri: str, why: str) -> PipelineError:
    return PipelineError(
        f"refusing to load model '{model_uri}': {why}; this project loads only the pt2 models it logs "
        "itself (a pickled model can run any code when loaded): train one with `python -m pipeline train`"
    )


def check_our_format(folder: Path, model_uri: str) -> None:
    """Refuse a model folder that is not one ``tracking.log_model`` wrote; reads no pickle, only YAML."""
    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise refused(model_uri, f"its MLmodel file cannot be read ({type(e).__name__})")
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    flavor = flavors.get("pytorch") if isinstance(flavors, dict) else None
    if not isinstance(flavor, dict):
        raise refused(model_uri, "it has no pytorch flavor")
    if flavor.get("code"):
        raise refused(model_uri, "it ships its own code, which loading would import")
    data = folder / str(flavor.get("model_data"))
    files = sorted(p.name for p in data.iterdir()) if data.is_dir() else []
    if flavor.get("model_data") != "data" or files != OUR_DATA_FILES:
        raise refused(model_uri, f"its data folder holds {', '.join(files) or 'nothing'}, not the single "
                                 "model.pt2 the project writes")


@contextlib.contextmanager
def mlflow_settings(**values: str):
    """MLflow's environment switches set for the duration, then restored as they were."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_own_model(model_uri: str):
    """The torch module of a model the project logged; PipelineError for anything else or a bad URI."""
    with tempfile.TemporaryDirectory(prefix="model-") as tmp:
        try:  # a few small files: no progress bar (it would interleave with the command's own output)
            with mlflow_settings(**{MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name: "false"}):
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        except Exception as e:  # MLflow raises many types for a bad URI: not found, bad scheme, ...
            raise PipelineError(f"cannot load model '{model_uri}' ({type(e).__name__}: {e}); use {URI_FORMS}")
        check_our_format(local, model_uri)
        # MLflow's own switch: pickled payloads refused, every record of the pt2 archive checked
        with mlflow_settings(**{MLFLOW_ALLOW_PICKLE_DESERIALIZATION.name: "false"}):
            try:
                return mlflow.pytorch.load_model(str(local))
            except MlflowException as e:
                if "pickle" in str(e):  # MLflow found a pickled record inside the pt2 archive
                    raise refused(model_uri, "its model.pt2 archive holds pickled records")
                raise PipelineError(f"cannot load model '{model_uri}' ({e.message})")
            except Exception as e:  # a corrupt archive: zip, torch.export errors
                raise PipelineError(f"cannot load model '{model_uri}' ({type(e).__name__}: {e})")
