"""Encoders (image and location towers): what turns an image or a location into vectors.

  clip       the CLIP vision tower in Flax NNX and its weight loaders (Hugging Face
             and OpenAI / open_clip layouts, safetensors), CLIP preprocessing
  location   GeoCLIP's location encoder (Equal Earth or Web Mercator input, random
             Fourier feature capsules) and its weights, converted once from the
             `geoclip` wheel's torch files to safetensors
  vit        a ViT image encoder trained from scratch (uint8 pixels in, patch tokens
             out) and its presets (`vit.vit_config`)
  geoclip_weights  GeoCLIP's .pth weights -> safetensors (read once by a restricted
             unpickler: no torch)
  tiny_image the Im2GPS tiny-image embedding (area average to S x S, grey or colour,
             mean-centred, L2-normalized): no parameters, no training

The MLP heads and the transformer blocks the towers are built from live one
layer down, in geotoken_jax.nn (nn.heads, nn.layers); geotoken_jax.models
builds on these towers and is never imported from here.

Weights are never downloaded: every loader takes a path.  Each loader returns a
flat mapping {parameter path: numpy array} for its module's nnx.Param state,
so a trainer can place the arrays into already-sharded parameters.
"""
