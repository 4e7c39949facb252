"""Start, watch and stop one `accelerate launch -m trainer ...` job from another program (the app).

Every field is validated and the command is an argument list (no shell), outputs stay under one
runs folder, and only one job runs at a time.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .config import STAGES, ConfigError, chain_stages, check, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(os.environ.get("TINYSR_CONFIG_DIR", ROOT / "trainer" / "configs"))
RUNS = Path(os.environ.get("TINYSR_RUNS_DIR", ROOT / "runs"))
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
PRECISIONS = ("no", "fp16", "bf16")


class LaunchError(ValueError):
    pass


def available_configs() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


@dataclass
class LaunchRequest:
    stage: str
    config: str
    name: str
    steps: int = 0  # 0: the config's value
    batch_size: int = 0
    lr: float = 0.0
    num_processes: int = 1
    mixed_precision: str = "no"
    pairs: str = ""  # a pairs folder under the runs folder (the app's prepared data); empty: the config's data.pairs

    def stages(self, cfg=None) -> list[str]:
        if self.stage != "all":
            return [self.stage]
        try:
            return chain_stages(cfg or load_config(CONFIG_DIR / self.config))
        except ConfigError as e:
            raise LaunchError(str(e)) from None

    def validate(self) -> None:
        if self.stage not in (*STAGES, "all"):
            raise LaunchError(f"unknown stage {self.stage!r}")
        if self.config not in available_configs():
            raise LaunchError(f"unknown config {self.config!r}; choose one of {', '.join(available_configs())}")
        if not RUN_NAME.match(self.name or ""):
            raise LaunchError("run name: 1-64 letters, digits, '-' or '_', starting with a letter or digit")
        for field, value in (("steps", self.steps), ("batch size", self.batch_size), ("GPUs", self.num_processes)):
            if int(value) != value or value < 0:
                raise LaunchError(f"{field} must be a whole number >= 0, got {value}")
        if not 1 <= self.num_processes <= 64:
            raise LaunchError("GPUs (processes) must be between 1 and 64")
        if self.lr < 0 or self.lr > 1:
            raise LaunchError(f"learning rate must be in [0, 1], got {self.lr}")
        if self.mixed_precision not in PRECISIONS:
            raise LaunchError(f"mixed precision must be one of {', '.join(PRECISIONS)}")
        if self.pairs and not Path(self.pairs).resolve().is_relative_to(RUNS.resolve()):
            raise LaunchError(f"prepared pairs must lie under the runs folder {RUNS}, not {self.pairs}")

    def overrides(self) -> list[str]:
        items = [f"name={self.name}", f"output_dir={RUNS}"] + ([f"data.pairs={self.pairs}"] if self.pairs else [])
        for stage in self.stages():
            for key, value in (("steps", self.steps), ("batch_size", self.batch_size), ("lr", self.lr)):
                if value:
                    items.append(f"stages.{stage}.{key}={value}")
        return items

    def preflight(self):
        """The trainer's own config checks, here and now: missing pairs or earlier stages are a sentence, not a dead job.
        Returns the config as the job will run it."""
        try:
            cfg = load_config(CONFIG_DIR / self.config, self.overrides())
            check(cfg, self.stages(cfg))
        except ConfigError as e:
            raise LaunchError(str(e)) from None
        return cfg

    def command(self, use_cpu: bool) -> list[str]:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(int(self.num_processes))]
        launcher += ["--num_machines", "1", "--mixed_precision", self.mixed_precision, "--dynamo_backend", "no"]
        if use_cpu:
            launcher.append("--cpu")
        config = ["--config", str(CONFIG_DIR / self.config), f'mixed_precision="{self.mixed_precision}"']  # quoted: YAML reads a bare no as false
        return [*launcher, "-m", "trainer", self.stage, *config, *self.overrides()]


class TrainingJob:
    """The one training subprocess; its console output goes to runs/NAME/console.log."""

    def __init__(self):
        self._lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.request: LaunchRequest | None = None
        self.stages: list[str] = []
        self.targets: dict[str, int] = {}
        self.console: Path | None = None
        self.started = 0.0
        self.stopped = False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, request: LaunchRequest, use_cpu: bool | None = None) -> list[str]:
        """Stages and step targets are read from the config here, once: polls must not depend on the file staying."""
        request.validate()
        cfg = request.preflight()
        stages = request.stages(cfg)
        targets = {stage: int(cfg.stages[stage].steps) for stage in stages}  # check() saw a section for each
        if use_cpu is None:
            import torch

            use_cpu = not torch.cuda.is_available()
        with self._lock:
            if self.running():
                raise LaunchError(f"a training job is already running ({self.request.stage} of {self.request.name}); stop it first")
            run_dir = RUNS / request.name
            run_dir.mkdir(parents=True, exist_ok=True)
            command = request.command(use_cpu)
            self.console = run_dir / "console.log"
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with open(self.console, "w") as log:
                log.write("$ " + " ".join(command) + "\n")
                log.flush()
                # a session of its own, so stop() reaches accelerate's worker processes too
                self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.request, self.stages, self.targets = request, stages, targets
            self.started, self.stopped = time.time(), False
            return command

    def stop(self, grace_s: float = 10.0) -> bool:
        """SIGTERM to the job's process group, SIGKILL after `grace_s`; True if a job was running."""
        with self._lock:
            if not self.running():
                return False
            pgid = os.getpgid(self.process.pid)
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.process.wait()
            self.stopped = True
            return True

    def console_tail(self, max_chars: int = 6000) -> str:
        if self.console is None or not self.console.is_file():
            return ""
        text = self.console.read_text(errors="replace")
        return text[-max_chars:]

    def status(self) -> dict:
        """What the app shows: state, the stage being trained, its JSONL rows so far, and its step target."""
        if self.request is None:
            return {"state": "idle", "rows": []}
        code = self.process.poll()
        if code is None:
            state = "running"
        else:
            state = "finished" if code == 0 else "stopped" if self.stopped else f"failed (exit code {code})"
        log = latest_log(RUNS / self.request.name, self.stages)
        rows = read_log(log) if log else []
        stage = rows[-1]["stage"] if rows else self.stages[0]
        return {"state": state, "stage": stage, "rows": rows, "elapsed_s": time.time() - self.started, "target_steps": self.targets.get(stage)}


def latest_log(run_dir: Path, stages: list[str]) -> Path | None:
    logs = [run_dir / s / "log.jsonl" for s in stages if (run_dir / s / "log.jsonl").is_file()]
    return max(logs, key=lambda p: p.stat().st_mtime) if logs else None


def read_log(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return rows

