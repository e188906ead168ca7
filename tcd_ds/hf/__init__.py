"""Hugging Face format: the DeepSpeed-free MoE BERT classes, registered with the Auto classes on import, so that
a converted student loads with `import tcd_ds.hf; AutoModelForMaskedLM.from_pretrained(path)` (or
`AutoModelForSequenceClassification` for fine-tuning).

Importing `tcd_ds.models` (the training code) re-registers `AutoModelForMaskedLM` for `moe_bert` to the
DeepSpeed-backed class; both load the same weights. The converter itself is `tcd_ds.hf.convert`.
"""

from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification

from tcd_ds.hf.modeling_moe_bert import MoEBertConfig, MoEBertForMaskedLM, MoEBertForSequenceClassification

AutoConfig.register(MoEBertConfig.model_type, MoEBertConfig, exist_ok=True)
AutoModelForMaskedLM.register(MoEBertConfig, MoEBertForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(MoEBertConfig, MoEBertForSequenceClassification, exist_ok=True)

__all__ = ["MoEBertConfig", "MoEBertForMaskedLM", "MoEBertForSequenceClassification"]
