"""Load only the models this project writes, after checking their folder against what it writes.

Loading an MLflow model can run code of the model's author. ``mlflow.pytorch.load_model`` unpickles a
model saved in MLflow's older pickle format (``data/model.pth``), which MLflow 3.17 allows by default
(``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is true), and puts a ``code`` folder the model ships on the import
path; ``mlflow.pyfunc.load_model`` (what ``mlflow models serve`` uses) imports the module that the
``python_function`` flavor names, from that ``code`` folder if the model likes. The project logs every
model with ``tracking.log_model``, which writes exactly the folder described below: an MLmodel with a
``pytorch`` flavor and a ``python_function`` flavor whose loader is ``mlflow.pytorch``, neither with code,
and a ``data`` folder holding one ``model.pt2`` (a ``torch.export`` archive). Every command that loads a
model (evaluate, predict, serve, tune) goes through ``checked_copy``:

1. the URI must be ``runs:/``, ``models:/`` or a local folder; a folder is checked where it is (names,
   kinds and sizes of its files, nothing read), and so is what MLflow lists of a ``models:/`` URI, so that
   ``/usr/lib`` is refused at once instead of copied;
2. the model is copied into a temporary folder (deleted afterwards, on Ctrl-C and SIGTERM too) and that
   copy is checked in full: only the files the project writes, no links, at most ``MAX_MODEL_BYTES``, and
   an MLmodel (read as plain YAML) with only the keys the project writes, each key that makes MLflow
   import or load something holding the project's own value;
3. the copy is loaded with pickle deserialization switched off, so that MLflow also checks every record
   inside the ``.pt2`` archive is plain tensors or JSON before ``torch.export.load`` reads it. MLflow reads
   that switch from the environment only (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``): every command sets it
   at its start (``pipeline.cli``), and a caller that has not is refused rather than loaded unchecked.
"""

import contextlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import yaml
from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError
from pipeline.runtime.signals import interrupts_raise_keyboard_interrupt

URI_FORMS = ("runs:/<run_id>/model, models:/<name>@<alias>, models:/<name>/<version>, models:/<model_id> "
             "or a local model folder")
MLFLOW_SCHEMES = ("runs", "models")  # any other scheme (http, s3, file, ...) is refused

# The files tracking.log_model writes; a models:/ download also gets MLflow's registered_model_meta.
MODEL_FILES = {"MLmodel", "data/model.pt2", "conda.yaml", "python_env.yaml", "requirements.txt",
               "input_example.json", "serving_input_example.json", "registered_model_meta"}
MODEL_FOLDERS = {"data"}
REQUIRED_FILES = ("MLmodel", "data/model.pt2")
MAX_MODEL_BYTES = 20 * 2**20  # far above a softmax regression's 7,850 weights and its two input examples

# The MLmodel file tracking.log_model writes: its top-level keys, and the keys of each flavor. A key MLflow
# acts on (a module it imports, a folder it loads or puts on the import path) must hold the value shown,
# an absent key counting as None; ANY marks a record MLflow does not act on when it loads the model.
ANY = object()
MLMODEL_KEYS = {"artifact_path", "flavors", "is_signature_from_type_hint", "mlflow_version", "model_id",
                "model_size_bytes", "model_uuid", "prompts", "run_id", "saved_input_example_info", "signature",
                "type_hint_from_example", "utc_time_created"}
FLAVORS = {
    "pytorch": {"model_data": "data", "code": None, "pytorch_version": ANY},
    "python_function": {"loader_module": "mlflow.pytorch", "data": "data", "code": None,
                        "pickle_module_name": "mlflow.pytorch.pickle_module", "config": {"device": None},
                        "env": ANY, "python_version": ANY},
}


def refused(model_uri: str, why: str) -> PipelineError:
    return PipelineError(
        f"refusing to load model '{model_uri}': {why}; this project loads only the pt2 models it logs "
        "itself (loading another model can run any code its author chose): train one with "
        "`python -m pipeline train`"
    )


def clip(text: str, limit: int = 300) -> str:
    """Text for a one-line message: on one line, cut short (it may come from a file someone else wrote)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def short(value) -> str:
    return clip(repr(value), limit=60)


def check_entries(entries, model_uri: str) -> None:
    """Refuse a model whose files are not among those the project writes; reads no file.

    ``entries``: (path relative to the model folder, kind: "file", "folder" or anything else, size in bytes).
    Stops at the first entry that does not belong, so a system folder is refused at once.
    """
    total = 0
    for path, kind, size in entries:
        expected = "folder" if path in MODEL_FOLDERS else "file" if path in MODEL_FILES else None
        if expected is None:
            raise refused(model_uri, f"it holds {short(path)}, which the project's models do not")
        if kind != expected:
            raise refused(model_uri, f"its {path} is a link or not a regular {expected}")
        total += size
        if total > MAX_MODEL_BYTES:
            raise refused(model_uri, f"it holds more than {MAX_MODEL_BYTES // 2**20} MB")


def local_entries(folder: Path):
    """The entries of a model folder for ``check_entries``, in name order, without following links."""
    def kind(entry: os.DirEntry) -> str:
        if entry.is_symlink():
            return "link"
        return "folder" if entry.is_dir() else "file" if entry.is_file() else "special file"

    def listed(path):
        with os.scandir(path) as it:
            return sorted(it, key=lambda entry: entry.name)

    for entry in listed(folder):
        yield entry.name, kind(entry), entry.stat(follow_symlinks=False).st_size
        if entry.name in MODEL_FOLDERS and kind(entry) == "folder":
            for inner in listed(entry.path):
                yield f"{entry.name}/{inner.name}", kind(inner), inner.stat(follow_symlinks=False).st_size


def check_folder(folder: Path, model_uri: str) -> None:
    """Refuse a local folder that is not shaped like a model the project logged; reads no file."""
    if not folder.exists():
        raise PipelineError(f"cannot load model '{model_uri}': no such folder; use {URI_FORMS}")
    if not folder.is_dir() or not (folder / "MLmodel").is_file():
        raise refused(model_uri, "it is not an MLflow model folder (it has no MLmodel file)")
    try:
        check_entries(local_entries(folder), model_uri)
    except OSError as e:
        raise PipelineError(f"cannot load model '{model_uri}': cannot look into {e.filename} ({e.strerror})")
    missing = [path for path in REQUIRED_FILES if not (folder / path).is_file()]
    if missing:
        raise refused(model_uri, f"it has no {', '.join(missing)}")


def check_mlmodel(folder: Path, model_uri: str) -> None:
    """Refuse an MLmodel file with keys or flavors the project does not write; reads it as plain YAML."""
    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise refused(model_uri, f"its MLmodel file cannot be read ({type(e).__name__})")
    if not isinstance(meta, dict) or not isinstance(meta.get("flavors"), dict):
        raise refused(model_uri, "its MLmodel file names no flavors")
    if set(meta) - MLMODEL_KEYS:
        raise refused(model_uri, f"its MLmodel file has keys the project does not write: "
                                 f"{short(sorted(map(str, set(meta) - MLMODEL_KEYS)))}")
    flavors = meta["flavors"]
    if "pytorch" not in flavors:
        raise refused(model_uri, "it has no pytorch flavor")
    for name, flavor in flavors.items():
        expected = FLAVORS.get(name)
        if expected is None:
            raise refused(model_uri, f"it has a {short(name)} flavor, which the project's models do not")
        if not isinstance(flavor, dict) or set(flavor) - set(expected):
            raise refused(model_uri, f"its {name} flavor holds what the project does not write: {short(flavor)}")
        for key, value in expected.items():
            if value is ANY or flavor.get(key) == value:
                continue
            if key == "code":
                raise refused(model_uri, f"it ships its own code (the {name} flavor's code: "
                                         f"{short(flavor[key])}), which loading would import")
            raise refused(model_uri, f"its {name} flavor's {key} is {short(flavor.get(key))}, not {value!r}")


def check_before_copying(model_uri: str) -> None:
    """Refuse what can be refused before a byte is copied: an unsupported URI, a local folder that is not
    shaped like a model, a model whose folder (as MLflow lists it) holds other files or too many bytes."""
    scheme = urlparse(model_uri).scheme
    if not scheme:
        check_folder(Path(model_uri), model_uri)
        return
    if scheme not in MLFLOW_SCHEMES:
        raise PipelineError(f"cannot load model '{model_uri}': {short(scheme + ':')} URIs are not supported; "
                            f"use {URI_FORMS}")
    try:  # the top of the model's folder (MLflow 3 lists nothing for runs:/<run_id>/<logged model>)
        listed = mlflow.artifacts.list_artifacts(artifact_uri=model_uri)
    except Exception:  # a bad URI: the download names the problem
        return
    check_entries(((f.path, "folder" if f.is_dir else "file", f.file_size or 0) for f in listed), model_uri)


def one_line(e: Exception) -> str:
    return clip(f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def checked_copy(model_uri: str):
    """A checked copy of the model's folder in a temporary folder, removed afterwards; PipelineError for
    a bad URI or a model the project did not write. SIGTERM acts like Ctrl-C meanwhile, so that the
    temporary folder is removed whichever ends the command."""
    check_before_copying(model_uri)
    with interrupts_raise_keyboard_interrupt(), tempfile.TemporaryDirectory(prefix="model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        except Exception as e:  # MLflow raises many types for a bad URI: not found, malformed, ...
            raise PipelineError(f"cannot load model '{model_uri}' ({one_line(e)}); use {URI_FORMS}")
        check_folder(local, model_uri)
        check_mlmodel(local, model_uri)
        yield local


def load_checked(folder: Path, model_uri: str):
    """The torch module of a folder ``checked_copy`` made."""
    # MLflow's own switch: pickled payloads refused, every record of the pt2 archive checked
    if MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get():
        raise PipelineError(f"cannot load model '{model_uri}' with MLflow's check of its archive switched off: "
                            f"set {MLFLOW_ALLOW_PICKLE_DESERIALIZATION.name}=false (every pipeline command does)")
    try:
        return mlflow.pytorch.load_model(str(folder))
    except MlflowException as e:
        if "pickle" in str(e):  # MLflow found a pickled record inside the pt2 archive
            raise refused(model_uri, "its model.pt2 archive holds pickled records")
        raise PipelineError(f"cannot load model '{model_uri}' ({clip(e.message)})")
    except Exception as e:  # a corrupt archive: zip, torch.export errors
        raise PipelineError(f"cannot load model '{model_uri}' ({one_line(e)})")


def load_model(model_uri: str):
    """The torch module of a model the project logged; PipelineError for anything else or a bad URI."""
    with checked_copy(model_uri) as folder:
        return load_checked(folder, model_uri)
