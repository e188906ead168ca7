"""A checkpoint of one of our runs -> a Hugging Face directory, written in full or not at all.

Output: config.json, model.safetensors (fp32), the run's tokenizer files, README.md (the model card) and, for
an MoE student, modeling_moe_bert.py with an `auto_map` in config.json for `trust_remote_code`. A teacher is
a plain `BertForMaskedLM` directory. A student's experts are written under DeepSpeed's per-expert names, as its
checkpoint names them; the model holds them stacked (see modeling_moe_bert.py: `load_state_dict` and
`from_pretrained` stack them, `save_pretrained` splits them back).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from transformers import BertConfig, BertForMaskedLM, PreTrainedModel

from tcd_ds.hf.model_card import model_card
from tcd_ds.models import modeling_moe_bert
from tcd_ds.models.configs import model_config
from tcd_ds.rundir import Checkpoint, CheckpointError, RunDir, locate_checkpoint
from tcd_ds.rundir.weights import full_state_dict
from tcd_ds.spec import ModelSpec

MODELING_FILE = Path(modeling_moe_bert.__file__)
AUTO_MAP = {
    "AutoConfig": f"{MODELING_FILE.stem}.MoEBertConfig",
    "AutoModelForMaskedLM": f"{MODELING_FILE.stem}.MoEBertForMaskedLM",
    "AutoModelForSequenceClassification": f"{MODELING_FILE.stem}.MoEBertForSequenceClassification",
}


class ConversionError(CheckpointError):
    """An output that must not be written, or a checkpoint that does not fit its run's spec."""


def hf_config(model: ModelSpec, vocab_size: int, pad_token_id: int) -> BertConfig:
    """The config the run trained with (the trainer's vocab_size = len(tokenizer)), every expert local."""
    config = model_config(model, vocab_size, pad_token_id)
    if model.moe is None:
        return config
    config.ep_size = 1
    config.auto_map = AUTO_MAP
    return config


def check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ConversionError(f"output directory {output} is not empty; pass --force to replace it")


def write_atomically(output: Path, fill: Callable[[Path], None]) -> None:
    """Fill a sibling temporary directory, then rename it to `output`. An existing `output` (--force) is
    renamed aside first and removed last, so `output` is never a mix of old and new or half written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        fill(partial)
        if output.is_dir() and any(output.iterdir()):
            old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(output, old)
            os.replace(partial, output)
            shutil.rmtree(old)
        else:
            os.replace(partial, output)  # rename(2) also replaces an empty directory
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def converted_model(ckpt: Checkpoint, spec: dict, model_spec: ModelSpec) -> tuple[PreTrainedModel, int, str]:
    """The HF model holding the checkpoint's weights, the checkpoint's step and where the weights came from."""
    tokenizer = ckpt.load_tokenizer()
    config = hf_config(model_spec, len(tokenizer), tokenizer.pad_token_id)
    model_class = BertForMaskedLM if model_spec.moe is None else modeling_moe_bert.MoEBertForMaskedLM
    model = model_class(config)
    dtype = spec.get("train", {}).get("dtype", "fp32")
    weights, step = full_state_dict(ckpt, model_spec, dtype)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        spec_file = ckpt.spec_file if ckpt.spec_file.is_file() else RunDir(ckpt.run_dir).spec_file
        raise ConversionError(f"{ckpt.dir} does not fit the model {spec_file} describes: {e}") from e
    source = "fp32, as trained" if dtype == "fp32" else f"fp32 master weights from the ZeRO shards ({dtype} run)"
    return model.eval(), step, source


def convert(source: str | Path, output: str | Path, tag: str | None = None, force: bool = False) -> Path:
    """Convert the checkpoint `tag` (default: the latest) of the run at `source` (a run directory, its
    checkpoints/ directory or a tag directory) into the Hugging Face directory `output`."""
    ckpt = locate_checkpoint(source, tag)
    output = Path(output)
    check_output(output, force)
    spec, model_spec = ckpt.read_spec()  # the spec it was written under, not the run's latest
    model, step, weights_source = converted_model(ckpt, spec, model_spec)
    card = model_card(ckpt, spec, model_spec, step, model.config.vocab_size, weights_source)

    def fill(directory: Path) -> None:
        model.save_pretrained(directory)
        (directory / "model.safetensors").chmod(0o644)  # the writer makes it 0600: unreadable on a shared cluster
        for file in RunDir(ckpt.run_dir).tokenizer_dir.iterdir():
            if file.is_file():
                shutil.copy2(file, directory / file.name)
        if model_spec.moe is not None:
            shutil.copy2(MODELING_FILE, directory / MODELING_FILE.name)
        (directory / "README.md").write_text(card)

    write_atomically(output, fill)
    return output
