"""The package's layers import one way: engine ← policies ← methods (ngc, breadcrumbs) ← evaluation ← CLIs.

Every ``ngc_trl`` import of every module is read from its source (function-level imports included), so a
new import that crosses a layer the wrong way fails here; and the engine imports with TRL made unimportable.
"""

import ast
import subprocess
import sys
from pathlib import Path

import ngc_trl

ROOT = Path(ngc_trl.__file__).parent

# what each unit may import (besides itself); a unit is a subpackage or a top-level module
ALLOWED = {
    "engine": set(),
    "policies": {"engine"},
    "tasks": set(),
    "models": set(),
    "hub": {"engine"},
    "ngc": {"engine", "policies"},
    "breadcrumbs": {"engine", "hub", "models"},
    "evaluation": {"engine", "policies", "tasks", "hub", "models", "ngc.interoception", "evaluation"},
}
CLIS = {
    "__init__",
    "train",
    "eval",
    "testbed",
    "splits",
    "warm_start",
}  # entry points: they may import every layer


def unit_of(module: str) -> str:
    parts = module.split(".")[1:]
    return parts[0] if parts else "__init__"


def ngc_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ngc_trl"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ngc_trl")}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import (the layering check reads absolute ones)")
    return out


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        yield ".".join(rel.parts).removesuffix(".__init__"), path


def test_imports_go_one_way():
    bad = []
    for module, path in modules():
        unit = unit_of(module) if module != "ngc_trl" else "__init__"
        if unit in CLIS:
            continue
        assert unit in ALLOWED, f"{module}: a new unit needs its row in ALLOWED"
        for imp in ngc_imports(path):
            target = ".".join(imp.split(".")[1:])
            target_unit = unit_of(imp)
            ok = (
                target_unit == unit
                or target_unit in ALLOWED[unit]
                or any(target == a or target.startswith(a + ".") for a in ALLOWED[unit])
            )
            if not ok:
                bad.append(f"{module} imports {imp}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_module_imports_a_test_helper():
    for module, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                )
                assert not any(n.split(".")[0] in ("tests", "conftest") for n in names), module


def test_engine_and_policies_import_without_trl():
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "import ngc_trl.engine.generation, ngc_trl.engine.replay, ngc_trl.engine.schedule, ngc_trl.policies\n"
        "from ngc_trl import EvictionConfig, generate_with_eviction, POLICIES\n"
        "assert 'ngc' in POLICIES and 'trl' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert res.returncode == 0, res.stderr
