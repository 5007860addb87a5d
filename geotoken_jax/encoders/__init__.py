"""Pretrained encoders: what turns an image or a location into a vector.

  clip       the CLIP vision tower in Flax NNX and its weight loaders (Hugging Face
             and OpenAI / open_clip layouts, safetensors), CLIP preprocessing
  location   GeoCLIP's location encoder (Equal Earth or Web Mercator input, random
             Fourier feature capsules) and its weights, converted once from the
             `geoclip` wheel's torch files to safetensors
  heads      small MLP heads (G3's loc / text heads, GeoCLIP's image MLP)

Weights are never downloaded: every loader takes a path.  Each loader returns a
flat mapping {parameter path: numpy array} for its module's nnx.Param state,
so a trainer can place the arrays into already-sharded parameters.
"""
