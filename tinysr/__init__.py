"""TinySR: one-step 4x real-world super-resolution with a pruned, condition-free SD3 transformer."""

from .models import TinyAutoencoder, TinySRTransformer
from .pipelines import TinySRPipeline, TSDSRPipeline, load_pipeline

__version__ = "0.1.0"
__all__ = ["TSDSRPipeline", "TinyAutoencoder", "TinySRPipeline", "TinySRTransformer", "load_pipeline"]
