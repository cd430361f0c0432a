"""Command-line options built from config dataclasses (by simple-parsing): one home for the CLI of a config.

Each field of a config dataclass becomes one option named after it (`batch_size` -> `--batch-size`),
with the docstring under the field as its help and its default shown, so the code, the help and the
docs cannot drift apart. A field annotated `Count` takes `50M`, `3k` or `1e6`; a bool field gives
`--name` and `--no-name`; `field(type=comma_list(int))` takes `16,32,64`. A bad value is argparse's
one-line error with exit 2. Every subcommand's parser is a `ConfigParser` (see traitscope.cli):

    add_config(parser, FinetuneConfig, dest="cfg")    # in add_arguments(parser)
    cfg = args.cfg                                    # in run(args): a FinetuneConfig

Checking a config's values is the config's own `validate()`; this module only turns text into values.
"""

import argparse
import re
from typing import Callable, NewType

import simple_parsing
from simple_parsing.wrappers import DataclassWrapper, FieldWrapper
from simple_parsing.wrappers.field_parsing import register_parsing_fn

from traitscope.errors import TraitscopeError

Count = NewType("Count", int)
"""A whole, non-negative count that also reads as '50M', '3k', '1e6' or '2.5M'."""

_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}


def parse_count(text: str | int | float) -> int:
    """'50M', '1e6', '250k', '2.5M', 4096 -> an integer count."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgb]?)\s*", str(text).replace("_", ""),
                             re.IGNORECASE)
        if not match:
            raise TraitscopeError(f"{text!r} is not a count (examples: 50M, 1e6, 250k, 4096)")
        value = float(match.group(1)) * _SUFFIXES.get(match.group(2).lower(), 1)
    if value != int(value) or value < 0:
        raise TraitscopeError(f"{text!r} is not a whole, non-negative count")
    return int(value)


def option_type(parse: Callable, name: str) -> Callable[[str], object]:
    """`parse` as an option's type (`field(type=...)`): its TraitscopeError becomes argparse's one-line
    error naming the option."""
    def parse_arg(text: str):
        try:
            return parse(text)
        except TraitscopeError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse_arg.__name__ = name
    return parse_arg


register_parsing_fn(Count, option_type(parse_count, "count"))


def comma_list(parse: Callable = str) -> Callable[[str], tuple]:
    """A parser of '16,32,64' (items read by `parse`) into a tuple, for `field(type=comma_list(int))`."""
    def parse_item(part: str):
        try:
            return parse(part)
        except TraitscopeError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a valid {parse.__name__}") from None

    def parse_list(text: str) -> tuple:
        return tuple(parse_item(part.strip()) for part in str(text).split(",") if part.strip())
    parse_list.__name__ = "comma list"
    return parse_list


class ConfigParser(simple_parsing.ArgumentParser):
    """An argparse parser that also takes config dataclasses (`add_config`); options spelled with dashes."""

    def __init__(self, *args, parents=(), **kwargs):
        kwargs.setdefault("formatter_class", argparse.HelpFormatter)
        super().__init__(*args, add_option_string_dash_variants=simple_parsing.DashVariant.DASH,
                         add_config_path_arg=False, **kwargs)
        for parent in parents:  # simple-parsing keeps `parents` but does not add their options
            self._add_container_actions(parent)
            self._defaults.update(parent._defaults)


def add_config(parser: ConfigParser, cls: type, dest: str, given_only: bool = False) -> None:
    """One option per field of the dataclass `cls` (nested dataclasses too); `args.<dest>` is the instance,
    or with `given_only` a dict of the values given on the command line (no attribute when none was)."""
    parser.add_arguments(cls, dest=dest, default=argparse.SUPPRESS if given_only else None,
                         dataclass_wrapper_class=_Config)


def show_default(value) -> str:
    """A default as the help shows it: 50_000_000, (8, 16, 32) as 8,16,32."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 10_000:
        return f"{value:_}"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


class _Option(FieldWrapper):
    """Our conventions on top of simple-parsing's: metavar from the name, `--no-` for bools, one value
    for optional fields, and the default at the end of the help."""

    @property
    def arg_options(self) -> dict:
        if self._arg_options:
            return self._arg_options
        options = super().arg_options
        if self.is_bool and "action" not in self.custom_arg_options:
            for key in ("type", "nargs", "metavar", "_conflict_prefix"):
                options.pop(key, None)
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["metavar"] = self.custom_arg_options.get("metavar", self.name.upper())
            if "nargs" not in self.custom_arg_options and (
                    options.get("nargs") == "?" or "type" in self.custom_arg_options):
                options.pop("nargs", None)  # one value: `--image-size` alone is an error, `--ks 8,16` one list
        if options.get("default") not in (None, "") and not options.get("required"):
            options["help"] = f"{options.get('help') or ''} (default: {show_default(options['default'])})".lstrip()
        if options.get("help"):  # a docstring is text, not an argparse format ('under 1% in' is a '% i' conversion)
            options["help"] = options["help"].replace("%", "%%")
        self._arg_options = options
        return options


class _Config(DataclassWrapper):
    """A config's option group: titled by the class name, its options built by `_Option`."""

    def __init__(self, *args, **kwargs):
        kwargs["field_wrapper_class"] = _Option
        super().__init__(*args, **kwargs)
        # simple-parsing builds the wrappers of nested dataclasses with its own class: rebuild them with ours
        for i, child in enumerate(self._children):
            ours = _Config(child.dataclass, child.name, default=child._default, parent=self, _field=child._field)
            ours.required, ours.optional = child.required, child.optional
            self._children[i] = ours

    @property
    def title(self) -> str:
        return self.dataclass.__name__

    @property
    def description(self) -> str:
        return super().description.split("\n\n")[0]  # the first paragraph
