"""Uploaded PNG/JPEG -> the raw uint8 pixels the model takes ([1, C, H, W] from the model's input spec).

Converted as fetch converted the training images (tasks/data/decode.py: conform): to the spec's colour (PIL's
"L" or "RGB") and size (bilinear resize), whatever the upload's colour and size.

Ink polarity: MNIST digits are light strokes on a dark ground, while a digit drawn or photographed on paper
is dark on light. The upload is inverted only when both hold: the model takes one channel and its training
data was dark on average (spec mean below 0.5 of full scale: MNIST's is 0.13), and the upload's border is
light (mean above 127). Colour models, and gray models trained on light images, get the pixels as they are.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from tuneline.serving.errors import BadRequest
from tuneline.core.spec import InputSpec

FORMATS = ("PNG", "JPEG")
MAX_SIDE = 4096  # pixels; decoding a larger upload would cost memory for nothing at these input sizes


def inverts_light_background(spec: InputSpec) -> bool:
    """Whether uploads with a light border are inverted for this model (see the module docstring)."""
    return spec.channels == 1 and spec.mean[0] < 0.5


def decode_image(data: bytes, spec: InputSpec) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 [1, C, H, W] in the spec's colour and size; BadRequest for anything else."""
    channels, height, width = spec.shape
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in FORMATS:
            raise BadRequest(f"image format {image.format} is not accepted: send PNG or JPEG")
        if max(image.size) > MAX_SIDE:
            raise BadRequest(f"image is {image.size[0]}×{image.size[1]}: at most {MAX_SIDE} pixels a side")
        converted = image.convert("L" if channels == 1 else "RGB")
    # Pillow reports a malformed file as OSError, but also as SyntaxError ("broken PNG file"), ValueError
    # ("Truncated IHDR chunk") or EOFError, depending on where the damage is.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadRequest(f"not a readable PNG or JPEG image ({reason})") from None
    if channels not in (1, 3):
        raise BadRequest(f"the image endpoint serves gray or RGB models; this one takes {channels} channels: "
                         "send tensors to /v2/models/{name}/infer")
    if converted.size != (width, height):
        converted = converted.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(converted, dtype=np.uint8)
    if channels == 1:
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        if inverts_light_background(spec) and border.mean() > 127:
            pixels = 255 - pixels
        return pixels.reshape(1, 1, height, width)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)).reshape(1, channels, height, width)
