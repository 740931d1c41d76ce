"""The layout of deberta_fast/adapters: imports go one way (down the layers below), and the public names stay put.

The layer check reads the source with ``ast`` (nothing is imported for it): every ``import`` / ``from ... import`` in
a module, at the top or inside a function (a lazy import is still a dependency), is resolved to the package module
it names, and that module's layer must not be above the importer's. Imports leaving the package may only go down
the house layers (deberta_fast.models, deberta_fast.ops, or the version string of deberta_fast itself).
"""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

import deberta_fast
import deberta_fast.adapters as adapters

ROOT = pathlib.Path(adapters.__file__).parent
PACKAGE = "deberta_fast.adapters"

# Highest first. A module may import from its own layer or any layer below it, never from one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("package", ("",)),  # __init__: the public names, re-exported
    ("model", ("model", "init", "trainer")),
    ("model API", (
        "management", "summary", "embeddings",
        "heads.management", "heads.prediction", "heads.static",
        "composition.fusion_management",
        "persistence.adapter_io", "persistence.setup_io", "persistence.hub",
    )),
    ("encoder", ("base_model", "base_model_api", "injection", "attention")),
    ("methods", (
        "methods.bottleneck", "methods.phm", "methods.lora", "methods.dora", "methods.vera", "methods.mtl_lora",
        "methods.prefix_tuning", "methods.prompt_tuning", "methods.reft", "methods.invertible",
        "methods.initialization",
    )),
    ("layer base", ("layer_base",)),
    ("registry / context", ("registry", "context")),
    # configuration and what it needs; composition blocks and AdapterFusion's configs (fusion.py also holds the
    # fusion layer, but imports only configuration: the registry reads its configs); the file format helpers; the
    # subpackage __init__ files, which import nothing (checked below).
    ("configuration", (
        "configuration", "errors", "composition.blocks", "composition.fusion", "persistence.files",
        "methods", "heads", "composition", "persistence",
    )),
]
SUBPACKAGES = ("methods", "heads", "composition", "persistence")
OUTSIDE_ALLOWED = ("deberta_fast.models", "deberta_fast.ops")

LAYER_OF = {module: depth for depth, (_, modules) in enumerate(LAYERS) for module in modules}
LAYER_NAME = [name for name, _ in LAYERS]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _full(module: str) -> str:
    return f"{PACKAGE}.{module}" if module else PACKAGE


def _imports(module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``module``, top-level and lazy."""
    path = MODULES[module]
    package = _full(module) if path.name == "__init__.py" else _full(module).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                # `from X import y` names module X.y when y is a module, else something defined in X
                candidate = f"{target}.{alias.name}"
                inside = candidate.startswith(PACKAGE + ".") and candidate[len(PACKAGE) + 1:] in MODULES
                found.append((node.lineno, candidate if inside else target))
    return found


def test_every_module_has_a_layer():
    unassigned = sorted(set(MODULES) - set(LAYER_OF))
    stale = sorted(set(LAYER_OF) - set(MODULES))
    assert not unassigned, f"modules of {PACKAGE} without a layer in LAYERS (place them): {unassigned}"
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


@pytest.mark.parametrize("module", sorted(MODULES), ids=lambda m: m or "__init__")
def test_imports_go_down_the_layers(module):
    upward, outside = [], []
    for line, target in _imports(module):
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            imported = target[len(PACKAGE) + 1:]
            assert imported in LAYER_OF, f"{module}:{line} imports {target}, which is not a module of {PACKAGE}"
            if LAYER_OF[imported] < LAYER_OF[module]:
                upward.append(f"line {line}: {imported} ({LAYER_NAME[LAYER_OF[imported]]})")
        elif target == "deberta_fast":
            pass  # the version string (persistence/hub.py); deberta_fast/__init__ imports nothing eagerly
        elif target.startswith("deberta_fast."):
            if not target.startswith(OUTSIDE_ALLOWED):
                outside.append(f"line {line}: {target}")
    assert not upward, (f"{module or '__init__'} ({LAYER_NAME[LAYER_OF[module]]}) imports from a higher layer: "
                        f"{upward}")
    assert not outside, f"{module or '__init__'} imports outside {OUTSIDE_ALLOWED}: {outside}"


def test_resolver_sees_lazy_and_relative_imports():
    # guards the checker itself: known imports of the current code, one lazy, one two levels up, one `from . import`
    # persistence/hub.py imports files.py only inside a function
    assert any(t == f"{PACKAGE}.persistence.files" for _, t in _imports("persistence.hub"))
    assert any(t == "deberta_fast.ops.lora" for _, t in _imports("methods.lora"))  # three dots: outside the package
    assert any(t == f"{PACKAGE}.persistence.files" for _, t in _imports("embeddings"))  # from .persistence import files
    assert any(t == f"{PACKAGE}.trainer" for _, t in _imports(""))  # `from . import trainer` in __getattr__


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_subpackage_inits_import_nothing(subpackage):
    # importing any file of a subpackage runs its __init__ first: an import there would be a hidden dependency of
    # every file in it, whatever their layers
    tree = ast.parse((ROOT / subpackage / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


# The public names of deberta_fast.adapters before the package was grouped into subpackages (written out, not read
# from the code): each must still import from deberta_fast.adapters.
PUBLIC_NAMES = (
    "ADAPTERFUSION_CONFIG_MAP", "ADAPTER_CONFIG_MAP", "ALLOWED_NESTINGS", "AdapterConfig", "AdapterFusionConfig",
    "AdapterSetup", "AdapterTrainer", "AdapterTrainerCallback", "Average", "BatchSplit", "BnConfig",
    "ClassificationHead", "CompacterConfig", "CompacterPlusPlusConfig", "ConfigUnion", "DebertaV2AdapterModel",
    "DiReftConfig", "DoRAConfig", "DvoRAConfig", "DoubleSeqBnConfig", "DoubleSeqBnInvConfig",
    "DynamicAdapterFusionConfig", "ForwardContext", "Fuse", "GLOWCouplingBlock", "IA3Config", "LoRAConfig",
    "LoReftConfig", "MAMConfig", "MTLLoRAConfig", "MaskedLMHead", "MultiHeadOutput", "MultiLabelClassificationHead",
    "MultipleChoiceHead", "MultiTask", "NICECouplingBlock", "NoReftConfig", "ParBnConfig", "Parallel",
    "PredictionHead", "PrefixTuningConfig", "PromptTuningConfig", "QuestionAnsweringHead", "ReftConfig",
    "SeqBnConfig", "Seq2SeqAdapterTrainer", "SeqBnInvConfig", "Split", "Stack", "StaticAdapterFusionConfig",
    "TaggingHead", "UniPELTConfig", "VeraConfig", "head_type", "init", "parse_composition",
)
TOP_LEVEL_ADAPTER_NAMES = (
    "DebertaV2AdapterModel", "AdapterSetup", "AdapterConfig", "LoRAConfig", "IA3Config", "SeqBnConfig",
    "DoubleSeqBnConfig", "ParBnConfig", "BnConfig", "ConfigUnion", "Stack", "Average", "DoRAConfig", "DvoRAConfig",
    "VeraConfig", "MTLLoRAConfig", "MultiTask",
)


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_imports_from_adapters(name):
    assert name in adapters.__all__
    obj = getattr(adapters, name)
    # a class or function is reachable under the module it says it lives in (its file after the move), as the
    # same object: no stale copy left behind at an old path
    if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__"):
        home = importlib.import_module(obj.__module__)
        if obj.__module__.startswith(PACKAGE):
            assert getattr(home, obj.__qualname__) is obj


def test_star_import_gives_every_public_name():
    namespace: dict = {}
    exec(f"from {PACKAGE} import *", namespace)
    assert set(PUBLIC_NAMES) <= set(namespace)
    assert all(namespace[name] is getattr(adapters, name) for name in PUBLIC_NAMES)


@pytest.mark.parametrize("name", TOP_LEVEL_ADAPTER_NAMES)
def test_adapter_name_imports_from_deberta_fast(name):
    assert name in deberta_fast.__all__
    assert getattr(deberta_fast, name) is getattr(adapters, name)
