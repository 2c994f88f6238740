"""The package's layout holds: layers import only downward, no import cycles, nothing at import time.

Read from the source (an AST walk over star_hf/, imports inside functions included), so the rules
stay true as the code changes.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "star_hf"

# Layers from the bottom up. A module may import modules of its own layer or of lower layers only.
LAYERS: list[tuple[str, ...]] = [
    ("star_hf._version", "star_hf.errors"),
    ("star_hf.paths",),
    ("star_hf.config",),
    ("star_hf.gha",),
    ("star_hf.router",),
    ("star_hf.integrations",),
    ("star_hf.patching",),
    ("star_hf.training",),
    ("star_hf.adaptation",),
    ("star_hf.persistence",),
    ("star_hf.hub",),
    ("star_hf.experiments",),
    ("star_hf.cli", "star_hf.__main__"),
]
CORE_MAY_NOT_IMPORT = "star_hf.experiments"
CLI_COMMANDS_THAT_RUN_EXPERIMENTS = {"star_hf.cli.demo", "star_hf.cli.inspect"}  # demo; inspect --plot


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The star_hf modules ``path`` imports (absolute or relative, at any depth of the code)."""
    name = _module_name(path)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if _is_package(path) else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the module pkg.sub when there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == "star_hf" or t.startswith("star_hf.")}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def _layer(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


GRAPH = _graph()


def test_every_module_has_a_layer():
    for module in GRAPH:
        if module != "star_hf":
            _layer(module)


def test_no_module_imports_from_the_package_root():
    offenders = sorted(m for m, deps in GRAPH.items() if m != "star_hf" and "star_hf" in deps)
    assert not offenders, f"modules importing from the package root star_hf: {offenders}"


def test_layers_import_only_downward():
    upward = [
        f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
        for m, deps in sorted(GRAPH.items())
        if m != "star_hf"
        for d in sorted(deps)
        if d != "star_hf" and _layer(d) > _layer(m)
    ]
    assert not upward, "\n".join(upward)


def test_the_core_never_imports_the_experiments():
    offenders = [
        f"{m} imports {d}"
        for m, deps in sorted(GRAPH.items())
        if not m.startswith(CORE_MAY_NOT_IMPORT) and m not in CLI_COMMANDS_THAT_RUN_EXPERIMENTS
        for d in deps
        if d.startswith(CORE_MAY_NOT_IMPORT)
    ]
    assert not offenders, offenders


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # The package root only names its exports lazily; its edges are not imports at run time.
    graph = {m: deps - {"star_hf"} for m, deps in GRAPH.items() if m != "star_hf"}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_import_star_hf_changes_nothing():
    """After ``import star_hf`` PEFT's methods are the originals, no optimizer hook is registered, and
    neither torch, Transformers, matplotlib nor datasets was imported by it."""
    state = _run(
        "import json, sys\n"
        "import star_hf\n"
        "heavy = {m: m in sys.modules for m in ('torch', 'transformers', 'peft', 'matplotlib', 'datasets')}\n"
        "dir(star_hf); star_hf.__version__\n"
        "from peft import PeftModel\n"
        "from peft.tuners.tuners_utils import BaseTuner\n"
        "import torch.optim.optimizer as o\n"
        "print(json.dumps({'heavy': heavy, 'hooks': len(o._global_optimizer_post_hooks),\n"
        "    'inject': BaseTuner.inject_adapter.__module__, 'load': PeftModel.load_adapter.__module__,\n"
        "    'wrapped': hasattr(BaseTuner.inject_adapter, '_star_hf_wrapped')}))\n"
    )
    assert state["heavy"] == dict.fromkeys(("torch", "transformers", "peft", "matplotlib", "datasets"), False)
    assert state["hooks"] == 0
    assert state["inject"].startswith("peft.") and state["load"].startswith("peft.") and not state["wrapped"]


@pytest.mark.slow
def test_patch_model_installs_the_integrations_and_still_no_experiment_dependency():
    state = _run(
        "import json, sys\n"
        "import star_hf\n"
        "from transformers import MixtralConfig, MixtralForCausalLM\n"
        "cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "    num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)\n"
        "star_hf.patch_model(MixtralForCausalLM(cfg))\n"
        "from peft.tuners.tuners_utils import BaseTuner\n"
        "import torch.optim.optimizer as o\n"
        "print(json.dumps({'hooks': len(o._global_optimizer_post_hooks),\n"
        "    'wrapped': getattr(BaseTuner.inject_adapter, '_star_hf_wrapped', False),\n"
        "    'heavy': [m for m in ('matplotlib', 'datasets') if m in sys.modules]}))\n"
    )
    assert state == {"hooks": 1, "wrapped": True, "heavy": []}


def test_public_names_resolve_lazily():
    import star_hf

    for name in star_hf.__all__:
        assert getattr(star_hf, name) is not None, name
    assert star_hf.adaptation.__name__ == "star_hf.adaptation"  # subpackages and modules by attribute
    with pytest.raises(AttributeError):
        star_hf.no_such_name  # noqa: B018
