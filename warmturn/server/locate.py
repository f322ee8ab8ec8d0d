"""Find a model where users keep it, offline: a path, or a name in the Hugging Face cache, LM Studio's
or Ollama's model folders.

``MODEL=org/name`` never downloads anything. It is looked up, in this order, in

- the Hugging Face hub cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``
  or ``~/.cache/huggingface/hub``): ``models--org--name/snapshots/<commit>/``, the commit that
  ``refs/main`` names when there is one;
- LM Studio's model folders (``$LMSTUDIO_MODELS_DIR``, ``~/.lmstudio/models``,
  ``~/.cache/lm-studio/models``): ``publisher/model/``;
- Ollama's (``$OLLAMA_MODELS``, ``~/.ollama/models``, ``/usr/share/ollama/.ollama/models``): the
  manifest ``manifests/registry.ollama.ai/<namespace>/<name>/<tag>`` names the weights blob, which is a
  GGUF (``name:tag``, namespace ``library`` and tag ``latest`` by default).

A folder found there is used as an mlx-lm model directory when it has a ``config.json``, or as its
one GGUF file. What is not found raises :class:`ModelNotFound` with one line saying where it looked and
how to get the model. Standard library only: ``make run`` calls it (``python -m warmturn.server.locate``)
before mitmdump starts, in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_MODEL_MEDIA = "application/vnd.ollama.image.model"


class ModelNotFound(FileNotFoundError):
    """The model is not on this machine (or not in a form warmturn can load); the message says what to do."""


@dataclass(frozen=True)
class Located:
    path: Path  # an mlx-lm model directory or a GGUF file (an Ollama blob has no .gguf suffix)
    kind: str  # "dir" | "gguf"
    label: str  # a readable name for the served model (not a snapshot hash or a blob digest)
    source: str  # "path" | "huggingface" | "lmstudio" | "ollama"


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def hf_hub_dirs() -> list[Path]:
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"]).expanduser()]
    if os.environ.get("HF_HOME"):
        return [Path(os.environ["HF_HOME"]).expanduser() / "hub"]
    xdg = os.environ.get("XDG_CACHE_HOME")
    return [(Path(xdg) if xdg else _home() / ".cache") / "huggingface" / "hub"]


def lmstudio_dirs() -> list[Path]:
    if os.environ.get("LMSTUDIO_MODELS_DIR"):
        return [Path(os.environ["LMSTUDIO_MODELS_DIR"]).expanduser()]
    return [_home() / ".lmstudio" / "models", _home() / ".cache" / "lm-studio" / "models"]


def ollama_dirs() -> list[Path]:
    if os.environ.get("OLLAMA_MODELS"):
        return [Path(os.environ["OLLAMA_MODELS"]).expanduser()]
    return [_home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf") or model.count("/") > 1


def _in_folder(folder: Path, label: str, source: str) -> Located | None:
    """An mlx-lm directory (config.json) or the one GGUF in a folder; None when neither."""
    if (folder / "config.json").is_file():
        return Located(folder, "dir", label, source)
    ggufs = sorted(p for p in folder.glob("*.gguf") if p.is_file() and "mmproj" not in p.name.lower())
    if len(ggufs) == 1:
        return Located(ggufs[0], "gguf", label, source)
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ModelNotFound(f"{folder} holds several GGUF files ({names}): pass one, MODEL={ggufs[0]}")
    return None


def find_huggingface(name: str) -> Located | None:
    if name.count("/") != 1:
        return None
    org, repo = name.split("/")
    for hub in hf_hub_dirs():
        base = hub / f"models--{org}--{repo}"
        snapshots = base / "snapshots"
        if not snapshots.is_dir():
            continue
        order: list[Path] = []
        try:
            ref = (base / "refs" / "main").read_text().strip()
            order.append(snapshots / ref)
        except OSError:
            pass
        order += sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        for snap in order:
            if snap.is_dir() and (found := _in_folder(snap, repo, "huggingface")):
                return found
    return None


def find_lmstudio(name: str) -> Located | None:
    if name.count("/") != 1:
        return None
    for root in lmstudio_dirs():
        folder = root / name
        if folder.is_dir() and (found := _in_folder(folder, name.split("/")[1], "lmstudio")):
            return found
    return None


def ollama_ref(name: str) -> tuple[str, str, str]:
    """(namespace, model, tag) of an Ollama name: ``smollm2:135m``, ``library/smollm2``, ``user/model:tag``."""
    base, _, tag = name.partition(":")
    namespace, _, model = base.rpartition("/")
    return namespace or "library", model, tag or "latest"


def find_ollama(name: str) -> Located | None:
    if name.count("/") > 1 or not name.strip(":/"):
        return None
    namespace, model, tag = ollama_ref(name)
    for root in ollama_dirs():
        manifest = root / "manifests" / OLLAMA_REGISTRY / namespace / model / tag
        try:
            layers = json.loads(manifest.read_text()).get("layers") or []
        except (OSError, ValueError, AttributeError):
            continue
        for layer in layers:
            if isinstance(layer, dict) and layer.get("mediaType") == OLLAMA_MODEL_MEDIA:
                blob = root / "blobs" / str(layer.get("digest", "")).replace(":", "-")
                if blob.is_file():
                    return Located(blob, "gguf", f"{model}-{tag}", "ollama")
                raise ModelNotFound(f"Ollama's manifest {manifest} names {blob.name}, which is missing: "
                                    f"ollama pull {name}")
    return None


def download_hint(name: str) -> str:
    """How to get a model that is not here, on the user's own machine (which has the internet)."""
    if ":" in name:
        return f"ollama pull {name}"
    q, folder = shlex.quote(name), "models--" + name.replace("/", "--")
    return (f".venv/bin/hf download {q}  (or huggingface-cli download {q}; on another machine, then copy "
            f"~/.cache/huggingface/hub/{folder} here)")


def locate(model: str) -> Located:
    """Where ``model`` (a path or a name) is; raises :class:`ModelNotFound` with a one-line fix."""
    p = Path(model).expanduser()
    if p.exists() or looks_like_path(model):
        if p.is_file() and p.suffix == ".gguf":
            return Located(p, "gguf", p.stem, "path")
        if p.is_dir():
            if (p / "config.json").is_file():
                return Located(p, "dir", p.name, "path")
            found = _in_folder(p, p.name, "path")
            if found:
                return found
            raise ModelNotFound(f"{p} is not an mlx-lm model directory (no config.json) and holds no GGUF file")
        if p.exists():
            raise ModelNotFound(f"{p} is neither an mlx-lm model directory nor a .gguf file")
        raise ModelNotFound(f"model {model!r} not found: no such file or directory (pass an mlx-lm model directory, "
                            "a .gguf file or a name like org/name; warmturn never downloads weights)")
    if not model.strip() or model.startswith("-"):
        raise ModelNotFound(f"model {model!r}: pass a model directory, a .gguf file or a name like org/name")
    for find in (find_huggingface, find_lmstudio, find_ollama):
        found = find(model)
        if found:
            return found
    where = ", ".join(str(d) for d in [*hf_hub_dirs(), *lmstudio_dirs(), *ollama_dirs()[:1]])
    raise ModelNotFound(f"model {model!r} is not on this machine (looked in {where}; warmturn never downloads). "
                        f"Get it: {download_hint(model)}")


def main(argv: list[str] | None = None) -> int:
    """``python -m warmturn.server.locate MODEL``: print where MODEL is, or one line saying how to get it."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m warmturn.server.locate MODEL", file=sys.stderr)
        return 2
    try:
        found = locate(args[0])
    except ModelNotFound as e:
        print(f"warmturn: {e}", file=sys.stderr)
        return 1
    print(found.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
