"""Tessera's Python SDK for collaboration strategies.

A strategy is a WebAssembly component of the `tessera:collab` package
(`wit/collab.wit`), built from Python with componentize-py. The host runs the
models; a strategy asks it through the `models` interface (list, generate,
fan out, score, embed) and records its steps through `trace`. This package
wraps those calls so that a method reads like its pseudo-code, and carries the
same helpers as the Rust SDK: answer extraction, normalisation and voting
(`tessera_sdk.answer`), typed configuration (`tessera_sdk.config`) and dev
evaluation for `fit` (`tessera_sdk.dev`).

A strategy module defines a class named `WitWorld` (the name componentize-py
looks for) by subclassing `Strategy` and implementing `run` (and optionally
`fit`)::

    from tessera_sdk import Strategy, Response, generators, generate

    class WitWorld(Strategy):
        def run(self, req):
            first = generators()[0]
            return Response(text=generate(first.id, req.input, req.params).text)

Errors: raise `ModuleError` (the strategy failed), `ConfigError` (the
caller's configuration is wrong) or let a host call's error propagate; the
export turns each into the host's typed error.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from .answer import extract, normalize, vote  # noqa: F401  (re-exported)
from .config import Config, ConfigError  # noqa: F401

try:  # Inside a component: the bindings componentize-py generates.
    import wit_world as _world
    from componentize_py_types import Err, Ok  # noqa: F401
    from wit_world.imports import models as _models
    from wit_world.imports import output as _output
    from wit_world.imports import trace as _trace
    from wit_world.imports import types

    Request = types.Request
    Response = types.Response
    Example = types.Example
    GenParams = types.GenParams
    Generation = types.Generation
    Job = types.Job
    Message = types.Message
    ModelInfo = types.ModelInfo
    Scored = types.Scored
    _Base = _world.WitWorld
    IN_COMPONENT = True
except ImportError:  # Plain CPython (unit tests of the pure helpers).
    IN_COMPONENT = False
    _Base = object


class ModuleError(Exception):
    """The strategy itself failed (reported as `module-failed`)."""


def _host_error(e: BaseException):
    """The WIT error a Python exception stands for."""
    if isinstance(e, Err):
        return e
    if isinstance(e, ConfigError):
        return Err(types.Error_InvalidParams(str(e)))
    return Err(types.Error_ModuleFailed(f"{type(e).__name__}: {e}"))


def error_text(e: BaseException) -> str:
    """One line for a host call's error (for traces and messages)."""
    if IN_COMPONENT and isinstance(e, Err):
        v = e.value
        name = type(v).__name__.removeprefix("Error_")
        detail = getattr(v, "value", "")
        return f"{name}: {detail}" if detail != "" else name
    return str(e)


class Strategy(_Base):
    """Base class of a Python strategy: subclass it as `WitWorld`, implement
    `run(req) -> Response` and optionally `fit(dev, config) -> bytes | None`
    (`config` is a `Config`). Exceptions become typed host errors."""

    def run(self, req):  # pragma: no cover - overridden
        raise ModuleError("run is not implemented")

    def fit(self, dev, config):  # pragma: no cover - default: no state
        return None

    # componentize-py calls these names; they wrap the user's methods.
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        user_run = cls.__dict__.get("run")
        user_fit = cls.__dict__.get("fit")
        if user_run is not None:

            def run(self, req, _f=user_run):
                try:
                    return _f(self, req)
                except BaseException as e:  # noqa: BLE001 - every failure is typed
                    raise _host_error(e) from None

            cls.run = run
        if user_fit is not None:

            def fit(self, dev, config, _f=user_fit):
                try:
                    return _f(self, dev, Config(config))
                except BaseException as e:  # noqa: BLE001
                    raise _host_error(e) from None

            cls.fit = fit


def list_models() -> List["ModelInfo"]:
    """Every member this module may call, with its card."""
    return _models.list_models()


def generators() -> List["ModelInfo"]:
    """The members that generate, in pool order."""
    return [m for m in _models.list_models() if "generate" in m.capabilities]


def params(
    max_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
):
    """Decoding parameters; `None` leaves a field to the member's default."""
    return types.GenParams(max_tokens, temperature, top_p, top_k, seed, list(stop))


def user(text: str):
    """A one-turn chat input."""
    return types.Input_Chat([types.Message(role="user", content=text)])


def question(inp) -> str:
    """The text of the last user turn (or the raw prompt)."""
    if isinstance(inp, types.Input_Prompt):
        return inp.value
    for m in reversed(inp.value):
        if m.role == "user":
            return m.content
    return ""


def generate(model: str, inp, gen_params):
    """One generation by `model` (raises the host's typed error)."""
    return _models.generate(model, inp, gen_params)


def fan_out(jobs: Sequence["Job"]) -> List[Tuple[Optional["Generation"], Optional[BaseException]]]:
    """Many generations at once, run in parallel by the host; each result is
    `(generation, None)` or `(None, error)`."""
    out = []
    for r in _models.fan_out(list(jobs)):
        if isinstance(r, Ok):
            out.append((r.value, None))
        else:
            out.append((None, r))
    return out


def score(model: str, prompt, continuations: Sequence[str]) -> List["Scored"]:
    """Log-likelihood of each continuation after `prompt`."""
    return _models.score(model, prompt, list(continuations))


def embed(model: str, texts: Sequence[str]) -> List[List[float]]:
    """L2-normalised sentence embeddings."""
    return _models.embed(model, list(texts))


def generate_streamed(model: str, inp, gen_params):
    """`generate`, with every token also sent to a streaming caller as it
    decodes (`output`, WIT 0.1.2). The answer the strategy returns must
    begin with everything it streamed."""
    return _output.generate_streamed(model, inp, gen_params)


def write(text: str) -> None:
    """Sends `text` to a streaming caller now, as the next piece of the
    answer (the returned answer must begin with everything sent). Each
    write counts as one host call; an empty one sends nothing."""
    _output.write(text)


def trace(model: Optional[str], role: str, note: str) -> None:
    """Records one step of the strategy in the answer's provenance."""
    _trace.emit(_trace.Step(model=model, role=role, note=note))


def response(text: str, annotations: Sequence[Tuple[str, str]] = ()):
    """The module's answer with its annotations."""
    return types.Response(text=text, annotations=list(annotations))
