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


RESIZE_MODES = ("default", "clip")


def decode_resized(data: bytes, size: int, *, rng: np.random.Generator | None = None,
                   scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                   flip: bool = False, mode: str = "default") -> np.ndarray:
  """Encoded image -> uint8 [size, size, 3].

  rng None: deterministic evaluation view (shorter side resized to `size`,
  centre crop).  When the shorter side already is `size`, the centre square
  is cut out without resampling (offset floor((long - size) / 2)): a 64x64
  image at size 64 comes back pixel for pixel.  With an rng: a random resized crop (area fraction in `scale`,
  aspect ratio in `ratio`, as Inception / torchvision) and, if `flip`, a
  random horizontal flip.

  mode "default": large JPEGs are decoded at a reduced scale first (PIL draft
  mode, DCT scaling: much faster, close but not identical pixels), then
  resampled bilinearly.
  mode "clip": what CLIP's weights expect, exactly transformers'
  CLIPImageProcessor (PIL backend): decoded at full resolution (no draft), the
  evaluation view is `clip_resize_crop` (bicubic, its rounding); the training
  crop is resampled bicubically (antialiased, as every PIL resize) from the
  full-resolution image.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
  with Image.open(io.BytesIO(data)) as image:
    if mode == "default":
      image.draft("RGB", (size, size))  # JPEG: decode at >= size via DCT scaling
    image = to_rgb(image)
    if rng is None and mode == "clip":
      return clip_resize_crop(image, size)
    width, height = image.size
    if rng is None and min(width, height) == size:
      left, top = (width - size) // 2, (height - size) // 2
      return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)
    if rng is None:
      side = min(width, height)
      box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    else:
      box = _random_box(width, height, rng, scale, ratio)
    resample = Image.BICUBIC if mode == "clip" else Image.BILINEAR
    out = image.resize((size, size), resample, box=box)
    if rng is not None and flip and rng.random() < 0.5:
      out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, np.uint8)


def clip_resize_crop(image: Image.Image, size: int) -> np.ndarray:
  """RGB PIL image -> uint8 [size, size, 3], by transformers' CLIPImageProcessor rules (PIL
  backend, size={"shortest_edge": size}, crop_size size x size).

  The short side becomes `size` and the long side int(size * long / short)
  (truncated, not rounded); PIL's BICUBIC resize of the whole image
  (reducing_gap None: no reduce() shortcut; PIL antialiases a downscale by
  widening the filter); an image already of that size is not resampled.  The
  crop starts at (new - size) // 2 in each axis.  (torchvision's CenterCrop
  rounds that offset instead, so the OpenAI / torchvision pipelines can differ
  by one pixel row.)  No /255 or mean / std: the tower does those on device.
  """
  width, height = image.size
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if width <= height else (new_long, size)
  if (new_w, new_h) != (width, height):
    image = image.resize((new_w, new_h), resample=Image.BICUBIC)
  pixels = np.asarray(image, np.uint8)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.ascontiguousarray(pixels[top:top + size, left:left + size])


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
