"""Verb flags that can also come from a YAML file whose keys are the flag names.

Every verb that takes `--config FILE` registers its flags with `default=None` and keeps the
real defaults in a dict; `resolve_flags` then merges, lowest priority first:
defaults < (saved run settings) < YAML file < flags typed on the command line.
A YAML key may be spelt like the flag (`seq-len`) or like the attribute (`seq_len`).

Why by hand: jsonargparse (typed signatures as CLI + YAML, as litgpt uses) does this
job, but importing it takes about 0.5 s on a 2-core CPU, half of the CLI's one-second
start-up budget (`subllm bench startup`); this module is argparse plus ~150 lines. It
reads a parser's actions (`parser._actions`, stable since Python 2.7 and the only way
argparse offers to list them) and otherwise public attributes.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any

import yaml

from subllm.errors import SubLLMError


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number strictly between 0 and 1, got {text}")
    return value


def non_empty_path(text: str) -> str:
    """The type of every flag that names a file or directory: an empty one ('' from an unset
    shell variable) would mean the current directory, and fail later with a message about
    `.`; refused here, by the flag's name."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; pass a path")
    return text


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """Parse a YAML file; a missing file or a syntax error is a one-line SubLLMError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SubLLMError(f"{what} {path} does not exist; check the path") from None
    except UnicodeDecodeError:
        raise SubLLMError(f"{what} {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise SubLLMError(f"cannot read {what} {path}: {e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SubLLMError(
            f"{what} {path} is not valid YAML{where}: {problem}; fix the syntax "
            "(keys are flag names, e.g. `max-steps: 100`)"
        ) from None


def _flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action for every `--long` option of the parser (help excluded)."""
    return {
        a.dest: a
        for a in parser._actions
        if a.option_strings and a.dest not in ("help", "config")
    }


def _convert(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    """Check a YAML value against the flag's type, the way argparse would check it."""
    flag = action.option_strings[-1]
    where = f"{path}: `{key}`"
    if action.nargs == 0 and action.const is True:  # a store_true flag
        if not isinstance(value, bool):
            raise SubLLMError(
                f"{where} must be true or false (like the flag {flag}), got {value!r}"
            )
        return value
    if action.nargs in ("*", "+"):
        values = value if isinstance(value, list) else [value]
        return [_convert_one(action, where, v) for v in values]
    if isinstance(value, (list, dict)):
        raise SubLLMError(f"{where} must be a single value (like the flag {flag}), got {value!r}")
    return _convert_one(action, where, value)


def _convert_one(action: argparse.Action, where: str, value: Any) -> Any:
    if value is None:
        return None
    kind = action.type or str
    if isinstance(value, bool):  # YAML true/false where a number or a name is expected
        raise SubLLMError(f"{where} must be a value like the flag "
                          f"{action.option_strings[-1]} {action.metavar or ''} takes, got "
                          f"{str(value).lower()}".replace("  ", " "))
    try:
        converted = kind(str(value))
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise SubLLMError(f"{where}: {e}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise SubLLMError(f"{where} must be one of {choices}, got {value!r}")
    return converted


def explicit_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The flags the user typed: every flag is registered with default None."""
    return {dest: getattr(args, dest) for dest in _flag_actions(parser)
            if getattr(args, dest, None) is not None}


def file_settings(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    extra_keys: tuple[str, ...] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings of the YAML file `args.config` (read once, checked like flags), keyed by
    attribute name, and its extra sections such as `model`. No file: two empty dicts.

    An unknown key is an error that names the nearest valid one.
    """
    config_path = getattr(args, "config", None)
    if config_path is None:
        return {}, {}
    actions = _flag_actions(parser)
    path = Path(config_path)
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SubLLMError(
            f"config file {path} must be a mapping of flag names to values "
            f"(e.g. `max-steps: 100`), got {type(data).__name__}"
        )
    valid = sorted({a.option_strings[-1][2:] for a in actions.values()} | set(extra_keys))
    settings: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key)
        dest = key.replace("-", "_")
        if key in extra_keys or dest in extra_keys:
            extras[dest] = value
            continue
        if dest not in actions:
            near = difflib.get_close_matches(key.replace("_", "-"), valid, n=1, cutoff=0.5)
            hint = f"did you mean `{near[0]}`?" if near else f"valid keys: {', '.join(valid)}"
            raise SubLLMError(f"unknown key `{key}` in config file {path}; {hint}")
        settings[dest] = _convert(actions[dest], key, value, path)
    return settings, extras


def resolve_flags(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    defaults: dict[str, Any],
    base: dict[str, Any] | None = None,
    extra_keys: tuple[str, ...] = (),
    from_file: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge defaults < base < YAML (`args.config`) < typed flags.

    Returns (settings keyed by attribute name, the YAML's extra sections such as `model`).
    `from_file`: what `file_settings` already read, so the file is read once.
    """
    actions = _flag_actions(parser)
    settings = dict(defaults)
    if base:
        settings.update({k: v for k, v in base.items() if k in actions})
    found, extras = from_file if from_file is not None else file_settings(args, parser,
                                                                           extra_keys)
    for key, value in found.items():  # `key: null` for a setting that must have a value
        if value is None and defaults.get(key) is not None:
            flag = actions[key].option_strings[-1]
            raise SubLLMError(f"{args.config}: `{key.replace('_', '-')}` is null; give it a "
                              f"value like {flag} takes or drop the key (default "
                              f"{defaults[key]})")
    settings.update(found)
    settings.update(explicit_flags(args, parser))
    return settings, extras
