"""Adapter methods, one file per method: bottleneck adapters (with ``phm.py``, Compacter's projections), LoRA and
(IA)³ (``lora.py``, which picks DoRA, VeRA or MTL-LoRA from its own file when a config asks for it), prefix tuning,
prompt tuning, ReFT, invertible adapters; ``initialization.py`` holds their seeded initialisation.

They import downward only (layer base, registry / context, composition blocks, configuration); the layer order is
checked by tests/test_adapters_layout.py. This file imports nothing, so importing one method loads only that method."""
