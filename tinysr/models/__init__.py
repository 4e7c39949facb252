from .autoencoder_tiny import TinyAutoencoder
from .transformer_tinysr import TinySRTransformer

__all__ = ["TinyAutoencoder", "TinySRTransformer"]
