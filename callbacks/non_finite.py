"""Keep a run's state finite: stop a run whose loss or gradients stop being finite, or skip such steps.

mode=stop: each step's check runs on the device (no synchronisation); the host reads the result every
`every_n_steps` steps, before every checkpoint is written and before artifacts are exported
(`ensure_finite`), so a diverged state is never saved: the run ends with one line naming the first bad
step, and the last checkpoint written before it stays as it was.

mode=skip: the host reads the check at every step (one synchronisation per step) and a step whose loss or
gradients are not finite makes no update (its gradients are dropped, so the optimizer leaves the weights and
its moments as they were); a warning names the step, `train/skipped_steps` counts them, and more than
`max_consecutive_skips` skipped steps in a row end the run with one line.

In both modes the trained weights are checked before every checkpoint and export.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from utils.errors import ConfigError, UserError

log = logging.getLogger(__name__)
MODES = ("stop", "skip")
KEY = "callbacks.non_finite"


class TrainingDiverged(UserError):
    """The loss or a gradient became NaN or infinite."""


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A device-side bool: every tensor is finite (None for no tensors)."""
    if not tensors:
        return None
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()


class NonFiniteGuard(L.Callback):
    def __init__(self, every_n_steps: int = 10, mode: str = "stop", max_consecutive_skips: int = 10):
        from utils.checks import check_whole

        if mode not in MODES:
            raise ConfigError(f"{KEY}.mode={mode!r} is unknown; use stop (end the run) or skip (skip the step)")
        check_whole(f"{KEY}.every_n_steps", every_n_steps, 0)
        check_whole(f"{KEY}.max_consecutive_skips", max_consecutive_skips, 0)
        self.every_n_steps, self.mode, self.max_consecutive_skips = every_n_steps, mode, max_consecutive_skips
        self.first_bad: torch.Tensor | None = None  # stop: the first step whose loss or gradients were not finite
        self.loss_finite: torch.Tensor | None = None  # skip: this step's loss is finite (on the device)
        self.skipped = 0           # skip: steps skipped so far
        self.consecutive: list[int] = []  # skip: the steps skipped since the last good one

    def _flag(self, bad: torch.Tensor, step: int) -> None:
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self.mode == "skip":
            self.loss_finite = torch.isfinite(loss.detach()).all()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = _all_finite([p.grad for p in params])
        step = trainer.global_step + 1
        if self.mode == "stop":
            if finite is not None:
                self._flag(~finite, step)
            return
        checks = [c for c in (self.loss_finite, finite) if c is not None]
        bad = bool(checks) and not bool(torch.stack(checks).all())  # the step's one read of the device
        self.loss_finite = None
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None:
            bad = strategy.reduce_boolean_decision(bad, all=False)  # one rank's bad step is skipped by every rank
        if not bad:
            self.consecutive = []
            return
        for p in params:
            p.grad = None  # the optimizer skips parameters without a gradient: no update, moments kept
        self.skipped += 1
        self.consecutive.append(step)
        log.warning("step %d: the loss or a gradient is NaN or infinite; its update is skipped (%d skipped in all, "
                    "%d in a row)", step, self.skipped, len(self.consecutive))
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        if len(self.consecutive) > self.max_consecutive_skips:
            raise TrainingDiverged(
                f"the loss or a gradient was NaN or infinite at {len(self.consecutive)} steps in a row (steps "
                f"{self.consecutive[0]}-{step}), more than {KEY}.max_consecutive_skips={self.max_consecutive_skips}; "
                f"lower the learning rate or check the data")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.mode == "skip":
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            self._flag(~torch.isfinite(loss.detach()).all(), trainer.global_step)
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.check()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.check(pl_module, getattr(trainer, "global_step", None))

    def check(self, pl_module=None, step: int | None = None) -> None:
        """Raise TrainingDiverged if a step was not finite (stop mode) or the trained weights are not."""
        if self.first_bad is not None and (bad := int(self.first_bad)) >= 0:
            raise TrainingDiverged(f"the loss or a gradient became NaN or infinite at step {bad}; nothing from "
                                   f"that state was checkpointed or exported (earlier checkpoints are kept); "
                                   f"lower the learning rate or check the data")
        if pl_module is not None:
            finite = _all_finite([p.detach() for p in pl_module.parameters() if p.requires_grad])
            if finite is not None and not bool(finite):
                raise TrainingDiverged(f"the trained weights are NaN or infinite after step {step}; nothing from "
                                       f"that state was checkpointed or exported (earlier checkpoints are kept); "
                                       f"lower the learning rate or check the data")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": list(self.consecutive)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = list(state_dict.get("consecutive", []))


def ensure_finite(trainer) -> None:
    """Raise TrainingDiverged if the trainer's guard has seen a non-finite step or the trained weights are not
    finite (before writing results)."""
    for callback in trainer.callbacks:
        if isinstance(callback, NonFiniteGuard):
            callback.check(getattr(trainer, "lightning_module", None), getattr(trainer, "global_step", None))
