"""Steps 1 and 2 of ``pipeline.core.photos.read_photo``: an image file decoded safely (a decompression
bomb refused before any pixel is decoded) and small (grey, its longer side ``WORK_SIDE`` pixels)."""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import PipelineError

# A 50-megapixel photo is larger than a phone camera's usual output and decodes to 150 MB of RGB; past
# it, decoding costs gigabytes for no better a 28x28 garment.
MAX_PHOTO_PIXELS = 50_000_000
WORK_SIDE = 256  # the longer side of the photo while the garment is searched: ample for a 28x28 garment


def flatten_onto_white(img: Image.Image) -> Image.Image:
    """RGB(A)/LA/P with transparency -> grey, the transparent parts white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("L")


def too_large(path: Path, claim: str) -> PipelineError:
    return PipelineError(f"{path}: the image {claim}; predict takes at most {MAX_PHOTO_PIXELS // 1_000_000} "
                         "megapixels: scale it down and try again")


def load_grey(path: Path) -> np.ndarray:
    """The image as float32 grey levels, its longer side ``WORK_SIDE`` pixels (steps 1 and 2)."""
    try:
        with warnings.catch_warnings():
            # PIL warns (and past twice its own limit raises) at open, before any pixel is decoded
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PHOTO_PIXELS:
                    raise too_large(path, f"is {img.width}x{img.height} pixels")
                img.draft(img.mode, (WORK_SIDE, WORK_SIDE))  # JPEG: decode at a reduced scale, much less memory
                grey = flatten_onto_white(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # PIL's own limit, above ours
        raise too_large(path, f"claims more than {Image.MAX_IMAGE_PIXELS // 1_000_000} megapixels")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise PipelineError(f"{path}: cannot read the image ({e})")
    return np.asarray(to_work_size(grey), dtype=np.float32)


def to_work_size(grey: Image.Image) -> Image.Image:
    """The longer side resized to ``WORK_SIDE``, the aspect kept: the smoothing and the border band are
    then the same small fraction of every photo, a 28x28 one included."""
    scale = WORK_SIDE / max(grey.size)
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    # shrinking averages whole pixels (and their noise); enlarging interpolates smoothly
    return grey.resize(size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC)
