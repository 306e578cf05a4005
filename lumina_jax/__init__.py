"""lumina-jax: Lumina-mGPT (Chameleon decoder + VQGAN image tokenizer) in JAX/Flax.

Axis legend, the one meaning of each letter in shapes, einsums and comments across the package:

  decoder   B batch, T query length (new tokens), S key length (cache slots, or T without a cache),
            N query heads, K kv heads, G query heads per kv head (N = K * G), H head dim, D model dim,
            F MLP width, V vocabulary, L layers, c positions per loss chunk
  images    B batch, W x H image width and height in pixels (sizes are written (W, H), arrays (B, H, W, C)),
            h x w latent grid (H/16, W/16), C channels, E code width, M codebook size,
            (kh, kw, I, O) a convolution kernel: kernel height and width, input and output channels

H is the head dim in decoder shapes and the image height in image shapes; the two never meet in one
expression. A parameter count is written P, never N.
"""

__version__ = "0.1.0"
