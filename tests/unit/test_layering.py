"""DESIGN.md's dependency direction, checked by parsing every module's imports (TYPE_CHECKING blocks aside)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "ember"
# server → engine.async_engine → engine → runner → models → layers → ops: a layer imports only lower ones.
CHAIN = ["ops", "backends", "layers", "models", "runner", "engine", "engine.async_engine", "server"]
LEAVES = {"config", "sampling_params", "outputs", "int4_blocks", "weight_copy"}
LEAF_USERS = {"tokenizer", "loader"}  # import only leaves


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def ember_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "ember")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "ember":
                found.add(base)
    return found


def layer_of(module: str) -> str:
    """'ember.engine.scheduler' -> 'engine'; the async engine is its own layer."""
    rest = module.split(".")[1:]
    if rest[:2] == ["engine", "async_engine"]:
        return "engine.async_engine"
    return rest[0] if rest else ""


ENTRY_POINTS = {"", "__main__", "cli"}  # the package root, python -m ember, the ember command


def allowed(importer: str, imported: str) -> bool:
    src, dst = layer_of(importer), layer_of(imported)
    if src in ENTRY_POINTS:
        return True
    if dst in LEAVES or src == dst or dst == "":
        return src not in LEAVES or dst == src
    if src in LEAVES:
        return False
    if src in LEAF_USERS:
        return False
    if dst in ENTRY_POINTS or dst == "server":
        return False
    if dst in LEAF_USERS:
        return True
    if src == "llm":  # the offline API sits beside the server, on the engine
        return dst in ("engine",)
    if src in CHAIN and dst in CHAIN:
        return CHAIN.index(dst) < CHAIN.index(src)
    return False


def test_dependency_direction():
    violations = []
    for path in sorted(ROOT.rglob("*.py")):
        importer = module_name(path)
        for imported in ember_imports(path):
            if not allowed(importer, imported):
                violations.append(f"{importer} imports {imported}")
    assert not violations, "\n".join(violations)


def test_scheduler_and_kv_cache_manager_never_import_torch():
    for name in ("scheduler.py", "kv_cache_manager.py", "request.py", "scheduler_output.py"):
        tree = ast.parse((ROOT / "engine" / name).read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(m.split(".")[0] == "torch" for m in modules), name


def test_the_checker_catches_violations():
    assert not allowed("ember.models.llama", "ember.engine.scheduler")
    assert not allowed("ember.loader.gguf", "ember.tokenizer.tokenizer")
    assert not allowed("ember.config", "ember.outputs")
    assert not allowed("ember.engine.engine", "ember.engine.async_engine")
    assert not allowed("ember.runner.model_runner", "ember.server.app")
    assert not allowed("ember.llm", "ember.server.app")
    assert allowed("ember.server.app", "ember.engine.async_engine")
    assert allowed("ember.engine.engine", "ember.runner.model_runner")
