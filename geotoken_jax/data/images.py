"""Image bytes: validation and RGB normalization at preparation time; decoding and
resizing / cropping / flipping at load time.  PIL only (no TensorFlow, no OpenCV).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile

# A truncated file must fail, not decode half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Flickr photos are large but not decompression bombs; keep PIL's default guard.

JPEG_QUALITY = 95


class UndecodableImage(ValueError):
  """The bytes are not a complete image PIL can decode."""


def to_rgb(image: Image.Image) -> Image.Image:
  """Grayscale, CMYK, palette and alpha images -> RGB (alpha composited on white)."""
  if image.mode == "RGB":
    return image
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")
  if image.mode in ("RGBA", "LA", "PA"):
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background
  return image.convert("RGB")


KEPT_FORMATS = ("JPEG", "PNG")  # RGB files of these formats are stored as they are


def normalize_image(data: bytes, *, max_side: int = 0) -> tuple[bytes, int, int]:
  """Validated RGB image bytes (and width, height) from any image file's bytes.

  An RGB JPEG or an RGB PNG that needs no resizing is kept byte for byte (no
  re-encoding loss: a PNG stays lossless, so exact pixel comparisons survive
  preparation); anything else (CMYK / grayscale JPEG, palette, alpha or
  grayscale PNG, other formats, or larger than max_side when max_side > 0) is
  converted to RGB and encoded as JPEG (quality 95).  Raises UndecodableImage
  for truncated or corrupt data.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # decodes every byte: truncation raises here
      fmt = image.format
      keep = fmt in KEPT_FORMATS and image.mode == "RGB" and (not max_side or max(image.size) <= max_side)
      if keep:
        return bytes(data), image.width, image.height
      rgb = to_rgb(image)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise UndecodableImage(str(e) or type(e).__name__) from None
  if max_side and max(rgb.size) > max_side:
    scale = max_side / max(rgb.size)
    rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
  out = io.BytesIO()
  rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
  return out.getvalue(), rgb.width, rgb.height


def decode_resized(data: bytes, size: int, *, rng: np.random.Generator | None = None,
                   scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                   flip: bool = False) -> np.ndarray:
  """Encoded image -> uint8 [size, size, 3].

  rng None: deterministic evaluation view (shorter side resized to `size`,
  centre crop).  When the shorter side already is `size`, the centre square
  is cut out without resampling (offset floor((long - size) / 2)): a 64x64
  image at size 64 comes back pixel for pixel.  With an rng: a random resized crop (area fraction in `scale`,
  aspect ratio in `ratio`, as Inception / torchvision) and, if `flip`, a
  random horizontal flip.  Large JPEGs are decoded at a reduced scale first
  (PIL draft mode), which is much faster and loses nothing at the target size.
  """
  with Image.open(io.BytesIO(data)) as image:
    image.draft("RGB", (size, size))  # JPEG: decode at >= size via DCT scaling
    image = to_rgb(image)
    width, height = image.size
    if rng is None and min(width, height) == size:
      left, top = (width - size) // 2, (height - size) // 2
      return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)
    if rng is None:
      side = min(width, height)
      box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    else:
      box = _random_box(width, height, rng, scale, ratio)
    out = image.resize((size, size), Image.BILINEAR, box=box)
    if rng is not None and flip and rng.random() < 0.5:
      out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, np.uint8)


def _random_box(width: int, height: int, rng: np.random.Generator, scale, ratio):
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w = np.sqrt(target * aspect)
    h = np.sqrt(target / aspect)
    if w <= width and h <= height:
      x = rng.uniform(0, width - w)
      y = rng.uniform(0, height - h)
      return (x, y, x + w, y + h)
  side = min(width, height)  # fall back to the centre square
  return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
