"""IDX parsing and validation against torchvision's reader, and finding the raw files."""

import gzip

import numpy as np
import pytest

from pipeline.core.idx import locate_raw_files, read_idx, read_split
from pipeline.errors import PipelineError
from tests.helpers import write_idx


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


