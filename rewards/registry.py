"""Finding rewards by name: the registry, dotted paths and reward files, and names unique within a run.

A reward is any callable taking TRL's keywords (``prompts``, ``completions``, ``completion_ids``, ``images``,
every data column; see :mod:`rgpo.rewards.contract`) and returning ``list[float | None]``. Heavy rewards (a CLIP
model) are classes, instantiated once by :func:`get_reward` with the config's kwargs; a factory such as
``trl.rewards.get_soft_overlong_punishment`` is called with them and returns the reward.

This module and :mod:`rgpo.rewards.contract` import only the standard library: an isolated reward's worker
(:mod:`rgpo.rewards.worker`) resolves its reward with them in an interpreter that may have none of rgpo's
dependencies.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .contract import INPUTS, signature_of, takes_messages

__all__ = [
    "REGISTRY",
    "Reward",
    "RewardError",
    "get_reward",
    "get_rewards",
    "register_reward",
    "required_columns",
    "reward_name",
    "unique_names",
    "unwrap",
]


class RewardError(RuntimeError):
    """A reward could not be found, built, or returned something unusable."""


REGISTRY: dict[str, Callable[..., Any]] = {}
"""Registered reward name -> function or class (classes are instantiated by :func:`get_reward`)."""


def register_reward(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding a reward function or class to :data:`REGISTRY` under ``name``.

    Registering the same object twice is a no-op (a module imported again); a different object under a
    taken name is an error, since configs would silently start meaning something else.
    """

    def decorate(obj: Callable[..., Any]) -> Callable[..., Any]:
        existing = REGISTRY.get(name)
        if existing is not None and _qualname(existing) != _qualname(obj):
            raise RewardError(f"reward name {name!r} is already registered to {_qualname(existing)}; pick another name")
        REGISTRY[name] = obj
        return obj

    return decorate


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


@dataclass(frozen=True)
class Reward:
    """A resolved reward: a readable ``name`` (it keys logs and table columns), the callable ``fn``, its
    ``weight`` in the total, the ``source`` spec it was resolved from (``"a/r.py:score"``) and whether it takes
    TRL's ``conversational`` completions (message lists; :func:`rgpo.rewards.combine` converts text for it)."""

    name: str
    fn: Callable[..., list[Any]]
    weight: float = 1.0
    source: str | None = None
    conversational: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> list[Any]:
        return self.fn(*args, **kwargs)

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Data columns the reward reads (see :func:`required_columns`)."""
        return required_columns(self.fn)


def unwrap(fn: Any) -> Any:
    """The callable inside a :class:`Reward` (``fn`` itself otherwise): what a signature is read from."""
    return fn.fn if isinstance(fn, Reward) else fn


def required_columns(fn: Any) -> tuple[str, ...]:
    """Data columns a reward needs: its declared ``required_columns`` (looking through :class:`Reward` and
    ``functools.partial``), else the parameters of its signature without a default that are not among the
    reward inputs (``solution`` in TRL's ``accuracy_reward(completions, solution, **kwargs)``)."""
    inner = fn
    while True:
        declared = getattr(inner, "required_columns", None)
        if declared is not None:
            return tuple(declared)
        nested = getattr(inner, "fn", None) or getattr(inner, "func", None)
        if nested is None:
            break
        inner = nested
    sig = signature_of(unwrap(fn))
    if sig is None:
        return ()
    return tuple(
        name for name, p in sig.parameters.items()
        if name not in INPUTS and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )


def reward_name(fn: Any) -> str:
    """A readable name for any reward callable (for error messages and logs)."""
    for candidate in (fn, getattr(fn, "func", None)):  # functools.partial hides the name in .func
        if candidate is None:
            continue
        name = getattr(candidate, "name", None)
        if isinstance(name, str):
            return name
        name = getattr(candidate, "__name__", None)
        if isinstance(name, str):
            return name
    return type(fn).__name__


def get_reward(spec: Any, **kwargs: Any) -> Reward:
    """Resolve a reward spec to a :class:`Reward`.

    ``spec`` is one of:

    * a registered name: ``"format"``, ``"format_strict"``, ``"clip_consistency"``, ``"pickscore"``,
      ``"hpsv2"``, ``"aesthetic"``, ``"ocr"``, ``"vlm_judge"``, ``"remote"`` (see :data:`REGISTRY`);
    * a dotted path ``"package.module:function"`` or, as TRL's CLI writes it, ``"package.module.function"``
      (e.g. ``"trl.rewards.think_format_reward"``); the working directory is on the import path, so a
      ``my_rewards.py`` in it is ``"my_rewards.score"``;
    * a file path ``"path/to/file.py:function"`` (relative to the working directory; only that file is loaded);
    * a mapping or object with ``name`` and optional ``weight``, ``kwargs`` and ``python`` (a config
      ``RewardSpec``); with ``python``, the reward runs in that interpreter, in a resident worker process
      (:class:`rgpo.rewards.isolated.IsolatedReward`);
    * an already resolved :class:`Reward` (returned as is).

    A class is instantiated with ``kwargs`` (once: heavy rewards load their models in ``__init__``). A factory
    (a function taking none of the reward inputs and no ``**kwargs``, as TRL's ``get_*`` rewards) is called
    with ``kwargs`` and its result is the reward. Any other function given ``kwargs`` is wrapped in
    :func:`functools.partial`. Keyword arguments passed here override those in a spec object.

    The name is the function's (or the registered one); a run with several rewards should resolve them
    together with :func:`get_rewards`, which makes the names unique.
    """
    if isinstance(spec, Reward):
        return spec
    weight, python = 1.0, None
    if not isinstance(spec, str):
        fields = spec if isinstance(spec, Mapping) else vars(spec) if hasattr(spec, "__dict__") else {}
        if "name" not in fields:
            raise RewardError(f"reward spec must be a name string or have a 'name', got {spec!r}")
        weight = float(fields.get("weight", 1.0))
        kwargs = {**(fields.get("kwargs") or {}), **kwargs}
        python = fields.get("python")
        spec = fields["name"]
    if not isinstance(spec, str) or not spec:
        raise RewardError(f"reward name must be a non-empty string, got {spec!r}")
    if python:
        from .isolated import IsolatedReward  # here, not at the top: a worker loads this module without it

        isolated = IsolatedReward(spec, python, kwargs)
        return Reward(isolated.name, isolated, weight, source=spec, conversational=isolated.conversational)
    name, target = _resolve(spec)
    fn = _instantiate(name, target, kwargs)
    if fn is not target and isinstance(getattr(fn, "log_name", None), str):
        name = fn.log_name  # a built reward may name itself after its settings (remote: the served names)
    elif fn is not target and not inspect.isclass(target) and isinstance(getattr(fn, "__name__", None), str):
        name = fn.__name__  # a factory's reward: TRL names its logs after it too
    return Reward(name, fn, weight, source=spec, conversational=takes_messages(fn))


def get_rewards(specs: Sequence[Any]) -> list[Reward]:
    """Resolve every spec of a run (:func:`get_reward`), with names made unique by :func:`unique_names`."""
    return unique_names([get_reward(spec) for spec in specs])


def unique_names(rewards: Sequence[Reward]) -> list[Reward]:
    """The rewards with distinct, deterministic, readable names (they key logs and table columns).

    Names used once are kept. Rewards sharing a name are told apart by where they come from: the shortest
    tail of their file path or module that differs, joined with dots, before the name (``a/r.py:score`` and
    ``b/r.py:score`` become ``a.r:score`` and ``b.r:score``; a registered ``format`` and ``mine.py:format``
    become ``format`` and ``mine:format``). Rewards from the same place (one spec listed twice with other
    kwargs) keep the name on the first and get ``_2``, ``_3``, ... on the next ones, in list order.
    """
    names = [r.name for r in rewards]
    for name, count in Counter(names).items():
        if count < 2:
            continue
        at = [i for i, n in enumerate(names) if n == name]
        for i, qualifier in zip(at, _qualifiers([_location(rewards[i].source) for i in at])):
            names[i] = f"{qualifier}:{name}" if qualifier else name
    taken, seen, final = set(names), Counter[str](), []
    for name in names:
        seen[name] += 1
        if seen[name] > 1:
            k = seen[name]
            while f"{name}_{k}" in taken:
                k += 1
            name = f"{name}_{k}"
            taken.add(name)
        final.append(name)
    return [r if r.name == n else dataclasses.replace(r, name=n) for r, n in zip(rewards, final)]


def _location(source: str | None) -> tuple[str, ...]:
    """The parts of where a spec points: ``("a", "r")`` for ``a/r.py:score`` or ``a.r:score`` or ``a.r.score``,
    ``()`` for a registered name."""
    if not source or source in REGISTRY:
        return ()
    location = source.rsplit(":", 1)[0] if ":" in source else source.rsplit(".", 1)[0]
    if location.endswith(".py") or "/" in location or os.sep in location:
        return tuple(p for p in Path(location).with_suffix("").parts if p not in ("/", "", "."))
    return tuple(location.split("."))


def _qualifiers(locations: list[tuple[str, ...]]) -> list[str]:
    """For each location, the shortest tail (same length for all) that tells apart every pair of different
    locations; "" for all when they are all the same place."""
    distinct = len(set(locations))
    if distinct < 2:
        return [""] * len(locations)
    longest = max(len(loc) for loc in locations)
    for k in range(1, longest + 1):
        if len({loc[-k:] for loc in locations}) == distinct:
            return [".".join(loc[-k:]) for loc in locations]
    return [".".join(loc) for loc in locations]  # unreachable: the full locations are distinct


def _resolve(spec: str) -> tuple[str, Any]:
    """(readable name, function or class) for a registered name, dotted path or file path."""
    if spec in REGISTRY:
        return spec, REGISTRY[spec]
    is_path = spec.endswith(".py") or "/" in spec or os.sep in spec
    if ":" not in spec and (is_path or "." not in spec):
        hint = ""
        if is_path:
            hint = " (a file path needs ':function' at the end: 'path/file.py:function')"
        raise RewardError(f"unknown reward {spec!r}{hint}; registered rewards: {sorted(REGISTRY)}")
    # rsplit: a Windows drive letter also has a colon; TRL's CLI form 'module.function' has none at all
    location, attr = spec.rsplit(":", 1) if ":" in spec else spec.rsplit(".", 1)
    if not attr.isidentifier():
        raise RewardError(f"reward {spec!r}: {attr!r} after ':' is not a Python name")
    is_file = location.endswith(".py") or "/" in location or os.sep in location
    module = _load_file(location, spec) if is_file else _import_module(location, spec)
    if not hasattr(module, attr):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        where = module.__file__ if is_file else location
        raise RewardError(f"reward {spec!r}: {where} has no attribute {attr!r}; its callables: {public}")
    target = getattr(module, attr)
    if not callable(target):
        raise RewardError(f"reward {spec!r}: {attr!r} is a {type(target).__name__}, not a function or class")
    return attr, target


def _import_module(dotted: str, spec: str) -> ModuleType:
    """Import ``dotted`` with the working directory on the import path (a user's ``my_rewards.py`` beside the
    config imports without ``PYTHONPATH=.``). It goes at the END of ``sys.path``: installed packages still win
    over a same-named folder in the working directory."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.append(cwd)
    if dotted not in sys.modules:
        importlib.invalidate_caches()  # a module written since the last import (a test, a notebook) is seen
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as e:
        parts = dotted.split(".")
        if e.name is not None and e.name not in {".".join(parts[:k]) for k in range(1, len(parts) + 1)}:
            raise RewardError(
                f"reward {spec!r}: module {dotted!r} imports {e.name!r}, which is not installed ({e})"
            ) from e
        registered = f"; registered rewards: {sorted(REGISTRY)}" if ":" not in spec else ""
        raise RewardError(
            f"reward {spec!r}: cannot import module {dotted!r} ({e}); looked in the working directory {cwd} "
            f"and on sys.path. A reward in a file can be given by path instead: "
            f"'{dotted.replace('.', '/')}.py:{spec.rsplit(':', 1)[-1].rsplit('.', 1)[-1]}'{registered}"
        ) from e
    except Exception as e:  # the module itself is broken: say so, keep its traceback
        raise RewardError(f"reward {spec!r}: importing {dotted!r} raised {type(e).__name__}: {e}") from e


_FILE_MODULES: dict[Path, ModuleType] = {}


def _load_file(location: str, spec: str) -> ModuleType:
    """Import one .py file as its own module, once per path, so rewards in it share module-level caches."""
    path = Path(location).expanduser().resolve()
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    if not path.is_file():
        raise RewardError(f"reward {spec!r}: file {location!r} not found (resolved to {path}, cwd {os.getcwd()})")
    # A name unique to the path: two users' 'rewards.py' must not collide in sys.modules.
    module_name = f"_rgpo_reward_file_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"reward {spec!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here while it runs
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise RewardError(f"reward {spec!r}: running {path} raised {type(e).__name__}: {e}") from e
    _FILE_MODULES[path] = module
    return module


def _instantiate(name: str, target: Any, kwargs: dict[str, Any]) -> Callable[..., list[Any]]:
    if inspect.isclass(target) or _is_factory(target):
        try:
            built = target(**kwargs)
        except RewardError:
            raise
        except Exception as e:
            what = getattr(target, "__name__", name)
            hint = "" if inspect.isclass(target) else (
                f" ({what} takes none of {list(INPUTS)} and no **kwargs, so it was taken for a factory that builds "
                f"the reward; a reward function takes **kwargs)")
            raise RewardError(f"reward {name!r}: building {what}(**{kwargs}) raised {type(e).__name__}: {e}{hint}") from e
        if not callable(built):
            raise RewardError(f"reward {name!r}: {target.__name__}(**{kwargs}) returned a "
                              f"{type(built).__name__}, not a reward function")
        return built
    return functools.partial(target, **kwargs) if kwargs else target


def _is_factory(fn: Any) -> bool:
    """A function that takes none of the reward inputs and no ``**kwargs`` cannot be a reward itself: it builds
    one (TRL's ``get_repetition_penalty_reward(ngram_size, max_penalty)``)."""
    if not inspect.isfunction(fn):
        return False
    sig = signature_of(fn)
    if sig is None:
        return False
    params = sig.parameters.values()
    return not any(p.kind is p.VAR_KEYWORD or p.name in INPUTS for p in params)
