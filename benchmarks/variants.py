"""What `benchmarks/bench.py` compares: the real training steps, built by `Trainer` from the presets' run specs and
stepped by its `TrainStep`, what a user would write instead (HF `BertForMaskedLM` + `torch.optim.AdamW`), and
the parts of a step measured alone (teacher forward, relation losses).

A variant set (`VARIANT_SETS`) names the steps one launch builds and measures; a new comparison is one function
there (and one launch in `bench.py`)."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Callable

import deepspeed.comm as dist
import torch
from transformers import BertConfig, BertForMaskedLM

from benchmarks.measure import PhaseTimer, Times, timed
from tcd_ds.data.loader import seeded_generator
from tcd_ds.distill.relations import RelationDistiller
from tcd_ds.models.configs import bert_kwargs
from tcd_ds.spec import RunSpec, load_spec
from tcd_ds.train.trainer import Trainer, seed_step

REPO = Path(__file__).resolve().parents[1]
PRESETS = {  # dense, MoE baseline, MoE + TCD
    "demo": ("teacher_demo.yaml", "student_demo_moe.yaml", "student_demo_tcd.yaml"),
    "quick": ("teacher_tiny.yaml", "student_tiny_moe.yaml", "student_tiny_tcd.yaml"),
    "small": ("teacher_small.yaml", "student_moe_small.yaml", "student_tcd_small.yaml"),  # tools/gpu_check.sh
}
# The small preset trains on a hub corpus with the teacher's tokenizer; its shapes are what is measured, on the
# bundled corpus with a tokenizer of its own (offline, no teacher run needed).
PRESET_DATA = {"small": ("--data.hub=null", "--data.train=[bundled:wiki/train.txt]", "--data.tokenizer.path=null")}
STEPS = {"hf": "HF BertForMaskedLM + torch AdamW (DDP)", "dense_full_head": "ours, dense, full MLM head",
         "dense": "ours, dense", "moe": "ours, MoE, MLM only", "tcd": "ours, MoE + TCD"}
Batch = dict[str, torch.Tensor]


def run_spec(preset: str, kind: str, run_dir: Path, cache_dir: str, world: int, teacher: Path | None = None,
             overrides: tuple[str, ...] = ()) -> RunSpec:
    """A preset's spec with one micro-batch per rank per step (a fixed per-rank batch whatever the world);
    `overrides` (`--a.b=v`) come last."""
    path = dict(zip(("dense", "moe", "tcd"), PRESETS[preset]))[kind].removesuffix(".yaml")  # a shipped spec
    teacher_arg = [f"--distill.teacher={teacher}"] if kind == "tcd" else []
    overrides = (*PRESET_DATA.get(preset, ()), *overrides)
    base = load_spec(path, [*teacher_arg, *overrides])
    args = [
        f"--run_dir={run_dir}", f"--data.cache_dir={cache_dir}", "--train.steps=100000",
        f"--train.global_batch_size={base.train.micro_batch_size * world}",
        "--logging.progress_bar=False", "--logging.wandb.enabled=False", *teacher_arg,
    ]
    if kind != "dense":
        args.append(f"--model.moe.ep_size={math.gcd(base.model.moe.ep_size, world)}")
    return load_spec(path, [*args, *overrides])


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Stepper:
    """One variant's optimizer steps over a fixed set of host batches, with its own step counter (which seeds
    dropout, routing noise and sampled positions as in `Trainer.fit`)."""

    def __init__(self, fn: Callable[[list[Batch], int], object], batches: list[list[Batch]], seed: int, rank: int):
        self.fn, self.batches, self.seed, self.rank, self.count = fn, batches, seed, rank, 0

    def __call__(self) -> None:
        seed_step(self.seed, self.count, self.rank)
        self.fn(self.batches[self.count % len(self.batches)], self.count)
        self.count += 1


class HFBaseline:
    """What a user writes: HF `BertForMaskedLM` (HF's default attention), `torch.optim.AdamW` over all
    parameters, DDP across ranks, the same gradient clipping as ours. Starts from our dense model's weights."""

    def __init__(self, spec: RunSpec, ours: torch.nn.Module, device: torch.device):
        kwargs = bert_kwargs(spec.model, ours.config.vocab_size, ours.config.pad_token_id)
        kwargs.pop("attn_implementation")
        model = BertForMaskedLM(BertConfig(**kwargs)).to(device)
        model.load_state_dict(ours.state_dict())
        self.attn_implementation = model.get_correct_attn_implementation(None)  # what HF picks when not asked
        self.model = model
        if dist.get_world_size() > 1:
            device_ids = None if device.type == "cpu" else [device.index]
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        o = spec.optim
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.grad_clip = o.grad_clip
        self.device = device

    def loss(self, batch: Batch) -> torch.Tensor:
        hf_batch = {k: v for k, v in batch.items() if k != "masked_positions"}  # HF's head runs at every token
        return self.model(**to_device(hf_batch, self.device)).loss

    def step(self, micro_batches: list[Batch], step: int = 0) -> None:
        self.loss(micro_batches[0]).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def full_head_step(trainer: Trainer, micro_batches: list[Batch], step: int = 0) -> None:
    """Our dense step without the masked-head fast path: without `masked_positions` the head is HF's, with
    logits at every token."""
    b = to_device(micro_batches[0], trainer.engine.device)
    out = trainer.engine(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), labels=b["labels"])
    trainer.engine.backward(out.loss)
    trainer.engine.step()


class Builds:
    """One world's trainers, each built on first use in its own run dir (`work/PREFIX+NAME`; a TCD student's
    teacher is `work/teacher`, written by the main world), and the host batches every variant steps through:
    those of the first trainer built, so every variant sees the same data."""

    def __init__(self, cfg: dict, world: int, rank: int, prefix: str = "", batch_steps: int = 4):
        self.cfg, self.world, self.rank, self.prefix, self.batch_steps = cfg, world, rank, prefix, batch_steps
        self.work = Path(cfg["work"])
        self.trainers: dict[str, Trainer] = {}
        self.batches: list[list[Batch]] = []

    def trainer(self, kind: str, name: str | None = None, overrides: tuple[str, ...] = ()) -> Trainer:
        """`kind`: dense, moe or tcd (the preset's three specs); `name` tells apart trainers of one kind."""
        name = name or kind
        if name not in self.trainers:
            spec = run_spec(self.cfg["preset"], kind, self.work / f"{self.prefix}{name}", self.cfg["cache_dir"],
                            self.world, self.work / "teacher", (*self.cfg.get("overrides", ()), *overrides))
            self.trainers[name] = trainer = Trainer(spec)
            if not self.batches:
                self.batches = [trainer.train_batches.micro_batches(s) for s in range(self.batch_steps)]
        return self.trainers[name]

    def stepper(self, kind: str, name: str | None = None, overrides: tuple[str, ...] = ()) -> Stepper:
        """The trainer's own step, `TrainStep`, as `Trainer.fit` calls it."""
        trainer = self.trainer(kind, name, overrides)
        return Stepper(trainer.train_step, self.batches, trainer.spec.seed, self.rank)

    def hf_stepper(self) -> Stepper:
        dense = self.trainer("dense")
        hf = HFBaseline(dense.spec, dense.model, dense.engine.device)
        return Stepper(hf.step, self.batches, dense.spec.seed, self.rank)


# A variant set: the steps of one comparison, each made on first use (so that a memory measurement sees what
# building it costs), in the order they are built and measured.
VariantSet = Callable[[Builds], dict[str, Callable[[], Stepper]]]


def ours(builds: Builds) -> dict[str, Callable[[], Stepper]]:
    """Our dense, MoE and TCD steps."""
    return {kind: partial(builds.stepper, kind) for kind in ("dense", "moe", "tcd")}


def ours_and_hf(builds: Builds) -> dict[str, Callable[[], Stepper]]:
    """Ours, then the HF baseline on the dense model's weights."""
    return {**ours(builds), "hf": builds.hf_stepper}


EXPERT_COUNTS = {  # name: (kind, overrides of the preset, label); the dense step's shapes and batch
    "dense": ("dense", (), "dense"),
    "moe8": ("moe", ("--model.moe.num_experts=8", "--model.moe.layers=every_other"), "8 experts, every other layer"),
    "moe64": ("moe", ("--model.moe.num_experts=64", "--model.moe.layers=every_other"),
              "64 experts, every other layer"),
    "moe64_every": ("moe", ("--model.moe.num_experts=64", "--model.moe.layers=every"), "64 experts, every layer"),
    "moe64_copy": ("moe", ("--model.moe.num_experts=64", "--model.moe.layers=every_other"),
                   "64 experts, every other layer, weights copied per forward (before issue 23)"),
    "moe8_padded": ("moe", ("--model.moe.num_experts=8", "--model.moe.layers=every_other"),
                    "8 experts, every other layer, experts on the capacity-padded buffers (before)"),
    "moe64_padded": ("moe", ("--model.moe.num_experts=64", "--model.moe.layers=every_other"),
                     "64 experts, every other layer, experts on the capacity-padded buffers (before)"),
}
WEIGHT_COPY = {"moe64_copy"}  # built with `with_weight_copy`
PADDED = {"moe8_padded", "moe64_padded"}  # built with `with_padded_experts`


class CopiedProjections:
    """The experts' forward as it was before they were stored packed: each forward copies the layer's expert
    weights into new tensors (then `torch.stack` of the per-expert parameters) and the products keep the copy
    for backward. Over the same packed parameters, so the step, ZeRO groups and optimizer are the same."""

    def __init__(self, experts):
        self.projections = experts.projections

    def __call__(self):
        return tuple(t.clone() for t in self.projections())


def with_weight_copy(model: torch.nn.Module) -> torch.nn.Module:
    for block in model.moe_blocks().values():
        experts = block.deepspeed_moe.experts
        experts.projections = CopiedProjections(experts)
    return model


def with_padded_experts(model: torch.nn.Module) -> torch.nn.Module:
    """DeepSpeed's own `MOELayer.forward` in every MoE layer: the experts compute every capacity slot, as before
    `RoutedRowsMOELayer` (tcd_ds/models/deepspeed_moe.py); the same routing, parameters and step."""
    from deepspeed.moe.sharded_moe import MOELayer

    for block in model.moe_blocks().values():
        block.deepspeed_moe.__class__ = MOELayer
    return model


def expert_stepper(builds: Builds, name: str) -> Stepper:
    kind, overrides, _ = EXPERT_COUNTS[name]
    if name not in builds.trainers:
        if name in WEIGHT_COPY:
            with_weight_copy(builds.trainer(kind, name, overrides).model)
        elif name in PADDED:
            with_padded_experts(builds.trainer(kind, name, overrides).model)
    return builds.stepper(kind, name, overrides)


def experts(builds: Builds) -> dict[str, Callable[[], Stepper]]:
    """The expert-count comparison (issues 13, 23): dense against the MoE student (MLM only) at 8 and 64 experts,
    64 experts with the former per-forward weight copy, and 8 and 64 experts with the former capacity-padded
    experts, on the same shapes and batches."""
    return {name: partial(expert_stepper, builds, name) for name in EXPERT_COUNTS}


MOE_PARTS = ("gate", "dispatch", "all-to-all", "experts", "combine")


def moe_split(trainer: Trainer, batches: list[list[Batch]], steps: int) -> dict[str, dict[str, float]]:
    """Seconds per step of the MoE layers' forwards, split into DeepSpeed's stages: the gate, the dispatch
    (the gather into capacity slots), the all-to-alls (the tokens' both ways and, with `RoutedRowsMOELayer`, the
    kept counts'), the experts and the combine (back to token order, scaled by the gate). Each stage timed by
    hooks on the gate and experts modules and around `_AllToAll.forward`; dispatch = gate end -> first all-to-all
    (or experts) start, combine = the rest of the layer after the experts' (or last all-to-all's) end. Backward
    is not split (it is in the step's phases)."""
    from deepspeed.moe import sharded_moe

    marks: list[tuple[str, str, tuple[float, float]]] = []
    clock = PhaseTimer._start
    handles = []
    for block in trainer.model.moe_blocks().values():
        for part, module in (("layer", block), ("gate", block.deepspeed_moe.gate),
                             ("experts", block.deepspeed_moe.experts)):
            handles.append(module.register_forward_pre_hook(lambda *_, p=part: marks.append((p, "start", clock()))))
            handles.append(module.register_forward_hook(lambda *_, p=part: marks.append((p, "end", clock()))))
    all_to_all = sharded_moe._AllToAll.forward

    def timed_all_to_all(*args, **kwargs):
        marks.append(("all-to-all", "start", clock()))
        try:
            return all_to_all(*args, **kwargs)
        finally:
            marks.append(("all-to-all", "end", clock()))

    sharded_moe._AllToAll.forward = staticmethod(timed_all_to_all)
    try:
        timed(Stepper(trainer.train_step, batches, trainer.spec.seed, trainer.rank), steps)
    finally:
        sharded_moe._AllToAll.forward = staticmethod(all_to_all)
        for handle in handles:
            handle.remove()
    totals = {part: defaultdict(float) for part in MOE_PARTS}
    layer: list = []
    for mark in marks:  # one MoE layer forward at a time, in order; the backward's all-to-alls fall outside
        if mark[:2] == ("layer", "start"):
            layer = []
        layer.append(mark)
        if mark[0] == "layer" and mark[1] == "end":
            at = {(p, e): t for p, e, t in layer}  # the last of each kind: the second all-to-all's
            a2a_starts = [t for p, e, t in layer if (p, e) == ("all-to-all", "start")]
            a2a_ends = [t for p, e, t in layer if (p, e) == ("all-to-all", "end")]
            spans = {"gate": (at["gate", "start"], at["gate", "end"]),
                     "experts": (at["experts", "start"], at["experts", "end"]),
                     "dispatch": (at["gate", "end"], (a2a_starts or [at["experts", "start"]])[0]),
                     "combine": ((a2a_ends or [at["experts", "end"]])[-1], at["layer", "end"])}
            a2a = [(s, e) for s, e in zip(a2a_starts, a2a_ends)]
            for part, (start, end) in [*spans.items(), *(("all-to-all", se) for se in a2a)]:
                for clock_name, t0, t1 in zip(("wall", "cpu"), start, end):
                    totals[part][clock_name] += (t1 - t0) / steps
            layer = []
    return {part: dict(t) for part, t in totals.items()}


def moe_memory(trainer: Trainer, batch: Batch) -> dict[str, int]:
    """On one micro-batch (forward and backward): the bytes the MoE layers keep for backward (saved tensors
    other than the parameters, each storage once), and the bytes of new tensors shaped as a layer's local expert
    weights (packed, or one projection) that the layers' forwards and the backward create: copies of the
    weights, and in backward also their gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    blocks = list(trainer.model.moe_blocks().values())
    shapes = set()
    for b in blocks:
        w_in, _, w_out, _ = b.deepspeed_moe.experts.projections()
        shapes |= {tuple(b.deepspeed_moe.experts.weight.shape), tuple(w_in.shape), tuple(w_out.shape)}
    saved: dict[int, int] = {}
    big = {"forward": 0, "backward": 0}
    phase = ["outside"]

    parameters = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}  # weights, not activations

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in parameters:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            is_view = any(r.alias_info is not None for r in func._schema.returns)
            if phase[0] in big and not is_view:
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and tuple(t.shape) in shapes:
                        big[phase[0]] += t.nbytes
            return out

    contexts = []

    def enter(*_):
        phase[0] = "forward"
        contexts.append(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        contexts[-1].__enter__()

    def leave(*_):
        contexts.pop().__exit__(None, None, None)
        phase[0] = "outside"

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    engine = trainer.engine
    try:
        with Watch():
            losses = trainer.train_step.losses(
                batch, seeded_generator(trainer.spec.seed, "bench memory", 0, 0, trainer.rank))
            phase[0] = "backward"
            engine.backward(losses["total"])
            phase[0] = "outside"
        engine.step()  # closes the accumulation the backward opened
    finally:
        for h in handles:
            h.remove()
    weights = sum(b.deepspeed_moe.experts.weight.nbytes for b in blocks)
    return {"saved for backward": sum(saved.values()), "weight-shaped, forward": big["forward"],
            "weight-shaped, backward": big["backward"], "expert weights": weights}


VARIANT_SETS: dict[str, VariantSet] = {"ours": ours, "ours_and_hf": ours_and_hf, "experts": experts}


# ----------------------------------------------------------------------------- parts of a step, alone


def captures_of(trainer: Trainer, batch: Batch) -> tuple[dict, dict]:
    """Copies of what the taps of both models capture on `batch` (the student's as fresh leaves)."""
    b = to_device(batch, trainer.engine.device)
    tcd = trainer.train_step.tcd
    tcd.teacher_forward(b)
    with torch.no_grad():
        trainer.engine(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"))
    student = {loc: [t.detach().clone().requires_grad_() for t in slots]
               for loc, slots in tcd.student_taps.captures.items()}
    teacher = {loc: [t.clone() for t in slots] for loc, slots in tcd.teacher_taps.captures.items()}
    tcd.student_taps.clear()
    tcd.teacher_taps.clear()
    return student, teacher


def relation_bench(distiller: RelationDistiller, captures: tuple[dict, dict], mask: torch.Tensor) -> Callable:
    """The relation losses alone, forward and backward, on a step's captures (the student's gradient stops at
    the captures, where the model's backward would take over)."""
    student, teacher = captures
    draws = itertools.count()

    def run() -> None:
        generator = seeded_generator(0, "bench", next(draws), dist.get_rank())
        distiller.weighted_sum(distiller(student, teacher, mask, generator)).backward()

    return run


def mlm_loss_check(dense: Trainer, moe: Trainer, hf: HFBaseline, batch: Batch) -> dict:
    """The masked-head MLM loss against HF's full-head forward, same weights and dropout draws (the MoE
    student's full-head MLM loss by hand from its logits: its `loss` also holds the balance term)."""
    def seeded(fn):
        seed_step(dense.spec.seed, 0, dense.rank)
        return fn().item()

    def ours(trainer: Trainer) -> torch.Tensor:
        return trainer.train_step.losses(batch, seeded_generator(0, "bench", "loss check"))["mlm"]

    def moe_full_head() -> torch.Tensor:
        logits = moe.engine(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1))

    b = to_device(batch, dense.engine.device)
    return {
        "dense": {"ours": seeded(lambda: ours(dense)), "hf_full_head": seeded(lambda: hf.loss(batch))},
        "moe": {"ours": seeded(lambda: ours(moe)), "full_head": seeded(moe_full_head)},
    }


PHASES = ("teacher forward", "student forward", "relation losses (forward)", "backward (student and relations)",
          "optimizer step")


def phase_breakdown(trainer: Trainer, batches: list[list[Batch]], steps: int) -> dict[str, Times]:
    """Seconds per step in each phase of the real step, each drained and timed: the step's calls made here in
    `TrainStep.__call__`'s order (its `losses`, `engine.backward`, `engine.step`), the teacher's and the
    student's forwards timed inside `losses` by forward hooks. "relation losses (forward)" is the rest of
    `losses` in the TCD step (the relation terms and their weighted sum, and the batch's copy to the device,
    which in the MoE step falls into "other")."""
    step, engine = trainer.train_step, trainer.engine
    forwards = {"student forward": engine}
    if step.tcd is not None:
        forwards["teacher forward"] = step.tcd.teacher
    timer = PhaseTimer()

    def instrumented(micro_batches: list[Batch], count: int) -> None:
        for micro, host_batch in enumerate(micro_batches):
            with timer.span("losses"):
                losses = step.losses(host_batch, seeded_generator(trainer.spec.seed, "bench phases", count, micro,
                                                                  trainer.rank))
            with timer.span("backward (student and relations)"):
                engine.backward(losses["total"])
            with timer.span("optimizer step"):
                engine.step()

    with timer.forwards(forwards):
        total = timed(Stepper(instrumented, batches, trainer.spec.seed, trainer.rank), steps)
    per_step = {name: {c: t / steps for c, t in times.items()} for name, times in timer.seconds.items()}
    losses = per_step.pop("losses")
    if step.tcd is not None:
        per_step["relation losses (forward)"] = {c: losses[c] - sum(per_step[f][c] for f in forwards) for c in losses}
    out = {name: per_step[name] for name in PHASES if name in per_step}  # in the step's order
    out["other"] = {c: total[c] - sum(times[c] for times in out.values()) for c in total}
    return {**out, "total": total}
