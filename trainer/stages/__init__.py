"""Stage name -> the function that runs it (`fn(cfg, stage, resume) -> output folder`)."""

import importlib

STAGE_FUNCTIONS = {
    "vae-encoder": "vae:run_vae_encoder",
    "vae-decoder": "vae:run_vae_decoder",
    "decoder-tune": "vae:run_decoder_tune",
    "cache": "export:run_cache",
    "prune-search": "pruning:run_prune_search",
    "prune-tinyfusion": "pruning:run_prune_search",
    "prune-shortgpt": "pruning:run_prune_shortgpt",
    "prune-export": "pruning:run_prune_export",
    "distill-1": "distill:run_distill",
    "distill-2": "distill:run_distill",
    "export": "export:run_export",
    "token-prune": "token_prune:run_token_prune",
    "demo-prior": "standins:run_prior",
    "demo-base-vae": "standins:run_base_vae",
    "demo-teacher": "standins:run_teacher",
    "demo-teacher-tune": "standins:run_teacher",
    "demo-teacher-decoder": "standins:run_teacher_decoder",
}


def stage_function(stage: str):
    module, name = STAGE_FUNCTIONS[stage].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
