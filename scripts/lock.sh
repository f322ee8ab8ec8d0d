#!/usr/bin/env bash
# Regenerate constraints.txt: the exact versions of warmturn[dev,cpu] and everything it pulls in,
# resolved by pip with the versions installed in .venv preferred (so it pins what was tested), and the
# installers setup.sh puts in .venv: uv and pip.
# Run after changing a dependency range in pyproject.toml, then review the diff.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip freeze --all --exclude-editable | grep -v '^#' > "$tmp/installed.txt"
"$PY" -m pip install -q --dry-run --ignore-installed --report "$tmp/report.json" -c "$tmp/installed.txt" ".[dev,cpu]" uv pip
{
  echo "# Exact pins for warmturn[dev,cpu] and its whole dependency tree (Linux x86-64, Python 3.12), and for"
  echo "# the installers scripts/setup.sh puts in .venv (uv, pip)."
  echo "# scripts/setup.sh installs with -c constraints.txt; pyproject.toml holds the compatible ranges."
  echo "# Regenerate with scripts/lock.sh after changing pyproject.toml. Entries for packages a platform"
  echo "# does not install (mlx-cpu, mitmproxy-linux on macOS) are ignored there."
  "$PY" -c '
import json, sys
r = json.load(open(sys.argv[1]))
for name, ver in sorted(((i["metadata"]["name"], i["metadata"]["version"]) for i in r["install"]), key=lambda x: x[0].lower()):
    if name.lower() != "warmturn":
        print(f"{name}=={ver}")
' "$tmp/report.json"
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
