"""The folder tree is the architecture (docs/ARCHITECTURE.md): each stage imports only the
stages below it, no module imports itself back through others, and no module outgrows one
reading. Checked on the source, every import counted, those inside functions too."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "python" / "eoq"

# stage: (level, its modules and packages). A module imports from its own stage and from
# stages of a lower level only: calibrate and load do not import each other, nor do convert
# and evaluate.
STAGES = {
    "kernels": (0, ["eoq._C", "eoq._build_info", "eoq._version", "eoq.ops", "eoq.errors", "eoq.standalone",
                    "eoq._moved"]),
    "methods": (1, ["eoq.methods"]),
    "format": (2, ["eoq.format"]),
    "calibrate": (3, ["eoq.calibrate"]),
    "load": (3, ["eoq.load"]),
    "convert": (4, ["eoq.convert"]),
    "evaluate": (4, ["eoq.evaluate"]),
    "testing": (5, ["eoq.testing"]),
    "entry points": (6, ["eoq", "eoq.cli", "eoq.demo", "eoq.__main__"]),
}
LEVELS = {prefix: (lv, stage) for stage, (lv, prefixes) in STAGES.items() for prefix in prefixes}
# The stand-alone loader is copied into every folder and runs without eoq; where eoq is
# installed it hands the work to it (``import eoq``): that import is its purpose.
ALLOWED = {("eoq.standalone.load_quantized", "eoq")}
MAX_LINES = 560  # "about 500": what a reader takes in at one sitting
LONG_ON_PURPOSE = {"eoq.standalone.load_quantized"}  # one file, copied into every folder


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py") if p.name != "_build_info.py"}


def is_package(name: str) -> bool:
    return MODULES.get(name, PKG).name == "__init__.py"


def resolve(name: str, node: ast.ImportFrom) -> str:
    base = name.split(".") if is_package(name) else name.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str) -> set[str]:
    """The eoq modules ``name`` imports (``from pkg import mod`` counts as mod)."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "eoq"}
        elif isinstance(node, ast.ImportFrom):
            mod = resolve(name, node) if node.level else node.module
            if mod.split(".")[0] != "eoq":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in MODULES or sub == "eoq._C" else mod)
    return {m for m in out if m != name}


GRAPH = {name: imports(name) for name in MODULES}


def level(name: str) -> tuple[int, str]:
    for prefix in sorted(LEVELS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return LEVELS[prefix]
    raise AssertionError(f"{name}: in no stage of tests/test_layout.py STAGES (a new stage?)")


def test_every_module_has_a_stage():
    for name in MODULES:
        level(name)


def test_imports_run_down_the_stages():
    wrong = []
    for name, targets in GRAPH.items():
        lv, pkg = level(name)
        for t in targets:
            tl, tpkg = level(t)
            if (name, t) in ALLOWED:
                continue
            if tl > lv or (tl == lv and tpkg != pkg):
                wrong.append(f"{name} ({pkg}) imports {t} ({tpkg})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles():
    """Between modules; a package's __init__ importing its own modules is no circle as long
    as those modules do not import the __init__ back."""
    seen, stack, circles = set(), [], []

    def visit(n):
        if n in stack:
            circles.append(" -> ".join(stack[stack.index(n):] + [n]))
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for t in sorted(GRAPH.get(n, ())):
            if (n, t) not in ALLOWED:
                visit(t)
        stack.pop()

    for n in sorted(GRAPH):
        visit(n)
    assert not circles, "\n".join(circles)


def test_modules_read_in_one_sitting():
    long = {n: len(p.read_text().splitlines()) for n, p in MODULES.items() if n not in LONG_ON_PURPOSE}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


@pytest.mark.parametrize("name", ["quantize_model", "load_quantized", "QuantConfig", "ProtectRule", "quantize_tensor",
                                  "read_state_dict", "FormatError", "CorruptStreamError", "ops", "calibration",
                                  "calibrate_model", "summary_table", "parse_size", "QuantizedTensor"])
def test_public_names_stay(name):
    import eoq

    assert getattr(eoq, name) is not None


def test_old_module_names_lead_to_the_new_ones():
    import importlib
    import warnings

    import eoq
    from eoq import _moved

    for old, new in _moved.MOVED.items():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m = importlib.import_module(f"eoq.{old}")
        assert m is importlib.import_module(f"eoq.{new}")
        assert m.__spec__.name == f"eoq.{new}"  # the module keeps its own name (pickling)
        if old in _moved.QUIET:
            assert not w
        else:
            assert any(f"eoq.{new}" in str(x.message) for x in w), old
        assert getattr(eoq, old) is m


def test_names_of_the_old_convert_module_lead_to_their_modules():
    import importlib
    import warnings

    import eoq.convert

    for name, module in eoq.convert._MOVED.items():
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = getattr(eoq.convert, name)
        assert got is getattr(importlib.import_module(f"eoq.convert.{module}"), name)
        assert any(f"eoq.convert.{module}.{name}" in str(x.message) for x in w), name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        eoq.convert.nothing
