"""TinySR training stages (tiny VAE, latent cache, pruning search, distillation) on accelerate.

The stages are tracked in the trainer issue; this package holds them as they land.
"""
