"""Test helper run under the `deepspeed` launcher: a run's latest checkpoint, loaded into a DeepSpeed engine built
as the trainer builds it (tcd_ds/train/trainer.py), then eval logits on a fixed batch per rank.

    deepspeed --num_gpus 2 tests/ds_eval_logits.py OUT_PREFIX RUN_DIR [RUN_DIR ...]

Each rank writes OUT_PREFIX.rank{r}.pt: {run_dir: {"input_ids", "attention_mask", "logits", "expert_counts",
"tokens"}}, expert_counts per MoE layer (routed real tokens per expert, before capacity drops) so that a test
can check that no expert overflowed.
"""

import os
import sys
from pathlib import Path

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from tcd_ds.data.tokenizer import load_tokenizer
from tcd_ds.models.build import build_model
from tcd_ds.models.param_groups import moe_param_groups
from tcd_ds.spec import load_spec
from tcd_ds.train.ds_config import deepspeed_config
from tcd_ds.train.optim import build_optimizer, build_scheduler

BATCH, LENGTH, PADDED = 2, 12, 4  # per rank; the last PADDED positions of the last row are padding


def fixed_batch(rank: int, vocab_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1000 + rank))
    mask = torch.ones_like(ids)
    ids[-1, -PADDED:], mask[-1, -PADDED:] = pad_id, 0
    return ids, mask


def eval_logits(run_dir: Path, rank: int, world_size: int) -> dict:
    accelerator = get_accelerator()
    spec = load_spec(run_dir / "spec.yaml")
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    torch.manual_seed(spec.seed + rank)
    model = build_model(spec.model, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    optimizer = build_optimizer(moe_param_groups(model, spec.optim.weight_decay), spec.optim, accelerator.device_name())
    scheduler = build_scheduler(optimizer, spec.optim, spec.train.steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(spec, world_size)
    )
    path, _ = engine.load_checkpoint(str(run_dir / "checkpoints"))
    assert path is not None, f"no checkpoint loaded from {run_dir}"
    engine.eval()
    ids, mask = fixed_batch(rank, len(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = engine(input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device)).logits
    counts = {i: b.expert_counts.cpu() for i, b in model.moe_blocks().items()} if spec.model.moe else {}
    return {"input_ids": ids, "attention_mask": mask, "logits": logits.cpu(), "expert_counts": counts,
            "tokens": ids.numel()}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    out_prefix, run_dirs = args[0], [Path(p) for p in args[1:]]
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    results = {str(run_dir): eval_logits(run_dir, rank, world_size) for run_dir in run_dirs}
    torch.save(results, f"{out_prefix}.rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
