"""The specs of the downstream commands, with the run spec's conventions (unknown keys refused, `--key=value`
overrides, one line per problem): fine-tuning and the out-of-domain MLM probe.

Each setting is declared once, in a `*Settings` class: the command's spec adds what one job needs (the model,
the task, where to write), and the protocol preset embeds the same settings as they are (tcd_ds/protocol/preset.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from tcd_ds.spec import DataPath, PositiveInt, Section

Mode = Literal["full", "adapter"]
LearningRates = Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)]


class FinetuneSettings(Section):
    """How a converted model is fine-tuned on a task (transformers.Trainer). The defaults make the model sizes we
    ship learn (H 64-128, 2-12 layers); for BERT-base use lr 2e-5 to 5e-5 (adapters 1e-4 to 1e-3), 3 epochs."""

    seeds: Annotated[list[int], Field(min_length=1)] = [1, 2, 3]
    epochs: PositiveInt = 5
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt = 128
    lr: LearningRates = Field([2e-4, 5e-4, 1e-3], description="learning rates of full fine-tuning: each is tried "
                              "with every seed, and the one with the best mean held-out score is reported")
    adapter_lr: LearningRates = Field([5e-4, 1e-3, 2e-3], description="learning rates of adapter fine-tuning")
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    max_length: PositiveInt = 128
    adapter_size: PositiveInt = Field(64, description="adapter bottleneck width")
    balance_weight: Annotated[float, Field(ge=0)] | None = Field(
        None, description="MoE load-balancing loss weight in fine-tuning; default: the model's (its run's); 0: off")
    max_train_examples: PositiveInt | None = Field(
        None, description="train on a fixed random subset of this size (the same for every model and seed)")
    selection: Literal["heldout", "dev", "last"] = Field(
        "heldout", description="the reported epoch: best on a slice held out from train, best on dev, or the last")
    heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(0.1, description="share of train held out")
    heldout_max_examples: PositiveInt = 1000
    eval_capacity_factor: Annotated[float, Field(gt=0)] | None = Field(
        None, description="MoE: expert capacity factor in evaluation; default: the converted model's")
    train_router: bool = Field(True, description="MoE, full mode: train the router (False: keep it as pre-trained)")
    report_to: list[str] = Field([], description="Trainer integrations, e.g. [wandb]; none by default")

    def lr_for(self, mode: Mode) -> list[float]:
        return self.lr if mode == "full" else self.adapter_lr

    def check_grid(self, modes: list[Mode]) -> None:
        """A grid of learning rates is selected on the held-out slice: other epoch selections take one lr."""
        for mode in modes:
            if len(self.lr_for(mode)) > 1 and self.selection != "heldout":
                field = "lr" if mode == "full" else "adapter_lr"
                raise ValueError(f"{field}: a grid of {len(self.lr_for(mode))} learning rates is selected on the "
                                 f"held-out slice: set selection: heldout, or give one {field}")


class FinetuneSpec(FinetuneSettings):
    """One fine-tuning job: a converted model on one task in one mode, over the seeds."""

    model: str = Field(description="a Hugging Face directory written by `tcd-ds convert`")
    task: str = Field(description="a bundled task's name, a task directory with task.yaml, or a GLUE task name")
    mode: Mode = "full"
    out: str | None = Field(None, description="results JSON; default runs/finetune/<model>_<task>_<mode>.json")

    @model_validator(mode="after")
    def _grid_needs_heldout(self) -> FinetuneSpec:
        self.check_grid([self.mode])
        return self


class ProbeSettings(Section):
    """The out-of-domain MLM probe: masked exactly as pre-training's validation, with a fixed seed."""

    name: str = Field("nyt_editorials", description="the probe's name, recorded in the result")
    files: Annotated[list[DataPath], Field(min_length=1)] = Field(
        ["bundled:tasks/nyt_editorials/sentences.txt"], validate_default=True,
        description="text files, one sentence or paragraph a line")
    seq_len: Annotated[int, Field(ge=8)] = 128
    batch_size: PositiveInt = 32
    cache_dir: str = ".cache/tcd_ds"


class ProbeSpec(ProbeSettings):
    """One probe job: a converted model on the probe's text."""

    model: str = Field(description="a Hugging Face directory written by `tcd-ds convert`")
    out: str | None = Field(None, description="result JSON; default: print only")

