"""PHM (parameterized hypercomplex multiplication) layers: the down/up projections of Compacter and Compacter++.

A PHM layer of ``in`` -> ``out`` features with n = ``phm_dim`` computes

    y = x H + b,   H [in, out] = sum_{i < n} kron(C_i, W_i),   C_i [n, n],   W_i [in / n, out / n]

so H[a·p + c, b·q + d] = sum_i C[i, a, b] · W[i, c, d] with p = in / n, q = out / n. Factorisations (AdapterHub's
options): ``factorized_phm_W`` W = W_left [n, p, rank] @ W_right [n, rank, q]; ``factorized_phm_rule``
C = phm_rule_left [n, n, 1] @ phm_rule_right [n, 1, n]. ``shared_phm_rule`` (default) keeps C in the model's
``shared_parameters.<adapter>`` (one rule for every layer of the adapter), ``shared_W_phm`` keeps W there too
(``W_down_*`` / ``W_up_*``); otherwise they are parameters of the layer.

State-dict keys (AdapterHub's): ``W_left``, ``W_right`` (or ``W``), ``b``, and ``phm_rule`` / ``phm_rule_left`` /
``phm_rule_right`` when not shared; shared: ``deberta.shared_parameters.<adapter>.phm_rule`` etc.

Initialisation is AdapterHub's effective one: W slices Xavier-normal (AdapterHub selects Xavier-normal for every
``hypercomplex_nonlinearity`` value), b = 0, a layer's own rule N(0, 0.01) or U(-0.01, 0.01), a shared rule
N(0, phm_init_range) or U(-1, 1) (``phm_c_init``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .initialization import seeded_init

__all__ = ["PHMLayer", "phm_matrix", "shared_phm_parameters"]


def phm_matrix(rule: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """H [n·p, n·q] = sum_i kron(rule[i], weights[i]) for rule [n, n, n] and weights [n, p, q]."""
    n, p, q = weights.shape
    return torch.einsum("iab,icd->acbd", rule, weights).reshape(n * p, n * q)


def _check_divisible(features: int, phm_dim: int, argument: str, hint: str) -> None:
    if features % phm_dim != 0:
        raise ValueError(f"PHM layer: {argument}={features} is not divisible by phm_dim={phm_dim}; {hint}")


def _xavier_normal_slices_(tensor: torch.Tensor) -> None:
    for i in range(tensor.shape[0]):
        nn.init.xavier_normal_(tensor.data[i])


class PHMLayer(nn.Module):
    """One PHM projection (module docstring). ``position`` is "down" or "up" (which shared W it reads)."""

    def __init__(self, adapter_name: str, in_features: int, out_features: int, position: str, config, registry,
                 device=None, dtype=None):
        super().__init__()
        n = config["phm_dim"]
        hint = ("the bottleneck is hidden_size // reduction_factor; choose reduction_factor / phm_dim so that both "
                "sides divide")
        _check_divisible(in_features, n, "in_features", hint)
        _check_divisible(out_features, n, "out_features", hint)
        if config["hypercomplex_nonlinearity"] not in ("phm", "glorot-normal", "glorot-uniform", "normal"):
            raise ValueError(f"hypercomplex_nonlinearity must be 'phm', 'glorot-normal', 'glorot-uniform' or "
                             f"'normal'; got {config['hypercomplex_nonlinearity']!r}")
        if config["phm_c_init"] not in ("normal", "uniform"):
            raise ValueError(f"phm_c_init must be 'normal' or 'uniform'; got {config['phm_c_init']!r}")
        object.__setattr__(self, "_registry", registry)
        self.adapter_name = adapter_name
        self.position = position
        self.in_features, self.out_features, self.phm_dim = in_features, out_features, n
        self.shared_phm_rule = bool(config["shared_phm_rule"])
        self.factorized_phm_rule = bool(config["factorized_phm_rule"])
        self.shared_W_phm = bool(config["shared_W_phm"])
        self.factorized_phm_W = bool(config["factorized_phm_W"])
        factory = dict(device=device, dtype=dtype)
        p, q, rank = in_features // n, out_features // n, config["phm_rank"]
        if not self.shared_phm_rule:
            learn = bool(config["learn_phm"])
            if self.factorized_phm_rule:
                self.phm_rule_left = nn.Parameter(torch.empty(n, n, 1, **factory), requires_grad=learn)
                self.phm_rule_right = nn.Parameter(torch.empty(n, 1, n, **factory), requires_grad=learn)
            else:
                self.phm_rule = nn.Parameter(torch.empty(n, n, n, **factory), requires_grad=learn)
        if not self.shared_W_phm:
            if self.factorized_phm_W:
                self.W_left = nn.Parameter(torch.empty(n, p, rank, **factory))
                self.W_right = nn.Parameter(torch.empty(n, rank, q, **factory))
            else:
                self.W = nn.Parameter(torch.empty(n, p, q, **factory))
        if config["phm_bias"]:
            self.b = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("b", None)
        with seeded_init(config["init_weights_seed"], factory.get("device")):
            self._initialize(config)

    @torch.no_grad()
    def _initialize(self, config) -> None:
        if any(param.device.type == "meta" for param in self.parameters()):
            return
        for name in ("W_left", "W_right", "W"):
            if hasattr(self, name) and isinstance(getattr(self, name), nn.Parameter):
                _xavier_normal_slices_(getattr(self, name))
        if self.b is not None:
            self.b.zero_()
        for name in ("phm_rule", "phm_rule_left", "phm_rule_right"):
            rule = getattr(self, name, None)
            if isinstance(rule, nn.Parameter):
                if config["phm_c_init"] == "uniform":
                    rule.uniform_(-0.01, 0.01)
                else:
                    rule.normal_(mean=0.0, std=0.01)

    def _shared(self) -> nn.ParameterDict:
        shared = getattr(self._registry, "shared_parameters", None)
        if shared is None or self.adapter_name not in shared:
            raise RuntimeError(f"PHM layer of adapter {self.adapter_name!r}: its shared parameters are missing from "
                               "the model's shared_parameters")
        return shared[self.adapter_name]

    def rule(self) -> torch.Tensor:
        """C [n, n, n]."""
        source = self._shared() if self.shared_phm_rule else None
        if self.factorized_phm_rule:
            left = source["phm_rule_left"] if source is not None else self.phm_rule_left
            right = source["phm_rule_right"] if source is not None else self.phm_rule_right
            return torch.bmm(left, right)
        return source["phm_rule"] if source is not None else self.phm_rule

    def slices(self) -> torch.Tensor:
        """W [n, in / n, out / n]."""
        if self.shared_W_phm:
            source = self._shared()
            if self.factorized_phm_W:
                return torch.bmm(source[f"W_{self.position}_left"], source[f"W_{self.position}_right"])
            return source[f"W_{self.position}"]
        if self.factorized_phm_W:
            return torch.bmm(self.W_left, self.W_right)
        return self.W

    @property
    def weight(self) -> torch.Tensor:
        """Hᵀ [out, in], the equivalent nn.Linear weight (so the fused bottleneck op can run PHM adapters)."""
        return phm_matrix(self.rule(), self.slices()).t()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x H + b [..., out]."""
        return F.linear(x, self.weight, self.b)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, phm_dim={self.phm_dim}"


def shared_phm_parameters(config, hidden_size: int, down_size: int, device=None, dtype=None) -> nn.ParameterDict:
    """The ``shared_parameters.<adapter>`` entries of a PHM adapter: its rule (shared_phm_rule) and/or W
    (shared_W_phm) for the down [hidden -> down] and up [down -> hidden] projections."""
    factory = dict(device=device, dtype=dtype)
    meta = torch.device(device or "cpu").type == "meta"
    with seeded_init(None if meta else config["init_weights_seed"], device):
        return _shared_phm_parameters(config, hidden_size, down_size, factory, meta)


def _shared_phm_parameters(config, hidden_size: int, down_size: int, factory: dict, meta: bool) -> nn.ParameterDict:
    n, rank = config["phm_dim"], config["phm_rank"]
    parameters = nn.ParameterDict()
    if config["shared_W_phm"]:
        _check_divisible(hidden_size, n, "hidden_size", "shared PHM weights need hidden_size % phm_dim == 0")
        _check_divisible(down_size, n, "bottleneck size", "shared PHM weights need a bottleneck divisible by phm_dim")
        p, q = hidden_size // n, down_size // n
        if config["factorized_phm_W"]:
            shapes = {"W_down_left": (n, p, rank), "W_down_right": (n, rank, q), "W_up_left": (n, q, rank),
                      "W_up_right": (n, rank, p)}
        else:
            shapes = {"W_down": (n, p, q), "W_up": (n, q, p)}
        for name, shape in shapes.items():
            tensor = torch.empty(shape, **factory)
            if not meta:
                _xavier_normal_slices_(tensor)
            parameters[name] = nn.Parameter(tensor)
    if config["shared_phm_rule"]:
        learn = bool(config["learn_phm"])
        shapes = ({"phm_rule_left": (n, n, 1), "phm_rule_right": (n, 1, n)} if config["factorized_phm_rule"]
                  else {"phm_rule": (n, n, n)})
        for name, shape in shapes.items():
            tensor = torch.empty(shape, **factory)
            if not meta:
                with torch.no_grad():
                    if config["phm_c_init"] == "uniform":
                        tensor.uniform_(-1.0, 1.0)
                    else:
                        tensor.normal_(mean=0.0, std=config["phm_init_range"])
            parameters[name] = nn.Parameter(tensor, requires_grad=learn)
    return parameters
