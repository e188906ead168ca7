"""Conversion of our DeepSpeed checkpoints to Hugging Face directories (`tcd_ds.hf.convert`). The model a
converted student loads into is `tcd_ds.models.modeling_moe_bert`."""
