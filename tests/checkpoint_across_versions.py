"""Run by tests/test_checkpoint_compat.py under one tcd_ds version or another (PYTHONPATH picks it):
`save DIR` trains an ep_size-2 student one AdamW step on 2 CPU ranks, checkpoints it as DIR/checkpoints/t
(DeepSpeed's own files and ZeRO-2 shards) and records its weights after a second step; `resume DIR` loads that
checkpoint, optimizer state included, takes the same second step, records its weights and checkpoints them as
DIR/checkpoints/new, for the test to compare."""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch
import torch.multiprocessing as mp

from tcd_ds.models.build import build_model
from tcd_ds.models.param_groups import moe_param_groups
from tcd_ds.spec import ModelSpec, MoESpec

WORLD, V = 2, 20


def model_spec() -> ModelSpec:
    return ModelSpec(hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16, max_position=12, dropout=0.0,
                     attention_dropout=0.0,
                     moe=MoESpec(num_experts=4, ep_size=2, layers="every", min_capacity=0, drop_tokens=False))


def worker(rank: int, port: int, mode: str, directory: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(1 + rank)
    model = build_model(model_spec(), V, pad_token_id=0)
    optimizer = torch.optim.AdamW(moe_param_groups(model, weight_decay=0.01), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def step(seed: int) -> None:
        ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(seed + rank))
        engine.backward(engine(ids, attention_mask=torch.ones_like(ids), labels=ids).loss)
        engine.step()

    if mode == "save":
        step(100)
        engine.save_checkpoint(os.path.join(directory, "checkpoints"), tag="t")
    else:
        from tcd_ds.models.batched_experts import accept_per_expert_zero_shards  # today's code only

        accept_per_expert_zero_shards(engine.optimizer)  # as the trainer does
        engine.load_checkpoint(os.path.join(directory, "checkpoints"), tag="t")
    step(200)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(directory, f"{mode}.rank{rank}.pt"))
    if mode == "resume":
        engine.save_checkpoint(os.path.join(directory, "checkpoints"), tag="new")


if __name__ == "__main__":
    from tcd_ds.train.launch import free_port

    mp.spawn(worker, args=(free_port(), sys.argv[1], sys.argv[2]), nprocs=WORLD, join=True)
