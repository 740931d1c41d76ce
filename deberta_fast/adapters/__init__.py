"""AdapterHub-compatible adapters and flexible heads for deberta_fast (``DebertaV2AdapterModel``)."""

from .composition.blocks import (
    ALLOWED_NESTINGS,
    Average,
    BatchSplit,
    Fuse,
    MultiTask,
    Parallel,
    Split,
    Stack,
    parse_composition,
)
from .composition.fusion import (
    ADAPTERFUSION_CONFIG_MAP,
    AdapterFusionConfig,
    DynamicAdapterFusionConfig,
    StaticAdapterFusionConfig,
)
from .configuration import (
    ADAPTER_CONFIG_MAP,
    AdapterConfig,
    BnConfig,
    CompacterConfig,
    CompacterPlusPlusConfig,
    ConfigUnion,
    DoRAConfig,
    DvoRAConfig,
    DoubleSeqBnConfig,
    DiReftConfig,
    DoubleSeqBnInvConfig,
    IA3Config,
    LoRAConfig,
    LoReftConfig,
    MAMConfig,
    MTLLoRAConfig,
    NoReftConfig,
    ParBnConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    ReftConfig,
    SeqBnConfig,
    SeqBnInvConfig,
    UniPELTConfig,
    VeraConfig,
)
from .context import AdapterSetup, ForwardContext
from .heads.management import head_type
from .heads.prediction import (
    ClassificationHead,
    MaskedLMHead,
    MultiHeadOutput,
    MultiLabelClassificationHead,
    MultipleChoiceHead,
    PredictionHead,
    QuestionAnsweringHead,
    TaggingHead,
)
from .init import init
from .methods.invertible import GLOWCouplingBlock, NICECouplingBlock
from .model import DebertaV2AdapterModel

__all__ = [
    "ADAPTERFUSION_CONFIG_MAP",
    "ADAPTER_CONFIG_MAP",
    "ALLOWED_NESTINGS",
    "AdapterConfig",
    "AdapterFusionConfig",
    "AdapterSetup",
    "AdapterTrainer",
    "AdapterTrainerCallback",
    "Average",
    "BatchSplit",
    "BnConfig",
    "ClassificationHead",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "ConfigUnion",
    "DebertaV2AdapterModel",
    "DiReftConfig",
    "DoRAConfig",
    "DvoRAConfig",
    "DoubleSeqBnConfig",
    "DoubleSeqBnInvConfig",
    "DynamicAdapterFusionConfig",
    "ForwardContext",
    "Fuse",
    "GLOWCouplingBlock",
    "IA3Config",
    "LoRAConfig",
    "LoReftConfig",
    "MAMConfig",
    "MTLLoRAConfig",
    "MaskedLMHead",
    "MultiHeadOutput",
    "MultiLabelClassificationHead",
    "MultipleChoiceHead",
    "MultiTask",
    "NICECouplingBlock",
    "NoReftConfig",
    "ParBnConfig",
    "Parallel",
    "PredictionHead",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QuestionAnsweringHead",
    "ReftConfig",
    "SeqBnConfig",
    "Seq2SeqAdapterTrainer",
    "SeqBnInvConfig",
    "Split",
    "Stack",
    "StaticAdapterFusionConfig",
    "TaggingHead",
    "UniPELTConfig",
    "VeraConfig",
    "head_type",
    "init",
    "parse_composition",
]

# The trainers import transformers' Trainer (and accelerate): loaded on first use only.
_TRAINER_NAMES = ("AdapterTrainer", "AdapterTrainerCallback", "Seq2SeqAdapterTrainer")


def __getattr__(name):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
