"""The DeepSpeed config, generated from the run spec so that batch sizes and ZeRO settings are stated once."""

from __future__ import annotations

from tcd_ds.spec import RunSpec, grad_accum_steps


def check_world_size(spec: RunSpec, world_size: int) -> None:
    """Checks that need the world size, made before any model is built."""
    grad_accum_steps(spec.train.global_batch_size, spec.train.micro_batch_size, world_size)
    moe = spec.model.moe
    if moe is not None and world_size % moe.ep_size:
        raise ValueError(
            f"world size {world_size} is not divisible by model.moe.ep_size ({moe.ep_size}): "
            "expert-parallel groups must tile the ranks"
        )
    distill = spec.distill
    if distill is not None and distill.scope == "global" and distill.num_positions % world_size:
        raise ValueError(
            f"distill.num_positions ({distill.num_positions}) must be divisible by the world size ({world_size}) "
            "with distill.scope: global (each rank samples num_positions / world size)"
        )


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
