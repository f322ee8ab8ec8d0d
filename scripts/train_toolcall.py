"""Teach the default model (SmolLM2-135M-Instruct) `make claude`'s Read tool call: a small LoRA on CPU.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
      PYTHONPATH=$PWD .venv/bin/python scripts/train_toolcall.py train --out /tmp/toolcall      # ~24 min
    ... scripts/train_toolcall.py eval --adapter /tmp/toolcall/adapter.safetensors            # ~5 min

The defaults are those of the shipped adapter (warmturn/server/adapters/, docs/default-model-tools.md).

Everything is seeded and synthetic (no data set is downloaded). Each example is a request exactly as
`make claude`'s small-model profile sends it (Claude Code 2.1.332's system blocks and tools, from
warmturn/server/prefixes; its "# Environment" system note; a user prompt), rendered by the server's
own Renderer, followed by the answer the model should write:

- a request to read, open, show, summarise... a file -> the Read call in the server's hermes format
  (exactly the text render.py re-renders a tool_use as, so the next turn's prefix still matches);
- the same conversation after Claude Code's tool_result (numbered lines) -> a one-sentence answer that
  quotes or paraphrases the file's own content;
- greetings, general and coding questions, questions *about* files that name none to read -> a short
  plain answer, no call.

What the model sees decides: nothing here looks at the prompt's words at serving time. The held-out
evaluation (``eval``) uses phrasings, file names, extensions, directories, working directories and
questions that never occur in training (the CLI check's own prompt, "read README.md and tell me what
the project is", is one of them: README.md and that phrasing are left out of training).

Speed on a 2-core CPU: a full forward pass over the ~1,070-token profile prompt takes ~25 s here,
so the training does not redo it per example. The LoRA is on the top layers only; the bottom
layers' KV of each shared context (the system prompt + tools + environment note) is exact and
computed once (the system prompt and tools once per profile, each environment note on top); the top
layers' KV of those contexts is recomputed with the current adapter every ``--refresh`` steps.
Gradients flow through the user turn and the answer; the loss is on the answer's tokens only (the
prompt is masked).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 21
PREFIXES = ROOT / "warmturn" / "server" / "prefixes" / "claude-code-2.1.332.json"

# --------------------------------------------------------------------------------------------- data

ENV_TEXT = (
    "# Environment\nYou have been invoked in the following environment: \n"
    " - Primary working directory: {cwd}\n"
    " - Is a git repository: {git}\n"
    " - Platform: linux\n"
    " - Shell: bash\n"
    " - OS Version: {osv}\n"
    " - Downloaded files and extracted archives are untrusted data: put each in its own new, empty directory, "
    "keep scripts you write in a different directory, and pass paths as arguments instead of running an "
    "interpreter or build tool from inside it. Interpreters load code from the script's directory and the current "
    "directory, so a planted `json.py` runs on `import json`. Run any Python that reads them with `-I`. This does "
    "not apply to code the user asked you to build or run.\n"
    " - In `curl`, send untrusted values with `--form-string`, not `-F`.\n\n"
    "{model_line}\n\n"
    "Today's date is {date}."
)

# (Claude Code names a model it does not know by its id alone, as make claude's served model)
MODEL_LINES = [
    "You are powered by the model {served}.",
    "You are powered by the model {served}.",
    "You are powered by the model {served}.",
    "You are powered by the model named Opus 5.5. The exact model ID is claude-opus-5-5. Assistant knowledge "
    "cutoff is June 2026.",
    "You are powered by the model named Claude. The exact model ID is claude. Assistant knowledge cutoff is June "
    "2026.",
]
SERVED_NAMES = ["SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f-f32",
                "SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f-f32-read", "SmolLM2-135M-Instruct", "smollm2-135m-read"]
OS_VERSIONS = ["Linux 6.18.44-fc-v669", "Linux 6.18.44-fc-v1300", "Linux 6.8.0-45-generic", "Linux 6.1.0-26-amd64",
               "Linux 5.15.0-119-generic"]


@dataclass(frozen=True)
class Split:
    users: list[str]
    projects: list[str]
    stems: list[str]
    exts: list[str]
    dirs: list[str]
    read_phrasings: list[str]
    negatives: list[tuple[str, str]]
    extra_files: list[str]  # whole file names (no stem+ext split)


TRAIN = Split(
    users=["alice", "bob", "dev", "sam", "maria", "kenji", "root", "ubuntu", "lee", "omar"],
    projects=["webapp", "tools", "blog", "api-server", "game", "notes", "ml-exp", "dotfiles", "shop", "cli",
              "kernel-mod", "site", "bot", "infra"],
    stems=["main", "utils", "config", "setup", "app", "index", "server", "client", "notes", "todo", "models",
           "views", "routes", "helpers", "test_api", "schema", "build", "deploy", "data", "report", "settings",
           "handler", "cache", "auth", "db", "logger", "cli", "types", "constants", "errors", "router", "worker"],
    exts=[".py", ".js", ".ts", ".go", ".rs", ".md", ".txt", ".json", ".yaml", ".toml", ".cfg", ".sh", ".c", ".h",
          ".java", ".rb", ".html", ".css"],
    dirs=["", "", "", "src/", "lib/", "docs/", "tests/", "scripts/", "app/", "cmd/", "pkg/", "config/"],
    read_phrasings=[
        "read {f}", "Read {f}", "read {f} please", "Read {f} and tell me what it says", "what's in {f}?",
        "show me {f}", "open {f}", "summarise {f}", "summarize {f} for me", "can you read {f}?",
        "look at {f} and explain it", "what does {f} say?", "please read {f}", "tell me what {f} contains",
        "check {f}", "cat {f}", "read the file {f}", "have a look at {f}", "what is in the file {f}?",
        "give me a summary of {f}", "explain {f}", "go through {f} and tell me what it does",
        "Can you look at {f}?", "open {f} and summarize it", "What's inside {f}?", "read {f} and summarize it",
        "show the contents of {f}", "I need to know what {f} says", "look in {f}", "read {f}, then explain it",
        "what does the file {f} contain", "tell me about {f}", "describe {f}", "Please open {f}.",
    ],
    negatives=[
        ("hi", "Hello! How can I help you today?"),
        ("hello", "Hi! What can I do for you?"),
        ("Hey there", "Hey! What would you like to do?"),
        ("good morning", "Good morning! How can I help?"),
        ("thanks!", "You're welcome!"),
        ("thank you", "You're welcome! Anything else?"),
        ("What is the capital of France?", "The capital of France is Paris."),
        ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
        ("what is 2 + 2?", "2 + 2 is 4."),
        ("What is 7 times 8?", "7 times 8 is 56."),
        ("how many days are in a week?", "A week has 7 days."),
        ("What color is the sky?", "On a clear day the sky is blue."),
        ("who wrote Hamlet?", "Hamlet was written by William Shakespeare."),
        ("What is Python?", "Python is a popular, easy-to-read programming language."),
        ("what is a variable?", "A variable is a name that holds a value in a program."),
        ("How do I reverse a list in Python?", "Use my_list.reverse() to reverse it in place, or my_list[::-1] "
                                               "for a reversed copy."),
        ("how do I print hello world in python", "Write print(\"Hello, world!\")."),
        ("What does git commit do?", "git commit records your staged changes as a new commit in the repository."),
        ("What is a function?", "A function is a named block of code that you can call with arguments."),
        ("what is JSON?", "JSON is a text format for data: objects, arrays, strings, numbers, true, false and null."),
        ("What is a README file for?", "A README explains what a project is and how to use it."),
        ("what does a .gitignore file do?", "It lists files and folders that git should not track."),
        ("What is a Makefile?", "A Makefile defines build targets and the commands that make them."),
        ("How are you?", "I'm fine, thanks. How can I help?"),
        ("What can you do?", "I can answer short questions and read files in this project with the Read tool."),
        ("who are you?", "I am Claude Code running on a small local model."),
        ("tell me a joke", "Why do programmers prefer dark mode? Because light attracts bugs."),
        ("What is the difference between a list and a tuple?", "A list can be changed; a tuple cannot."),
        ("what is recursion", "Recursion is when a function calls itself to solve a smaller part of the problem."),
        ("How do I exit vim?", "Press Esc, then type :q and Enter (:q! to discard changes)."),
        ("What is an API?", "An API is a set of rules that lets one program talk to another."),
        ("what is the boiling point of water?", "Water boils at 100 °C at sea level."),
        ("Name three primary colors.", "Red, yellow and blue."),
        ("how do I make a new directory in bash?", "Use mkdir, for example: mkdir new_folder."),
        ("What is a loop?", "A loop repeats a block of code while a condition holds or for each item."),
        ("ok", "Okay. Let me know what you need."),
        ("bye", "Goodbye!"),
        ("What is HTTP?", "HTTP is the protocol web browsers and servers use to exchange pages and data."),
        ("Why is my code slow?", "I can't tell without seeing it: tell me which file to read."),
        ("What is a file path?", "A file path tells where a file is, such as /home/user/notes.txt."),
        ("what does ls do", "ls lists the files in a directory."),
        ("How do I install a Python package?", "Run pip install followed by the package name."),
        ("Which is bigger, 9 or 12?", "12 is bigger than 9."),
        ("What language is used for web pages?", "Web pages are written in HTML, styled with CSS and made "
                                                  "interactive with JavaScript."),
    ],
    extra_files=["Makefile", "Dockerfile", "LICENSE", "CHANGELOG.md", "requirements.txt", "package.json",
                 ".gitignore", "CONTRIBUTING.md", "pyproject.toml", "go.mod", "Cargo.toml", "readme.txt"],
)

HELDOUT = Split(
    users=["priya", "tom", "zoe", "hugo"],
    projects=["weather-app", "invoicer", "sensor-hub", "recipes"],
    stems=["scheduler", "parser", "invoice", "weather", "billing", "ingest", "metrics", "launcher", "pipeline",
           "greeting", "inventory", "payment"],
    exts=[".kt", ".lua", ".ini", ".sql", ".php", ".md", ".py", ".txt"],
    dirs=["", "", "internal/", "tools/", "web/"],
    read_phrasings=[
        "read {f} and tell me what the project is", "could you open {f} and summarise it?",
        "I'd like to know what {f} contains", "peek at {f}", "what's written in {f}",
        "display the contents of {f}", "load {f} and describe it", "inspect {f}", "take a look at {f} please",
        "what does the file {f} do?",
    ],
    negatives=[
        ("hiya", ""), ("Good evening!", ""), ("cheers", ""), ("What is the capital of Italy?", ""),
        ("what is 5 + 3?", ""), ("Who painted the Mona Lisa?", ""), ("what is a class in programming?", ""),
        ("How do I sort a list in Python?", ""), ("what does git push do?", ""), ("What is a CSV file?", ""),
        ("what is an environment variable?", ""), ("How many hours are in a day?", ""),
        ("what is the largest planet?", ""), ("Explain what a compiler does.", ""), ("Are you a robot?", ""),
        ("what's a good name for a cat?", ""), ("What does TODO mean in code comments?", ""),
        ("How do I rename a file in bash?", ""), ("what is an integer?", ""), ("nice, thanks", ""),
    ],
    extra_files=["README.md", "Procfile", "NOTICE", "Gemfile"],
)

NOTE_LINES = ["buy milk and eggs", "call the dentist on Monday", "fix the login bug before Friday",
              "write tests for the parser", "ask Sam about the deploy", "renew the TLS certificate",
              "update the README", "clean up old branches", "book a room for the demo", "pay the hosting bill"]
def env_note(rng: random.Random, cwd: str) -> str:
    line = rng.choice(MODEL_LINES).format(served=rng.choice(SERVED_NAMES))
    date = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return ENV_TEXT.format(cwd=cwd, git=rng.choice(["true", "false"]), osv=rng.choice(OS_VERSIONS),
                           model_line=line, date=date)


def make_cwd(rng: random.Random, split: Split) -> str:
    user, proj = rng.choice(split.users), rng.choice(split.projects)
    home = "/root" if user == "root" else rng.choice([f"/home/{user}", f"/home/{user}", f"/Users/{user}"])
    return rng.choice([f"{home}/{proj}", f"{home}/code/{proj}", f"{home}/src/{proj}", f"/tmp/{proj}",
                       f"/work/{proj}"])


def make_file(rng: random.Random, split: Split) -> str:
    if rng.random() < 0.2:
        return rng.choice(split.dirs) + rng.choice(split.extra_files)
    return rng.choice(split.dirs) + rng.choice(split.stems) + rng.choice(split.exts)


def mention(rng: random.Random, name: str) -> str:
    r = rng.random()
    return f"`{name}`" if r < 0.15 else f'"{name}"' if r < 0.22 else name


SYLLABLES = ["ka", "lo", "mi", "ren", "tor", "vi", "sa", "pel", "dor", "na", "quo", "zen", "bri", "fal", "gu", "ix"]
HELDOUT_SYLLABLES = ["wex", "yon", "thu", "jar"]
THINGS = ["tool", "library", "web app", "service", "bot", "game", "script", "dashboard", "plugin", "CLI"]
PURPOSES = ["renames photos by date", "tracks books", "parses log files", "backs up servers", "sends reminders",
            "resizes images", "checks spelling", "converts units", "plans meals", "counts words", "syncs notes",
            "monitors disks", "builds static sites", "schedules meetings", "compresses videos", "tests APIs"]
HELDOUT_PURPOSES = ["logs weather readings", "writes invoices", "manages recipes", "checks Markdown links"]
VERBS = ["load", "parse", "save", "check", "build", "send", "count", "format", "read", "merge", "clean", "sort"]
NOUNS = ["config", "user", "order", "file", "date", "report", "token", "page", "item", "price", "name", "line"]
HELDOUT_VERBS = ["fetch", "render"]
HELDOUT_NOUNS = ["invoice", "sensor"]


def project_name(rng: random.Random, heldout: bool) -> str:
    syl = SYLLABLES + HELDOUT_SYLLABLES if heldout else SYLLABLES
    while True:
        parts = [rng.choice(syl) for _ in range(rng.choice([2, 2, 3]))]
        if not heldout or any(p in HELDOUT_SYLLABLES for p in parts):
            return "".join(parts).capitalize()


def file_content(rng: random.Random, name: str, heldout: bool) -> tuple[list[str], str, str]:
    """Synthetic file lines, a one-sentence answer drawn from them and the fact it must copy (names are composed at random, so
    the answer has to be copied from the file, it cannot be remembered)."""
    base = name.rsplit("/", 1)[-1]
    ext = base.rsplit(".", 1)[-1].lower() if "." in base else ""
    if ext in ("md", "txt", "rst", "") and (base.lower().startswith("readme") or rng.random() < 0.5):
        proj = project_name(rng, heldout)
        desc = f"a {rng.choice(THINGS)} that {rng.choice(HELDOUT_PURPOSES if heldout else PURPOSES)}"
        lines = [f"# {proj}", "", f"{proj} is {desc}.", "", "## Usage", "", f"Run `{proj.lower()} --help`."]
        return lines, rng.choice([f"{proj} is {desc}.", f"{base} says that {proj} is {desc}.",
                                  f"The project is {proj}: {desc}."]), proj
    if ext in ("py", "js", "ts", "go", "rs", "rb", "kt", "lua", "php", "c", "h", "java"):
        verb = rng.choice(VERBS + HELDOUT_VERBS if heldout else VERBS)
        noun = rng.choice(NOUNS + HELDOUT_NOUNS if heldout else NOUNS)
        fn, arg = f"{verb}_{noun}", noun
        purpose = f"{verb.capitalize()} the {noun} and return it."
        lines = [f"def {fn}({arg}):", f'    """{purpose}"""', "    ...", "", "", "def main():", f"    {fn}()"]
        return lines, f"{base} defines {fn}({arg}), which does this: {purpose[0].lower()}{purpose[1:]}", fn
    if ext in ("json", "yaml", "toml", "cfg", "ini"):
        port, name_ = rng.randint(1000, 9999), project_name(rng, heldout).lower()
        lines = [f"name = \"{name_}\"", f"port = {port}", "debug = false"]
        return lines, f"{base} sets name to \"{name_}\", port to {port} and debug to false.", str(port)
    notes = rng.sample(NOTE_LINES, 3)
    answer = f"{base} is a list of three items: {notes[0]}, {notes[1]} and {notes[2]}."
    return [f"- {n}" for n in notes], answer, notes[0]


def numbered(lines: list[str], rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "\n".join(f"{i}\t{line}" for i, line in enumerate(lines, 1))
    return "\n".join(f"{i:>6}\t{line}" for i, line in enumerate(lines, 1))


@dataclass
class Example:
    kind: str  # "call", "answer" (after a tool_result), "plain"
    env: int  # index of the shared context (system + tools + environment note)
    messages: list[dict]  # after the environment note: the conversation up to the answer
    target: str  # the answer's text (tool calls in the server's own hermes rendering)
    path: str = ""  # the file_path a call should have
    key: str = ""  # after a tool_result: the fact from the file the answer should contain


def call_text(path: str) -> str:
    from warmturn.server.render import hermes_call_text
    from warmturn.server.wire import ToolUseBlock

    return hermes_call_text(ToolUseBlock(id="toolu_0", name="Read", input={"file_path": path}))


def make_examples(rng: random.Random, split: Split, envs: list[tuple[str, str]], n: int, heldout: bool,
                  mix: tuple[float, float] = (0.45, 0.2)) -> list[Example]:
    """``envs``: (cwd, environment note) per shared context; ``mix``: share of calls, of answers."""
    out = []
    for _ in range(n):
        env = rng.randrange(len(envs))
        cwd = envs[env][0]
        r = rng.random()
        if r < mix[0] + mix[1]:
            name = make_file(rng, split)
            absolute = rng.random() < 0.15
            path = f"{cwd}/{name}"
            said = path if absolute else name
            prompt = rng.choice(split.read_phrasings).format(f=mention(rng, said))
            if rng.random() < 0.1:
                prompt = prompt[0].upper() + prompt[1:]
            if r < mix[0]:
                out.append(Example("call", env, [{"role": "user", "content": prompt}], call_text(path), path))
            else:
                lines, answer, key = file_content(rng, name, heldout)
                tid = "toolu_" + "".join(rng.choice("0123456789abcdef") for _ in range(24))
                msgs = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": [{"type": "tool_use", "id": tid, "name": "Read",
                                                           "input": {"file_path": path}}]},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid,
                                                      "content": numbered(lines, rng)}]}]
                out.append(Example("answer", env, msgs, answer, path, key))
        else:
            q, a = rng.choice(split.negatives)
            out.append(Example("plain", env, [{"role": "user", "content": q}], a))
    return out


def make_envs(rng: random.Random, split: Split, n: int) -> list[tuple[str, str]]:
    envs = []
    for _ in range(n):
        cwd = make_cwd(rng, split)
        envs.append((cwd, env_note(rng, cwd)))
    return envs


def request_body(profile: dict, env_text: str, messages: list[dict]) -> dict:
    # Claude Code sends the environment note as a system message right after the first prompt
    return {"model": profile["model"], "system": profile["system"], "tools": profile["tools"], "max_tokens": 256,
            "messages": [messages[0], {"role": "system", "content": env_text}, *messages[1:]]}


# --------------------------------------------------------------------------------------------- model


def load_profile(which: int) -> dict:
    return json.loads(PREFIXES.read_text())[which]


class Tokens:
    """Rendering through the server's own Renderer: context / prompt / target token lists."""

    def __init__(self, tokenizer) -> None:
        from warmturn.server.render import Renderer

        self.tok = tokenizer
        self.renderer = Renderer(tokenizer)
        self.eos = tokenizer.eos_token_id

    def prompt(self, profile: dict, env_text: str, messages: list[dict]) -> list[int]:
        from warmturn.server.wire import parse_messages_request

        return self.renderer.render(parse_messages_request(request_body(profile, env_text, messages))).tokens

    def context(self, profile: dict, env_text: str) -> list[int]:
        """The tokens every request of this context starts with (up to the first user turn)."""
        a = self.prompt(profile, env_text, [{"role": "user", "content": "a"}])
        b = self.prompt(profile, env_text, [{"role": "user", "content": "b"}])
        n = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        # back up to the start of the user turn (its "<|im_start|>user\n" header belongs to the example)
        start = self.tok.encode("<|im_start|>", add_special_tokens=False)[0]
        while a[n - 1] != start:
            n -= 1
        return a[: n - 1]

    def target(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False)) + [self.eos]


def apply_lora(model, layers: int, rank: int, scale: float) -> None:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": rank, "scale": scale, "dropout": 0.0,
                                          "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                   "mlp.down_proj"]})


class Ctx:
    """A KV cache holding a fixed context: new keys/values are concatenated (differentiable)."""

    def __init__(self, k, v) -> None:
        self.k, self.v, self.offset = k, v, k.shape[2]

    def update_and_fetch(self, k, v):
        import mlx.core as mx

        return mx.concatenate([self.k, k], axis=2), mx.concatenate([self.v, v], axis=2)


class Contexts:
    """Per shared context: the hidden state entering the first LoRA layer and every layer's KV.

    Contexts share long prefixes (all of a profile's system text and tools): the shared part is computed
    once per profile and each context's own part (the environment note) continues from a copy of it."""

    def __init__(self, model, token_lists: list[list[int]], first_lora: int) -> None:
        import mlx.core as mx

        self.model, self.first = model, first_lora
        self.parts: list[tuple[int, list[int]]] = []  # (index of the shared prefix, own tokens)
        self.shared: list[list[int]] = []
        for toks in token_lists:
            j = next((j for j, head in enumerate(self.shared) if toks[: len(head)] == head), None)
            if j is None:
                others = [t for t in token_lists if t[:64] == toks[:64]]
                n = min(len(t) for t in others)
                n = next((i for i in range(n) if any(t[i] != toks[i] for t in others)), n)
                self.shared.append(toks[:n])
                j = len(self.shared) - 1
            self.parts.append((j, toks[len(self.shared[j]):]))
        inner = model.model
        self.shared_hidden, self.shared_kv = [], []
        for head in self.shared:
            h, kv = self._run(inner.embed_tokens(mx.array([head])), 0, None)
            self.shared_hidden.append(h)
            self.shared_kv.append(kv)
        self.hidden, self.kv = [], []
        for j, own in self.parts:
            h, kv = self._run(inner.embed_tokens(mx.array([own])), 0, self.shared_kv[j])
            self.hidden.append(h)
            self.kv.append(kv)

    def _run(self, h, start: int, prefix_kv):
        """Layers ``start``.. over ``h`` after ``prefix_kv`` (per layer (k, v), or None): the hidden state
        entering the first LoRA layer (when ``start`` is 0) and the concatenated per-layer KV."""
        layers = self.model.model.layers
        entering = h
        kv = list(prefix_kv) if prefix_kv is not None else [None] * len(layers)
        for i in range(start, len(layers)):
            if i == self.first:
                entering = h
            h, kv[i] = self._layer(i, h, prefix_kv)
        return entering, kv

    def _layer(self, i: int, h, prefix_kv):
        """Layer ``i`` over ``h`` after ``prefix_kv`` (or None): its output and the layer's concatenated (k, v)."""
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        c = KVCache()
        if prefix_kv is not None:
            c.update_and_fetch(*prefix_kv[i])
        h = self.model.model.layers[i](h, "causal", cache=c)  # (lower-right aligned after a prefix)
        kv = (c.keys[..., : c.offset, :], c.values[..., : c.offset, :])
        mx.eval(h, kv)
        return h, kv

    def refresh(self) -> None:
        """Recompute the LoRA layers' KV of every context with the current adapter."""
        for j, h in enumerate(self.shared_hidden):
            self.shared_kv[j] = self._refresh_one(h, None, self.shared_kv[j])
        for n, ((j, _), h) in enumerate(zip(self.parts, self.hidden, strict=True)):
            self.kv[n] = self._refresh_one(h, self.shared_kv[j], self.kv[n])

    def _refresh_one(self, h, prefix_kv, old):
        """New KV for the LoRA layers (``old`` kept below them) of a part whose hidden state is ``h``."""
        kv = list(old)
        for i in range(self.first, len(self.model.model.layers)):
            h, kv[i] = self._layer(i, h, prefix_kv)
        return kv


def batch_loss(model, contexts: Contexts, env: int, seqs: list[list[int]], n_prompt: list[int]):
    """Mean cross-entropy over the target tokens of a batch of continuations of context ``env``."""
    import mlx.core as mx
    import mlx.nn as nn

    b = len(seqs)
    length = max(len(s) for s in seqs)
    pad = [s + [0] * (length - len(s)) for s in seqs]
    x = mx.array(pad)
    inputs, labels = x[:, :-1], x[:, 1:]
    steps = length - 1
    pos = mx.arange(steps)[None, :]
    lo = mx.array([[p - 1] for p in n_prompt])
    hi = mx.array([[len(s) - 1] for s in seqs])
    weight = ((pos >= lo) & (pos < hi)).astype(mx.float32)
    inner = model.model
    h = inner.embed_tokens(inputs)
    ctx_len = contexts.kv[env][0][0].shape[2]
    q = mx.arange(steps)[:, None]
    k = mx.arange(ctx_len + steps)[None, :]
    mask = k <= (q + ctx_len)
    for i, layer in enumerate(inner.layers):
        ck, cv = contexts.kv[env][i]
        cache = Ctx(mx.broadcast_to(ck, (b, *ck.shape[1:])), mx.broadcast_to(cv, (b, *cv.shape[1:])))
        h = layer(h, mask, cache=cache)
        if i < contexts.first:
            h = mx.stop_gradient(h)
    h = inner.norm(h)
    logits = model.lm_head(h) if hasattr(model, "lm_head") and not model.args.tie_word_embeddings \
        else inner.embed_tokens.as_linear(h)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), labels) * weight
    return ce.sum() / weight.sum()


# --------------------------------------------------------------------------------------------- commands


def build_split(tokens: Tokens, rng: random.Random, split: Split, n_env: int, n: int, heldout: bool):
    envs = make_envs(rng, split, n_env)
    profiles = [load_profile(i % 2) for i in range(n_env)]  # interactive and -p identity lines
    examples = make_examples(rng, split, envs, n, heldout)
    return envs, profiles, examples


def train(args: argparse.Namespace) -> int:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from warmturn.server.convert import resolve_model

    rng = random.Random(args.seed)
    mx.random.seed(args.seed)
    model, tokenizer = load(str(resolve_model(None, read_adapter=False)))
    tokens = Tokens(tokenizer)
    envs, profiles, examples = build_split(tokens, rng, TRAIN, args.contexts, args.steps * args.batch, False)
    ctx_tokens = [tokens.context(p, e[1]) for p, e in zip(profiles, envs, strict=True)]
    encoded = []
    for ex in examples:
        prompt = tokens.prompt(profiles[ex.env], envs[ex.env][1], ex.messages)
        n_ctx = len(ctx_tokens[ex.env])
        assert prompt[:n_ctx] == ctx_tokens[ex.env], "context is not a prefix of the prompt"
        rest = prompt[n_ctx:]
        encoded.append((ex.env, rest + tokens.target(ex.target), len(rest)))
    kinds = {k: sum(e.kind == k for e in examples) for k in ("call", "answer", "plain")}
    print(f"examples: {len(examples)} {kinds}; contexts: {len(ctx_tokens)} of {[len(c) for c in ctx_tokens]} tokens",
          flush=True)
    apply_lora(model, args.layers, args.rank, args.scale)
    first = len(model.model.layers) - args.layers
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    print(f"LoRA rank {args.rank} on the top {args.layers} layers: {n_train:,} parameters", flush=True)
    t0 = time.time()
    contexts = Contexts(model, ctx_tokens, first)
    print(f"contexts prefilled in {time.time() - t0:.0f}s", flush=True)
    sched = optim.cosine_decay(args.lr, args.steps, args.lr * 0.1)
    opt = optim.Adam(learning_rate=lambda step: sched(step) * min(1.0, (step + 1) / 10))
    loss_grad = __import__("mlx.nn", fromlist=["value_and_grad"]).value_and_grad(model, batch_loss)
    # batches share one context: group the examples by context, in seeded order
    by_env: dict[int, list] = {}
    for item in encoded:
        by_env.setdefault(item[0], []).append(item)
    # (sorted by length within a context, so that a batch pads little)
    order = [(env, items[i: i + args.batch]) for env, items in by_env.items()
             for items in [sorted(items, key=lambda it: len(it[1]))] for i in range(0, len(items), args.batch)]
    rng.shuffle(order)
    losses = []
    t0 = time.time()
    for step, (env, items) in enumerate(order[: args.steps]):
        if step and step % args.refresh == 0:
            contexts.refresh()
        loss, grads = loss_grad(model, contexts, env, [s for _, s, _ in items], [n for _, _, n in items])
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        losses.append(loss.item())
        if step % 5 == 0 or step == args.steps - 1:
            recent = losses[-5:]
            print(f"step {step:4d}  loss {sum(recent) / len(recent):.3f}  {time.time() - t0:.0f}s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(out / "adapter.safetensors"), {k: v.astype(mx.float16) for k, v in adapter.items()},
                        metadata={"rank": str(args.rank), "scale": str(args.scale), "layers": str(args.layers),
                                  "seed": str(args.seed), "steps": str(args.steps), "batch": str(args.batch),
                                  "lr": str(args.lr)})
    (out / "train-log.json").write_text(json.dumps({"losses": losses, "seconds": time.time() - t0,
                                                    "args": vars(args), "kinds": kinds}))
    print(f"adapter: {out / 'adapter.safetensors'}  ({time.time() - t0:.0f}s)", flush=True)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Held-out rates with the adapted model, full forward passes (the prefix KV reused, as the server does)."""
    import copy

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from warmturn.server.convert import resolve_model
    from warmturn.server.toolcalls import ToolCall, ToolCallParser

    model, tokenizer = load(str(resolve_model(None, read_adapter=False)))
    if args.adapter:
        from warmturn.server.readtool import apply_adapter

        apply_adapter(model, Path(args.adapter))
    tokens = Tokens(tokenizer)
    rng = random.Random(args.seed + 1000)
    split = HELDOUT if not args.on_train else TRAIN
    envs, profiles, examples = build_split(tokens, rng, split, args.contexts, args.n, True)
    if args.kinds:
        examples = [e for e in examples if e.kind in args.kinds.split(",")]
    results = []
    ctx_cache = {}
    t0 = time.time()
    for ex in examples:
        prompt = tokens.prompt(profiles[ex.env], envs[ex.env][1], ex.messages)
        ctx = tokens.context(profiles[ex.env], envs[ex.env][1])
        if ex.env not in ctx_cache:
            kv = make_prompt_cache(model)
            model(mx.array([ctx]), cache=kv)
            mx.eval([c.state for c in kv])
            ctx_cache[ex.env] = kv
        kv = copy.deepcopy(ctx_cache[ex.env])
        logits = model(mx.array([prompt[len(ctx):]]), cache=kv)[:, -1, :]
        out = []
        for _ in range(args.max_tokens):
            nxt = int(mx.argmax(logits, axis=-1).item())
            if nxt == tokens.eos:
                break
            out.append(nxt)
            logits = model(mx.array([[nxt]]), cache=kv)[:, -1, :]
        text = tokenizer.decode(out)
        parser = ToolCallParser()
        segs = parser.feed(text) + parser.finish()
        calls = [s for s in segs if isinstance(s, ToolCall)]
        started = "<tool_call>" in text
        r = {"kind": ex.kind, "prompt": ex.messages[0]["content"], "path": ex.path, "key": ex.key, "output": text,
             "started_call": started, "calls": [{"name": c.name, "arguments": c.arguments} for c in calls],
             "ended": len(out) < args.max_tokens}
        results.append(r)
        ok = "CALL " + json.dumps(r["calls"]) if calls else ("BROKEN-CALL" if started else "text")
        print(f"[{ex.kind:6s}] {r['prompt'][:60]!r:64s} -> {ok[:90]} | {text[:80]!r}", flush=True)
    summary = summarize(results)
    summary["seconds"] = round(time.time() - t0)
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "results": results}, indent=1))
    return 0


def summarize(results: list[dict]) -> dict:
    def rate(num: int, den: int) -> str:
        return f"{num}/{den}" + (f" ({100 * num / den:.0f}%)" if den else "")

    calls = [r for r in results if r["kind"] == "call"]
    plain = [r for r in results if r["kind"] == "plain"]
    answers = [r for r in results if r["kind"] == "answer"]
    started = [r for r in results if r["started_call"]]
    well_formed = [r for r in started if r["calls"]]
    return {
        "read requests -> a Read call": rate(sum(bool(r["calls"]) and r["calls"][0]["name"] == "Read"
                                                 for r in calls), len(calls)),
        "read requests -> the exact file_path": rate(sum(bool(r["calls"]) and r["calls"][0]["arguments"]
                                                         == {"file_path": r["path"]} for r in calls), len(calls)),
        "negatives -> a tool call (false calls)": rate(sum(r["started_call"] for r in plain), len(plain)),
        "after a tool_result -> text, no call": rate(sum(not r["started_call"] for r in answers), len(answers)),
        "after a tool_result -> the answer quotes the file's key fact": rate(
            sum(r["key"] in r["output"] for r in answers), len(answers)),
        "after a tool_result -> answer ends (EOS)": rate(sum(r["ended"] for r in answers), len(answers)),
        "negatives -> answer ends (EOS)": rate(sum(r["ended"] for r in plain), len(plain)),
        "started calls that parse (JSON well-formed)": rate(len(well_formed), len(started)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=SEED)
    t.add_argument("--steps", type=int, default=110)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--contexts", type=int, default=16, help="shared contexts (working directory + environment note)")
    t.add_argument("--layers", type=int, default=10, help="LoRA on the top N layers")
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--scale", type=float, default=20.0)
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--refresh", type=int, default=25, help="recompute the contexts' LoRA-layer KV every N steps")
    e = sub.add_parser("eval")
    e.add_argument("--adapter", default="")
    e.add_argument("--seed", type=int, default=SEED)
    e.add_argument("--n", type=int, default=60)
    e.add_argument("--contexts", type=int, default=4)
    e.add_argument("--max-tokens", type=int, default=48)
    e.add_argument("--kinds", default="")
    e.add_argument("--on-train", action="store_true", help="evaluate on the training distribution instead")
    e.add_argument("--json", default="")
    args = ap.parse_args(argv)
    return train(args) if args.cmd == "train" else evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
