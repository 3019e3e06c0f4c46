"""The engine's command-line flags, made from `EngineConfig`'s fields (worker/types.py).

qnext-serve, qnext-batch and qnext-validate add them with `add_engine_flags` and read them back with
`engine_config_from_args`, so every engine option is spelled, defaulted, described and checked the same way in
all three: its flag, help text, choices and default come from the field (--help shows that default through
worker/cli_help.py), and its value is checked only by `EngineConfig.__post_init__`, whose ValueError becomes a
usage error naming the flag. Torch-free: qnext-serve's process imports it.

    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_engine_flags(p, exclude=("model",))
    config = engine_config_from_args(p.parse_args(), p, model=...)
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
import weakref
from collections.abc import Iterable
from typing import Any

from qnext.worker.types import EngineConfig

# parser -> {field name: flag} of the engine flags add_engine_flags gave it
_ADDED: weakref.WeakKeyDictionary[argparse.ArgumentParser, dict[str, str]] = weakref.WeakKeyDictionary()


def engine_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(EngineConfig)


def flag_of(name: str) -> str:
    """The command-line flag of EngineConfig's field `name` (--enforce-eager for cuda_graphs, ...)."""
    [f] = [f for f in engine_fields() if f.name == name]
    return f.metadata.get("flag", "--" + name.replace("_", "-"))


def name_the_flag(message: str) -> str:
    """A ValueError's "field: ..." as "--flag: ..." when `field` is an EngineConfig field; otherwise unchanged."""
    name, sep, rest = message.partition(": ")
    if sep and name in {f.name for f in engine_fields()}:
        return f"{flag_of(name)}: {rest}"
    return message


def _value_type(hint: Any) -> type:
    """int for `int` and for `int | None`, and so on."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_engine_flags(parser: argparse.ArgumentParser, exclude: Iterable[str] = ()) -> argparse._ArgumentGroup:
    """Add a flag for each EngineConfig field not in `exclude` (field names), in an "engine options" group;
    each flag's dest is its field's name."""
    exclude = set(exclude)
    unknown = exclude - {f.name for f in engine_fields()}
    if unknown:
        raise ValueError(f"exclude: not EngineConfig fields: {sorted(unknown)}")
    group = parser.add_argument_group("engine options")
    added = _ADDED.setdefault(parser, {})
    hints = typing.get_type_hints(EngineConfig)  # the annotations are strings (`from __future__ import annotations`)
    for f in engine_fields():
        if f.name in exclude:
            continue
        meta = dict(f.metadata)
        meta.pop("flag", None)
        flag = flag_of(f.name)
        # argparse %-formats help strings ("%(default)s"): a literal % is written %%
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": meta.pop("help").replace("%", "%%")}
        if "action" not in meta:
            kwargs["type"] = _value_type(hints[f.name])
        kwargs.update(meta)  # action, const, choices
        group.add_argument(flag, **kwargs)
        added[f.name] = flag
    return group


def engine_config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser,
                            **overrides: Any) -> EngineConfig:
    """The EngineConfig of the engine flags `add_engine_flags` gave `parser`, as parsed into `args`, with
    `overrides` (fields the command sets itself) on top. A value EngineConfig refuses is a usage error naming
    the flag (parser.error: message on stderr, exit 2)."""
    values = {name: getattr(args, name) for name in _ADDED.get(parser, {})}
    try:
        return EngineConfig(**{**values, **overrides})
    except ValueError as e:
        name = str(e).partition(": ")[0]
        parser.error(name_the_flag(str(e)) if name in values and name not in overrides else str(e))
        raise  # parser.error exits; a subclass that does not still must not return a config
