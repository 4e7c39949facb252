"""`python -m trainer STAGE --config trainer/configs/NAME.yaml [key=value ...] [--resume latest]`.

The same command runs under `accelerate launch -m trainer ...` on several GPUs or nodes.
`STAGE` may be `all`, which runs the chain vae-encoder -> ... -> export in order (with decoder-tune where configured).
"""

import argparse
import sys

from tinysr.device import reuse_freed_memory
from tinysr.errors import missing_extra_message


def main(argv=None) -> int:
    try:
        from .config import STAGES, ConfigError, chain_stages, check, load_config
    except ImportError as e:  # a core install: say what to install, --help still works
        message = missing_extra_message(e)
        if message is None:
            raise
        parser = argparse.ArgumentParser(prog="tinysr-train", description=f"{__doc__}\nTraining: {message}.",
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("stage")
        parser.parse_known_args(argv)
        print(f"error: {message}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=[*STAGES, "all"])
    parser.add_argument("--config", required=True, help="YAML file, e.g. trainer/configs/demo.yaml")
    parser.add_argument("--resume", default=None, help="`latest` or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="config overrides like stages.distill-1.steps=10")
    args = parser.parse_intermixed_args(argv)
    reuse_freed_memory()
    try:
        cfg = load_config(args.config, args.overrides)
        stages = chain_stages(cfg) if args.stage == "all" else [args.stage]
        check(cfg, stages)
        from .stages import STAGE_FUNCTIONS, stage_function

        missing = [s for s in stages if s not in STAGE_FUNCTIONS]
        if missing:
            raise ConfigError(f"stage {missing[0]} is not implemented yet")
        for stage in stages:
            out = stage_function(stage)(cfg, stage, args.resume)
            print(f"[{stage}] done -> {out}", flush=True)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
