"""The repository's top-level `kernels/` folder (installed as gefx.kernels) must not break
transformers when a checkout's root is on sys.path (`python -m pytest`, `python -c` run from it):
transformers imports Hugging Face's own `kernels` package by that name."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_transformers_imports_from_a_checkout_root():
    code = ("import transformers.models.gpt2.modeling_gpt2, gefx.kernels, kernels; "
            "print(gefx.kernels.__file__, hasattr(gefx.kernels, 'OPS'), hasattr(kernels, 'OPS'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ours, has_ops, bare_has_ops = r.stdout.split()
    assert Path(ours).parent == ROOT / "kernels" and has_ops == "True"
    assert bare_has_ops == "False"  # under the bare name: Hugging Face's package (or an empty stand-in)


def _imports() -> dict[str, set[str]]:
    """gefx module -> the gefx modules it imports at module level (relative imports)."""
    import ast
    mods = {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f
            for f in (ROOT / "gefx").rglob("*.py")}
    graph = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_imports_flow_one_way():
    """No import cycle among gefx's modules (package re-exports aside), and the engine never imports
    the application (gefx.unlearning), the integrations or the command line (docs/ARCHITECTURE.md)."""
    graph = _imports()
    outer = ("gefx.unlearning", "gefx.integrations", "gefx.cli", "gefx.__main__")
    shims = {"gefx.objectives", "gefx.data", "gefx.models", "gefx.profile", "gefx.report"}  # old names, aliases
    for name, deps in graph.items():
        if not name.startswith(outer) and name not in shims and name != "gefx":
            assert not {d for d in deps if d.startswith(outer)}, f"the engine module {name} imports {deps}"
    state: dict = {}

    def visit(u, path):
        state[u] = 1
        for v in graph[u]:
            if v == "gefx" or graph.get(v) is None:
                continue
            assert state.get(v) != 1, "import cycle: " + " -> ".join(path[path.index(v):] + [v])
            if v not in state:
                visit(v, path + [v])
        state[u] = 2
    for u in graph:
        if u != "gefx" and u not in state:
            visit(u, [u])
