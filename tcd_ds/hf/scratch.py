"""A model of a converted model's shape with no pre-training: the protocol's from-scratch baseline row."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

from tcd_ds.models import register_auto_classes


def write_scratch_model(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """`model_dir`'s config and tokenizer with weights freshly initialised (HF's initialisation, seeded), as a
    Hugging Face directory that loads and fine-tunes as the converted model does."""
    register_auto_classes()
    config = AutoConfig.from_pretrained(str(model_dir))
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(config)
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out_dir))
    return Path(out_dir)
