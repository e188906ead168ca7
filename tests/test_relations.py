"""Relational losses against naive references, and `scope: global` against one process holding the whole batch."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from tcd_ds.distill.relations import RelationDistiller, relation_loss, sample_positions
from tcd_ds.distill.taps import TapPlan, Taps
from tcd_ds.spec import AttentionRelationSpec, DistillSpec, RelationSpec
from tcd_ds.train.launch import free_port

HIDDEN, LAYERS, HEADS, SEQ = 32, 3, 4, 8


def naive_relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Python loops over leading indices and pairs i != j, cosines written out."""
    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    s_all = student.reshape(-1, *student.shape[-2:]).tolist()
    t_all = teacher.reshape(-1, *teacher.shape[-2:]).tolist()
    per_matrix = []
    for s, t in zip(s_all, t_all):
        n = len(s)
        pairs = [(cos(s[i], s[j]) - cos(t[i], t[j])) ** 2 for i in range(n) for j in range(n) if i != j]
        per_matrix.append(sum(pairs) / len(pairs))
    return sum(per_matrix) / len(per_matrix)


@pytest.mark.parametrize("leading", [(), (3,), (2, 4)])
def test_relation_loss_matches_naive_double_loop(leading):
    g = torch.Generator().manual_seed(len(leading))
    student = torch.randn(*leading, 6, 5, generator=g, dtype=torch.float64)
    teacher = torch.randn(*leading, 6, 5, generator=g, dtype=torch.float64)
    assert relation_loss(student, teacher).item() == pytest.approx(naive_relation_loss(student, teacher), rel=1e-12)
    assert relation_loss(student.float(), teacher.float()).dtype == torch.float32


def test_zero_row_has_finite_small_gradient():
    """A token dropped at MoE capacity has an all-zero MoE output; its gradient must not blow up (fp16 overflows)."""
    student = torch.randn(5, 8, dtype=torch.float64)
    student[2] = 0.0
    student.requires_grad_(True)
    loss = relation_loss(student, torch.randn(5, 8, dtype=torch.float64))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert student.grad.abs().max() < 10.0


def test_sample_positions_real_distinct_deterministic():
    mask = torch.zeros(4, 10, dtype=torch.long)
    for row, length in enumerate([10, 3, 7, 1]):
        mask[row, :length] = 1
    real = set(mask.reshape(-1).nonzero().squeeze(1).tolist())
    draws = [sample_positions(mask, 15, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    for positions in draws:
        assert positions.dtype == torch.long and positions.shape == (15,)
        assert set(positions.tolist()) <= real
        assert len(set(positions.tolist())) == 15
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])
    assert set(sample_positions(mask, 21, torch.Generator().manual_seed(3)).tolist()) == real
    with pytest.raises(ValueError, match="only 21 non-padding tokens"):
        sample_positions(mask, 22, torch.Generator())


# --- the distiller against a hand-written reference --------------------------------------------------------------


def tiny_bert(seed: int, hidden: int = HIDDEN) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(config).double()


def global_batch(sequences: int = 4):
    g = torch.Generator().manual_seed(11)
    input_ids = torch.randint(5, 50, (sequences, SEQ), generator=g)
    lengths = torch.tensor([8, 5, 6, 3, 8, 2][:sequences])
    attention_mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return input_ids, attention_mask


def distill_spec(scope: str, num_positions: int) -> DistillSpec:
    return DistillSpec(
        teacher=".", num_positions=num_positions, scope=scope,
        trunk=RelationSpec(weight=0.5),
        residual_inner=RelationSpec(weight=2.0, layers=[0, 2]),
        attention=AttentionRelationSpec(enabled=True, weight=3.0, layers=[1, 2]),
    )


def cosine_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    cs = F.cosine_similarity(s[:, None, :], s[None, :, :], dim=-1)
    ct = F.cosine_similarity(t[:, None, :], t[None, :, :], dim=-1)
    off = ~torch.eye(len(s), dtype=torch.bool)
    return ((cs - ct)[off] ** 2).mean()


def reference_losses(s_caps, t_caps, positions) -> dict[str, torch.Tensor]:
    """One cosine matrix per captured tensor (per head for attention), averaged per location."""
    out = {}
    for location, s_list in s_caps.items():
        terms = []
        for s, t in zip(s_list, t_caps[location], strict=True):
            s, t = s.reshape(-1, s.shape[-1])[positions], t.reshape(-1, t.shape[-1])[positions]
            if location == "attention":
                ds, dt = s.shape[-1] // HEADS, t.shape[-1] // HEADS
                terms += [cosine_mse(s[:, h * ds:(h + 1) * ds], t[:, h * dt:(h + 1) * dt]) for h in range(HEADS)]
            else:
                terms.append(cosine_mse(s, t))
        out[location] = torch.stack(terms).mean()
    return out


def run_distiller(student, teacher, input_ids, attention_mask, spec, generator):
    distiller = RelationDistiller(spec, TapPlan.from_spec(spec, LAYERS), num_heads=HEADS)
    with Taps(student, distiller.plan) as s_taps, Taps(teacher, distiller.plan) as t_taps:
        student(input_ids=input_ids, attention_mask=attention_mask)
        with torch.no_grad():
            teacher(input_ids=input_ids, attention_mask=attention_mask)
        losses = distiller(s_taps.captures, t_taps.captures, attention_mask, generator)
    return losses, distiller.weighted_sum(losses)


def reference_run(positions, spec=None, teacher_hidden=HIDDEN):
    """One process, the whole batch, the given positions: losses, weighted total and student gradients."""
    student, teacher = tiny_bert(0), tiny_bert(1, teacher_hidden).requires_grad_(False)
    input_ids, attention_mask = global_batch()
    plan = TapPlan.from_spec(spec or distill_spec("local", len(positions)), LAYERS)
    with Taps(student, plan) as s_taps, Taps(teacher, plan) as t_taps:
        student(input_ids=input_ids, attention_mask=attention_mask)
        teacher(input_ids=input_ids, attention_mask=attention_mask)
        losses = reference_losses(s_taps.captures, t_taps.captures, positions)
    weights = {"trunk": 0.5, "residual_inner": 2.0, "attention": 3.0}
    total = sum(weights[location] * loss for location, loss in losses.items())
    total.backward()
    return losses, total, {name: p.grad for name, p in student.named_parameters() if p.grad is not None}


def assert_matches_reference(losses: dict, total, student, ref_losses: dict, ref_total, ref_grads: dict) -> None:
    """Each loss, the total and every student gradient equal the naive computation's."""
    assert losses.keys() == ref_losses.keys()
    for name in losses:
        torch.testing.assert_close(losses[name], ref_losses[name], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total, ref_total, rtol=1e-10, atol=1e-12)
    grads = {name: p.grad for name, p in student.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("scope", ["local", "global"])  # global without a process group is one rank
def test_distiller_matches_reference_on_one_rank(scope):
    student, teacher = tiny_bert(0), tiny_bert(1).requires_grad_(False)
    input_ids, attention_mask = global_batch()
    losses, total = run_distiller(
        student, teacher, input_ids, attention_mask, distill_spec(scope, 10), torch.Generator().manual_seed(5)
    )
    total.backward()
    positions = sample_positions(attention_mask, 10, torch.Generator().manual_seed(5))
    ref_losses, ref_total, ref_grads = reference_run(positions)

    assert losses.keys() == {"trunk", "residual_inner", "attention"}
    assert_matches_reference(losses, total, student, ref_losses, ref_total, ref_grads)


@pytest.mark.parametrize("attention", [False, True])
def test_a_teacher_half_the_students_width_matches_the_reference(attention):
    """Each model's cosines in its own width: trunk and residual_inner (and per-head attention, the head count
    being equal) against the naive computation, losses and student gradients."""
    spec = distill_spec("local", 10).model_copy(
        update={"attention": AttentionRelationSpec(enabled=attention, weight=3.0, layers=[1, 2])}
    )
    student, teacher = tiny_bert(0), tiny_bert(1, HIDDEN // 2).requires_grad_(False)
    input_ids, attention_mask = global_batch()
    losses, total = run_distiller(student, teacher, input_ids, attention_mask, spec, torch.Generator().manual_seed(5))
    total.backward()
    positions = sample_positions(attention_mask, 10, torch.Generator().manual_seed(5))
    ref_losses, ref_total, ref_grads = reference_run(positions, spec, teacher_hidden=HIDDEN // 2)

    assert losses.keys() == {"trunk", "residual_inner", *(["attention"] if attention else [])}
    assert all(loss > 0 for loss in losses.values())
    assert_matches_reference(losses, total, student, ref_losses, ref_total, ref_grads)


def test_disabled_locations_give_no_loss():
    spec = distill_spec("local", 6).model_copy(
        update={"trunk": RelationSpec(enabled=False), "attention": AttentionRelationSpec(enabled=False)}
    )
    input_ids, attention_mask = global_batch()
    losses, total = run_distiller(
        tiny_bert(0), tiny_bert(1).requires_grad_(False), input_ids, attention_mask, spec, torch.Generator()
    )
    assert list(losses) == ["residual_inner"]
    torch.testing.assert_close(total, 2.0 * losses["residual_inner"])


# --- scope: global on two ranks ----------------------------------------------------------------------------------

WORLD, PER_RANK = 2, 6


def _global_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        student, teacher = tiny_bert(0), tiny_bert(1).requires_grad_(False)
        input_ids, attention_mask = global_batch()
        mine = slice(rank * 2, rank * 2 + 2)
        generator = torch.Generator().manual_seed(100 + rank)
        losses, total = run_distiller(
            student, teacher, input_ids[mine], attention_mask[mine], distill_spec("global", WORLD * PER_RANK), generator
        )
        total.backward()
        grads = {}
        for name, p in student.named_parameters():  # what DeepSpeed's data-parallel reduction does: mean over ranks
            if p.grad is not None:
                dist.all_reduce(p.grad)
                grads[name] = p.grad / WORLD
        teacher_grads = [p.grad for p in teacher.parameters() if p.grad is not None]
        odd = None
        try:
            spec = distill_spec("global", 11)
            run_distiller(student, teacher, input_ids[mine], attention_mask[mine], spec, generator)
        except ValueError as e:
            odd = str(e)
        torch.save(
            {"losses": {k: v.detach() for k, v in losses.items()}, "total": total.detach(), "grads": grads,
             "teacher_grads": teacher_grads, "odd": odd},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()



def test_global_scope_equals_one_process_with_the_concatenated_batch(tmp_path):
    mp.spawn(_global_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    # Rank r sampled PER_RANK positions of its own 2 sequences; in the concatenated batch they sit r*2*SEQ later.
    _, attention_mask = global_batch()
    per_rank = [
        sample_positions(attention_mask[2 * r:2 * r + 2], PER_RANK, torch.Generator().manual_seed(100 + r))
        for r in range(WORLD)
    ]
    positions = torch.cat([r * 2 * SEQ + p for r, p in enumerate(per_rank)])
    ref_losses, ref_total, ref_grads = reference_run(positions)
    assert all(g.norm() > 1e-6 for name, g in ref_grads.items() if "encoder.layer.0." in name and "weight" in name)

    for result in results:
        assert result["teacher_grads"] == []
        assert "must be divisible by the data-parallel world size (2)" in result["odd"]
        for name in ref_losses:
            torch.testing.assert_close(result["losses"][name], ref_losses[name], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(result["total"], ref_total.detach(), rtol=1e-6, atol=1e-9)
        assert result["grads"].keys() == ref_grads.keys()
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-9)
