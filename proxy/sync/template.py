"""The subset of Go's text/template that regsync configurations use.

regsync expands credentials, targets and backup names with Go templates (`{{env "HUB_USER"}}`,
`{{file "/run/secrets/token"}}`, `{{ $t := time.Now }}{{printf "%d" $t.Year}}`, `{{.Ref.Tag}}`).
Users' files must keep working, so this evaluates exactly that language: text and actions with
`{{-`/`-}}` trimming, comments, variables (`$x := ...`), field chains on the data (`.Ref.Tag`)
and on values (`$t.Month`), function calls, parentheses and pipes, and the functions regclient
provides that make sense here. Control structures (`if`, `range`, ...) are refused with a clear
error rather than half supported.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["Template", "TemplateError"]

_MONTHS: Final = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
_WEEKDAYS: Final = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
_KEYWORDS: Final = frozenset(
    {"if", "else", "end", "range", "with", "define", "template", "block", "break", "continue"}
)
_TOKEN: Final = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*"|`[^`]*`)
      | (?P<number>-?\d+)
      | (?P<declare>:=)
      | (?P<assign>=)
      | (?P<pipe>\|)
      | (?P<open>\()
      | (?P<close>\))
      | (?P<variable>\$\w*(?:\.\w+)*)
      | (?P<field>(?:\.\w+)+|\.)
      | (?P<identifier>[A-Za-z_]\w*(?:\.\w+)*)
    )""",
    re.VERBOSE,
)
_VERB: Final = re.compile(r"%([-+ #0]*)(\d+)?(?:\.(\d+))?([a-zA-Z%])")


class TemplateError(ValueError):
    """A template that cannot be parsed or evaluated; the message quotes the template."""


class GoMonth(int):
    """time.Month: prints as its name, formats with %d as its number (as Go does)."""

    def __str__(self) -> str:
        return _MONTHS[self - 1]


class GoWeekday(int):
    """time.Weekday, Sunday = 0."""

    def __str__(self) -> str:
        return _WEEKDAYS[self]


@dataclass(frozen=True, slots=True)
class GoTime:
    """The fields and methods of Go's time.Time that templates use."""

    value: datetime.datetime

    @property
    def Year(self) -> int:
        return self.value.year

    @property
    def Month(self) -> GoMonth:
        return GoMonth(self.value.month)

    @property
    def Day(self) -> int:
        return self.value.day

    @property
    def Hour(self) -> int:
        return self.value.hour

    @property
    def Minute(self) -> int:
        return self.value.minute

    @property
    def Second(self) -> int:
        return self.value.second

    @property
    def YearDay(self) -> int:
        return self.value.timetuple().tm_yday

    @property
    def Weekday(self) -> GoWeekday:
        return GoWeekday(self.value.isoweekday() % 7)

    @property
    def Unix(self) -> int:
        return int(self.value.timestamp())

    def __str__(self) -> str:
        return self.value.strftime("%Y-%m-%d %H:%M:%S %z %Z").strip()


@dataclass(frozen=True, slots=True)
class _TimeFuncs:
    """regclient's `time` value: `time.Now`."""

    now: Callable[[], datetime.datetime]

    @property
    def Now(self) -> GoTime:
        return GoTime(self.now())


def _text(value: object) -> str:
    """Go's default formatting of a value (`{{.}}`, `%v`, `%s`)."""
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + " ".join(_text(item) for item in value) + "]"
    return str(value)


def _printf(pattern: str, *args: object) -> str:
    """fmt.Sprintf for the verbs templates use: %s %v %d %q %x %f %t %%, with flags and width."""
    remaining = list(args)

    def verb(match: re.Match[str]) -> str:
        flags, width, precision, conversion = match.groups()
        if conversion == "%":
            return "%"
        if not remaining:
            raise TemplateError(f"printf {pattern!r}: missing argument for %{conversion}")
        value = remaining.pop(0)
        spec = "%" + flags + (width or "") + (f".{precision}" if precision else "")
        if conversion in ("d", "x", "X", "o", "b"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TemplateError(f"printf {pattern!r}: %{conversion} of {_text(value)!r}")
            if conversion == "b":
                return (spec + "s") % format(value, "b")
            return (spec + conversion) % int(value)
        if conversion == "f":
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TemplateError(f"printf {pattern!r}: %f of {_text(value)!r}")
            return (spec + "f") % value
        if conversion == "q":
            return (spec + "s") % json.dumps(_text(value))
        if conversion in ("s", "v", "t"):
            return (spec + "s") % _text(value)
        raise TemplateError(f"printf {pattern!r}: unsupported verb %{conversion}")

    result = _VERB.sub(verb, pattern)
    if remaining:
        raise TemplateError(f"printf {pattern!r}: {len(remaining)} extra argument(s)")
    return result


def _read_file(path: str) -> str:
    """regclient's `file`: the content, trimmed; empty when it cannot be read."""
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _field(value: object, name: str, where: str) -> object:
    if isinstance(value, Mapping):
        if name not in value:
            raise TemplateError(f"{where}: no field {name!r}")
        return value[name]
    if name.startswith("_") or not hasattr(value, name):
        raise TemplateError(f"{where}: {_text(value)!r} has no field {name!r}")
    return getattr(value, name)


# -- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Literal:
    value: object


@dataclass(frozen=True, slots=True)
class _Variable:
    name: str  # "$" is the root data
    chain: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Field:
    chain: tuple[str, ...]  # () is "." itself


@dataclass(frozen=True, slots=True)
class _Call:
    name: str
    chain: tuple[str, ...]  # fields read off the function's result: `time.Now`


@dataclass(frozen=True, slots=True)
class _Group:
    pipeline: _Pipeline


_Operand = _Literal | _Variable | _Field | _Call | _Group
_Command = tuple[_Operand, ...]


@dataclass(frozen=True, slots=True)
class _Pipeline:
    declare: str | None  # `$x :=` or `$x =`
    commands: tuple[_Command, ...]


class _Parser:
    """Turns the inside of one action into a pipeline."""

    def __init__(self, source: str, where: str) -> None:
        self.where = where
        self.tokens: list[tuple[str, str]] = []
        position = 0
        source = source.strip()
        while position < len(source):
            match = _TOKEN.match(source, position)
            if match is None or match.end() == position:
                raise TemplateError(f"{where}: cannot parse {source[position:]!r}")
            kind = match.lastgroup
            assert kind is not None
            self.tokens.append((kind, match.group(kind)))
            position = match.end()
        self.position = 0

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self) -> tuple[str, str]:
        token = self.tokens[self.position]
        self.position += 1
        return token

    def parse(self) -> _Pipeline:
        pipeline = self._pipeline()
        extra = self._peek()
        if extra is not None:
            raise TemplateError(f"{self.where}: unexpected {extra[1]!r}")
        return pipeline

    def _pipeline(self) -> _Pipeline:
        declare = None
        if (
            len(self.tokens) > self.position + 1
            and self.tokens[self.position][0] == "variable"
            and self.tokens[self.position + 1][0] in ("declare", "assign")
        ):
            declare = self._take()[1]
            self._take()
        commands = [self._command()]
        while (token := self._peek()) is not None and token[0] == "pipe":
            self._take()
            commands.append(self._command())
        return _Pipeline(declare, tuple(commands))

    def _command(self) -> _Command:
        operands: list[_Operand] = []
        while (token := self._peek()) is not None and token[0] not in ("pipe", "close"):
            operands.append(self._operand())
        if not operands:
            raise TemplateError(f"{self.where}: empty command")
        return tuple(operands)

    def _operand(self) -> _Operand:
        kind, text = self._take()
        if kind == "string":
            value = text[1:-1] if text.startswith("`") else json.loads(text)
            return _Literal(value)
        if kind == "number":
            return _Literal(int(text))
        if kind == "variable":
            name, *chain = text.split(".")
            return _Variable(name, tuple(chain))
        if kind == "field":
            return _Field(tuple(part for part in text.split(".") if part))
        if kind == "identifier":
            name, *chain = text.split(".")
            if name in ("true", "false"):
                return _Literal(name == "true")
            if name == "nil":
                return _Literal(None)
            if name in _KEYWORDS:
                raise TemplateError(f"{self.where}: {{{{{name}}}}} is not supported")
            return _Call(name, tuple(chain))
        if kind == "open":
            pipeline = self._pipeline()
            if self._peek() is None or self._take()[0] != "close":
                raise TemplateError(f"{self.where}: unclosed parenthesis")
            return _Group(pipeline)
        raise TemplateError(f"{self.where}: unexpected {text!r}")


_Node = str | _Pipeline
_ACTION: Final = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)


def _parse(text: str) -> tuple[_Node, ...]:
    nodes: list[_Node] = []
    position = 0
    trim_next = False
    for match in _ACTION.finditer(text):
        literal = text[position : match.start()]
        if trim_next:
            literal = literal.lstrip()
        if match.group(1):
            literal = literal.rstrip()
        if literal:
            nodes.append(literal)
        trim_next = bool(match.group(3))
        position = match.end()
        inner = match.group(2).strip()
        if inner.startswith("/*"):
            if not inner.endswith("*/"):
                raise TemplateError(f"template {text!r}: unclosed comment")
            continue
        nodes.append(_Parser(inner, f"template {text!r}").parse())
    literal = text[position:]
    if trim_next:
        literal = literal.lstrip()
    if "{{" in literal:
        raise TemplateError(f"template {text!r}: unclosed action")
    if literal:
        nodes.append(literal)
    return tuple(nodes)


# -- evaluation -------------------------------------------------------------------------------


class _Evaluation:
    """One rendering: the variables, the data and the functions."""

    def __init__(
        self,
        where: str,
        data: object,
        env: Mapping[str, str],
        now: Callable[[], datetime.datetime],
    ) -> None:
        self.where = where
        self.data = data
        self.variables: dict[str, object] = {"$": data}
        self.functions: dict[str, Callable[..., object]] = {
            "env": lambda name: env.get(name, ""),
            "file": _read_file,
            "printf": _printf,
            "print": lambda *values: "".join(_text(v) for v in values),
            "default": lambda fallback, value=None: value or fallback,
            "lower": lambda value: str(value).lower(),
            "upper": lambda value: str(value).upper(),
            "trimSpace": lambda value: str(value).strip(),
            "time": lambda: _TimeFuncs(now),
        }

    def _chain(self, value: object, chain: tuple[str, ...], args: list[object]) -> object:
        for index, name in enumerate(chain):
            value = _field(value, name, self.where)
            if callable(value):
                value = value(*args) if index == len(chain) - 1 else value()
            elif args and index == len(chain) - 1:
                raise TemplateError(f"{self.where}: {name} is not a method; it takes no arguments")
        return value

    def _operand(self, operand: _Operand, args: list[object]) -> object:
        if isinstance(operand, _Literal):
            return operand.value
        if isinstance(operand, _Variable):
            if operand.name not in self.variables:
                raise TemplateError(f"{self.where}: undefined variable {operand.name}")
            return self._chain(self.variables[operand.name], operand.chain, args)
        if isinstance(operand, _Field):
            return self._chain(self.data, operand.chain, args)
        if isinstance(operand, _Group):
            return self.pipeline(operand.pipeline)
        function = self.functions.get(operand.name)
        if function is None:
            raise TemplateError(f"{self.where}: function {operand.name!r} not defined")
        if operand.chain:
            return self._chain(function(), operand.chain, args)
        try:
            return function(*args)
        except TypeError as exc:
            raise TemplateError(f"{self.where}: {operand.name}: wrong arguments ({exc})") from None

    def pipeline(self, pipeline: _Pipeline) -> object:
        value: object = None
        for index, command in enumerate(pipeline.commands):
            args = [self._operand(operand, []) for operand in command[1:]]
            if index:
                args.append(value)
            head = command[0]
            if args and isinstance(head, _Literal):
                raise TemplateError(f"{self.where}: {_text(head.value)!r} is not a function")
            value = self._operand(head, args)
        if pipeline.declare is not None:
            self.variables[pipeline.declare] = value
        return value


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template; parse once at load (errors then), render per use."""

    text: str
    nodes: tuple[_Node, ...]

    @classmethod
    def parse(cls, text: str) -> Template:
        return cls(text, _parse(text))

    def render(
        self,
        data: object = None,
        *,
        env: Mapping[str, str] | None = None,
        now: Callable[[], datetime.datetime] | None = None,
    ) -> str:
        evaluation = _Evaluation(
            f"template {self.text!r}",
            data,
            os.environ if env is None else env,
            now or (lambda: datetime.datetime.now().astimezone()),
        )
        parts = []
        for node in self.nodes:
            if isinstance(node, str):
                parts.append(node)
            else:
                value = evaluation.pipeline(node)
                if node.declare is None:
                    parts.append(_text(value))
        return "".join(parts)
