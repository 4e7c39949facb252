"""TinySR's training stages (tiny VAE, latent cache, pruning search, two-stage distillation) on accelerate."""
