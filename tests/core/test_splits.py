"""Stratified, seeded splits and the prepared-data cache keyed on the raw files' bytes."""


import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.core.idx import read_split
from pipeline.core.splits import Splits, prepare_splits, split_data, stratified_take
from pipeline.errors import PipelineError
from tests.helpers import write_fake_dataset


def test_stratified_take_keeps_class_mix():
    labels = np.repeat(np.arange(10), [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000])
    idx = stratified_take(labels, 550, np.random.default_rng(0))
    assert len(idx) == len(set(idx)) == 550
    counts = np.bincount(labels[idx], minlength=10)
    np.testing.assert_allclose(counts, np.bincount(labels) * 550 / len(labels), atol=1)


def _real_split(real_data_dir, **kw):
    from pipeline.core.idx import raw_files_in

    raw = raw_files_in(real_data_dir)
    train = read_split(raw["train_images"], raw["train_labels"])
    test = read_split(raw["test_images"], raw["test_labels"])
    return split_data(*train, *test, DataConfig(**kw))


def test_split_sizes_stratified_disjoint_and_seeded(real_data_dir):
    s = _real_split(real_data_dir, val_size=10_000, split_seed=3)
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (50_000, 10_000, 10_000)
    assert np.bincount(s.val_y).tolist() == [1000] * 10  # Fashion-MNIST is balanced: 6,000 per class
    # no image is in both train and val: compare the raw bytes of every image
    train_keys = {bytes(img) for img in s.train_x.reshape(len(s.train_x), -1)}
    assert not any(bytes(img) in train_keys for img in s.val_x.reshape(len(s.val_x), -1)[:2000])
    again = _real_split(real_data_dir, val_size=10_000, split_seed=3)
    other = _real_split(real_data_dir, val_size=10_000, split_seed=4)
    np.testing.assert_array_equal(s.val_x, again.val_x)
    assert not np.array_equal(s.val_y, other.val_y)


def test_limit_shrinks_every_split(real_data_dir):
    s = _real_split(real_data_dir, val_size=5_000, limit=1_000)
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (1_000, 1_000, 1_000)
    assert np.bincount(s.test_y).tolist() == [100] * 10


def test_prepared_split_is_cached_and_reused(tmp_path, fake_data_dir):
    cfg = DataConfig(data_dir=str(fake_data_dir), val_size=100)
    first, path, info = prepare_splits(cfg, cache_root=tmp_path / "cache")
    assert not info["reused"] and path.is_file()
    second, path2, info2 = prepare_splits(cfg, cache_root=tmp_path / "cache")
    assert info2["reused"] and path2 == path
    np.testing.assert_array_equal(first.val_x, second.val_x)
    _, path3, info3 = prepare_splits(DataConfig(data_dir=str(fake_data_dir), val_size=120),
                                     cache_root=tmp_path / "cache")
    assert not info3["reused"] and path3 != path
    assert Splits.load(path).train_x.dtype == np.uint8


def test_changed_raw_file_invalidates_the_cache(tmp_path):
    raw = write_fake_dataset(tmp_path / "raw")
    cfg = DataConfig(data_dir=str(raw), val_size=100)
    _, path, _ = prepare_splits(cfg, cache_root=tmp_path / "cache")
    write_fake_dataset(raw, seed=1)
    _, path2, info = prepare_splits(cfg, cache_root=tmp_path / "cache")
    assert path2 != path and not info["reused"]


def test_val_size_too_large_is_rejected(fake_data_dir, tmp_path):
    with pytest.raises(PipelineError, match="val_size 600 must be smaller than the 600"):
        prepare_splits(DataConfig(data_dir=str(fake_data_dir), val_size=600), cache_root=tmp_path)
