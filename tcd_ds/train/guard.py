"""The non-finite guard: DeepSpeed's ZeRO optimizer skips a step whose gradient norm is NaN/Inf (the same verdict
on every rank); the guard counts such steps in a row and stops the run when they do not recover."""

from __future__ import annotations


class NonFiniteTraining(RuntimeError):
    """Training diverged: too many consecutive steps were skipped for NaN/Inf."""


class NonFiniteGuard:
    def __init__(self, engine, max_in_a_row: int, log):
        self.engine, self.max_in_a_row, self.log = engine, max_in_a_row, log
        self.in_a_row = 0
        self.skipped_before = engine.skipped_steps

    def step(self, step: int, last_checkpoint: int) -> None:
        """After the optimizer step that ends `step`: raises NonFiniteTraining after `max_in_a_row` skips."""
        skipped = self.engine.skipped_steps > self.skipped_before
        self.skipped_before = self.engine.skipped_steps
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row:
            self.log(f"[tcd-ds] step {step}: non-finite loss or gradients, step skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteTraining(
                f"{self.in_a_row} steps in a row had non-finite losses or gradients (train.max_skipped_steps="
                f"{self.max_in_a_row}); stopped at step {step}, last good checkpoint: step {last_checkpoint}"
            )
