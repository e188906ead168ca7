"""The student under torch.distributed (gloo, CPU ranks spawned here): the DeepSpeed engine path and expert
parallelism, checked against one process holding every expert."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")


import deepspeed
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from deepspeed.moe.layer import MoE

from tcd_ds.models.batched_experts import named_tensors
from tcd_ds.models.build import build_model
from tcd_ds.models.param_groups import moe_param_groups
from tcd_ds.spec import ModelSpec, MoESpec
from tcd_ds.train.launch import free_port

V, H, E = 20, 8, 4


def spec(ep_size: int, drop_tokens: bool = True) -> ModelSpec:
    return ModelSpec(
        hidden_size=H, num_layers=2, num_heads=2, intermediate_size=16, max_position=12, dropout=0.0,
        attention_dropout=0.0,
        moe=MoESpec(num_experts=E, ep_size=ep_size, layers="every", min_capacity=0, drop_tokens=drop_tokens),
    )


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(100 + rank))
    return ids, torch.ones_like(ids)



def spawn(worker, world_size: int) -> None:
    mp.spawn(worker, args=(world_size, free_port()), nprocs=world_size, join=True)


def init_rank(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    deepspeed.init_distributed(dist_backend="gloo")


def engine_step_worker(rank: int, world_size: int, port: int) -> None:
    init_rank(rank, world_size, port)
    torch.manual_seed(0)
    model = build_model(spec(ep_size=1), V, pad_token_id=0)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(moe_param_groups(model, weight_decay=0.01), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    before = {n: p.clone() for n, p in named_tensors(model).items()}
    ids, mask = rank_batch(rank)
    out = engine(ids, attention_mask=mask, labels=ids)
    loss = out.loss
    assert torch.isfinite(loss)
    engine.backward(loss)
    engine.step()
    for i, block in model.moe_blocks().items():
        for j, count in enumerate(block.expert_counts.tolist()):
            name = f"bert.encoder.layer.{i}.output.dense.deepspeed_moe.experts.deepspeed_experts.{j}.dense_in.bias"
            moved = not torch.equal(before[name], named_tensors(model)[name])
            assert moved == (count > 0), (name, count)  # biases: no weight decay, so only a gradient moves them
    dist.destroy_process_group()


def test_engine_trains_the_student_on_one_rank():
    spawn(engine_step_worker, world_size=1)


def expert_parallel_worker(rank: int, world_size: int, port: int) -> None:
    init_rank(rank, world_size, port)
    torch.manual_seed(0)  # same shared weights on both ranks, as the engine's broadcast would make them
    model = build_model(spec(ep_size=world_size, drop_tokens=False), V, pad_token_id=0)
    torch.manual_seed(1 + rank)  # each rank's experts distinct, so a mix-up between ranks shows
    for block in model.moe_blocks().values():
        assert block.deepspeed_moe.experts.num_local_experts == E // world_size
        for p in block.deepspeed_moe.experts.parameters():
            p.data.normal_(0.0, 0.2)
    for module in model.modules():
        if isinstance(module, MoE):
            module.set_deepspeed_parallelism()  # what deepspeed.initialize does: attach the expert group

    ids, mask = rank_batch(rank)
    out = model(ids, attention_mask=mask, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()

    # One process holding all E experts, expert g = (rank r, local j) with g = r * E / ep_size + j.
    local = E // world_size
    state = model.state_dict()
    full_state = {k: v for k, v in state.items() if ".deepspeed_experts." not in k}
    for key, value in state.items():
        if ".deepspeed_experts." in key:
            prefix, rest = key.split(".deepspeed_experts.")
            j, param = rest.split(".", 1)
            gathered = [torch.empty_like(value) for _ in range(world_size)]
            dist.all_gather(gathered, value.contiguous())
            for r, tensor in enumerate(gathered):
                full_state[f"{prefix}.deepspeed_experts.{r * local + int(j)}.{param}"] = tensor
    reference = build_model(spec(ep_size=1, drop_tokens=False), V, pad_token_id=0)
    reference.load_state_dict(full_state, strict=True)
    ref_out = reference(ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits, ref_out.logits)
    ref_out.loss.backward()

    # An expert's gradient collects every rank's tokens routed to it: the sum of the per-rank references.
    ref_grads = named_tensors(reference, grads=True)
    for name, grad in named_tensors(model, grads=True).items():
        if ".deepspeed_experts." not in name:
            continue
        prefix, rest = name.split(".deepspeed_experts.")
        j, param = rest.split(".", 1)
        expected = torch.stack([ref_grads[f"{prefix}.deepspeed_experts.{r * local + int(j)}.{param}"]
                                for r in range(world_size)])
        dist.all_reduce(expected)
        torch.testing.assert_close(grad, expected[rank], rtol=1e-4, atol=1e-6)
    dist.destroy_process_group()


def test_expert_parallel_matches_one_process_with_all_experts():
    spawn(expert_parallel_worker, world_size=2)
