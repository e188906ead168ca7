"""The command-line convention every command shares, as the run spec's: a pydantic spec (from `--spec FILE`,
a shipped spec's name, or defaults), `--dotted.key=value` overrides (`--key value` and `--key v1 v2` too, as
argparse users type them, `-` in a key as `_`; a bare `--flag` is `--flag=True`), `--dry-run`, `--print-schema`;
a user's mistake exits 2 with one line per problem and no traceback."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel

from tcd_ds.spec import SpecError, apply_overrides, read_yaml_mapping, validate

USAGE_ERROR = 2


@dataclass
class CommandLine:
    positionals: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)  # the command's own options (--spec, --out, ...)
    flags: set[str] = field(default_factory=set)  # the command's own flags (--dry-run, ...)
    overrides: list[str] = field(default_factory=list)  # --key=value, for the spec


def parse_command_line(argv: list[str], options: tuple[str, ...] = (), flags: tuple[str, ...] = ()) -> CommandLine:
    """Split `argv` into the command's own options and flags, positionals, and spec overrides, normalised to
    `--key=value` (a value list as `[v1, v2]`)."""
    line = CommandLine()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            line.positionals.append(arg)
            continue
        key, has_value, value = arg[2:].partition("=")
        if key in flags and not has_value:
            line.flags.add(key)
            continue
        values = [value] if has_value else []
        if key not in options:
            key = key.replace("-", "_")  # --batch-size as --batch_size: fields are snake_case
        while not has_value and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if key in options:
            if len(values) != 1:
                raise SpecError([f"--{key}: give one value"])
            line.options[key] = values[0]
        elif not values:
            line.overrides.append(f"--{key}=True")
        elif len(values) == 1:
            line.overrides.append(f"--{key}={values[0]}")
        else:
            line.overrides.append(f"--{key}=[{', '.join(values)}]")
    return line


def load_command_spec(model: type[BaseModel], line: CommandLine, what: str, positional: str | None = None):
    """The command's spec: its `--spec` file (or defaults), the positional argument as the field `positional`
    (the model directory, as users type it), then the overrides; validated, or a SpecError."""
    data = read_yaml_mapping(line.options["spec"], what) if "spec" in line.options else {}
    if len(line.positionals) > (positional is not None):
        raise SpecError([f"unexpected argument(s): {' '.join(line.positionals)} (settings are --key=value)"])
    if line.positionals:
        data[positional] = line.positionals[0]
    return validate(model, apply_overrides(data, line.overrides))


def start_model_command(argv: list[str], doc: str, spec_class: type[BaseModel], label: str,
                        check: Callable[[Any], Any], errors: tuple[type[Exception], ...] = ()):
    """The start the commands on a converted model share (finetune, probe): --help, --print-schema, the spec with
    the model directory as its positional argument, the directory checked, then `check(spec)` (its inputs).
    Returns (command line, spec, what `check` returned), or the exit status where the command ends here."""
    if wants_help(argv, doc):
        return 0
    from tcd_ds.checks import check_converted_model

    try:
        line = parse_command_line(argv, options=("spec",), flags=("dry-run", "print-schema"))
        if "print-schema" in line.flags:
            return print_schema(spec_class)
        spec = load_command_spec(spec_class, line, label, positional="model")
        check_converted_model(spec.model, "model")
        checked = check(spec)
    except (SpecError, ValueError, *errors) as e:
        return refuse(f"invalid {label}", e)
    return line, spec, checked


def refuse(what: str, problem: Exception, prog: str = "tcd-ds") -> int:
    """Print a user's mistake as `prog: invalid WHAT:` and one indented line per problem; the exit status."""
    lines = str(problem).splitlines() or [type(problem).__name__]
    if len(lines) == 1:
        say(f"{prog}: {what}: {lines[0]}")
    else:
        say("\n".join([f"{prog}: {what}:", *(f"  {line.strip()}" for line in lines)]))
    return USAGE_ERROR


def say(message: str) -> None:
    """`message` and its newline to stderr in one write: under a launcher every rank's stderr is unbuffered and
    shared, and `print`'s separate writes of the text and the newline let two ranks' lines run into each other."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def print_schema(model: type[BaseModel]) -> int:
    print(json.dumps(model.model_json_schema(), indent=2))
    return 0


def wants_help(argv: list[str], doc: str) -> bool:
    if "-h" in argv or "--help" in argv:
        print(doc.strip())
        return True
    return False
