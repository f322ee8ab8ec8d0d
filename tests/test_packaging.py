"""Packaging: every import is declared, constraints.txt pins the declared ranges, and the wheel
carries the data files and entry points a non-editable install needs.

The full check (a fresh virtualenv, `pip install .`, the report and the smoke bench run from
outside the checkout) takes minutes and downloads packages: `make check-install`.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGES = ["warmturn"]  # the one installed top-level name; server/ analysis/ bench/ addons/ hold checkout launchers
FIRST_PARTY = {*PACKAGES, "server", "analysis", "addons", "bench", "tests", "conftest", "procs"}


def _requirements(names: list[str]) -> dict[str, Requirement]:
    out = {}
    for spec in names:
        r = Requirement(spec)
        out[canonicalize_name(r.name)] = r
    return out


RUNTIME = _requirements(PROJECT["dependencies"])
EXTRAS = {k: _requirements(v) for k, v in PROJECT["optional-dependencies"].items()}


def _third_party_imports(files: list[Path]) -> dict[str, set[str]]:
    """Top-level module name -> files importing it (absolute imports only, stdlib left out)."""
    out: dict[str, set[str]] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    out.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    return out


@functools.cache
def _module_distributions() -> dict[str, list[str]]:
    return md.packages_distributions()


def _distributions(module: str) -> set[str]:
    """The installed distributions providing `module`; for a module not installed here (an opt-in
    extra such as the browser test's playwright), its own name, which is then checked against the
    declared names like any other."""
    found = _module_distributions().get(module)
    return {canonicalize_name(d) for d in found} if found else {canonicalize_name(module)}


def _package_files() -> list[Path]:
    files = [f for p in PACKAGES for f in (ROOT / p).rglob("*.py")]
    # the sample recorder is a developer script (it needs the dev extra's anthropic SDK)
    return [f for f in files if "sample" not in f.relative_to(ROOT).parts]


def test_every_runtime_import_is_a_declared_dependency():
    imports = _third_party_imports(_package_files())
    assert {"numpy", "anyio", "pandas", "mitmproxy"} <= set(imports)  # the scan sees the packages
    missing = {m: sorted(where) for m, where in imports.items() if not _distributions(m) & set(RUNTIME)}
    assert not missing, f"imported but not in [project.dependencies]: {missing}"


def test_every_test_and_script_import_is_declared():
    files = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "warmturn" / "analysis" / "sample").glob("*.py")]
    declared = set(RUNTIME) | set(EXTRAS["dev"]) | set(EXTRAS["browser"])  # browser: make test-browser
    imports = _third_party_imports(files)
    missing = {m: sorted(where) for m, where in imports.items() if not _distributions(m) & declared}
    assert not missing, f"imported by tests/scripts but not in dependencies or the dev extra: {missing}"


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
            assert m, f"constraints.txt: not an exact pin: {line!r}"
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_constraints_pin_every_declared_dependency_inside_its_range():
    pins = _pins()
    assert "numpy" in pins and "mlx" in pins
    reqs = [*RUNTIME.values(), *(r for extra in EXTRAS.values() for r in extra.values())]
    for r in reqs:
        name = canonicalize_name(r.name)
        assert name in pins, f"{r.name} is declared but has no exact pin in constraints.txt"
        assert r.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {r}"
        assert "==" not in str(r.specifier), f"{r}: exact pins belong in constraints.txt, ranges in pyproject.toml"


def test_the_installed_environment_matches_the_pins():
    pins = _pins()
    for name in [*RUNTIME, *EXTRAS["dev"]]:
        assert md.version(name) == pins[name], f"{name}: installed {md.version(name)}, pinned {pins[name]}"


def test_entry_points_resolve_to_callables():
    scripts = PROJECT["scripts"]
    assert {"warmturn-proxy", "warmturn-server", "warmturn-analysis", "warmturn-bench", "warmturn-convert"} <= set(scripts)
    for name, target in scripts.items():
        ep = md.EntryPoint(name, target, "console_scripts")
        assert callable(ep.load()), name


def test_proxy_entry_point_builds_the_documented_mitmdump_command():
    from warmturn.addons.launch import SCRIPT, mitmdump_args

    assert SCRIPT.name == "normalize.py" and SCRIPT.is_file()
    args = mitmdump_args(["--listen-port", "8082"])
    assert args[:2] == ["-s", str(SCRIPT)]
    assert args[args.index("--listen-host") + 1] == "127.0.0.1"  # loopback unless asked
    assert f"embedded_python={sys.executable}" in args and args[-2:] == ["--listen-port", "8082"]
    own = mitmdump_args(["--listen-host", "0.0.0.0", "--set", "embedded_python=/x/python"])
    assert own.count("--listen-host") == 1 and not any(a == f"embedded_python={sys.executable}" for a in own)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # built from a copy of the sources, so setuptools' build/ folder is not left in the checkout
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "results"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("warmturn-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_carries_package_data_and_entry_points(wheel):
    names = set(wheel.namelist())
    for pkg in PACKAGES:  # every first-party package, including the shared stdlib-only warmturn/
        assert f"{pkg}/__init__.py" in names, f"{pkg} missing from the wheel"
    for data in ("bench/fixtures/session.json", "analysis/sample/sample-capture.jsonl", "addons/normalize.py"):
        assert any(n.endswith(data) for n in names), f"{data} missing from the wheel"
    assert not any(n.startswith(("tests/", "server/", "analysis/", "bench/", "addons/")) for n in names)  # launchers
    ep = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = wheel.read(ep).decode()
    for script in PROJECT["scripts"]:
        assert f"{script} = " in text
    meta = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: numpy" in meta and "Requires-Dist: anyio" in meta


def test_checkout_launchers_keep_the_documented_commands():
    """`python -m server|analysis|bench` from the repository root reach warmturn.*, and the mitmdump
    script addons/normalize.py hands mitmproxy the addon chain (loaded as mitmdump -s does)."""
    for mod in ("server", "analysis", "bench"):
        r = subprocess.run([sys.executable, "-m", mod, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "usage:" in r.stdout, (mod, r.stderr[-2000:])
        assert f"warmturn.{mod}" in r.stdout or mod in r.stdout
    import runpy

    ns = runpy.run_path(str(ROOT / "addons" / "normalize.py"))
    assert [type(a).__name__ for a in ns["addons"]][:2] == ["Gate", "Normalize"]


def test_makefile_targets_are_phony_and_pass_args_quoted():
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", text, re.M))
    phony = set(re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split())
    assert targets - phony == set(), "targets missing from .PHONY"
    recipes = [line for line in text.splitlines() if line.startswith("\t")]
    # make's ARGS reach a command only as one quoted word ($(call shq,ARGS)), split by shell rules
    # by the script that receives it (scripts/lib.sh split_words; scripts/exec_args.sh for the rest)
    raw = [line for line in recipes if "$(ARGS)" in line]
    assert not raw, f"unquoted $(ARGS): {raw}"


def test_exec_args_splits_by_shell_rules_without_evaluating(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PY": sys.executable, "ARGS": "--out 'a b' $HOME `id` \"c d\""}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "exec_args.sh"), "printf", "[%s]"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "[--out][a b][$HOME][`id`][c d]", (r.stdout, r.stderr)
    env["ARGS"] = "--set 'unbalanced"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "exec_args.sh"), "true"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "cannot parse ARGS" in r.stderr


def test_pre_commit_runs_the_pinned_ruff_and_mypy():
    text = (ROOT / ".pre-commit-config.yaml").read_text()  # (no YAML parser among the declared packages)
    hooks = dict(re.findall(r"- id: (\S+)\n\s+name: .*\n\s+entry: (.*)", text))
    assert hooks["ruff"].startswith(".venv/bin/python -m ruff check") and hooks["mypy"] == ".venv/bin/python -m mypy"
    files = PYPROJECT["tool"]["mypy"]["files"]
    assert {"warmturn/protocol.py", "warmturn/rules.py"} <= set(files) and all((ROOT / f).is_file() for f in files)
    assert "mypy" in EXTRAS["dev"]
