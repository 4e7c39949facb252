from .autoencoder_patch import PatchAutoencoder
from .autoencoder_tiny import TinyAutoencoder
from .transformer_tinysr import TinySRTransformer

__all__ = ["PatchAutoencoder", "TinyAutoencoder", "TinySRTransformer"]
