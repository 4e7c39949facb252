"""What every stage's loop shares: accelerate setup, seeded batches, atomic checkpoints, logs.

A stage writes its own loop (nanoGPT style) and calls into a `TrainingRun` for the plumbing:

    run = TrainingRun(cfg, "distill-1", resume)
    opt, schedule = run.optimizer(params)
    model, opt, schedule = run.prepare(model, opt, schedule)
    for step in run.steps():
        batch = run.batch(dataset, step)
        with run.accelerator.accumulate(model):
            loss = ...
            run.optimizer_step(loss, opt, params, schedule)
        run.log(step, loss=loss.item(), lr=schedule.get_last_lr()[0])
    run.finish()

Batches and any noise are drawn from generators seeded by (seed, step), so a resumed run
sees exactly what an uninterrupted one would have seen; each checkpoint records the settings and inputs it was
trained with (trainer.provenance), so that a resume continues only the same training.
"""

import json
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import SAFE_WEIGHTS_NAME, set_seed
from diffusers.optimization import get_scheduler
from safetensors import safe_open

from .config import ConfigError, stage_dir
from .provenance import checkpoint_differences, training_record

CHECKPOINTS = "checkpoints"


def latest_checkpoint(directory: Path) -> Path | None:
    """A stage folder's last complete checkpoint."""
    complete = sorted((directory / CHECKPOINTS).glob("step-*[0-9]")) if (directory / CHECKPOINTS).is_dir() else []
    complete = [p for p in complete if (p / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


class TrainingRun:
    def __init__(self, cfg, stage: str, resume: str | None = None):
        self.cfg, self.stage = cfg, stage
        self.scfg = cfg.stages[stage]
        self.dir = stage_dir(cfg, stage)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=self.scfg.grad_accum,
            log_with=list(cfg.report_to),
            project_dir=str(self.dir),
        )
        set_seed(cfg.seed)
        self.accelerator.init_trackers(f"{cfg.name}-{stage}")
        self.accelerator.register_save_state_pre_hook(self._drop_frozen_parameters)
        self.start_step = 0
        # the main process records and checks (the others may start before it has written the last stage's output;
        # a refusal there ends the whole launch)
        self.record = training_record(cfg, stage, self.accelerator.num_processes) if self.is_main else None
        self.resume_from = self._find_checkpoint(resume) if resume else None
        if self.resume_from is not None and self.is_main:
            self._refuse_other_training()
        self._t0 = time.perf_counter()
        self._last_step_time = self._t0

    @property
    def device(self):
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # ----- setup -----
    def prepare(self, *objects):
        """accelerator.prepare, then restore the checkpoint being resumed (weights, optimisers, RNG)."""
        prepared = self.accelerator.prepare(*objects)
        if self.resume_from is not None:
            self._refuse_foreign_checkpoint([o for o in objects if isinstance(o, torch.nn.Module)])
            self.accelerator.load_state(str(self.resume_from), strict=False)
            self.start_step = json.loads((self.resume_from / "trainer_state.json").read_text())["step"]
            self._truncate_log(self.start_step)
            self.accelerator.print(f"[{self.stage}] resumed from {self.resume_from} at step {self.start_step}")
        return prepared

    def _refuse_foreign_checkpoint(self, models: list) -> None:
        """Loading is not strict (frozen weights are not saved), so a checkpoint naming tensors the model lacks
        (another layout) would resume its step count and optimiser with fresh weights: refuse it instead."""
        for i, model in enumerate(models):
            path = self.resume_from / (SAFE_WEIGHTS_NAME if i == 0 else SAFE_WEIGHTS_NAME.replace(".", f"_{i}."))  # accelerate's names
            if not path.is_file():
                continue
            own = model.state_dict()
            with safe_open(path, "pt") as f:
                unexpected = sorted(set(f.keys()) - set(own))
                resized = sorted(k for k in set(f.keys()) & set(own) if tuple(f.get_slice(k).get_shape()) != tuple(own[k].shape))
            if unexpected or resized:
                what = f"weights this model does not have ({len(unexpected)}, e.g. {unexpected[0]})" if unexpected else (
                    f"weights of other shapes than this model's ({len(resized)}, e.g. {resized[0]})")
                raise ConfigError(
                    f"{path} holds {what}: it was written for another model layout; run the stage without --resume or move "
                    "that checkpoint away"
                )

    def _refuse_other_training(self) -> None:
        """A checkpoint written with other settings or inputs would continue another training: refuse it (checkpoints
        from before records were kept are resumed unchecked)."""
        changed = checkpoint_differences(self.resume_from, self.record, self.stage)
        if changed:
            listed = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise ConfigError(
                f"{self.resume_from} was trained with other settings or inputs ({listed}): resuming would mix two trainings. "
                f"To train the stage afresh, move {self.dir} away, or train under another name=..."
            )

    def _find_checkpoint(self, resume: str) -> Path | None:
        if resume != "latest":
            path = Path(resume)
            if not (path / "trainer_state.json").is_file():
                raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
            return path
        return latest_checkpoint(self.dir)

    # ----- the loop -----
    def steps(self):
        return range(self.start_step + 1, self.scfg.steps + 1)

    def generator(self, step: int, salt: int = 0) -> torch.Generator:
        """A CPU generator for this step (and process), independent of everything that came before."""
        return torch.Generator().manual_seed(hash((self.cfg.seed, step, salt, self.accelerator.process_index)) & 0x7FFF_FFFF)

    def batch(self, dataset, step: int, batch_size: int | None = None) -> dict:
        """A batch drawn with this step's generator (with replacement across steps, like random cropping)."""
        n = batch_size or self.scfg.batch_size
        if self.scfg.overfit_batch:
            idx = torch.arange(n) % len(dataset)
        else:
            idx = torch.randint(len(dataset), (n,), generator=self.generator(step))
        items = [dataset[int(i)] for i in idx]
        out = {}
        for key in items[0]:
            values = [item[key] for item in items]
            out[key] = torch.stack(values).to(self.device) if isinstance(values[0], torch.Tensor) else values
        return out

    def optimizer(self, params, no_decay=()):
        """AdamW and its learning-rate schedule from the stage config (prepare both); `no_decay` params get no weight decay.

        Counts are in optimizer steps and multiplied by the number of processes, as the official
        trainers do: accelerate steps a prepared schedule once per process.
        """
        s = self.scfg
        groups = [{"params": list(params)}] + ([{"params": list(no_decay), "weight_decay": 0.0}] if no_decay else [])
        opt = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=s.weight_decay)
        n = self.accelerator.num_processes
        updates = max(s.steps // s.grad_accum, 1)  # accelerate syncs on every grad_accum-th batch
        schedule = get_scheduler(
            s.lr_scheduler, opt, num_warmup_steps=s.lr_warmup_steps * n, num_training_steps=updates * n, num_cycles=s.lr_num_cycles
        )
        return opt, schedule

    def optimizer_step(self, loss, opt, params, schedule) -> None:
        """Backward, clip (on the step that syncs), step, schedule, zero: call inside `accelerator.accumulate`."""
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(params, self.scfg.max_grad_norm)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)

    def log(self, step: int, **scalars) -> None:
        now = time.perf_counter()
        scalars = {k: float(v) for k, v in scalars.items()}
        scalars["images_per_s"] = self.scfg.batch_size * self.accelerator.num_processes / max(now - self._last_step_time, 1e-9)
        self._last_step_time = now
        if step % self.scfg.log_every == 0 or step == self.scfg.steps:
            self.accelerator.log(scalars, step=step)
            if self.is_main:
                with open(self.dir / "log.jsonl", "a") as f:
                    f.write(json.dumps({"stage": self.stage, "step": step, "time": round(now - self._t0, 3), **scalars}) + "\n")
        every = self.scfg.checkpoint_every
        if every and step % every == 0 and step != self.scfg.steps:
            self.save_checkpoint(step)

    def _truncate_log(self, step: int) -> None:
        path = self.dir / "log.jsonl"
        if self.is_main and path.is_file():
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(r + "\n" for r in rows))

    # ----- checkpoints -----
    @staticmethod
    def _drop_frozen_parameters(models, weights, output_dir) -> None:
        """Checkpoints hold what training changes; frozen weights (a 2 B teacher copy) are rebuilt on resume."""
        for model, state in zip(models, weights, strict=True):
            frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
            for key in frozen & set(state):
                del state[key]

    def save_checkpoint(self, step: int) -> Path:
        """accelerate state into `step-N.part`, then renamed: a checkpoint folder is complete or absent."""
        final = self.dir / CHECKPOINTS / f"step-{step:07d}"
        tmp = final.with_name(final.name + ".part")
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        if self.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "stage": self.stage, "record": self.record}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        self.accelerator.wait_for_everyone()
        return final

    def finish(self) -> None:
        self.save_checkpoint(self.scfg.steps)
        self.accelerator.end_training()

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)
