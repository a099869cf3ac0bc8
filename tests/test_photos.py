"""predict on photo-like images: a real test-set garment on a grey, a coloured or a transparent background.

The images are made here from real test images the way a photo of the garment would look (dark garment,
scaled up, off-centre on a larger light background); after ``image_to_array`` the model must predict
them as it predicts the original test image.
"""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.config import TrainConfig
from pipeline.core.images import UNSURE_BELOW, image_to_array, top_k
from pipeline.core.model import build_model
from pipeline.core.training import Tensors, fit
from pipeline.errors import PipelineError

CANVAS = (200, 170)  # width, height of the "photo"
OFFSET = (60, 30)  # where the garment is pasted: off-centre
SCALE = 4  # the 28-pixel garment becomes 112 pixels


@pytest.fixture(scope="module")
def model(real_slice):
    return fit(build_model(0), Tensors.from_splits(real_slice[0]), TrainConfig(epochs=3)).model


def garment_darkness(test_image: np.ndarray) -> np.ndarray:
    """The test image scaled up, as 0 (background) .. 1 (garment): the photo's garment before inversion."""
    big = Image.fromarray(test_image).resize((28 * SCALE, 28 * SCALE), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 255


def on_background(test_image: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    """A dark garment on a plain background of ``colour`` (RGB)."""
    canvas = np.empty((CANVAS[1], CANVAS[0], 3), dtype=np.float32)
    canvas[:] = colour
    darkness = garment_darkness(test_image)[..., None]
    x, y = OFFSET
    region = canvas[y:y + darkness.shape[0], x:x + darkness.shape[1]]
    region *= 1 - darkness  # the garment darkens the background where it is
    return Image.fromarray(canvas.round().astype(np.uint8))


def transparent(test_image: np.ndarray) -> Image.Image:
    """A black garment whose alpha is its shape; transparent pixels store black (as many PNGs do)."""
    rgba = np.zeros((CANVAS[1], CANVAS[0], 4), dtype=np.uint8)
    darkness = garment_darkness(test_image)
    x, y = OFFSET
    rgba[y:y + darkness.shape[0], x:x + darkness.shape[1], 3] = (darkness * 255).round().astype(np.uint8)
    return Image.fromarray(rgba, mode="RGBA")


PHOTOS = {
    "grey.jpg": lambda img: on_background(img, (200, 200, 200)),
    "blue.png": lambda img: on_background(img, (150, 190, 235)),
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


def test_without_normalising_a_grey_background_the_model_sees_a_veil(real_slice, tmp_path):
    """Why step 3 exists: inverted, a light grey background becomes a uniform dark grey, not black."""
    path = tmp_path / "grey.png"
    on_background(real_slice[0].test_x[0], (200, 200, 200)).save(path)
    naive = 255 - np.asarray(Image.open(path).convert("L"))
    assert np.median(naive) == 55  # the veil the old predict passed on to the model
    assert np.median(image_to_array(path)) == 0


def test_blank_image_is_refused_in_one_line(tmp_path):
    path = tmp_path / "blank.png"
    Image.new("RGB", (50, 40), (120, 130, 140)).save(path)
    with pytest.raises(PipelineError, match="blank.png: the image is blank .* plain background"):
        image_to_array(path)


def test_predict_prints_top_three_and_says_when_unsure(model, real_slice, tmp_path, mlflow_store):
    """Through the command: three classes per image, and 'unsure' exactly when the top one is unlikely."""
    import mlflow

    from pipeline.support.tracking import log_model

    with mlflow.start_run():
        info = log_model(model, real_slice[0].val_x[:4], step=3)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        on_background(real_slice[0].test_x[i], (200, 200, 200)).save(paths[-1])
    paths.append(tmp_path / "noise.png")  # no garment at all: the model must not sound sure
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 90, 3), dtype=np.uint8)).save(paths[-1])
    out = CliRunner().invoke(cli, ["predict", "--model-uri", info.model_uri, *map(str, paths)])
    assert out.exit_code == 0, out.output
    tops = top_k(model, np.stack([image_to_array(p) for p in paths]))
    for path, top in zip(paths, tops):
        line = next(line for line in out.output.splitlines() if line.startswith(f"{path}:"))
        assert line.count(",") == 2  # three classes
        assert line.split(": ")[1].startswith(f"{top[0][0]} {top[0][1]:.3f}")
        assert ("unsure" in line) == (top[0][1] < UNSURE_BELOW)
    assert "unsure" in out.output.splitlines()[-1]  # the noise
