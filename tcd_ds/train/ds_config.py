"""The DeepSpeed config, generated from the run spec so that batch sizes and ZeRO settings are stated once."""

from __future__ import annotations

from tcd_ds.spec import RunSpec, grad_accum_steps


def deepspeed_config(spec: RunSpec, world_size: int) -> dict:
    """Optimizer and scheduler are built by the trainer (tcd_ds/train/optim.py), not by DeepSpeed."""
    t = spec.train
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(t.global_batch_size, t.micro_batch_size, world_size),
        "gradient_clipping": spec.optim.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {
            "stage": spec.parallel.zero_stage,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "overlap_comm": spec.parallel.overlap_comm,
        },
        "zero_allow_untested_optimizer": True,
    }
    if t.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif t.dtype == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config
