"""The DeepSpeed config, generated from the run spec so that batch sizes and ZeRO settings are stated once."""

from __future__ import annotations

from tcd_ds.spec import RunSpec, grad_accum_steps

# Gradient elements per ZeRO-2 reduction bucket on an accelerator. A bucket is reduced as soon as the backward has
# filled it, while the backward goes on (overlap_comm): 2.5e7 fp32 elements (100 MB) are far past the few MB at
# which NCCL reaches full bandwidth, and split a BERT-base backward (110M parameters) into ~5 reductions, so all
# but the last overlap with compute. DeepSpeed's default (5e8) is one bucket for any of our models: no overlap.
GPU_REDUCE_BUCKET = 25_000_000
# Parameter elements per all-gather of the updated weights after the optimizer step (nothing left to overlap
# with): large, few calls; with overlap_comm DeepSpeed holds ~4.5 bucket sizes of buffers, so not unbounded.
GPU_ALLGATHER_BUCKET = 50_000_000
# On CPU (gloo) nothing overlaps (no streams), and each collective has a fixed cost: DeepSpeed's one-bucket default.
CPU_BUCKET = 500_000_000


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def deepspeed_config(spec: RunSpec, world_size: int, accelerator: str | None = None) -> dict:
    """Optimizer and scheduler are built by the trainer (tcd_ds/train/optim.py), not by DeepSpeed. `accelerator`
    ("cuda", "cpu", ...; default: DeepSpeed's) picks the ZeRO tuning.

    Nothing here makes the host wait on the device inside a step: DeepSpeed's throughput timer (on by default)
    synchronizes the device at every forward and step, so it is off; our trainer measures tokens/s at log
    intervals. With bf16/fp16 weights, gradients are accumulated over micro-batches and reduced across ranks in
    fp32 (DeepSpeed's default is the weights' dtype: bf16 sums of 8 micro-batches lose the low bits)."""
    t = spec.train
    on_cpu = (accelerator or accelerator_name()) == "cpu"
    p = spec.parallel
    overlap = p.overlap_comm if p.overlap_comm is not None else not on_cpu
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(t.global_batch_size, t.micro_batch_size, world_size),
        "gradient_clipping": spec.optim.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "zero_optimization": {
            "stage": p.zero_stage,
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "overlap_comm": overlap,
            "reduce_bucket_size": p.reduce_bucket_size or (CPU_BUCKET if on_cpu else GPU_REDUCE_BUCKET),
            "allgather_bucket_size": p.allgather_bucket_size or (CPU_BUCKET if on_cpu else GPU_ALLGATHER_BUCKET),
        },
        "zero_allow_untested_optimizer": True,
    }
    if t.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif t.dtype == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if t.dtype != "fp32":
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return config
