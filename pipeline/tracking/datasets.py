"""The prepared splits as MLflow datasets, and fetching them from a prepare run's artifact."""

import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.config import DataConfig
from pipeline.core.splits import SPLITS, Splits, array_digest, prepare_splits
from pipeline.errors import PipelineError
from pipeline.names import DATASET_CONTEXTS


@dataclass(frozen=True)
class Described:
    """What the datasets of one Splits object are recorded with: their source and each split's digest."""

    source: str
    digests: dict[str, str]


# id(splits) -> its description, for as long as that Splits object lives. Only these few strings are kept:
# an MLflow dataset holds its arrays, which must go with their Splits object, not stay for the process's life.
_described: dict[int, Described] = {}


def described(splits: Splits, source: str) -> Described:
    """The source and digests of ``splits``, worked out once per Splits object in this process.

    A digest reads every byte of its split, so every trial of a study reuses them.
    MLflow keeps one dataset per name and digest in an experiment: the first source recorded stays.
    """
    key = id(splits)
    if key not in _described:
        _described[key] = Described(source, {s: array_digest(*splits.arrays(s)) for s in SPLITS})
        weakref.finalize(splits, _described.pop, key, None)  # before another object can take its id
    return _described[key]


def split_digest(splits: Splits, split: str) -> str:
    """The digest of one split (as its MLflow dataset records it), worked out once per Splits object."""
    return described(splits, "prepared splits").digests[split]


def datasets_of(splits: Splits, source: str) -> dict:
    """The three splits as MLflow datasets, made afresh (they hold the arrays) from their description."""
    about = described(splits, source)
    made = {}
    for split in SPLITS:
        x, y = splits.arrays(split)
        with warnings.catch_warnings():  # a local path matches two equivalent source types; either is right
            warnings.filterwarnings("ignore", message="The specified dataset source")
            made[split] = mlflow.data.from_numpy(x, targets=y, source=about.source, name=f"fashion-mnist-{split}",
                                                 digest=about.digests[split])
    return made


def log_datasets(splits: Splits, source: str = "prepared splits", which=SPLITS) -> None:
    """Record the splits (all three, or ``which``) as MLflow dataset inputs of the active run."""
    datasets = datasets_of(splits, source)
    for split in which:
        log_input(datasets[split], DATASET_CONTEXTS[split])


def log_input(dataset, context: str) -> None:
    """``mlflow.log_input``, once more if another process added the same dataset to the experiment at the
    same moment: MLflow looks for the dataset's row and inserts it in two steps, so the later of two inserts
    fails on the unique key; the second try finds the row and links it."""
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as e:
        if not any(word in str(e).lower() for word in ("unique", "duplicate")):
            raise
        mlflow.log_input(dataset, context=context)


def fetch_prepared(data_uri: str) -> Splits:
    """Load the prepared splits from a local path or any MLflow artifact URI (runs:/<id>/prepared).

    An artifact is downloaded into a temporary folder that is deleted once its arrays are in memory
    (``Splits.load`` reads them eagerly): every step reads the 55 MB split, and none keeps a copy.
    """
    if Path(data_uri).exists():
        splits = Splits.load(Path(data_uri))
        described(splits, str(Path(data_uri).resolve()))  # the datasets' source, for the runs that use them
        return splits
    with tempfile.TemporaryDirectory(prefix="prepared-") as tmp:  # the arrays are in memory once loaded
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=data_uri, dst_path=tmp)
        except Exception as e:
            raise PipelineError(
                f"cannot fetch the prepared data from '{data_uri}' ({type(e).__name__}: {e}); pass the "
                "prepare run's artifact URI (runs:/<run_id>/prepared) or a local prepared folder"
            )
        splits = Splits.load(Path(local))
    described(splits, f"prepared splits: {data_uri}")  # MLflow has no dataset source type for runs:/ URIs
    return splits


def is_default_split(data_uri: str) -> bool:
    """Whether ``data_uri`` holds the default split: all the data, the default validation split. The
    registry's ``champion`` is chosen among models validated on it. A prepared folder records no settings,
    so it never counts."""
    if not data_uri:
        return True  # load_data prepares the default split
    if not data_uri.startswith("runs:/"):
        return False
    params = mlflow.get_run(data_uri.removeprefix("runs:/").split("/")[0]).data.params
    default = DataConfig()
    return all(params.get(name) == str(getattr(default, name)) for name in ("val_size", "split_seed", "limit"))


def load_data(data_uri: str) -> Splits:
    """The prepared splits named by ``data_uri``; with none given, prepare the default ones here.

    The datasets are logged to the active run; without one (``predict``) nothing is logged, since
    ``mlflow.log_input`` would otherwise start a stray run of its own.
    """
    if data_uri:
        return fetch_prepared(data_uri)
    splits = prepare_splits(DataConfig())[0]
    if mlflow.active_run() is not None:
        log_datasets(splits, "prepared in this run with the default settings")
    return splits
