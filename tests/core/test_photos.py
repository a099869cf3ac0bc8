"""predict on photos: real test garments on photo-like backgrounds, doubtful photos, image bombs.

The photos are made here from real test images the way a photo of the garment would look (dark garment,
scaled up, off-centre on a larger light background); after ``image_to_array`` the model must predict
them as it predicts the original test image. The benchmark (``bench.photos``) does the same on seven
generated backgrounds, noise and JPEG included, with a model trained here by the seed recipe.
"""

import struct
import zlib

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

from bench import photos as benchmark
from pipeline.cli import cli
from pipeline.config import DataConfig, TrainConfig
from pipeline.core.image_files import MAX_PHOTO_PIXELS, WORK_SIDE
from pipeline.core.models import build_model
from pipeline.core.photos import SMOOTHING, UNSURE_BELOW, image_to_array, read_photo, top_k
from pipeline.core.splits import prepare_splits
from pipeline.core.training import Tensors, fit
from pipeline.errors import PipelineError
from pipeline.tracking.logged_models import log_model
from tests.fault_helpers import run_cli

CANVAS = (200, 170)  # width, height of the "photo"
OFFSET = (60, 30)  # where the garment is pasted: off-centre
SCALE = 4  # the 28-pixel garment becomes 112 pixels
BENCHMARK_GARMENTS = 120  # test images pasted on every background of the benchmark


@pytest.fixture(scope="module")
def model(real_slice):
    return fit(build_model(TrainConfig()), Tensors.from_splits(real_slice[0]), TrainConfig(epochs=3)).model


@pytest.fixture
def model_uri(model, real_slice, mlflow_store):
    """The module's model, logged to this test's store as training logs it."""
    with mlflow.start_run():
        return log_model(model, real_slice[0].val_x[:4], step=3).model_uri


def garment_darkness(test_image: np.ndarray) -> np.ndarray:
    """The test image scaled up, as 0 (background) .. 1 (garment): the photo's garment before inversion."""
    big = Image.fromarray(test_image).resize((28 * SCALE, 28 * SCALE), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 255


def on_background(test_image: np.ndarray, colour: tuple[int, int, int], canvas=CANVAS, offset=OFFSET) -> np.ndarray:
    """A dark garment on a plain background of ``colour`` (RGB), as float pixels."""
    pixels = np.empty((canvas[1], canvas[0], 3), dtype=np.float32)
    pixels[:] = colour
    darkness = garment_darkness(test_image)[..., None]
    x, y = offset
    region = pixels[y:y + darkness.shape[0], x:x + darkness.shape[1]]
    region *= 1 - darkness  # the garment darkens the background where it is
    return pixels


def as_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def transparent(test_image: np.ndarray) -> Image.Image:
    """A black garment whose alpha is its shape; transparent pixels store black (as many PNGs do)."""
    rgba = np.zeros((CANVAS[1], CANVAS[0], 4), dtype=np.uint8)
    darkness = garment_darkness(test_image)
    x, y = OFFSET
    rgba[y:y + darkness.shape[0], x:x + darkness.shape[1], 3] = (darkness * 255).round().astype(np.uint8)
    return Image.fromarray(rgba, mode="RGBA")


PHOTOS = {
    "dataset.png": Image.fromarray,  # the dataset's own 28x28 image
    "grey.jpg": lambda img: as_image(on_background(img, (200, 200, 200))),
    "blue.png": lambda img: as_image(on_background(img, (150, 190, 235))),
    "transparent.png": transparent,
}


def confident_test_images(model, splits, count=4):
    """Indices of test images of different classes that the model predicts with probability > 0.8."""
    chosen, classes = [], set()
    for i, top in enumerate(top_k(model, splits.test_x[:200], k=1)):
        name, p = top[0]
        if p > 0.8 and name not in classes:
            chosen.append(i)
            classes.add(name)
        if len(chosen) == count:
            break
    return chosen


@pytest.mark.parametrize("kind", PHOTOS)
def test_photo_predicted_as_its_test_image(model, real_slice, tmp_path, kind):
    splits = real_slice[0]
    indices = confident_test_images(model, splits)
    assert len(indices) == 4
    arrays = []
    for i in indices:
        path = tmp_path / f"{i}-{kind}"
        PHOTOS[kind](splits.test_x[i]).save(path)
        arrays.append(image_to_array(path))
    photos = [top[0][0] for top in top_k(model, np.stack(arrays), k=1)]
    originals = [top[0][0] for top in top_k(model, splits.test_x[indices], k=1)]
    assert photos == originals
    # and the image the model sees is the test image again, up to resampling
    assert np.abs(arrays[0].astype(int) - splits.test_x[indices[0]]).mean() < 20


def test_a_garment_covering_much_of_the_border_is_not_taken_for_background(model, real_slice, tmp_path):
    """Dataset images whose garment (a bag, a pullover) covers over a third of the 2-pixel border."""
    splits = real_slice[0]
    border = np.ones((28, 28), dtype=bool)
    border[2:-2, 2:-2] = False
    wide = [i for i, img in enumerate(splits.test_x) if (img[border] > 0).mean() > 1 / 3][:8]
    assert len(wide) == 8
    arrays = []
    for i in wide:
        Image.fromarray(splits.test_x[i]).save(tmp_path / f"{i}.png")
        arrays.append(image_to_array(tmp_path / f"{i}.png"))
    photos = [top[0][0] for top in top_k(model, np.stack(arrays), k=1)]
    originals = [top[0][0] for top in top_k(model, splits.test_x[wide], k=1)]
    assert photos == originals


def test_without_normalising_a_grey_background_the_model_sees_a_veil(real_slice, tmp_path):
    """Why the background is subtracted: inverted, a light grey background becomes dark grey, not black."""
    path = tmp_path / "grey.png"
    as_image(on_background(real_slice[0].test_x[0], (200, 200, 200))).save(path)
    naive = 255 - np.asarray(Image.open(path).convert("L"))
    assert np.median(naive) == 55  # the veil the model would read as a bag
    assert np.median(image_to_array(path)) == 0


def test_blank_image_is_refused_in_one_line(tmp_path):
    path = tmp_path / "blank.png"
    Image.new("RGB", (50, 40), (120, 130, 140)).save(path)
    with pytest.raises(PipelineError, match="blank.png: the image is blank .* plain background"):
        image_to_array(path)


# ---------------------------------------------------------------------------------------------------
# Photos in which the garment does not stand out clearly: predicted, but flagged unsure


def two_garments(test_image: np.ndarray) -> Image.Image:
    """The same garment twice, side by side with a wide gap: which one is meant?"""
    pixels = on_background(test_image, (200, 200, 200), canvas=(340, 170), offset=(20, 30))
    pixels[30:142, 208:320] *= 1 - garment_darkness(test_image)[..., None]
    return as_image(pixels)


def close_up() -> Image.Image:
    """A dark, grainy fabric filling all of the photo but a thin light margin: no garment shape to see."""
    pixels = np.full((300, 300), 235, dtype=np.float32)
    pixels[9:-9, 9:-9] = 60 + 15 * np.random.default_rng(0).standard_normal((282, 282))
    return as_image(pixels)


def faint(test_image: np.ndarray) -> Image.Image:
    """A garment only a few noise levels darker than a noisy background (with one clearly dark patch).

    The photo is as wide as ``predict`` works (``WORK_SIDE``), so its noise reaches the garment search
    only smoothed (scipy's Gaussian filter of ``SMOOTHING``): that spread is what the garment must beat.
    """
    noise = 40 * np.random.default_rng(0).standard_normal((200, WORK_SIDE))
    spread = ndimage.gaussian_filter(noise, SMOOTHING).std()
    shape = garment_darkness(test_image) > 0.2
    pixels = 170 + noise
    pixels[40:152, 70:182][shape] = 170 - 3.4 * spread  # uniform: the garment hides the noise behind it
    pixels[90:102, 120:132] = 170 - 10 * spread  # a label that does stand out
    return as_image(pixels)


def test_predict_prints_top_three_and_says_when_unsure(model, model_uri, real_slice, tmp_path):
    """Through the command: three classes per image, and 'unsure' with its reasons: a low top probability,
    or a photo whose garment is not clear. A photo with no garment at all is refused, the rest predicted."""
    test_x = real_slice[0].test_x
    paths = {}
    for i in range(6):  # plain photos: unsure only when the top probability is low
        paths[f"{i}.png"] = as_image(on_background(test_x[i], (200, 200, 200)))
    paths["two.png"] = two_garments(test_x[0])
    paths["close-up.png"] = close_up()
    paths["faint.png"] = faint(test_x[1])
    paths["noise.png"] = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 90, 3), dtype=np.uint8))
    for name, image in paths.items():
        image.save(tmp_path / name)
    out = CliRunner().invoke(cli, ["predict", "--model-uri", model_uri, *(str(tmp_path / n) for n in paths)])

    assert out.exit_code == 1, out.output  # one image failed ...
    assert out.stderr.strip() == (f"error: {tmp_path / 'noise.png'}: the image is blank (no garment stands out "
                                  "from its background); give a photo of one garment on a plain background")
    lines = {line.split(": ")[0]: line for line in out.stdout.splitlines()}
    assert len(lines) == len(paths) - 1  # ... and every other one was predicted
    expected_doubts = {"two.png": "several objects stand out from the background",
                       "close-up.png": "the garment fills the whole photo, with no background around it",
                       "faint.png": "the garment barely stands out from the background's noise"}
    for name in list(paths)[:-1]:
        photo = read_photo(tmp_path / name)
        top = top_k(model, photo.pixels[None])[0]
        line = lines[str(tmp_path / name)]
        assert line.split(": ", 1)[1].startswith(", ".join(f"{c} {p:.3f}" for c, p in top))  # three classes
        doubts = [expected_doubts[name]] if name in expected_doubts else []
        assert photo.doubts == doubts
        reasons = ([f"top probability below {UNSURE_BELOW}"] if top[0][1] < UNSURE_BELOW else []) + doubts
        assert line.endswith(f"  (unsure: {'; '.join(reasons)})" if reasons else f"{top[2][1]:.3f}")


# ---------------------------------------------------------------------------------------------------
# Images too large to decode: refused from their header, the others still predicted


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def black_png(path, width: int, height: int, with_pixels: bool = True) -> None:
    """A real grey PNG of zeros, compressed row by row (a few hundred kB for 400 megapixels); without
    pixels, just the header that claims the size (all a reader needs to learn it)."""
    chunks = [png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))]
    if with_pixels:
        compressor, row = zlib.compressobj(9), bytes(width + 1)  # each row: its filter byte, then the pixels
        chunks.append(png_chunk(b"IDAT", b"".join(compressor.compress(row) for _ in range(height))
                                + compressor.flush()))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + png_chunk(b"IEND", b""))


@pytest.mark.slow
def test_image_bombs_are_refused_one_line_each_and_the_rest_predicted(model_uri, real_slice, subprocess_env,
                                                                      tmp_path):
    bombs = {"claims-60000x60000.png": (60000, 60000, False),  # a 57-byte file
             "20000x20000.png": (20000, 20000, True),  # beyond PIL's own limit: DecompressionBombError
             "12000x12000.png": (12000, 12000, True),  # within it: only DecompressionBombWarning
             "8000x7000.png": (8000, 7000, True)}  # within PIL's limits, beyond ours
    for name, (width, height, pixels) in bombs.items():
        black_png(tmp_path / name, width, height, pixels)
        assert width * height > MAX_PHOTO_PIXELS
    photo = tmp_path / "shirt.png"
    as_image(on_background(real_slice[0].test_x[0], (200, 200, 200))).save(photo)

    done = run_cli(subprocess_env, "predict", "--model-uri", model_uri, *(tmp_path / name for name in bombs), photo,
                   "--test", "2", "--data", real_slice[1])
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    too_many = "claims more than 89 megapixels; predict takes at most 50 megapixels: scale it down and try again"
    assert errors == [f"error: {tmp_path / 'claims-60000x60000.png'}: the image {too_many}",
                      f"error: {tmp_path / '20000x20000.png'}: the image {too_many}",
                      f"error: {tmp_path / '12000x12000.png'}: the image {too_many}",
                      f"error: {tmp_path / '8000x7000.png'}: the image is 8000x7000 pixels; predict takes at most "
                      "50 megapixels: scale it down and try again"]
    predicted = [line.split(":")[0] for line in done.stdout.splitlines()]
    assert predicted == [str(photo), "test[0] (true", "test[1] (true"]


def test_a_negative_test_count_is_refused(model_uri, real_slice):
    out = CliRunner().invoke(cli, ["predict", "--model-uri", model_uri, "--data", str(real_slice[1]), "--test", "-3"])
    assert out.exit_code == 2  # click's usage error, before any model is loaded
    assert "Invalid value for '--test': -3 is not in the range x>=0" in out.output
    assert "test[" not in out.output


# ---------------------------------------------------------------------------------------------------
# The benchmark: every background keeps the accuracy, and no confident mistake goes unflagged


@pytest.fixture(scope="module")
def full_splits(real_data_dir, tmp_path_factory):
    return prepare_splits(DataConfig(data_dir=str(real_data_dir)), cache_root=tmp_path_factory.mktemp("full"))[0]


@pytest.mark.slow
def test_photo_benchmark_holds_on_every_background(full_splits):
    cfg = TrainConfig()  # the seed recipe, on the full training split
    model = fit(build_model(cfg), Tensors.from_splits(full_splits), cfg).model
    rows = benchmark.evaluate(model, full_splits.test_x, full_splits.test_y, count=BENCHMARK_GARMENTS)
    clean = rows.pop("clean")
    assert clean.photos == BENCHMARK_GARMENTS and clean.accuracy > 0.75
    assert set(rows) == {b.key for b in benchmark.BACKGROUNDS}
    for key, row in rows.items():
        assert row.photos == BENCHMARK_GARMENTS
        assert row.accuracy >= benchmark.KEEP_OF_CLEAN * clean.accuracy, (key, row, clean)
        assert row.confident_wrong == 0, (key, row)


def test_photo_set_is_seeded(real_slice, tmp_path):
    """The same seed gives the same photo, byte for byte (JPEG included); another seed another photo."""
    image, background = real_slice[0].test_x[0], benchmark.BACKGROUNDS[4]

    def photo_bytes(seed: int, name: str) -> bytes:
        photo = benchmark.render(image, background, np.random.default_rng(seed))
        return benchmark.save(photo, background, tmp_path / name).read_bytes()

    assert photo_bytes(0, "a") == photo_bytes(0, "b") != photo_bytes(1, "c")
