"""Task models: transformers' DebertaV2For* classes with deberta_fast's base model inside.

Each class is transformers' own (module tree, parameter names, losses, outputs, ``config.legacy`` choice of
masked-LM head) with its DeBERTa-v2 modules switched by ``patch_deberta`` once built.
"""

from __future__ import annotations

from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from .patch import patch_deberta


class DebertaV2ForMaskedLM(hf.DebertaV2ForMaskedLM):
    __doc__ = hf.DebertaV2ForMaskedLM.__doc__

    def __init__(self, config):
        super().__init__(config)
        patch_deberta(self)


class DebertaV2ForSequenceClassification(hf.DebertaV2ForSequenceClassification):
    __doc__ = hf.DebertaV2ForSequenceClassification.__doc__

    def __init__(self, config):
        super().__init__(config)
        patch_deberta(self)


class DebertaV2ForTokenClassification(hf.DebertaV2ForTokenClassification):
    __doc__ = hf.DebertaV2ForTokenClassification.__doc__

    def __init__(self, config):
        super().__init__(config)
        patch_deberta(self)


class DebertaV2ForQuestionAnswering(hf.DebertaV2ForQuestionAnswering):
    __doc__ = hf.DebertaV2ForQuestionAnswering.__doc__

    def __init__(self, config):
        super().__init__(config)
        patch_deberta(self)


class DebertaV2ForMultipleChoice(hf.DebertaV2ForMultipleChoice):
    __doc__ = hf.DebertaV2ForMultipleChoice.__doc__

    def __init__(self, config):
        super().__init__(config)
        patch_deberta(self)
