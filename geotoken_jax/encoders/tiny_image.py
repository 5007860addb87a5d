"""The tiny-image embedding (Im2GPS's baseline): no training, no parameters.

  spec = parse("tiny_image:16:colour")         # TinyImageSpec(size=16, colour=True)
  vectors = embed(images, spec)                # uint8 [B, H, W, 3] -> float32 [B, S*S] or [B, S*S*3]

An image becomes a vector in four steps, all in float32:
  1. grey (the default): the BT.601 luma 0.299 R + 0.587 G + 0.114 B (PIL's "L"); colour keeps RGB;
  2. an area average down to S x S (default 16): output pixel (i, j) is the mean of the input
     over the square [i H/S, (i+1) H/S) x [j W/S, (j+1) W/S), input pixels weighted by their
     overlap with it (cv2's INTER_AREA, PIL's box filter; a plain block mean when S divides H);
  3. the S*S (grey) or S*S*3 (colour, row-major over rows, columns, channels) values are
     mean-centred: their mean over the whole vector is subtracted;
  4. L2-normalized (a constant image, all zero after step 3, stays zero).

Step 2 is two matrix products with fixed weights (area_weights), at HIGHEST precision (no
bf16 / TF32 passes on accelerators).  The vector is what retrieval searches (cosine = inner
product of unit vectors): a nearest neighbour over these is Im2GPS's "tiny images" kNN.

Its identity (identity(spec, image_size, resize)) names everything that decides the
vectors: the embedding, S, colour, and the pixels it read (the images' side and the
data pipeline's resize mode); an embedding store records it, and retrieval refuses a
store written by another embedder.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NAME = "tiny_image"
FIELD = "tiny"  # the one field a tiny-image store holds
DEFAULT_SIZE = 16
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, PIL's convert("L")


@dataclasses.dataclass(frozen=True)
class TinyImageSpec:
  size: int = DEFAULT_SIZE
  colour: bool = False

  def __post_init__(self):
    if int(self.size) < 1:
      raise ValueError(f"tiny_image: the size must be >= 1, got {self.size}")

  @property
  def dim(self) -> int:
    return int(self.size) ** 2 * (3 if self.colour else 1)

  def __str__(self) -> str:
    return f"{NAME}:{int(self.size)}{':colour' if self.colour else ''}"


def is_tiny_image(text) -> bool:
  """Does `text` name the tiny-image embedding ("tiny_image[:S[:colour|grey]]")?"""
  return isinstance(text, str) and text.split(":")[0].strip() == NAME


def parse(text: str) -> TinyImageSpec:
  """"tiny_image", "tiny_image:S", "tiny_image:S:colour" (or ":color"), "tiny_image:S:grey"."""
  parts = [p.strip() for p in str(text).split(":")]
  if parts[0] != NAME or len(parts) > 3:
    raise ValueError(f"not a tiny-image embedding: {text!r} (use tiny_image[:SIZE[:colour]])")
  size = DEFAULT_SIZE
  if len(parts) > 1 and parts[1]:
    try:
      size = int(parts[1])
    except ValueError:
      raise ValueError(f"{text!r}: the size must be an integer, got {parts[1]!r}") from None
  colour = False
  if len(parts) > 2:
    if parts[2] not in ("colour", "color", "grey", "gray"):
      raise ValueError(f"{text!r}: the third part must be colour or grey, got {parts[2]!r}")
    colour = parts[2] in ("colour", "color")
  return TinyImageSpec(size, colour)


def identity(spec: TinyImageSpec, image_size: int, resize: str) -> dict:
  """What an embedding store records of the embedder that wrote it (manifest `extra`):
  everything that decides the vectors, nothing else."""
  return {"embedding": NAME, "size": int(spec.size), "colour": bool(spec.colour), "image_size": int(image_size),
          "resize": str(resize)}


def area_weights(source: int, target: int) -> np.ndarray:
  """float64 [target, source]: row i averages input pixels [i s/t, (i+1) s/t), each weighted by
  its overlap with that interval (rows sum to 1)."""
  edges = np.arange(target + 1, dtype=np.float64) * source / target
  pixels = np.arange(source, dtype=np.float64)
  overlap = np.clip(np.minimum(edges[1:, None], pixels[None, :] + 1) - np.maximum(edges[:-1, None], pixels[None, :]),
                    0.0, None)
  return overlap * (target / source)


def embed(images, spec: TinyImageSpec) -> jax.Array:
  """uint8 (or float) images [B, H, W, 3] -> float32 [B, spec.dim]: the module docstring's steps."""
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"tiny_image reads RGB images [batch, height, width, 3], got {images.shape}")
  b, h, w, _ = images.shape
  x = images.astype(jnp.float32)
  highest = jax.lax.Precision.HIGHEST
  if not spec.colour:
    x = jnp.einsum("bhwc,c->bhw", x, jnp.asarray(LUMA, jnp.float32), precision=highest)[..., None]
  rows = jnp.asarray(area_weights(h, int(spec.size)), jnp.float32)  # [S, H]
  cols = jnp.asarray(area_weights(w, int(spec.size)), jnp.float32)  # [S, W]
  small = jnp.einsum("sh,bhwc->bswc", rows, x, precision=highest)
  small = jnp.einsum("tw,bswc->bstc", cols, small, precision=highest)  # [B, S, S, C]
  v = small.reshape(b, -1)
  v = v - jnp.mean(v, axis=1, keepdims=True)
  norm = jnp.sqrt(jnp.sum(v * v, axis=1, keepdims=True))
  return jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1.0), 0.0)
