"""Integrations with other libraries (KerasHub, Hugging Face PEFT), imported lazily."""
