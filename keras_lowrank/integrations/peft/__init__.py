"""Hugging Face PEFT adapter folders in and out (KerasHub models).

`names` holds the name tables per architecture, `format` the folder format
and PEFT's `LoraConfig` rules, `mapping` the model ↔ module-name lookups and
tensor layouts, `experts` the same for MoE expert parameters
(`target_parameters`), `plan` the checks a load makes before anything
changes, and `load` / `export` the two verbs.
"""

from keras_lowrank.integrations.peft.export import export_peft_adapter
from keras_lowrank.integrations.peft.load import load_peft_adapter

__all__ = ["export_peft_adapter", "load_peft_adapter"]
