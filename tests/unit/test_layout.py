"""The architecture contract of DESIGN.md, checked: who may import whom, honest __all__."""
from __future__ import annotations

import ast
import importlib
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "core", "drivers", "server")
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

# third-party (and own) top-level imports each package may use
ALLOWED = {
    # tomli is the stdlib tomllib, back-ported for Python 3.10
    "core": {"numpy", "cython", "libc", "cpython", "tomli", "isal", "fedgate.core"},
    "drivers": {"numpy", "pymodbus", "serial", "fedgate.core", "fedgate.drivers"},
    "server": {"numpy", "zmq", "prometheus_client", "dp_accounting", "fedgate.core", "fedgate.server"},
    "agent": {"numpy", "zmq", "prometheus_client", "fedgate.core", "fedgate.drivers", "fedgate.agent"},
}

# The one exception to "server never imports agent": a relay is a server and also a client of
# headquarters, and re-writing the agent's uplink (reconnects, CURVE client, durable outbox)
# inside the server would be worse. Only server/relay.py, only these modules (they pull no
# drivers); the service and the config load it lazily, so a plain server never loads agent code.
EXCEPTIONS = {"server/relay.py": {"fedgate.agent.uplink", "fedgate.agent.uplink_types"}}

_PYX_IMPORT = re.compile(r"^\s*(?:from\s+([\w.]+)\s+c?import|c?import\s+([\w.]+))", re.M)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    text = path.read_text()
    if path.suffix in (".pyx", ".pxd"):
        return [(text[: m.start()].count("\n") + 1, m.group(1) or m.group(2)) for m in _PYX_IMPORT.finditer(text)]
    out = []
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            out.append((node.lineno, "<relative>"))
    return out


def _allowed(pkg: str, module: str) -> bool:
    top = module.split(".")[0]
    if top in STDLIB:
        return True
    if top == "fedgate":
        return ".".join(module.split(".")[:2]) in ALLOWED[pkg]
    return top in ALLOWED[pkg]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_imports_follow_design_rules(pkg):
    bad = []
    for path in sorted((ROOT / pkg).rglob("*")):
        if path.suffix not in (".py", ".pyx", ".pxd") or "__pycache__" in path.parts:
            continue
        for line, module in _imports(path):
            if module == "<relative>":
                bad.append(f"{path.relative_to(ROOT)}:{line}: relative import (use fedgate.{pkg}...)")
            elif module.split(".")[0] in PACKAGES:
                bad.append(f"{path.relative_to(ROOT)}:{line}: bare '{module}' (import fedgate.{module})")
            elif module in EXCEPTIONS.get(path.relative_to(ROOT).as_posix(), ()):
                continue
            elif not _allowed(pkg, module):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {pkg} may not import {module}")
    assert not bad, "\n".join(bad)


def test_errors_and_units_load_no_compiled_module():
    code = (
        "import sys, fedgate.core.errors, fedgate.core.units, fedgate.core.config\n"
        "bad = sorted(n for n, m in sys.modules.items() if n.split('.')[0] in ('numpy', 'zmq')"
        " or (n.startswith('fedgate') and str(getattr(m, '__file__', '')).endswith(('.so', '.pyd'))))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_relay_loads_no_drivers_and_a_plain_server_no_agent_code():
    code = (
        "import sys\n"
        "import fedgate.server.service, fedgate.server.cli, fedgate.server.config\n"
        "plain = sorted(n for n in sys.modules if n.startswith('fedgate.agent') or n == 'fedgate.server.relay')\n"
        "import fedgate.server.relay\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('pymodbus', 'serial')"
        " or n.startswith('fedgate.drivers'))\n"
        "agent = sorted(n for n in sys.modules if n.startswith('fedgate.agent'))\n"
        "print(','.join(plain)); print(','.join(bad)); print(','.join(agent))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    plain, bad, agent = out.stdout.split("\n")[:3]
    assert plain == "", f"a plain server loaded {plain}"
    assert bad == "", f"fedgate.server.relay loaded {bad}"
    assert "fedgate.agent.uplink" in agent.split(",")


def test_only_the_relay_imports_the_agent():
    importers = [path.relative_to(ROOT).as_posix() for path in sorted((ROOT / "server").rglob("*.py"))
                 if any(m.startswith("fedgate.agent") for _, m in _imports(path))]
    assert importers == ["server/relay.py"]


def _public_modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        for init in sorted((ROOT / pkg).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT)
            names.append("fedgate." + ".".join(rel.parts))
    return names


@pytest.mark.parametrize("modname", _public_modules())
def test_all_is_honest(modname):
    mod = importlib.import_module(modname)
    assert hasattr(mod, "__all__"), f"{modname} has no __all__"
    assert len(set(mod.__all__)) == len(mod.__all__), f"{modname}.__all__ has duplicates"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{modname}.__all__ names what it does not have: {missing}"
    # every public (non-underscore) name defined in the package's own __init__ is exported
    src = (ROOT / modname.split(".", 1)[1].replace(".", "/") / "__init__.py").read_text()
    tree = ast.parse(src)
    defined = {
        n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")
    }
    assert defined <= set(mod.__all__), f"{modname} defines public names missing from __all__: {defined - set(mod.__all__)}"
