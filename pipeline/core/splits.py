"""The three splits: a stratified, seeded validation split held out of the training images, cached.

The prepared splits are one uncompressed ``.npz`` file (55 MB of uint8, loads in a blink), stored under
a key made of the raw files' bytes and the split settings, so an identical preparation is reused.
"""

import hashlib
import json
import math
import os
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, DataConfig
from pipeline.core.idx import LOCAL_ROOT, file_digest, locate_raw_files, raw_digest, read_split
from pipeline.errors import PipelineError

PREPARED_FILE = "splits.npz"
SPLITS = ("train", "val", "test")
MIN_TRAIN_IMAGES = 2  # one image is no training set; an empty split would report NaN accuracy


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

    def problem(self) -> str | None:
        """What makes these splits unusable (an empty split, labels not matching images, images that are not
        28x28 bytes, labels outside 0..9), or None."""
        for split in SPLITS:
            x, y = self.arrays(split)
            if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
                return (f"the {split} images are {x.dtype} of shape {x.shape}; expected uint8 of shape "
                        f"(N, {IMAGE_SIZE}, {IMAGE_SIZE})")
            if y.dtype != np.int64 or y.ndim != 1:
                return f"the {split} labels are {y.dtype} of shape {y.shape}; expected int64 of shape (N,)"
            if len(x) != len(y):
                return f"the {split} split has {len(x)} images but {len(y)} labels"
            if len(y) == 0:
                return f"the {split} split holds no images"
            if y.min() < 0 or y.max() >= NUM_CLASSES:
                bad = int(np.flatnonzero((y < 0) | (y >= NUM_CLASSES))[0])
                return f"the {split} split has label {y[bad]} at index {bad}, outside 0..{NUM_CLASSES - 1}"
        if len(self.train_y) < MIN_TRAIN_IMAGES:
            return f"the train split holds {len(self.train_y)} image; training needs at least {MIN_TRAIN_IMAGES}"
        return None

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / PREPARED_FILE
        tmp = directory / f"{PREPARED_FILE}.{os.getpid()}.tmp.npz"  # per process: workers may race
        try:
            np.savez(tmp, **self.__dict__)  # uncompressed uint8: 55 MB, loads in a blink
            tmp.replace(path)  # atomic: a crash never leaves a half-written cache behind
        finally:
            tmp.unlink(missing_ok=True)  # a full disk: give the space of the half-written file back
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
            claimed, size = claimed_bytes(path), path.stat().st_size
            if claimed > size:  # numpy would allocate what the headers claim before reading a byte
                raise ValueError(f"its arrays claim {claimed:,} bytes, the file has {size:,}")
            with np.load(path) as f:  # f[k] reads the whole array into memory
                splits = cls(**{k: f[k] for k in cls.__dataclass_fields__})
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as e:
            raise PipelineError(f"{path}: not a valid prepared split ({e}); run prepare again")
        if splits.problem():
            raise PipelineError(f"{path}: {splits.problem()}; run prepare again")
        return splits


def claimed_bytes(path: Path) -> int:
    """The bytes the arrays of an ``.npz`` file hold by their headers, read without reading the arrays.

    The prepared file is uncompressed, so its arrays cannot hold more bytes than the file itself.
    """
    total = 0
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as member:
                version = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(member)
                total += math.prod(shape) * dtype.itemsize
    return total


def stratified_take(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of n items whose class mix matches ``labels``' (largest-remainder rounding)."""
    if n == 0:  # an empty file: nothing to take (split_data then refuses the empty split)
        return np.zeros(0, dtype=np.int64)
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
    splits = Splits(
        train_x=train_x[train_idx], train_y=as_labels(train_y[train_idx]),
        val_x=train_x[val_idx], val_y=as_labels(train_y[val_idx]),
        test_x=test_x[test_idx], test_y=as_labels(test_y[test_idx]),
    )
    if splits.problem():
        raise PipelineError(f"{splits.problem()} (val_size {cfg.val_size}, limit {cfg.limit}, "
                            f"{len(train_y)} training and {len(test_y)} test images in the raw files); "
                            "change val_size or limit, or check the data files")
    return splits


# ---------------------------------------------------------------------------------------------------
# Digests and the prepared-data cache


def array_digest(*arrays: np.ndarray) -> str:
    """SHA-256 over the full arrays (MLflow's own dataset digest only looks at the first 10,000 values)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def cache_key(raw: dict[str, Path], cfg: DataConfig) -> str:
    """Same raw bytes and same split parameters -> same key -> the cached split is reused."""
    parts = {k: file_digest(p) for k, p in sorted(raw.items())}
    parts.update(val_size=cfg.val_size, split_seed=cfg.split_seed, limit=cfg.limit)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def prepare_splits(cfg: DataConfig, cache_root: Path = LOCAL_ROOT / "prepared") -> tuple[Splits, Path, dict]:
    """Find, parse, validate and split the data, reusing an earlier identical preparation.

    Returns the splits, the prepared file and a small description (source, digest of the raw files, cache
    key, reused or not).
    """
    cfg.validate()
    raw = locate_raw_files(cfg.data_dir)
    key = cache_key(raw, cfg)
    cached = cache_root / key / PREPARED_FILE
    info = {"source": str(raw["train_images"].parent.resolve()), "raw_digest": raw_digest(raw), "cache_key": key,
            "reused": cached.is_file()}
    if cached.is_file():
        try:
            return Splits.load(cached), cached, info
        except PipelineError:  # truncated or damaged (a full disk, a copy gone wrong): build it anew
            print(f"warning: the cached split {cached} is damaged; preparing it again", file=sys.stderr)
            info["reused"] = False
    train_x, train_y = read_split(raw["train_images"], raw["train_labels"])
    test_x, test_y = read_split(raw["test_images"], raw["test_labels"])
    splits = split_data(train_x, train_y, test_x, test_y, cfg)
    return splits, splits.save(cache_root / key), info


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1], what torchvision's ToTensor gives."""
    return pixels(torch.from_numpy(images).unsqueeze(1))


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 pixels in [0, 1] (x / 255, as ToTensor), the same shape."""
    if images.dtype != torch.uint8:  # pixels already scaled would silently shrink 255-fold
        raise TypeError(f"pixels() takes uint8 images, got {images.dtype}")
    return images.float().div_(255)
