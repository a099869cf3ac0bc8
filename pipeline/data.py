"""Data preparation: find the raw Fashion-MNIST IDX files, parse and validate them, split them.

The IDX format (http://yann.lecun.com/exdb/mnist/) is tiny: a 4-byte magic number whose third byte is
the element type (0x08 = unsigned byte) and fourth byte the number of dimensions, then one big-endian
uint32 per dimension, then the data. We parse it ourselves so that every way a file can be broken gets
an error that names the file and the problem.
"""

import gzip
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, DataConfig
from pipeline.errors import PipelineError

RAW_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
LOCAL_ROOT = Path("data")  # torchvision's layout below it: data/FashionMNIST/raw/
PREPARED_FILE = "splits.npz"
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------------
# IDX parsing


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a uint8 array, checking everything we can."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise PipelineError(f"{path}: cannot read or decompress the file ({e}); is the gzip corrupt?")
    if len(raw) < 4:
        raise PipelineError(f"{path}: file is {len(raw)} bytes, too short to be an IDX file")
    zero, dtype, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise PipelineError(
            f"{path}: bad magic number 0x{raw[:4].hex()}; expected 0x00000801 (labels) or "
            "0x00000803 (images) of an unsigned-byte IDX file"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise PipelineError(f"{path}: truncated header ({len(raw)} bytes, need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise PipelineError(
            f"{path}: file {what}: header says shape {shape} ({expected} bytes) but the file has "
            f"{len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check one images file and its labels file."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise PipelineError(
            f"{images_path}: expected images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), got {images.shape}"
        )
    if labels.ndim != 1:
        raise PipelineError(f"{labels_path}: expected a 1-d label file, got shape {labels.shape}")
    if len(images) != len(labels):
        raise PipelineError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise PipelineError(
            f"{labels_path}: label {labels[bad]} at index {bad} is outside 0..{NUM_CLASSES - 1}"
        )
    return images, labels


# ---------------------------------------------------------------------------------------------------
# Finding the raw files


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def raw_files_in(directory: Path) -> dict[str, Path] | None:
    """The four raw files in ``directory`` (gzipped or not), or None if any is missing."""
    found = {key: _find_file(directory, stem) for key, stem in RAW_FILES.items()}
    return None if None in found.values() else found


def candidate_dirs(data_dir: str | None) -> list[tuple[str, Path]]:
    """Where to look, in order: --data-dir, $FASHION_MNIST_DIR, ./data, the Debian package."""
    places = []
    if data_dir:
        places.append(("--data-dir", Path(data_dir)))
    if os.environ.get("FASHION_MNIST_DIR"):
        places.append(("$FASHION_MNIST_DIR", Path(os.environ["FASHION_MNIST_DIR"])))
    places.append(("./data (torchvision layout)", LOCAL_ROOT / "FashionMNIST" / "raw"))
    places.append((f"Debian package {DEBIAN_PACKAGE}", DEBIAN_DIR))
    return places


def download_with_torchvision(root: Path) -> Path:
    from torchvision.datasets import FashionMNIST

    FashionMNIST(root=str(root), train=True, download=True)
    FashionMNIST(root=str(root), train=False, download=True)
    return root / "FashionMNIST" / "raw"


def locate_raw_files(data_dir: str | None, allow_download: bool = True) -> dict[str, Path]:
    """Find the raw files; download them with torchvision as the last resort."""
    places = candidate_dirs(data_dir)
    for label, directory in places:
        found = raw_files_in(directory)
        if found:
            return found
        if label == "--data-dir":  # an explicit directory that lacks the files is a mistake, say so
            raise PipelineError(
                f"--data-dir {directory} does not hold the four Fashion-MNIST files "
                f"({', '.join(RAW_FILES.values())}, gzipped or not)"
            )
    download_error = "download not attempted"
    if allow_download:
        try:
            found = raw_files_in(download_with_torchvision(LOCAL_ROOT))
            if found:
                return found
            download_error = "download finished but the files are not where torchvision puts them"
        except Exception as e:  # no network, HTTP errors, checksum mismatch...
            download_error = f"download failed: {e}"
    looked = "\n".join(f"  - {label}: {directory}" for label, directory in places)
    raise PipelineError(
        "Fashion-MNIST raw files not found. Looked in:\n"
        f"{looked}\n  - torchvision download into {LOCAL_ROOT}: {download_error}\n"
        "Provide the data in one of these ways: pass --data-dir DIR (or set FASHION_MNIST_DIR) to a "
        f"folder with {', '.join(RAW_FILES.values())} (.gz or not); or on Debian/Ubuntu run "
        f"`apt-get install {DEBIAN_PACKAGE}`; or run once with internet access to download them."
    )


# ---------------------------------------------------------------------------------------------------
# Splitting


@dataclass
class Splits:
    """The three splits as uint8 images (N, 28, 28) and int64 labels (N,)."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return getattr(self, f"{split}_x"), getattr(self, f"{split}_y")

    def class_counts(self, split: str) -> dict[str, int]:
        counts = np.bincount(self.arrays(split)[1], minlength=NUM_CLASSES)
        return {name: int(c) for name, c in zip(CLASS_NAMES, counts)}

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / PREPARED_FILE
        tmp = directory / f"{PREPARED_FILE}.{os.getpid()}.tmp.npz"  # per process: workers may race
        np.savez(tmp, **self.__dict__)  # uncompressed uint8: 55 MB, loads in a blink
        tmp.replace(path)  # atomic: a crash never leaves a half-written cache behind
        return path

    @classmethod
    def load(cls, path: Path) -> "Splits":
        path = Path(path)
        if path.is_dir():
            path = path / PREPARED_FILE
        if not path.is_file():
            raise PipelineError(
                f"prepared data not found at {path}; run `python -m pipeline prepare` first, or pass "
                "--data with the prepare run's artifact URI (runs:/<run_id>/prepared)"
            )
        try:
            with np.load(path) as f:
                return cls(**{k: f[k] for k in cls.__dataclass_fields__})
        except (OSError, KeyError, ValueError, zlib.error) as e:
            raise PipelineError(f"{path}: not a valid prepared split ({e}); run prepare again")


def stratified_take(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of n items whose class mix matches ``labels``' (largest-remainder rounding)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / len(labels)
    take = np.floor(quota).astype(int)
    # hand the leftover items to the classes with the largest fractional parts
    for i in np.argsort(-(quota - take), kind="stable")[: n - take.sum()]:
        take[i] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return rng.permutation(np.concatenate(chosen))


def split_data(train_x, train_y, test_x, test_y, cfg: DataConfig) -> Splits:
    """Hold out a stratified, seeded validation split; optionally shrink every split (smoke runs)."""
    if cfg.val_size >= len(train_y):
        raise PipelineError(f"val_size {cfg.val_size} must be smaller than the {len(train_y)} training images")
    rng = np.random.default_rng(cfg.split_seed)
    val_idx = stratified_take(train_y, cfg.val_size, rng)
    train_idx = rng.permutation(np.setdiff1d(np.arange(len(train_y)), val_idx))
    test_idx = np.arange(len(test_y))
    if cfg.limit:
        train_idx = train_idx[stratified_take(train_y[train_idx], min(cfg.limit, len(train_idx)), rng)]
        val_idx = val_idx[stratified_take(train_y[val_idx], min(cfg.limit, len(val_idx)), rng)]
        test_idx = np.sort(stratified_take(test_y, min(cfg.limit, len(test_y)), rng))
    as_labels = lambda y: y.astype(np.int64)  # noqa: E731 (torch's losses want int64 targets)
    return Splits(
        train_x=train_x[train_idx], train_y=as_labels(train_y[train_idx]),
        val_x=train_x[val_idx], val_y=as_labels(train_y[val_idx]),
        test_x=test_x[test_idx], test_y=as_labels(test_y[test_idx]),
    )


# ---------------------------------------------------------------------------------------------------
# Digests and the prepared-data cache


def array_digest(*arrays: np.ndarray) -> str:
    """SHA-256 over the full arrays (MLflow's own dataset digest only looks at the first 10,000 values)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def cache_key(raw: dict[str, Path], cfg: DataConfig) -> str:
    """Same raw bytes and same split parameters -> same key -> the cached split is reused."""
    parts = {k: file_digest(p) for k, p in sorted(raw.items())}
    parts.update(val_size=cfg.val_size, split_seed=cfg.split_seed, limit=cfg.limit)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def prepare_splits(cfg: DataConfig, cache_root: Path = LOCAL_ROOT / "prepared") -> tuple[Splits, Path, dict]:
    """Find, parse, validate and split the data, reusing an earlier identical preparation.

    Returns the splits, the prepared file and a small description (source, cache key, reused or not).
    """
    cfg.validate()
    raw = locate_raw_files(cfg.data_dir)
    key = cache_key(raw, cfg)
    cached = cache_root / key / PREPARED_FILE
    info = {"source": str(raw["train_images"].parent.resolve()), "cache_key": key, "reused": cached.is_file()}
    if cached.is_file():
        return Splits.load(cached), cached, info
    train_x, train_y = read_split(raw["train_images"], raw["train_labels"])
    test_x, test_y = read_split(raw["test_images"], raw["test_labels"])
    splits = split_data(train_x, train_y, test_x, test_y, cfg)
    return splits, splits.save(cache_root / key), info


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1], what torchvision's ToTensor gives."""
    return torch.from_numpy(images).unsqueeze(1).float().div_(255)
