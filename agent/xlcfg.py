"""The xl.cfg(5) grammar, read the way libxlu (xl's own parser) reads it.

Domain configs and snapshot cfgfiles both use it. The rule throughout: what
`parse` accepts, xl accepts with the same meaning, so a file can go to either
tool (a test holds it to Xen 4.17's libxlu on thousands of inputs). As in
libxlu, a number keeps its text (`007`, `0x200`: see Number), a setting made
with `+=` is never read as a number (see Appended), and lists may nest (xl
reads `vnuma` and `vsnd` so). Where libxlu is lax in a way that changes or
hides meaning, `parse` refuses with a message instead:

- a number token that is not decimal, `0x` hex or leading-zero octal, or is
  larger than a C long (libxlu lexes `12abc` or `09` as a number and fails
  only when it is read as one);
- `\\x` and octal escapes in strings (libxlu rejects every `\\xHH`, and drops
  an octal escape from the string without a word);
- a character libxlu cannot lex as the very last one of the input (libxlu
  ignores it, where anywhere else it is an error).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, TypeAlias, TypeVar, overload

from .errors import InvalidArgument

Scalar: TypeAlias = str | int
Value: TypeAlias = Scalar | list["Value"]
# What dump writes: values, and tuples where lists are.
Writable: TypeAlias = Scalar | Sequence["Writable"]

MAX_TEXT: Final = 1 << 20
MAX_SETTINGS: Final = 10_000
MAX_DEPTH: Final = 64
COMMAND_LINE: Final = "<command line>"

# libxlu's lexer: lower case only, and no leading underscore.
_KEY: Final = re.compile(r"[a-z][a-z0-9_.]*")
_KEY_RULE: Final = "xl.cfg keys are lower-case letters, digits, '_' and '.', starting with a letter"
# What libxlu's strtol(..., 0) reads fully; a NUMBER token has no sign and
# only lower-case hex digits, because that is all the lexer lets through.
_NUMBER_TOKEN: Final = re.compile(r"0x[0-9a-f]+|0[0-7]*|[1-9][0-9]*")
_C_LONG: Final = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_LONG_MIN: Final = -(1 << 63)
_LONG_MAX: Final = (1 << 63) - 1
_WORD_TAIL: Final = re.compile(r"[A-Za-z0-9_.]*")
_BLANKS: Final = re.compile(r"[ \t]*")
_DIGITS: Final = frozenset("0123456789")
_WORD_START: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_STRING_RUN: Final = {quote: re.compile(f"[^{quote}\\\\\\n\\0]*") for quote in "'\""}
_ESCAPES: Final = {
    '"': '"',
    "'": "'",
    "\\": "\\",
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
}
# dump writes double-quoted strings, which need no escaped "'".
_QUOTE_TABLE: Final = str.maketrans({char: "\\" + code for code, char in _ESCAPES.items() if char != "'"})


class Number(str):
    """An unquoted number as written (`007`, `0x200`): libxlu keeps a number's
    text, so it reads as that string, and as an integer only through get_int."""


class Appended(str):
    """A string setting made or grown by `+=`: libxlu concatenates the text
    (`x = 5` then `x += 6` is "56") and never reads such a setting as a number."""


class XlCfgError(InvalidArgument):
    """Malformed xl.cfg text, located by 1-based line and column.

    `override` is the index into `parse`'s overrides when the fault is in one
    of them (the source is then "<command line>"), else None.
    """

    def __init__(self, source: str, line: int, column: int, why: str, override: int | None = None) -> None:
        where = source if override is None else f"{source}[{override}]"
        super().__init__(f"{where}:{line}:{column}: {why}", reason="INVALID_CONFIG", source=where,
                         line=str(line), column=str(column))
        self.source = source
        self.line = line
        self.column = column
        self.why = why
        self.override = override


@dataclass(frozen=True)
class _Origin:
    source: str
    override: int | None = None

    def error(self, line: int, column: int, reason: str) -> XlCfgError:
        return XlCfgError(self.source, line, column, reason, self.override)


class _Kind(enum.StrEnum):
    WORD = "word"
    NUMBER = "number"
    STRING = "string"
    ASSIGN = "'='"
    APPEND = "'+='"
    OPEN = "'['"
    CLOSE = "']'"
    COMMA = "','"
    SEMICOLON = "';'"
    NEWLINE = "end of line"
    EOF = "end of input"


_PUNCTUATION: Final = {
    "=": _Kind.ASSIGN,
    "[": _Kind.OPEN,
    "]": _Kind.CLOSE,
    ",": _Kind.COMMA,
    ";": _Kind.SEMICOLON,
}
_END_OF_STATEMENT: Final = frozenset({_Kind.NEWLINE, _Kind.SEMICOLON, _Kind.EOF})


class _Token(NamedTuple):
    kind: _Kind
    value: str
    line: int
    column: int

    def describe(self) -> str:
        if self.kind is _Kind.WORD:
            return f"{self.value!r}"
        if self.kind is _Kind.NUMBER:
            return f"number {self.value}"
        if self.kind is _Kind.STRING:
            return f"string {_abbreviate(str(self.value))!r}"
        return self.kind.value


def _abbreviate(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Lexer:
    """Turns text into tokens on demand, so an error is reported where the parser meets it."""

    def __init__(self, text: str, origin: _Origin, terminated: bool) -> None:
        self._text = text
        self._origin = origin
        # Whether xl reads a newline after this text (it adds one after the
        # file when overrides follow, and after each override).
        self._terminated = terminated
        self._pos = 0
        self._line = 1
        self._line_start = 0

    def next(self) -> _Token:
        self._skip_blanks()
        if self._pos >= len(self._text):
            return self._token(_Kind.EOF, "", self._pos)
        char = self._text[self._pos]
        if char in "\n#":
            return self._newline()
        if char in "'\"":
            return self._string()
        if char in _DIGITS:
            return self._number()
        if char in _WORD_START:
            return self._word()
        if self._text.startswith("+=", self._pos):
            return self._advance(_Kind.APPEND, "+=", 2)
        if char in _PUNCTUATION:
            return self._advance(_PUNCTUATION[char], char, 1)
        raise self._error(self._pos, _unexpected(char, self._text[self._pos + 1 : self._pos + 2]))

    def _skip_blanks(self) -> None:
        match = _BLANKS.match(self._text, self._pos)
        assert match is not None
        self._pos = match.end()

    def _token(self, kind: _Kind, value: str, start: int) -> _Token:
        return _Token(kind, value, self._line, start - self._line_start + 1)

    def _error(self, pos: int, reason: str) -> XlCfgError:
        return self._origin.error(self._line, pos - self._line_start + 1, reason)

    def _advance(self, kind: _Kind, value: str, length: int) -> _Token:
        token = self._token(kind, value, self._pos)
        self._pos += length
        return token

    def _newline(self) -> _Token:
        # A comment is part of the newline that ends it, as in libxlu; that is
        # what lets comments sit between the items of a list.
        token = self._token(_Kind.NEWLINE, "", self._pos)
        end = self._text.find("\n", self._pos)
        if end < 0 and not self._terminated:
            raise self._error(self._pos, "a comment at the end of the input needs a newline after it (xl rejects it)")
        if end < 0:
            self._pos = len(self._text)
        else:
            self._pos = self._line_start = end + 1
            self._line += 1
        return token

    def _word(self) -> _Token:
        match = _WORD_TAIL.match(self._text, self._pos + 1)
        assert match is not None  # the pattern matches the empty string
        return self._advance(_Kind.WORD, self._text[self._pos : match.end()], match.end() - self._pos)

    def _number(self) -> _Token:
        match = _WORD_TAIL.match(self._text, self._pos)
        assert match is not None
        text = match.group()
        if not _NUMBER_TOKEN.fullmatch(text):
            raise self._error(self._pos, _bad_number(text))
        if _c_integer(text) > _LONG_MAX:
            raise self._error(self._pos, f"number {_abbreviate(text)} is too large (at most {_LONG_MAX})")
        return self._advance(_Kind.NUMBER, Number(text), len(text))

    def _string(self) -> _Token:
        start = self._pos
        quote = self._text[start]
        pieces: list[str] = []
        pos = start + 1
        while True:
            match = _STRING_RUN[quote].match(self._text, pos)
            assert match is not None
            pieces.append(match.group())
            pos = match.end()
            char = self._text[pos : pos + 1]
            if char == quote:
                break
            if char == "\0":
                raise self._error(pos, "NUL character in a string")
            if char != "\\":
                raise self._error(start, "unterminated string")
            pieces.append(self._escape(start, pos))
            pos += 2
        self._pos = pos + 1
        return self._token(_Kind.STRING, "".join(pieces), start)

    def _escape(self, start: int, pos: int) -> str:
        code = self._text[pos + 1 : pos + 2]
        if code in _ESCAPES:
            return _ESCAPES[code]
        if code in ("", "\n"):
            raise self._error(start, "unterminated string")
        if code == "x" or code in "01234567":
            reason = f"escape '\\{code}' is not supported: xl misreads \\x and octal escapes"
            raise self._error(pos, f"{reason}; write the character itself")
        if code.isprintable():
            raise self._error(pos, f"invalid escape '\\{code}' in a string")
        raise self._error(pos, f"invalid character {code!r} after a backslash in a string")


def _unexpected(char: str, following: str) -> str:
    if char == "\r":
        return "carriage return: xl.cfg lines end with LF only (is this a CRLF file?)"
    if char == "-" and following in _DIGITS:
        return "xl.cfg has no negative numbers; write the value as a string"
    return f"unexpected character {char!r}"


def _bad_number(text: str) -> str:
    shown = _abbreviate(text)
    if "." in text and text.replace(".", "", 1).isdecimal():
        return f"xl.cfg has no fractional numbers; write {shown} as a string"
    return f"invalid number {shown!r} (decimal, 0x hex or 0 octal; quote it if it is a string)"


def _c_integer(digits: str) -> int:
    """Reads digits the way C's strtol with base 0 does (a leading 0 means octal)."""
    if digits[:2] in ("0x", "0X"):
        return int(digits[2:], 16)
    if digits.startswith("0"):
        return int(digits, 8)
    if len(digits) > 19:
        # Out of range whatever the digits, and int() refuses very long decimals.
        return _LONG_MAX + 1
    return int(digits)


class _Settings:
    """Settings parsed so far, with libxlu's meaning of '=' and '+='."""

    def __init__(self) -> None:
        self.values: dict[str, Value] = {}
        # Strings grown by '+=' are joined once at the end: repeated
        # concatenation would make a long run of appends quadratic.
        self._pieces: dict[str, list[str]] = {}

    def assign(self, key: str, value: Value) -> None:
        self.values[key] = value
        self._pieces.pop(key, None)

    def append(self, key: str, value: Value) -> None:
        old = self.values.get(key)
        if isinstance(old, list) and isinstance(value, list):
            old.extend(value)
        elif isinstance(old, str) and isinstance(value, str):
            self._pieces.setdefault(key, [old]).append(value)
        else:
            self.assign(key, Appended(value) if isinstance(value, str) else value)

    def result(self) -> dict[str, Value]:
        for key, pieces in self._pieces.items():
            self.values[key] = Appended("".join(pieces))
        self._pieces.clear()
        return self.values


class _Parser:
    """Recursive descent over libxlu's grammar, stopping at the first error."""

    def __init__(self, text: str, origin: _Origin, settings: _Settings, *, terminated: bool) -> None:
        self._lexer = _Lexer(text, origin, terminated)
        self._origin = origin
        self._settings = settings

    def file(self) -> int:
        """Parses every statement; returns how many settings it held."""
        count = 0
        while (token := self._lexer.next()).kind is not _Kind.EOF:
            if token.kind in _END_OF_STATEMENT:
                continue
            key = self._assignment(token)
            count += 1
            end = self._lexer.next()
            if end.kind not in _END_OF_STATEMENT:
                reason = f"expected ';' or a new line after the value of {key!r}"
                raise self._error(end, f"{reason}, found {end.describe()}")
            if end.kind is _Kind.EOF:
                break
        return count

    def _error(self, token: _Token, reason: str) -> XlCfgError:
        return self._origin.error(token.line, token.column, reason)

    def _assignment(self, key_token: _Token) -> str:
        key = self._key(key_token)
        operator = self._lexer.next()
        if operator.kind not in (_Kind.ASSIGN, _Kind.APPEND):
            raise self._error(operator, f"expected '=' after {key!r}, found {operator.describe()}")
        value_token = self._lexer.next()
        value = self._value(value_token, operator)
        if key not in self._settings.values and len(self._settings.values) >= MAX_SETTINGS:
            raise self._error(key_token, f"too many settings (the limit is {MAX_SETTINGS})")
        if operator.kind is _Kind.APPEND:
            self._append(key, value, value_token)
        else:
            self._settings.assign(key, value)
        return key

    def _key(self, token: _Token) -> str:
        if token.kind is _Kind.WORD and _KEY.fullmatch(str(token.value)):
            return str(token.value)
        if token.kind is _Kind.WORD:
            raise self._error(token, f"invalid key {token.value!r}: {_KEY_RULE}")
        raise self._error(token, f"expected a setting (KEY = VALUE), found {token.describe()}")

    def _value(self, token: _Token, operator: _Token) -> Value:
        if token.kind in (_Kind.STRING, _Kind.NUMBER):
            return token.value
        if token.kind is _Kind.OPEN:
            return self._list(token, 1)
        raise self._error(token, f"expected a value after {operator.value!r}{_found_instead(token)}")

    def _list(self, opening: _Token, depth: int) -> list[Value]:
        if depth > MAX_DEPTH:
            raise self._error(opening, f"lists nested too deeply (the limit is {MAX_DEPTH})")
        items: list[Value] = []
        while True:
            token = self._skip_newlines()
            if token.kind is _Kind.CLOSE:
                return items
            items.append(self._item(token, opening, depth))
            token = self._skip_newlines()
            if token.kind is _Kind.CLOSE:
                return items
            if token.kind is not _Kind.COMMA:
                raise self._list_error(token, opening, "expected ',' or ']' in the list")

    def _item(self, token: _Token, opening: _Token, depth: int) -> Value:
        if token.kind in (_Kind.STRING, _Kind.NUMBER):
            return token.value
        if token.kind is _Kind.OPEN:
            return self._list(token, depth + 1)
        raise self._list_error(token, opening, "expected a value or ']' in the list")

    def _list_error(self, token: _Token, opening: _Token, reason: str) -> XlCfgError:
        if token.kind is _Kind.EOF:
            return self._error(opening, "unclosed list: no ']' matches this '['")
        return self._error(token, f"{reason}{_found_instead(token)}")

    def _skip_newlines(self) -> _Token:
        while (token := self._lexer.next()).kind is _Kind.NEWLINE:
            pass
        return token

    def _append(self, key: str, value: Value, token: _Token) -> None:
        old = self._settings.values.get(key)
        if old is not None and isinstance(old, list) != isinstance(value, list):
            raise self._error(token, f"'+=' cannot add a {_kind_of(value)} to the {_kind_of(old)} {key!r}")
        self._settings.append(key, value)


def _found_instead(token: _Token) -> str:
    if token.kind is _Kind.WORD:
        return f", found the unquoted word {token.value!r} (strings must be quoted)"
    return f", found {token.describe()}"


def _kind_of(value: Value) -> str:
    return "list" if isinstance(value, list) else "string"


def parse(text: str, overrides: Sequence[str] = (), *, source: str = "<config>") -> dict[str, Value]:
    """Parses xl.cfg text, then each `KEY=VALUE` override after it, as `xl create` does.

    An override is parsed like a line of the file (so `name=x` is an error:
    strings must be quoted) and must hold at least one setting. Later settings
    replace earlier ones; `+=` extends a list or a string (a number's text
    counts as a string, as in xl).
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of KEY=VALUE strings, not one string")
    size = len(text) + sum(len(override) for override in overrides)
    if size > MAX_TEXT:
        raise XlCfgError(source, 1, 1, f"config too large ({size} characters; the limit is {MAX_TEXT})")
    settings = _Settings()
    _Parser(text, _Origin(source), settings, terminated=bool(overrides)).file()
    for index, override in enumerate(overrides):
        origin = _Origin(COMMAND_LINE, index)
        if _Parser(override, origin, settings, terminated=True).file() == 0:
            raise origin.error(1, 1, f"expected KEY=VALUE, found {_abbreviate(override)!r}")
    return settings.result()


def dump(cfg: Mapping[str, Writable]) -> str:
    """Writes canonical xl.cfg text: one `key = value` line per setting, in order.

    `parse(dump(cfg)) == cfg` for every cfg that `parse` returns, and xl reads
    both the same: a Number is written as its text, an Appended string with
    `+=`. Values xl.cfg cannot express (negative numbers, NUL characters,
    bools) raise InvalidArgument rather than being written as something else.
    """
    return "".join(
        f"{_dump_key(key)} {'+=' if isinstance(value, Appended) else '='} {_dump_value(key, value)}\n"
        for key, value in cfg.items()
    )


def _dump_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise InvalidArgument(f"cannot write key {key!r}: {_KEY_RULE}")
    return key


def _dump_value(key: str, value: object) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_dump_value(key, item) for item in value) + "]"
    if isinstance(value, Number) and _NUMBER_TOKEN.fullmatch(value) and _c_integer(value) <= _LONG_MAX:
        return str(value)
    if isinstance(value, str):
        if "\0" in value:
            raise InvalidArgument(f"cannot write {key!r}: xl.cfg strings cannot hold NUL characters")
        return '"' + value.translate(_QUOTE_TABLE) + '"'
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value <= _LONG_MAX:
            raise InvalidArgument(f"cannot write {key!r} = {value}: xl.cfg numbers are 0 to {_LONG_MAX}")
        return str(value)
    raise InvalidArgument(f"cannot write {key!r}: a {type(value).__name__} is not an xl.cfg value")


_T = TypeVar("_T")


class _Required(enum.Enum):
    TOKEN = enum.auto()


_REQUIRED: Final = _Required.TOKEN


def _missing(key: str, default: object) -> object:
    if default is _REQUIRED:
        raise InvalidArgument(f"missing setting {key!r}")
    return default


@overload
def get_str(cfg: Mapping[str, Value], key: str) -> str: ...
@overload
def get_str(cfg: Mapping[str, Value], key: str, default: _T) -> str | _T: ...
def get_str(cfg: Mapping[str, Value], key: str, default: object = _REQUIRED) -> object:
    """A string setting; a number reads as its text as written, as in xl."""
    value = cfg.get(key)
    if value is None:
        return _missing(key, default)
    if isinstance(value, list):
        raise InvalidArgument(f"setting {key!r} must be a string, not a list")
    return str(value)


@overload
def get_int(cfg: Mapping[str, Value], key: str) -> int: ...
@overload
def get_int(cfg: Mapping[str, Value], key: str, default: _T) -> int | _T: ...
def get_int(cfg: Mapping[str, Value], key: str, default: object = _REQUIRED) -> object:
    """An integer setting; like xl, a string such as "512" or "0x200" counts
    too, and a setting made with `+=` does not."""
    value = cfg.get(key)
    if value is None:
        return _missing(key, default)
    if isinstance(value, int):
        return value
    if isinstance(value, Appended):
        raise InvalidArgument(f"setting {key!r} was made with '+=', which xl never reads as a number")
    number = _c_long(value) if isinstance(value, str) else None
    if number is None:
        shown = "a list" if isinstance(value, list) else repr(_abbreviate(value))
        raise InvalidArgument(f"setting {key!r} must be an integer, not {shown}")
    return number


@overload
def get_list(cfg: Mapping[str, Value], key: str) -> list[str]: ...
@overload
def get_list(cfg: Mapping[str, Value], key: str, default: _T) -> list[str] | _T: ...
def get_list(cfg: Mapping[str, Value], key: str, default: object = _REQUIRED) -> object:
    """A list setting as strings (numbers as their text), which is how xl reads items."""
    value = cfg.get(key)
    if value is None:
        return _missing(key, default)
    if not isinstance(value, list):
        raise InvalidArgument(f"setting {key!r} must be a list, not {_abbreviate(str(value))!r}")
    if any(isinstance(item, list) for item in value):
        # xl's own loops stop at a nested item without a word.
        raise InvalidArgument(f"setting {key!r} must be a list of strings, not of lists")
    return [str(item) for item in value]


def _c_long(text: str) -> int | None:
    """C's strtol(text, &end, 0) when it must consume all of text, else None."""
    match = _C_LONG.fullmatch(text)
    if match is None:
        return None
    sign, digits = match.groups()
    number = -_c_integer(digits) if sign == "-" else _c_integer(digits)
    return number if _LONG_MIN <= number <= _LONG_MAX else None
