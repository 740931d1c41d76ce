"""DeBERTa-v2's token-wise blocks on deberta_fast's fused ops: attention output, intermediate, FFN output.

Subclasses of transformers' DebertaV2SelfOutput, DebertaV2Intermediate and DebertaV2Output that add no parameters
(``patch_deberta`` switches them in place), with the linear's bias moved out of the GEMM into the fused op after it:

- DebertaV2SelfOutput, DebertaV2Output: LayerNorm(dropout(dense(hidden)) + input_tensor)
  = ``residual_layernorm(hidden · Wᵀ, b, input_tensor, ...)`` (``deberta_fast.ops.residual_layernorm``)
- DebertaV2Intermediate: gelu(dense(hidden)) = ``bias_gelu(hidden · Wᵀ, b)`` (``deberta_fast.ops.bias_gelu``)

The fused path serves CPU tensors when the submodules are exactly torch's Linear (with a bias) / LayerNorm / Dropout
and transformers' exact GELU, without module hooks, and the requested backend is auto, cpu or reference. Otherwise
transformers' forward runs unchanged: CUDA tensors (the GPU path is the GEMM's bias epilogue and ATen's kernels),
the triton backend requested (these ops have no Triton kernels), PEFT / adapter wrappers or hooks on a submodule.
Under CPU autocast the products run in the autocast dtype as transformers' would: bias + GELU in that dtype,
residual + LayerNorm in the parameters' dtype (autocast keeps LayerNorm in fp32).
In train mode the native op's hidden dropout masks come from its counter-based stream, not torch's bernoulli draws
(``use_backend("reference")`` reproduces transformers' masks).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import GELUActivation
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf

from ..ops.bias_gelu import bias_gelu
from ..ops.dispatch import requested_backend
from ..ops.residual_layernorm import residual_layernorm

FUSED_BACKENDS = ("auto", "cpu", "reference")


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward / backward (pre-)hooks: then it must run as a module, not be fused away."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _plain_linear(module) -> bool:
    return type(module) is nn.Linear and module.bias is not None and not has_hooks(module)


def _fusable(hidden_states: torch.Tensor, *modules: nn.Module) -> bool:
    return (
        hidden_states.device.type == "cpu"
        and not any(has_hooks(m) for m in modules)
        and requested_backend() in FUSED_BACKENDS
    )


def residual_layernorm_tail_applies(block: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether ``block``'s LayerNorm / dropout / device / backend let ``residual_layernorm_tail`` run it (module
    docstring); what produces the tail's input (the dense) is the caller's check."""
    norm, dropout = block.LayerNorm, block.dropout
    return (
        type(norm) is nn.LayerNorm
        and norm.weight is not None
        and norm.bias is not None
        and tuple(norm.normalized_shape) == (block.dense.out_features,)
        and type(dropout) is nn.Dropout
        and _fusable(hidden_states, block, norm, dropout)
    )


def residual_layernorm_tail(block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                            input_tensor: torch.Tensor) -> torch.Tensor:
    """block.LayerNorm(block.dropout(x + bias) + input_tensor) on the fused op; x [B, L, hidden] is the dense's output
    without ``bias`` [hidden] (or with it, bias None). Only where ``residual_layernorm_tail_applies``."""
    norm, dropout = block.LayerNorm, block.dropout
    if x.dtype != norm.weight.dtype and torch.is_autocast_enabled("cpu"):
        # Under autocast the GEMM runs in bf16, while transformers' residual sum and LayerNorm run in fp32 (autocast
        # keeps layer_norm in fp32): the fused op takes the product in the parameters' dtype.
        x = x.to(norm.weight.dtype)
    p = dropout.p if dropout.training else 0.0
    return residual_layernorm(x, bias, input_tensor, norm.weight, norm.bias, norm.eps, p)


def bias_gelu_tail(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) on the fused op; x [B, L, intermediate] is the dense's output without ``bias`` [intermediate].
    Only where ``bias_gelu_tail_applies``."""
    if bias.dtype != x.dtype and torch.is_autocast_enabled("cpu"):
        bias = bias.to(x.dtype)  # autocast's linear adds its bias in the GEMM's dtype, and GELU runs there
    return bias_gelu(x, bias)


def bias_gelu_tail_applies(block: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether ``block``'s activation (transformers' exact GELU), device and backend let ``bias_gelu`` run its
    activation; the dense is the caller's check."""
    act = block.intermediate_act_fn
    return type(act) is GELUActivation and act.act is F.gelu and _fusable(hidden_states, block, act)


def _residual_layernorm_block(block, hidden_states, input_tensor):
    """The fused tail of a SelfOutput / Output block, or None when it does not apply (module docstring)."""
    if not (_plain_linear(block.dense) and residual_layernorm_tail_applies(block, hidden_states)):
        return None
    x = F.linear(hidden_states, block.dense.weight)
    return residual_layernorm_tail(block, x, block.dense.bias, input_tensor)


class DebertaV2SelfOutput(hf.DebertaV2SelfOutput):
    """forward(hidden_states [B, L, hidden], input_tensor [B, L, hidden]) -> LayerNorm(dropout(dense(hidden_states))
    + input_tensor), as transformers'; on the fused op where it applies (module docstring)."""

    def forward(self, hidden_states, input_tensor):
        fused = _residual_layernorm_block(self, hidden_states, input_tensor)
        return super().forward(hidden_states, input_tensor) if fused is None else fused


class DebertaV2Output(hf.DebertaV2Output):
    """forward(hidden_states [B, L, intermediate], input_tensor [B, L, hidden]) -> LayerNorm(dropout(
    dense(hidden_states)) + input_tensor), as transformers'; on the fused op where it applies (module docstring)."""

    def forward(self, hidden_states, input_tensor):
        fused = _residual_layernorm_block(self, hidden_states, input_tensor)
        return super().forward(hidden_states, input_tensor) if fused is None else fused


class DebertaV2Intermediate(hf.DebertaV2Intermediate):
    """forward(hidden_states [B, L, hidden]) -> gelu(dense(hidden_states)) [B, L, intermediate], as transformers';
    on the fused op where it applies (module docstring: exact GELU only)."""

    def forward(self, hidden_states):
        if _plain_linear(self.dense) and bias_gelu_tail_applies(self, hidden_states):
            return bias_gelu_tail(F.linear(hidden_states, self.dense.weight), self.dense.bias)
        return super().forward(hidden_states)
