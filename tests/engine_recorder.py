"""Recording what the real engine hands out (no tests here): every request's items, one shared log in order,
and a handle per request (tests/test_engine_batching.py, test_server_batching.py, test_families.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from warmturn.server.engine import Admitted, Done, Engine, GenerationRequest, Piece, Prefilled


class Recorder:
    """Collects every request's engine items, plus one shared log of (name, item) in order."""

    def __init__(self) -> None:
        self.items: dict[str, list] = {}
        self.admitted: dict[str, Admitted] = {}  # the cache lookup's item, kept apart from the rest
        self.log: list[tuple[str, object]] = []
        self.done: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def request(self, name: str, tokens: list[int], **kw) -> GenerationRequest:
        """A request (greedy, 10 tokens unless `kw` says otherwise) whose items are recorded under `name`."""
        self.items[name] = []
        self.done[name] = threading.Event()

        def emit(item):
            if isinstance(item, Admitted):
                assert name not in self.admitted and not self.items[name], "Admitted comes once, first"
                self.admitted[name] = item
                return
            with self.lock:
                self.items[name].append(item)
                self.log.append((name, item))
            if isinstance(item, (Done, Exception)):
                self.done[name].set()

        return GenerationRequest(tokens=list(tokens), emit=emit, **{"max_tokens": 10, "temperature": 0.0, **kw})

    def submit(self, engine: Engine, name: str, tokens: list[int], **kw) -> Handle:
        engine.submit(self.request(name, tokens, **kw))
        return Handle(self, name)

    def wait(self, timeout: float = 120) -> None:
        for name, ev in self.done.items():
            assert ev.wait(timeout), f"{name} never finished"

    def text(self, name: str) -> str:
        return "".join(i.text for i in self.items[name] if isinstance(i, Piece))

    def first(self, name: str) -> Prefilled:
        first = self.items[name][0]
        assert isinstance(first, Prefilled), self.items[name]
        # the lookup's count is the prefill's (a request taken out of the batch keeps its KV)
        admitted = self.admitted[name]
        assert (admitted.reused, admitted.prompt_tokens) == (first.reused, first.prompt_tokens)
        return first

    def last(self, name: str):
        return self.items[name][-1]


class Handle:
    """One recorded request."""

    def __init__(self, rec: Recorder, name: str) -> None:
        self.rec, self.name = rec, name

    @property
    def items(self) -> list:
        return self.rec.items[self.name]

    @property
    def done(self) -> threading.Event:
        return self.rec.done[self.name]

    def wait(self, timeout: float = 300) -> Handle:
        """Until it finished, which must be a Done (not an error)."""
        assert self.done.wait(timeout), f"{self.name} never finished"
        assert isinstance(self.rec.last(self.name), Done), self.rec.last(self.name)
        return self

    @property
    def text(self) -> str:
        return self.rec.text(self.name)

    @property
    def reused(self) -> int:
        return self.rec.first(self.name).reused


@contextmanager
def started_engines() -> Iterator:
    """A function that makes and starts an engine (``Engine``'s arguments); every one is stopped on the way out."""
    engines: list[Engine] = []

    def start(*args, **kw) -> Engine:
        engine = Engine(*args, **kw)
        engine.start()
        engines.append(engine)
        return engine

    try:
        yield start
    finally:
        for engine in engines:
            engine.stop()


def serve(engine: Engine, requests: dict[str, tuple[list[int], dict]]) -> Recorder:
    """Submit every request at once (in order) and wait for them all."""
    rec = Recorder()
    for name, (tokens, kw) in requests.items():
        engine.submit(rec.request(name, tokens, **kw))
    rec.wait()
    return rec
