"""Hugging Face PEFT adapter folders in and out (KerasHub models)."""

from keras_lowrank.integrations.peft.adapters import export_peft_adapter
from keras_lowrank.integrations.peft.adapters import load_peft_adapter

__all__ = ["export_peft_adapter", "load_peft_adapter"]
