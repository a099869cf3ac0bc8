"""The photo benchmark: ``predict`` on photos, real test garments pasted on generated backgrounds.

Each garment is a real Fashion-MNIST image, scaled up (bicubic, as a camera would see a smooth edge),
painted onto a larger canvas at a random place with a random size, the way a photo of it would look:
where the dataset image has intensity ``t`` (0 = background, 1 = full garment), the photo mixes the
background with the garment's colour in proportions ``1 - t`` and ``t``. The canvas is then given the
background's flaws (gradient, texture, pixel noise, blur, JPEG) and written to a file, which goes
through ``read_photo`` exactly as ``predict`` reads it.

Everything is seeded: the same images, model and seed give the same photos and the same table. The
figures reported per background: accuracy, its fraction of the accuracy on the original 28x28 test
images ("clean"), how many photos were flagged unsure or refused, and the confident mistakes (top
probability above 0.9, not flagged unsure). A confident mistake whose answer is the one the model gives
for the original test image too is the model's own (a linear model is confidently wrong on some test
images whatever the photo) and is counted apart from those the photo caused.

``predict``'s unsure limits (``pipeline.core.photos``) were chosen with ``evaluate`` on validation
images; the benchmark's garments come from the test split.
"""

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from scipy import ndimage

from bench.common import Result
from pipeline.config import CLASS_NAMES, DataConfig, TrainConfig
from pipeline.core.models import build_model
from pipeline.core.photos import read_photo, top_k, unsure
from pipeline.core.splits import prepare_splits
from pipeline.core.training import Tensors, fit
from pipeline.errors import PipelineError

GARMENTS = 250  # test images pasted on every background
CONFIDENT = 0.9  # a wrong answer above this probability, not flagged unsure, is a confident mistake
KEEP_OF_CLEAN = 0.7  # every background must keep at least 70% of the clean accuracy


@dataclass(frozen=True)
class Background:
    """How a photo's background looks, and whether the garment is darker or lighter than it."""

    name: str
    key: str  # the name in the results file
    colour: tuple[int, int, int]  # RGB of the background at its centre
    garment: tuple[int, int, int]  # RGB of the garment where the dataset image is at full intensity
    gradient: float = 0.0  # brightness change across the photo, along a random direction (grey levels)
    texture: float = 0.0  # amplitude of a smooth, cloth- or paper-like texture (grey levels)
    noise: float = 0.0  # sigma of the pixel noise (grey levels)
    blur: float = 0.0  # Gaussian blur radius (pixels), a slightly soft lens
    jpeg_quality: int = 0  # saved as JPEG at this quality; 0 = PNG (lossless)


BACKGROUNDS = (
    Background("flat grey", "flat_grey", colour=(200, 200, 200), garment=(20, 20, 20)),
    Background("beige gradient", "beige_gradient", colour=(225, 205, 170), garment=(40, 30, 60), gradient=70),
    Background("grey, noise sigma 4", "noise_4", colour=(190, 190, 190), garment=(25, 25, 25), noise=4),
    Background("grey, noise sigma 8", "noise_8", colour=(190, 190, 190), garment=(25, 25, 25), noise=8),
    Background("photo-like: beige gradient, texture, noise sigma 7, blur, JPEG", "photo_jpeg",
               colour=(220, 200, 165), garment=(50, 40, 70), gradient=50, texture=12, noise=7, blur=1.0,
               jpeg_quality=70),
    Background("light garment on dark grey, noise sigma 6", "light_on_dark", colour=(70, 70, 75),
               garment=(230, 225, 215), gradient=25, noise=6),
    Background("dark garment on white paper, shadow, JPEG", "dark_on_light", colour=(245, 243, 238),
               garment=(30, 45, 90), gradient=40, texture=6, noise=3, jpeg_quality=85),
)


def smooth_field(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Random, smooth variations of unit spread: blurred white noise (a cloth's or paper's texture)."""
    field = ndimage.gaussian_filter(rng.standard_normal((height, width)), sigma=scale)
    return field / (field.std() + 1e-12)


def render(image: np.ndarray, background: Background, rng: np.random.Generator) -> Image.Image:
    """One photo of the 28x28 dataset ``image`` on ``background``, placed and sized by ``rng``."""
    side = int(rng.integers(90, 220))  # the garment's 28 pixels become this many
    canvas_w = int(side * rng.uniform(1.3, 2.0))
    canvas_h = int(side * rng.uniform(1.3, 2.0))
    x, y = int(rng.integers(0, canvas_w - side + 1)), int(rng.integers(0, canvas_h - side + 1))

    # the background: a colour, a gradient along a random direction, a smooth texture
    angle = rng.uniform(0, 2 * np.pi)
    rows, cols = np.mgrid[0:canvas_h, 0:canvas_w]
    along = ((cols / canvas_w - 0.5) * np.cos(angle) + (rows / canvas_h - 0.5) * np.sin(angle))
    level = background.gradient * along
    if background.texture:
        level = level + background.texture * smooth_field(rng, canvas_h, canvas_w, scale=side / 20)
    photo = np.asarray(background.colour, np.float32) + level[..., None]

    # the garment: the dataset's intensity mixes the background with the garment's colour
    big = Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC)
    t = np.clip(np.asarray(big, np.float32) / 255, 0, 1)[..., None]
    region = photo[y:y + side, x:x + side]
    region[:] = region * (1 - t) + np.asarray(background.garment, np.float32) * t

    if background.noise:  # sensor noise, the same in the three channels: grey noise of this sigma
        photo += background.noise * rng.standard_normal((canvas_h, canvas_w, 1))
    result = Image.fromarray(np.clip(photo, 0, 255).round().astype(np.uint8))
    if background.blur:
        result = result.filter(ImageFilter.GaussianBlur(background.blur))
    return result


def save(photo: Image.Image, background: Background, path_stem: Path) -> Path:
    if background.jpeg_quality:
        path = path_stem.with_suffix(".jpg")
        photo.save(path, quality=background.jpeg_quality)
    else:
        path = path_stem.with_suffix(".png")
        photo.save(path)
    return path


def chosen_garments(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` image indices drawn without replacement, seeded (the same for every background)."""
    return np.sort(np.random.default_rng(seed).choice(len(labels), size=min(count, len(labels)), replace=False))


@dataclass
class Row:
    """One background's figures (or the original test images', "clean")."""

    photos: int
    accuracy: float  # a refused photo counts as wrong
    unsure: int  # answers flagged unsure
    refused: int  # photos ``predict`` refused (no garment found)
    confident_wrong: int  # wrong above CONFIDENT, not flagged unsure, unlike the original image's answer
    model_confident_wrong: int  # the same, but the original image gets the same wrong answer


def score(tops: list, flags: list[bool], labels: np.ndarray, clean_answers: list[str], refused: int) -> Row:
    """A background's ``Row``, from the answers to the photos that were not refused."""
    answers = [top[0][0] for top in tops]
    right = [a == CLASS_NAMES[t] for a, t in zip(answers, labels)]
    confident_wrong = [not ok and not flag and top[0][1] > CONFIDENT for ok, flag, top in zip(right, flags, tops)]
    as_clean = [c and a == clean for c, a, clean in zip(confident_wrong, answers, clean_answers)]
    photos = len(tops) + refused
    return Row(photos=photos, accuracy=sum(right) / photos, unsure=sum(flags), refused=refused,
               confident_wrong=sum(confident_wrong) - sum(as_clean), model_confident_wrong=sum(as_clean))


def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, count: int = GARMENTS,
             seed: int = 0, backgrounds: tuple[Background, ...] = BACKGROUNDS) -> dict[str, Row]:
    """``count`` of ``images`` as photos on every background, read as ``predict`` reads them.

    Returns a ``Row`` for the original images ("clean") and one per background (by its ``key``).
    """
    chosen = chosen_garments(labels, count, seed)
    x, y = images[chosen], labels[chosen]
    clean = top_k(model, x)
    clean_answers = [top[0][0] for top in clean]
    rows = {"clean": score(clean, [unsure(top) for top in clean], y, clean_answers, refused=0)}
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        for b, background in enumerate(backgrounds):
            rng = np.random.default_rng([seed, b])
            photos, kept = [], []
            for i, image in enumerate(x):
                path = save(render(image, background, rng), background, Path(tmp) / f"{b}-{i}")
                try:
                    photos.append(read_photo(path))
                    kept.append(i)
                except PipelineError:  # no garment found: predict refuses the photo
                    pass
            tops = top_k(model, np.stack([p.pixels for p in photos])) if photos else []
            flags = [unsure(top, p.doubts) for top, p in zip(tops, photos)]
            rows[background.key] = score(tops, flags, y[kept], [clean_answers[i] for i in kept],
                                         refused=len(x) - len(kept))
    return rows


def markdown(rows: dict[str, Row]) -> str:
    """The table for the docs: one line per background."""
    names = {"clean": "original 28x28 test images", **{b.key: b.name for b in BACKGROUNDS}}
    clean = rows["clean"].accuracy
    lines = ["| background | accuracy | of clean | unsure | refused | confident mistakes (photo / model's own) |",
             "|---|---|---|---|---|---|"]
    for key, row in rows.items():
        lines.append(f"| {names.get(key, key)} | {row.accuracy:.3f} | {row.accuracy / clean:.0%} | {row.unsure} | "
                     f"{row.refused} | {row.confident_wrong} / {row.model_confident_wrong} |")
    return "\n".join(lines)


def run(quick: bool, data_dir: str | None) -> list[Result]:
    """The seed recipe trained on the full training split (a slice with --quick), then every background."""
    with tempfile.TemporaryDirectory(prefix="bench-photos-data-") as tmp:
        splits = prepare_splits(DataConfig(data_dir=data_dir or "", limit=1_000 if quick else 0),
                                cache_root=Path(tmp))[0]
    cfg = TrainConfig(epochs=2) if quick else TrainConfig()
    model = fit(build_model(cfg), Tensors.from_splits(splits), cfg).model
    count = 40 if quick else GARMENTS
    rows = evaluate(model, splits.test_x, splits.test_y, count=count)
    print(markdown(rows), flush=True)

    clean = rows["clean"].accuracy
    result = Result("photos", quick=quick, metrics={"garments_per_background": count},
                    note=f"seed recipe ({cfg.epochs} epochs, lr {cfg.lr}, batch {cfg.batch_size}) trained on the "
                         "training split; garments drawn from the test split; a refused photo counts as wrong")
    for key, row in rows.items():
        result.metrics[f"{key}_accuracy"] = row.accuracy
        result.details[key] = asdict(row)
        if key != "clean":
            result.check(f"{key}_kept", row.accuracy / clean, KEEP_OF_CLEAN, at_least=True,
                         text=f"{key}: accuracy at least {KEEP_OF_CLEAN:.0%} of clean")
    result.check("confident_wrong", sum(row.confident_wrong for row in rows.values()), 0, at_least=False,
                 text=f"no wrong answer above {CONFIDENT} without the unsure flag, unless the original image "
                      "gets it too")
    return [result]
