"""Finding rewards by name: the registry, dotted paths and reward files.

A reward is any callable ``fn(prompts, completions, images, **columns) -> list[float | None]``. Heavy
rewards (a CLIP model) are classes, instantiated once by :func:`get_reward` with the config's kwargs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["REGISTRY", "Reward", "RewardError", "get_reward", "register_reward", "reward_name"]


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
    """A resolved reward: a readable ``name``, the callable ``fn`` and its ``weight`` in the total."""

    name: str
    fn: Callable[..., list[Any]]
    weight: float = 1.0

    def __call__(self, prompts: list[str], completions: list[str], images: list[Any], **columns: Any) -> list[Any]:
        return self.fn(prompts, completions, images, **columns)

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Data columns the reward reads (declared as ``required_columns`` on the function or object)."""
        return required_columns(self.fn)


def required_columns(fn: Any) -> tuple[str, ...]:
    """The ``required_columns`` a reward declares; looks through :class:`Reward` and ``functools.partial``."""
    while True:
        declared = getattr(fn, "required_columns", None)
        if declared is not None:
            return tuple(declared)
        inner = getattr(fn, "fn", None) or getattr(fn, "func", None)
        if inner is None:
            return ()
        fn = inner


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

    * a registered name: ``"format"``, ``"format_strict"``, ``"clip_consistency"`` (see :data:`REGISTRY`);
    * a dotted path ``"package.module:function"``;
    * a file path ``"path/to/file.py:function"`` (relative to the working directory; only that file is loaded);
    * a mapping or object with ``name`` and optional ``weight`` and ``kwargs`` (a config ``RewardSpec``);
    * an already resolved :class:`Reward` (returned as is).

    A class is instantiated with ``kwargs`` (once: heavy rewards load their models in ``__init__``); a
    function given ``kwargs`` is wrapped in :func:`functools.partial`. Keyword arguments passed here
    override those in a spec object.
    """
    if isinstance(spec, Reward):
        return spec
    weight = 1.0
    if not isinstance(spec, str):
        fields = spec if isinstance(spec, Mapping) else vars(spec) if hasattr(spec, "__dict__") else {}
        if "name" not in fields:
            raise RewardError(f"reward spec must be a name string or have a 'name', got {spec!r}")
        weight = float(fields.get("weight", 1.0))
        kwargs = {**(fields.get("kwargs") or {}), **kwargs}
        spec = fields["name"]
    if not isinstance(spec, str) or not spec:
        raise RewardError(f"reward name must be a non-empty string, got {spec!r}")
    name, target = _resolve(spec)
    return Reward(name, _instantiate(name, target, kwargs), weight)


def _resolve(spec: str) -> tuple[str, Any]:
    """(readable name, function or class) for a registered name, dotted path or file path."""
    if spec in REGISTRY:
        return spec, REGISTRY[spec]
    if ":" not in spec:
        hint = ""
        if "." in spec or "/" in spec:
            hint = " (a path needs ':function' at the end: 'package.module:function' or 'path/file.py:function')"
        raise RewardError(f"unknown reward {spec!r}{hint}; registered rewards: {sorted(REGISTRY)}")
    location, attr = spec.rsplit(":", 1)  # rsplit: a Windows drive letter also has a colon
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
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as e:
        raise RewardError(f"reward {spec!r}: cannot import module {dotted!r} ({e})") from e
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
    if inspect.isclass(target):
        try:
            return target(**kwargs)
        except Exception as e:
            raise RewardError(f"reward {name!r}: building {target.__name__}(**{kwargs}) raised {type(e).__name__}: {e}") from e
    return functools.partial(target, **kwargs) if kwargs else target
