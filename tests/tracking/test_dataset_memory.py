"""The datasets a run records do not keep the data alive: memory stays flat run after run (a real sqlite
store, real experiments with several seeds, Python's own allocation tracer)."""

import gc
import textwrap
import tracemalloc

import pytest

from pipeline.config import DataConfig
from pipeline.core.splits import array_digest, prepare_splits
from pipeline.experiment_files.spec import load_spec
from pipeline.steps.experiment import run_experiment
from pipeline.tracking.datasets import described, split_digest
from tests.helpers import write_fake_dataset

SEEDS = """
    experiment: seeds
    entry_point: train
    data: {{data_dir: {raw}, val_size: 1000}}
    params: {{epochs: 1, patience: 0}}
    seeds: [0, 1, 2]
"""


def traced_after(action) -> int:
    action()
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


@pytest.mark.slow
def test_memory_stays_flat_over_experiments_with_several_seeds(mlflow_store, tmp_path):
    raw = write_fake_dataset(tmp_path / "raw", n_train=8000, n_test=2000)
    path = tmp_path / "seeds.yaml"
    path.write_text(textwrap.dedent(SEEDS.format(raw=raw)))
    spec = load_spec(path)
    splits, _, _ = prepare_splits(spec.data)
    data_bytes = sum(a.nbytes for s in ("train", "val", "test") for a in splits.arrays(s))
    del splits

    tracemalloc.start()
    try:
        # each experiment loads the split afresh, trains and records three runs with their datasets
        after = [traced_after(lambda: run_experiment(spec)) for _ in range(3)]
    finally:
        tracemalloc.stop()
    # the first experiment warms MLflow's and torch's caches; from then on nothing accumulates
    grown = after[-1] - after[1]
    assert grown < data_bytes / 4, (after, data_bytes)


def test_digests_are_worked_out_once_per_split_set(fake_data_dir, tmp_path):
    splits, _, _ = prepare_splits(DataConfig(data_dir=str(fake_data_dir), val_size=100), tmp_path / "prepared")
    assert split_digest(splits, "val") == array_digest(splits.val_x, splits.val_y)
    assert described(splits, "here") is described(splits, "elsewhere")  # the first description is kept
