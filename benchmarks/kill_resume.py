"""Kill training at random moments and resume: is the final artifact the uninterrupted run's, bit for bit?

    python benchmarks/kill_resume.py --out runs/kill_resume --trials 10

Runs the default job (textual inversion of sun_medal on the shapes model, CPU) for --steps steps with a
checkpoint every --every steps, once uninterrupted. Each trial then runs it again and SIGKILLs the process
at a random moment: after a random step, or in the middle of a random checkpoint write (a half-written
file). It resumes from the crashed run's last.ckpt in a new folder (or starts over when no checkpoint was
written yet) and compares the resumed run's learned_embeds.safetensors with the uninterrupted run's: every
tensor bit for bit, and the metadata (the safetensors writer orders the header's metadata keys differently
in every process, so the files' bytes are compared through their contents). Writes
<out>/kill_resume.json and prints one row per trial.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = "learned_embeds.safetensors"


def contents(path: Path) -> tuple[dict, dict]:
    """(tensors as bytes, metadata) of a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}, f.metadata()


def train(run: Path, args, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", "trainer=cpu", "logger=csv", f"trainer.max_steps={args.steps}",
           f"callbacks.model_checkpoint.every_n_train_steps={args.every}", "callbacks.sample_grid=null",
           "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={run}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


def crash(run: Path, args, rng: random.Random) -> str:
    """Run until killed at a random moment; return what the moment was."""
    if rng.random() < 0.5:
        step = rng.randint(1, args.steps - 1)
        extra = ["+callbacks.kill._target_=tests.helpers.KillAtStep", f"+callbacks.kill.step={step}"]
        moment = f"after step {step}"
    else:  # ModelCheckpoint writes step_N.ckpt and last.ckpt at each interval: two saves per checkpoint
        save = rng.randint(1, 2 * (args.steps // args.every - 1))
        extra = [f"trainer.plugins=[{{_target_:tests.helpers.KillDuringCheckpointWrite,save:{save}}}]"]
        moment = f"during checkpoint write {save} (step {args.every * ((save + 1) // 2)})"
    proc = train(run, args, *extra)
    if proc.returncode == 0:
        raise RuntimeError(f"the run meant to crash {moment} finished")
    return moment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10, help="checkpoint interval in steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; choose a new --out")
    start = time.time()
    reference = args.out / "uninterrupted"
    if train(reference, args).returncode != 0:
        raise SystemExit("error: the uninterrupted run failed; see its train.log")
    expected = contents(reference / ARTIFACT)
    rows = []
    for trial in range(args.trials):
        rng = random.Random(f"{args.seed}/{trial}")
        crashed, resumed = args.out / f"trial{trial}_crashed", args.out / f"trial{trial}_resumed"
        moment = crash(crashed, args, rng)
        last = crashed / "checkpoints" / "last.ckpt"
        resume = [f"ckpt_path={last}"] if last.is_file() else []
        proc = train(resumed, args, *resume)
        same = proc.returncode == 0 and contents(resumed / ARTIFACT) == expected
        rows.append({"trial": trial, "killed": moment, "resumed_from": str(last) if resume else "start",
                     "identical": same})
        print(json.dumps(rows[-1]), flush=True)
    summary = {"trials": rows, "identical": sum(r["identical"] for r in rows), "steps": args.steps,
               "every": args.every, "seconds": round(time.time() - start)}
    (args.out / "kill_resume.json").write_text(json.dumps(summary, indent=2))
    print(f"{summary['identical']} of {len(rows)} resumed runs are bit-identical to the uninterrupted one")


if __name__ == "__main__":
    main()
