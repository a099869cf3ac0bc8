"""IDX parsing, validation, locating the files, splitting and the prepared-data cache."""

import gzip

import numpy as np
import pytest

from pipeline.config import DataConfig
from pipeline.core.idx import locate_raw_files, read_idx, read_split
from pipeline.core.splits import Splits, prepare_splits, split_data, stratified_take
from pipeline.errors import PipelineError
from tests.helpers import write_fake_dataset, write_idx


def test_read_idx_roundtrip_gzipped_and_plain(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    for compress in (True, False):
        path = write_idx(tmp_path / f"img{compress}", images, compress=compress)
        np.testing.assert_array_equal(read_idx(path), images)


def test_read_idx_matches_torchvision_on_real_file(real_data_dir):
    from torchvision.datasets.mnist import read_image_file, read_label_file

    images = read_idx(real_data_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(real_data_dir / "t10k-labels-idx1-ubyte.gz")
    # torchvision's own reader wants the uncompressed file
    import pathlib
    import tempfile
    tmp = pathlib.Path(tempfile.mkdtemp())
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp / name).write_bytes(gzip.decompress((real_data_dir / f"{name}.gz").read_bytes()))
    np.testing.assert_array_equal(images, read_image_file(str(tmp / "t10k-images-idx3-ubyte")).numpy())
    np.testing.assert_array_equal(labels, read_label_file(str(tmp / "t10k-labels-idx1-ubyte")).numpy())
    assert images.shape == (10_000, 28, 28)


def test_truncated_file_is_named(tmp_path):
    path = write_idx(tmp_path / "imgs", np.zeros((5, 28, 28), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PipelineError, match=r"imgs.*truncated"):
        read_idx(path)


def test_wrong_magic_is_named(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(PipelineError, match=r"bad.*magic number 0x00000d03"):
        read_idx(path)


def test_corrupt_gzip_is_named(tmp_path):
    path = write_idx(tmp_path / "labels", np.zeros(50, np.uint8))
    data = bytearray(path.read_bytes())
    data[15:25] = b"\xff" * 10
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(PipelineError, match=r"labels.*gzip"):
        read_idx(path)


def test_mismatched_counts(tmp_path):
    imgs = write_idx(tmp_path / "i", np.zeros((5, 28, 28), np.uint8))
    labels = write_idx(tmp_path / "l", np.zeros(4, np.uint8))
    with pytest.raises(PipelineError, match="5 images but .* 4 labels"):
        read_split(imgs, labels)


def test_label_out_of_range(tmp_path):
    imgs = write_idx(tmp_path / "i", np.zeros((3, 28, 28), np.uint8))
    labels = write_idx(tmp_path / "l", np.array([1, 12, 3], np.uint8))
    with pytest.raises(PipelineError, match=r"label 12 at index 1 is outside 0..9"):
        read_split(imgs, labels)


def test_wrong_image_shape(tmp_path):
    imgs = write_idx(tmp_path / "i", np.zeros((3, 32, 32), np.uint8))
    labels = write_idx(tmp_path / "l", np.zeros(3, np.uint8))
    with pytest.raises(PipelineError, match=r"expected images of shape"):
        read_split(imgs, labels)


def test_locate_prefers_data_dir_and_explains_a_bad_one(tmp_path, fake_data_dir):
    assert locate_raw_files(str(fake_data_dir))["train_images"].parent == fake_data_dir
    with pytest.raises(PipelineError, match="does not hold the four Fashion-MNIST files"):
        locate_raw_files(str(tmp_path / "empty"))


def test_locate_lists_every_place_when_nothing_is_found(tmp_path, monkeypatch):
    import pipeline.core.idx as data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    with pytest.raises(PipelineError) as err:
        data.locate_raw_files("", allow_download=False)
    message = str(err.value)
    for expected in ("$FASHION_MNIST_DIR", "./data", "no-debian", "dataset-fashion-mnist", "--data-dir"):
        assert expected in message


def test_environment_variable_is_used(fake_data_dir, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(fake_data_dir))
    assert locate_raw_files(None)["test_labels"].parent == fake_data_dir


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
