"""Uploaded PNG/JPEG digit -> the raw uint8 pixels the model takes ([1, H, W] from the model's input spec)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.errors import BadRequest

FORMATS = ("PNG", "JPEG")
MAX_SIDE = 4096  # pixels; a larger upload is not a digit, and decoding it would cost memory for nothing


def decode_digit(data: bytes, image_shape: tuple[int, ...]) -> np.ndarray:
    """Grey-scale, resized to the model's H×W, light-on-dark like MNIST; uint8 [1, *image_shape]."""
    channels, height, width = image_shape
    if channels != 1:
        raise BadRequest(f"the image endpoint serves grey-scale models; this one takes {channels} channels")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in FORMATS:
            raise BadRequest(f"image format {image.format} is not accepted: send PNG or JPEG")
        if max(image.size) > MAX_SIDE:
            raise BadRequest(f"image is {image.size[0]}×{image.size[1]}: at most {MAX_SIDE} pixels a side")
        grey = image.convert("L")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise BadRequest(f"not a readable PNG or JPEG image ({exc})") from None
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.uint8)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 127:  # dark ink on light paper: MNIST digits are light on dark
        pixels = 255 - pixels
    return pixels.reshape(1, *image_shape)
