"""Stop a run whose loss or gradients stop being finite, before anything from that state is kept.

Each step's check runs on the device (no synchronisation); the host reads the result every
`every_n_steps` steps, before every checkpoint is written and before artifacts are exported
(`ensure_finite`), so a diverged state is never saved: the run ends with one line naming the first bad
step, and the last checkpoint written before it stays as it was.
"""

from __future__ import annotations

import lightning as L
import torch

from utils.errors import UserError


class TrainingDiverged(UserError):
    """The loss or a gradient became NaN or infinite."""


class NonFiniteGuard(L.Callback):
    def __init__(self, every_n_steps: int = 10):
        self.every_n_steps = every_n_steps
        self.first_bad: torch.Tensor | None = None  # the first step whose loss or gradients were not finite (-1: none)

    def _flag(self, bad: torch.Tensor, step: int) -> None:
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            norms = torch.stack(torch._foreach_norm(grads))
            self._flag(~torch.isfinite(norms).all(), trainer.global_step + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            self._flag(~torch.isfinite(loss.detach()).all(), trainer.global_step)
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.check()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.check()

    def check(self) -> None:
        if self.first_bad is not None and (step := int(self.first_bad)) >= 0:
            raise TrainingDiverged(f"the loss or a gradient became NaN or infinite at step {step}; nothing from "
                                   f"that state was checkpointed or exported (earlier checkpoints are kept); "
                                   f"lower the learning rate or check the data")


def ensure_finite(trainer) -> None:
    """Raise TrainingDiverged if the trainer's guard has seen a non-finite step (before writing results)."""
    for callback in trainer.callbacks:
        if isinstance(callback, NonFiniteGuard):
            callback.check()
