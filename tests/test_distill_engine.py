"""TCD inside a real DeepSpeed ZeRO-2 engine on 2 gloo ranks: with `scope: global`, the relation loss and the
student's (data-parallel averaged) gradients equal those of one process holding the concatenated batch with
the same sampled positions; and the frozen teacher neither changes nor receives gradients while training."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from deepspeed.utils import safe_get_full_grad

from conftest import free_port
from tcd_ds.data.loader import seeded_generator
from tcd_ds.distill.tcd import TCD
from tcd_ds.distill.relations import RelationDistiller, relation_loss
from tcd_ds.distill.taps import TapPlan, Taps
from tcd_ds.models.build import build_model
from tcd_ds.models.param_groups import moe_param_groups
from tcd_ds.spec import DistillSpec, ModelSpec, MoESpec
from tcd_ds.train.step import TrainStep

WORLD, B, T, V, HEADS, SEED = 2, 2, 10, 30, 2, 7
SHAPE = dict(hidden_size=16, num_layers=2, num_heads=HEADS, intermediate_size=32, max_position=16, dropout=0.0,
             attention_dropout=0.0)
STUDENT = ModelSpec(**SHAPE, moe=MoESpec(num_experts=4, ep_size=1, layers="every", min_capacity=0, drop_tokens=False))
TEACHER = ModelSpec(**SHAPE)


def distill_spec(teacher_dir: str) -> DistillSpec:
    return DistillSpec(
        teacher=teacher_dir, num_positions=8, scope="global",
        trunk={"weight": 1.0}, residual_inner={"weight": 0.5}, attention={"enabled": True, "weight": 2.0},
    )


def batch_of(rank: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, V, (B, T), generator=torch.Generator().manual_seed(100 + rank))
    mask = torch.ones_like(ids)
    mask[1, T - 3 :] = 0  # padding: never sampled
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def models():
    torch.manual_seed(0)
    student = build_model(STUDENT, V, pad_token_id=0)
    torch.manual_seed(1)
    teacher = build_model(TEACHER, V, pad_token_id=0).bert.eval().requires_grad_(False)
    return student, teacher


def worker(rank: int, port: int, teacher_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    student, teacher = models()
    config = {
        "train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(moe_param_groups(student, 0.01), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=config)
    spec = distill_spec(teacher_dir)
    distiller = RelationDistiller(spec, TapPlan.from_spec(spec, 2), num_heads=HEADS)
    tcd = TCD(teacher, student, distiller)
    teacher_before = {n: p.clone() for n, p in teacher.named_parameters()}

    batch = batch_of(rank)
    tcd.teacher_forward(batch)
    engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = tcd.relation_losses(batch["attention_mask"], seeded_generator(SEED, "positions", 0, 0, rank))
    total = distiller.weighted_sum(losses)
    engine.backward(total)
    grads = {n: safe_get_full_grad(p).clone() for n, p in student.named_parameters()}
    engine.step()

    # A few ordinary TCD steps: the teacher must come out bitwise unchanged and without gradients.
    train_step = TrainStep(engine, tcd, SEED, rank)
    for step in range(1, 4):
        train_step([batch_of(rank + 10 * step)], step)
    teacher_unchanged = all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())
    teacher_grads = [n for n, p in teacher.named_parameters() if p.grad is not None or p.requires_grad]
    if rank == 0:
        torch.save({"losses": {k: v.detach() for k, v in losses.items()}, "total": total.detach(), "grads": grads,
                    "teacher_unchanged": teacher_unchanged, "teacher_grads": teacher_grads}, out)
    dist.barrier()
    dist.destroy_process_group()


def reference(spec: DistillSpec) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """One process, the two ranks' micro-batches concatenated, the positions each rank drew offset into it."""
    student, teacher = models()
    batches = [batch_of(r) for r in range(WORLD)]
    ids = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["attention_mask"] for b in batches])
    positions = []
    for r, b in enumerate(batches):
        real = b["attention_mask"].reshape(-1).nonzero().squeeze(1)
        order = torch.randperm(real.numel(), generator=seeded_generator(SEED, "positions", 0, 0, r))
        positions.append(real[order[: spec.num_positions // WORLD]] + r * B * T)
    positions = torch.cat(positions)
    plan = TapPlan.from_spec(spec, 2)
    with Taps(student, plan) as s_taps, Taps(teacher, plan) as t_taps:
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=mask)
        student(input_ids=ids, attention_mask=mask)
        losses = {}
        for location, weight in (("trunk", 1.0), ("residual_inner", 0.5), ("attention", 2.0)):
            s = torch.stack([c.reshape(-1, c.shape[-1])[positions] for c in s_taps.captures[location]])
            t = torch.stack([c.reshape(-1, c.shape[-1])[positions] for c in t_taps.captures[location]])
            if location == "attention":  # [L, N, H] -> [L, heads, N, H / heads]
                s = s.view(s.shape[0], s.shape[1], HEADS, -1).transpose(1, 2)
                t = t.view(t.shape[0], t.shape[1], HEADS, -1).transpose(1, 2)
            losses[location] = relation_loss(s, t)
        total = sum(w * losses[loc] for loc, w in (("trunk", 1.0), ("residual_inner", 0.5), ("attention", 2.0)))
        total.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in student.named_parameters()}
    return losses, total, grads


def test_global_relations_in_a_zero2_engine_equal_one_process(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(worker, args=(free_port(), str(tmp_path), out), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)
    want_losses, want_total, want_grads = reference(distill_spec(str(tmp_path)))
    for location, value in want_losses.items():
        assert got["losses"][location].item() == pytest.approx(value.item(), abs=1e-6), location
    assert got["total"].item() == pytest.approx(want_total.item(), abs=1e-6)
    assert got["grads"].keys() == want_grads.keys()
    nonzero = 0
    for name, want in want_grads.items():
        assert torch.allclose(got["grads"][name].float(), want, rtol=0, atol=1e-6), name
        nonzero += bool(want.abs().sum() > 0)
    assert nonzero > len(want_grads) // 2  # the comparison is not one of zeros
    assert got["teacher_unchanged"] and got["teacher_grads"] == []
