"""``AdapterTrainer``: transformers' ``Trainer`` for adapter training (AdapterHub's class, on an encoder).

What differs from ``Trainer``:

- checkpoints (``save_model`` / ``_save``) hold only what trains: ``save_all_adapters`` (with their heads),
  ``save_all_adapter_fusions`` when a fusion is trained, ``save_all_heads``; plus the processing class and
  ``training_args.bin``. Resuming (``resume_from_checkpoint``) and ``load_best_model_at_end`` load them back.
- training an AdapterFusion adds its regularisation ``get_fusion_regularization_loss()`` (0.01 · Σ‖I − W_value‖²)
  to the loss of every step, so its gradient joins the step's gradient (AdapterHub calls backward on it in a
  callback after the optimizer step, so it reaches the next step's update instead);
- fusion value matrices get no weight decay (they are regularised towards the identity instead);
- ``AdapterTrainerCallback`` refuses to start when the base model is not frozen (``train_adapter`` /
  ``train_adapter_fusion`` were not called), as AdapterHub does;
- ``label_names`` default to those of the active heads.

``Seq2SeqAdapterTrainer`` is the same on ``Seq2SeqTrainer`` (generation-based evaluation); DeBERTa is an encoder,
so it is only useful for subclasses that generate with another model.
"""

from __future__ import annotations

import logging
import os
import re

import torch
from transformers import PreTrainedModel, Seq2SeqTrainer, Trainer
from transformers.trainer_callback import TrainerCallback

from .composition.blocks import AdapterCompositionBlock, Fuse

logger = logging.getLogger("deberta_fast")

__all__ = ["AdapterTrainer", "AdapterTrainerCallback", "Seq2SeqAdapterTrainer"]

_FUSION_VALUE = re.compile(r".*adapter_fusion_layer\..*\.value\.")


def _trains_fusion(setup) -> bool:
    return isinstance(setup, Fuse) or (isinstance(setup, AdapterCompositionBlock)
                                      and any(isinstance(child, Fuse) for child in setup.children))


class AdapterTrainer(Trainer):
    """transformers' Trainer that checkpoints adapters, fusions and heads only (module docstring). Takes
    Trainer's arguments, plus ``adapter_names`` (a setup to activate) and ``tokenizer`` (alias of
    ``processing_class``)."""

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 tokenizer=None, processing_class=None, model_init=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, adapter_names=None, **kwargs):
        if model is None:
            raise ValueError("AdapterTrainer needs a model with adapters (model_init is not supported)")
        if model_init is not None:
            raise ValueError("AdapterTrainer does not support model_init: pass the model with its adapters")
        callbacks = [AdapterTrainerCallback(self)] + list(callbacks or [])
        super().__init__(model, args, data_collator, train_dataset, eval_dataset,
                         processing_class=processing_class or tokenizer, compute_metrics=compute_metrics,
                         callbacks=callbacks, optimizers=optimizers,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics, **kwargs)
        if adapter_names is not None:
            self.model.set_active_adapters(adapter_names)
        if self.model.active_adapters is None:
            raise ValueError("Expected a model with an active adapter setup. If you want to fully finetune the model "
                             "use the Trainer class.")
        self.train_adapter_fusion = bool(getattr(self.model, "model_frozen", False)) and \
            _trains_fusion(self.model.active_adapters)
        heads = getattr(self.model, "heads", {})
        active = self.model._active_head_names() if hasattr(self.model, "_active_head_names") else []
        if not self.label_names and active:
            names = set()
            for head in active:
                names |= set(heads[head].get_label_names())
            self.label_names = sorted(names)

    # ---- loss and optimizer -----------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not (self.train_adapter_fusion and model.training):
            return result
        regularization = self.model.get_fusion_regularization_loss()
        if regularization is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss + regularization.to(loss.dtype), outputs
        return result + regularization.to(result.dtype)

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name in super().get_decay_parameter_names(model) if not _FUSION_VALUE.match(name)]

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        logger.info("Saving adapter checkpoint to %s", output_dir)
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        if not isinstance(model, PreTrainedModel) or not hasattr(model, "save_all_adapters"):
            raise TypeError(f"AdapterTrainer saves adapter models; got {type(model).__name__}")
        model.save_all_adapters(output_dir)
        if self.train_adapter_fusion:
            model.save_all_adapter_fusions(output_dir)
        if getattr(model, "heads", None):
            model.save_all_heads(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _checkpoint_dirs(self, checkpoint: str):
        for name in sorted(os.listdir(checkpoint)):
            path = os.path.join(checkpoint, name)
            if os.path.isdir(path):
                yield name, path, set(os.listdir(path))

    def _load_adapter_checkpoint(self, checkpoint: str) -> None:
        model = self.model
        loaded = False
        for name, path, contents in self._checkpoint_dirs(checkpoint):
            if "," not in name and "adapter_config.json" in contents:
                model.load_adapter(path)
                loaded = True
        for name, path, contents in self._checkpoint_dirs(checkpoint):
            if "adapter_fusion_config.json" in contents:
                model.load_adapter_fusion(path)
        if getattr(model, "heads", None) is not None and hasattr(model, "add_prediction_head"):
            for name, path, contents in self._checkpoint_dirs(checkpoint):
                if "," not in name and "head_config.json" in contents and "adapter_config.json" not in contents:
                    model.load_head(path, set_active=False)
        if not loaded:
            raise ValueError(f"Can't find a valid checkpoint at {checkpoint} (no adapter directories)")
        model.to(self.args.device)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        self._load_adapter_checkpoint(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        logger.info("Loading best adapter(s) from %s (score: %s).", self.state.best_model_checkpoint,
                    self.state.best_metric)
        self._load_adapter_checkpoint(self.state.best_model_checkpoint)


class AdapterTrainerCallback(TrainerCallback):
    """Checks at the start of training that the base model is frozen (``train_adapter`` was called)."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        model = kwargs.get("model")
        if not getattr(model, "model_frozen", False):
            raise ValueError("The pre-trained model weights are not frozen. For training adapters, please call the "
                             "train_adapter() method")


class Seq2SeqAdapterTrainer(AdapterTrainer, Seq2SeqTrainer):
    """AdapterTrainer on transformers' Seq2SeqTrainer (module docstring)."""
