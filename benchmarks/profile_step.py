"""Where a training step's time goes: a torch.profiler window over a few steps of a train.py run.

    python benchmarks/profile_step.py --out runs/profile -- method=prompt_slider model=sdxl_random slider=age

Runs train.py (trainer=gpu, csv logger) with a callback that profiles steps [start, start + steps)
and writes, in the run directory, `profile.txt` (operators and the module's record_function ranges,
by CPU and by device time), with --trace `trace.json` (chrome://tracing), and `profile.json`: wall
seconds per step, device-busy seconds per step (the sum of kernel times), their ratio, kernel
launches per step and host waits per step (stream and event synchronisations: `.item()`, blocking copies).
A ratio well under 1 means the step waits on the CPU (kernel launches, Python, synchronisations), not on the
GPU; a host wait in every step keeps the host from queueing the next step while the GPU runs this one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
WAITS = ("cudaStreamSynchronize", "cudaEventSynchronize")  # torch's own waits (not the window's device syncs)


class StepProfile(L.Callback):
    def __init__(self, dirpath: str, start: int = 10, steps: int = 5, trace: bool = False):
        self.dirpath, self.start, self.steps, self.trace = Path(dirpath), start, steps, trace
        self.prof: profile | None = None
        self.began = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start and self.prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.began = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.prof is None or trainer.global_step != self.start + self.steps:
            return
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        wall = (time.perf_counter() - self.began) / self.steps
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events  # kernels, not the labelled ranges
                        if e.device_type.name == "CUDA" and not e.is_user_annotation)
        launches = sum(e.count for e in events if "LaunchKernel" in e.key)
        waits = sum(e.count for e in events if e.key in WAITS)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        with open(self.dirpath / "profile.txt", "w") as f:
            f.write(events.table(sort_by="cpu_time_total", row_limit=40) + "\n")
            if torch.cuda.is_available():
                f.write(events.table(sort_by="self_device_time_total", row_limit=30) + "\n")
        if self.trace:
            self.prof.export_chrome_trace(str(self.dirpath / "trace.json"))
        summary = {"wall_s_per_step": wall, "device_busy_s_per_step": device_us / 1e6 / self.steps,
                   "launches_per_step": launches / self.steps, "host_waits_per_step": waits / self.steps,
                   "steps": self.steps}
        summary["busy_fraction"] = summary["device_busy_s_per_step"] / wall
        (self.dirpath / "profile.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary), flush=True)
        self.prof = None
        trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="run directory (must not exist)")
    parser.add_argument("--start", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--trainer", default="gpu", help="trainer config (cpu for a dry run)")
    parser.add_argument("--trace", action="store_true", help="also write trace.json")
    parser.add_argument("overrides", nargs="*", help="train.py overrides")
    args = parser.parse_args()
    cmd = [sys.executable, "train.py", f"trainer={args.trainer}", "logger=csv", f"hydra.run.dir={args.out}",
           "callbacks.sample_grid=null", "callbacks.progress_bar.refresh_rate=0",
           f"trainer.max_steps={args.start + args.steps + 1}",
           "+callbacks.step_profile._target_=benchmarks.profile_step.StepProfile",
           f"+callbacks.step_profile.dirpath={args.out}", f"+callbacks.step_profile.start={args.start}",
           f"+callbacks.step_profile.steps={args.steps}",
           f"+callbacks.step_profile.trace={args.trace}", *args.overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    sys.exit(subprocess.run(cmd, cwd=ROOT, env=env).returncode)


if __name__ == "__main__":
    main()
