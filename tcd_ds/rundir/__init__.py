"""The run directory: its layout, its checkpoints and the weights in them; read by the trainer (resume), the
converter, the teacher loader and the protocol alike, so they agree on what a complete checkpoint is."""

from tcd_ds.rundir.layout import Checkpoint, CheckpointError, RunDir, locate_checkpoint

__all__ = ["Checkpoint", "CheckpointError", "RunDir", "locate_checkpoint"]
