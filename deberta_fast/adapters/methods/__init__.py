"""Adapter methods, one file per method (DoRA, VeRA, MTL-LoRA, invertible adapters so far). They import downward
only: layer base, registry / context, configuration; the LoRA layer (``..lora``) picks the module a config asks for."""
