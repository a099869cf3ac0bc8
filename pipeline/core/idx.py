"""The raw data: find the four Fashion-MNIST IDX files, parse and validate them.

The IDX format (http://yann.lecun.com/exdb/mnist/) is tiny: a 4-byte magic number whose third byte is
the element type (0x08 = unsigned byte) and fourth byte the number of dimensions, then one big-endian
uint32 per dimension, then the data. We parse it ourselves so that every way a file can be broken gets
an error that names the file and the problem.
"""

import gzip
import hashlib
import json
import math
import os
import zlib
from pathlib import Path

import numpy as np

from pipeline.config import IMAGE_SIZE, NUM_CLASSES
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


# ---------------------------------------------------------------------------------------------------
# IDX parsing


GZIP_MAGIC = b"\x1f\x8b"
# Deflate (gzip's compression) expands data at most 1032-fold (zlib's technical notes), so a gzip file
# of n bytes holds at most 1032 n: a header claiming more is refused before anything is decompressed.
MAX_DEFLATE_RATIO = 1032
CHUNK = 1 << 24  # read in 16 MiB pieces: memory follows what the file holds, not what its header claims


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a uint8 array, checking everything we can.

    Nothing is allocated for what the header merely claims: the claim is checked against what the file
    can hold first, and at most the claimed bytes (and one more, to see trailing bytes) are decompressed,
    so a gzip bomb cannot fill the memory.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            gzipped = file.read(2) == GZIP_MAGIC
            file.seek(0)
            size = os.fstat(file.fileno()).st_size
            if gzipped:
                with gzip.GzipFile(fileobj=file) as stream:
                    return parse_idx(path, stream, size, gzipped)
            return parse_idx(path, file, size, gzipped)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # BadGzipFile is an OSError: caught first
        raise PipelineError(f"{path}: cannot decompress the file ({e}); is the gzip corrupt?")
    except OSError as e:
        raise PipelineError(f"{path}: cannot read the file ({e.strerror}); check that it exists and is readable")


def read_at_most(stream, n: int) -> bytes:
    """Up to ``n`` bytes of ``stream``, fewer where it ends; never asks for more than a chunk at a time."""
    chunks = []
    while n > 0 and (chunk := stream.read(min(n, CHUNK))):
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def parse_idx(path: Path, stream, size: int, gzipped: bool) -> np.ndarray:
    """The IDX array in ``stream``, the content of a file of ``size`` bytes."""
    head = read_at_most(stream, 4)
    if len(head) < 4:
        raise PipelineError(f"{path}: file is {len(head)} bytes, too short to be an IDX file")
    zero, dtype, ndim = int.from_bytes(head[:2], "big"), head[2], head[3]
    if zero != 0 or dtype != 0x08 or ndim not in (1, 3):
        raise PipelineError(
            f"{path}: bad magic number 0x{head.hex()}; expected 0x00000801 (labels) or "
            "0x00000803 (images) of an unsigned-byte IDX file"
        )
    header = 4 + 4 * ndim
    dims = read_at_most(stream, header - 4)
    if len(dims) < header - 4:
        raise PipelineError(f"{path}: truncated header ({4 + len(dims)} bytes, need {header})")
    shape = tuple(int.from_bytes(dims[4 * i: 4 * i + 4], "big") for i in range(ndim))
    expected = header + math.prod(shape)  # Python ints: a huge claimed shape cannot overflow

    def mismatch(has: str, truncated: bool = True) -> PipelineError:
        return PipelineError(f"{path}: file {'truncated' if truncated else 'has trailing bytes'}: header says "
                             f"shape {shape} ({expected} bytes) but the file has {has}")

    if not gzipped and size != expected:
        raise mismatch(f"{size} bytes", truncated=size < expected)
    if gzipped and expected > size * MAX_DEFLATE_RATIO:
        raise mismatch(f"{size} bytes of gzip, which decompress to at most {size * MAX_DEFLATE_RATIO} bytes")
    data = read_at_most(stream, expected - header + 1)  # one byte more than claimed: are there trailing bytes?
    if header + len(data) < expected:
        raise mismatch(f"{header + len(data)} bytes")
    if header + len(data) > expected:
        raise mismatch("more", truncated=False)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


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


def file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError as e:
        raise PipelineError(f"{path}: cannot read the file ({e.strerror}); check its permissions")


def raw_digest(raw: dict[str, Path]) -> str:
    """One digest of the four raw files' contents: the same data gives the same digest wherever it lies."""
    parts = {k: file_digest(p) for k, p in sorted(raw.items())}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Finding the raw files


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        try:
            if (directory / name).is_file():
                return directory / name
        except PermissionError as e:  # a folder we may not look into is a mistake to report, not skip
            raise PipelineError(f"cannot look into {directory} ({e.strerror}); check its permissions")
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
