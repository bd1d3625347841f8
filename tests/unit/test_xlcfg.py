"""The xl.cfg parser: real configs, exact error locations, overrides, and round trips.

test_xl_differential.py holds the parser to Xen 4.17's own; these pin its API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domsnap.agent.errors import InvalidArgument
from domsnap.agent.xlcfg import (
    MAX_SETTINGS,
    MAX_TEXT,
    Appended,
    Number,
    Scalar,
    Value,
    XlCfgError,
    dump,
    get_int,
    get_list,
    get_str,
    parse,
)

PV_GUEST = r"""# A PV guest, written the way people write them.
name = "debian-pv"
type = "pv"
memory = 512 ; maxmem = 0x400   # hex, like xl's strtol
vcpus = 2
kernel = "/boot/vmlinuz-6.1.0-13-amd64"
ramdisk = '/boot/initrd.img-6.1.0-13-amd64'
extra = "root=/dev/xvda1 ro console=hvc0 quiet"

disk = [ '/srv/xen/debian-pv.qcow2,qcow2,xvda,w',   # root
         'phy:/dev/vg0/debian-swap,xvdb,w',

         'format=raw, vdev=xvdc, access=ro, target=/srv/iso/tools.iso',
       ]
vif = [ 'mac=00:16:3e:12:34:56,bridge=xenbr0', ]
on_crash = 'coredump-restart';;
description = "tab\there, \"double\", \'single\', back\\slash, bell\a"
cpus = []
"""


def test_pv_guest() -> None:
    assert parse(PV_GUEST, source="debian-pv.cfg") == {
        "name": "debian-pv",
        "type": "pv",
        "memory": "512",
        "maxmem": "0x400",
        "vcpus": "2",
        "kernel": "/boot/vmlinuz-6.1.0-13-amd64",
        "ramdisk": "/boot/initrd.img-6.1.0-13-amd64",
        "extra": "root=/dev/xvda1 ro console=hvc0 quiet",
        "disk": [
            "/srv/xen/debian-pv.qcow2,qcow2,xvda,w",
            "phy:/dev/vg0/debian-swap,xvdb,w",
            "format=raw, vdev=xvdc, access=ro, target=/srv/iso/tools.iso",
        ],
        "vif": ["mac=00:16:3e:12:34:56,bridge=xenbr0"],
        "on_crash": "coredump-restart",
        "description": "tab\there, \"double\", 'single', back\\slash, bell\a",
        "cpus": [],
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("\n\n;;\n# only a comment\n", {}),
        ("a = 1", {"a": "1"}),
        ("a=1;b=2;", {"a": "1", "b": "2"}),
        ("a = 010", {"a": "010"}),  # numbers keep their text, as in xl
        ("a = 0", {"a": "0"}),
        ("a = 9223372036854775807", {"a": "9223372036854775807"}),
        ("a.b_c9 = 'x'", {"a.b_c9": "x"}),
        ("a = 1\na = 'two'", {"a": "two"}),
        ("l = [\n# a comment inside\n1\n,\n'x'\n,\n]", {"l": ["1", "x"]}),
        ("s = 'a#b' # c\n", {"s": "a#b"}),
        ("vnuma = [ [ 'pnode=0', 10 ], [] ]", {"vnuma": [["pnode=0", "10"], []]}),
        ('s = "it\'s"', {"s": "it's"}),
        ("s = 'say \"hi\"'", {"s": 'say "hi"'}),
        ("s = '\\r\\n\\t\\v\\f\\b\\a\\\\'", {"s": "\r\n\t\v\f\b\a\\"}),
        ("s = 'caf\u00e9 \x01 \t'", {"s": "caf\u00e9 \x01 \t"}),
        ("s = ''", {"s": ""}),
        ("\t a \t=\t1\t", {"a": "1"}),
    ],
)
def test_grammar(text: str, expected: dict[str, Value]) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("l = [1]\nl += [2, 3]", {"l": ["1", "2", "3"]}),
        ("l += ['x']", {"l": ["x"]}),
        ("s = 'ab'\ns += 'cd'\ns += ''\ns += 'ef'", {"s": "abcdef"}),
        ("s = 'ab'\ns += 'cd'\ns = 'new'", {"s": "new"}),
        ("s += 'x'", {"s": "x"}),
        ("n = 5\nn += 6", {"n": "56"}),  # a number's text, as in xl
        ("n += 0x1", {"n": "0x1"}),
    ],
)
def test_append(text: str, expected: dict[str, Value]) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize("text", ["n = 5\nn += 6", "n += 5", "n += '5'", "n = 'x'\nn += '5'"])
def test_appended_settings_are_never_numbers(text: str) -> None:
    """libxlu refuses get_long on a setting made with '+=', whatever its text."""
    cfg = parse(text)
    with pytest.raises(InvalidArgument, match=r"made with '\+='"):
        get_int(cfg, "n")
    assert dump(cfg).startswith("n += ")
    assert parse("n = 'x'\n" + dump(cfg)) == {"n": "x" + get_str(cfg, "n")}


def test_many_appends_stay_fast() -> None:
    text = "s = ''\n" + "s += 'x'\n" * 100_000
    assert parse(text) == {"s": "x" * 100_000}


# (text, line, column, words the message must contain)
ERRORS = [
    ('name = "debian\nmemory = 1', 1, 8, "unterminated string"),
    ("name = 'a\\", 1, 8, "unterminated string"),
    ("\n\nname = 'debian", 3, 8, "unterminated string"),
    ("memory 256", 1, 8, "expected '=' after 'memory', found number 256"),
    ("memory\n= 256", 1, 7, "expected '=' after 'memory', found end of line"),
    ("Memory = 256", 1, 1, "invalid key 'Memory'"),
    ("_private = 1", 1, 1, "invalid key '_private'"),
    ("a = 1\n9lives = 1", 2, 1, "invalid number '9lives'"),
    ("'key' = 1", 1, 1, "expected a setting"),
    ("= 1", 1, 1, "expected a setting (KEY = VALUE), found '='"),
    ("a = 1\nb = 2\nmemory = \n", 3, 10, "expected a value after '='"),
    ("name = debian", 1, 8, "unquoted word 'debian'"),
    ("a =", 1, 4, "expected a value after '=', found end of input"),
    ("a += ;", 1, 6, "expected a value after '+='"),
    ("disk = [ 'a',\n  'b'\n", 1, 8, "unclosed list"),
    ("disk = [ 'a'\nmemory = 1", 2, 1, "expected ',' or ']' in the list, found the unquoted word 'memory'"),
    ("disk = [ 'a' 'b' ]", 1, 14, "expected ',' or ']'"),
    ("disk = [ , ]", 1, 10, "expected a value or ']' in the list, found ','"),
    ("disk = [ 'a',, ]", 1, 14, "expected a value or ']'"),
    ("a = " + "[" * 65 + "]" * 65, 1, 69, "lists nested too deeply"),
    ("memory = 256 MiB", 1, 14, "found 'MiB'"),
    ("memory = 256 # MiB\nvcpus = 2 4", 2, 11, "after the value of 'vcpus', found number 4"),
    ("a = 'x' 'y'", 1, 9, "found string 'y'"),
    ("a = [1] ]", 1, 9, "found ']'"),
    ("a = 1.5", 1, 5, "no fractional numbers"),
    ("a = -1", 1, 5, "no negative numbers"),
    ("a = 0x", 1, 5, "invalid number '0x'"),
    ("a = 0xFF", 1, 5, "invalid number"),
    ("a = 08", 1, 5, "invalid number '08'"),
    ("a = 12abc", 1, 5, "invalid number"),
    ("a = 9223372036854775808", 1, 5, "too large"),
    ("a = 0x8000000000000000", 1, 5, "too large"),
    ("a = 'x\\x41'", 1, 7, "escape '\\x' is not supported"),
    ("a = 'x\\101'", 1, 7, "escape '\\1' is not supported"),
    ("a = 'x\\q'", 1, 7, "invalid escape '\\q'"),
    ("a = 'x\\\x01'", 1, 7, "invalid character '\\x01' after a backslash"),
    ("a = 'x\0'", 1, 7, "NUL character"),
    ("a = 1\r\nb = 2\r\n", 1, 6, "carriage return"),
    ("a = 1 ? 2", 1, 7, "unexpected character '?'"),
    ("a = (1)", 1, 5, "unexpected character '('"),
    ("a = 1 # MiB", 1, 7, "a comment at the end of the input needs a newline"),
    ("a = 1\n#", 2, 1, "a comment at the end of the input needs a newline"),
    ("a = 'x'\na += ['y']", 2, 6, "cannot add a list to the string 'a'"),
    ("a = ['x']\na += 'y'", 2, 6, "cannot add a string to the list 'a'"),
]


@pytest.mark.parametrize(("text", "line", "column", "reason"), ERRORS)
def test_error_location(text: str, line: int, column: int, reason: str) -> None:
    with pytest.raises(XlCfgError) as caught:
        parse(text, source="guest.cfg")
    err = caught.value
    assert (err.source, err.line, err.column, err.override) == ("guest.cfg", line, column, None)
    assert reason in err.why
    assert str(err) == f"guest.cfg:{line}:{column}: {err.why}"


def test_error_message_format() -> None:
    with pytest.raises(XlCfgError) as caught:
        parse("a = 1\nb = 2\nmemory = \n", source="guest.cfg")
    assert str(caught.value) == "guest.cfg:3:10: expected a value after '=', found end of line"
    assert isinstance(caught.value, InvalidArgument)


def test_overrides() -> None:
    text = "name = 'guest'\nmemory = 512\ndisk = ['/a,raw,xvda']\nextra = 'quiet'\n"
    overrides = ["memory=256", 'name="other"', "disk+=['/b,raw,xvdb']", "vcpus = 2; extra += ' ro'"]
    assert parse(text, overrides) == {
        "name": "other",
        "memory": "256",
        "disk": ["/a,raw,xvda", "/b,raw,xvdb"],
        "extra": "quiet ro",
        "vcpus": "2",
    }


def test_overrides_end_the_file_with_a_newline() -> None:
    """xl adds one after the file when overrides follow, and after each override."""
    assert parse("a = 1 # c", ["b = 2 # c"]) == {"a": "1", "b": "2"}


@pytest.mark.parametrize(
    ("overrides", "index", "column", "reason"),
    [
        (["memory=256", "name=x"], 1, 6, "unquoted word 'x'"),  # xl needs the quotes too
        (["memory="], 0, 8, "expected a value after '='"),
        (["memory"], 0, 7, "expected '=' after 'memory'"),
        ([""], 0, 1, "expected KEY=VALUE"),
        (["# memory=1"], 0, 1, "expected KEY=VALUE"),
        (["disk=['/a'"], 0, 6, "unclosed list"),
        (["memory+=['1']"], 0, 9, "cannot add a list to the string 'memory'"),
    ],
)
def test_override_errors(overrides: list[str], index: int, column: int, reason: str) -> None:
    with pytest.raises(XlCfgError) as caught:
        parse("memory = 512\n", overrides, source="guest.cfg")
    err = caught.value
    assert (err.source, err.override, err.line, err.column) == ("<command line>", index, 1, column)
    assert reason in err.why
    assert str(err).startswith(f"<command line>[{index}]:1:{column}: ")


def test_overrides_must_be_a_sequence_of_strings() -> None:
    with pytest.raises(TypeError):
        parse("", "memory=1")


def test_text_size_limit() -> None:
    parse("#" * (MAX_TEXT - 1) + "\n")
    with pytest.raises(XlCfgError, match="too large"):
        parse("#" * (MAX_TEXT + 1))
    with pytest.raises(XlCfgError, match="too large"):
        parse("#" * MAX_TEXT, ["a=1"])


def test_settings_limit() -> None:
    at_limit = "".join(f"k{i} = {i}\n" for i in range(MAX_SETTINGS))
    assert len(parse(at_limit + "k0 = 'again'\n")) == MAX_SETTINGS
    with pytest.raises(XlCfgError) as caught:
        parse(at_limit + "one_more = 1\n")
    assert (caught.value.line, caught.value.column) == (MAX_SETTINGS + 1, 1)
    assert "too many settings" in caught.value.why


def test_dump_is_canonical() -> None:
    cfg: dict[str, Value] = {
        "name": 'say "hi"\n',
        "memory": 256,
        "disk": ["/a,qcow2,xvda", 7],
        "cpus": [],
        "extra": "it's a\\b\tc\r\x0b\x0c\x07\x08\x01",
        "vnuma": [["pnode=0", Number("0x10")], []],
        "n": Appended("56"),
    }
    assert dump(cfg) == (
        'name = "say \\"hi\\"\\n"\n'
        "memory = 256\n"
        'disk = ["/a,qcow2,xvda", 7]\n'
        "cpus = []\n"
        'extra = "it\'s a\\\\b\\tc\\r\\v\\f\\a\\b\x01"\n'
        'vnuma = [["pnode=0", 0x10], []]\n'
        'n += "56"\n'
    )
    assert parse(dump(cfg)) == as_read(cfg)


def test_dump_accepts_tuples() -> None:
    assert dump({"disk": ("a", "b")}) == 'disk = ["a", "b"]\n'


@pytest.mark.parametrize(
    ("cfg", "reason"),
    [
        ({"Name": "x"}, "cannot write key 'Name'"),
        ({"": "x"}, "cannot write key ''"),
        ({"a": -1}, "xl.cfg numbers are 0 to"),
        ({"a": 1 << 63}, "xl.cfg numbers are 0 to"),
        ({"a": True}, "a bool is not an xl.cfg value"),
        ({"a": 1.5}, "a float is not an xl.cfg value"),
        ({"a": [[{"x": 1}]]}, "a dict is not an xl.cfg value"),
        ({"a": "nul\0"}, "NUL"),
        ({"a": ["nul\0"]}, "NUL"),
    ],
)
def test_dump_refuses_what_xl_cannot_read(cfg: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason.replace("(", r"\(")):
        dump(cfg)  # type: ignore[arg-type]


def test_typed_access() -> None:
    text = "name = 'g'\nmemory = 512\nmaxmem = '0x400'\nvcpus = ' -2'\nbad = '12k'\n"
    cfg = parse(text + "disk = ['/a', 3]\nid = 007\nvnuma = [['a'], 'b']")
    assert get_str(cfg, "name") == "g"
    assert get_str(cfg, "id") == "007"  # as written, as in xl
    assert get_int(cfg, "id") == 7
    assert get_str(cfg, "missing", None) is None
    assert get_str(cfg, "missing", "dflt") == "dflt"
    assert get_int(cfg, "memory") == 512
    assert get_int(cfg, "maxmem") == 1024  # xl reads numbers from strings too
    assert get_int(cfg, "vcpus") == -2
    assert get_int(cfg, "missing", 1) == 1
    assert get_list(cfg, "disk") == ["/a", "3"]
    assert get_list(cfg, "vif", []) == []


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda cfg: get_str(cfg, "missing"), "missing setting 'missing'"),
        (lambda cfg: get_str(cfg, "disk"), "setting 'disk' must be a string, not a list"),
        (lambda cfg: get_int(cfg, "name"), "setting 'name' must be an integer, not 'g'"),
        (lambda cfg: get_int(cfg, "bad"), "setting 'bad' must be an integer, not '12k'"),
        (lambda cfg: get_int(cfg, "huge"), "setting 'huge' must be an integer, not '9223372036854775808'"),
        (lambda cfg: get_int(cfg, "disk"), "setting 'disk' must be an integer, not a list"),
        (lambda cfg: get_list(cfg, "name"), "setting 'name' must be a list, not 'g'"),
        (lambda cfg: get_list(cfg, "missing"), "missing setting 'missing'"),
        (lambda cfg: get_list(cfg, "vnuma"), "setting 'vnuma' must be a list of strings, not of lists"),
    ],
)
def test_typed_access_errors(call: Callable[[dict[str, Value]], object], reason: str) -> None:
    cfg = parse("name = 'g'\nbad = '12k'\nhuge = '9223372036854775808'\ndisk = ['/a']\nvnuma = [['a']]")
    with pytest.raises(InvalidArgument) as caught:
        call(cfg)
    assert caught.value.message == reason


# --- properties -------------------------------------------------------------

keys = st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True)
strings = st.text(st.characters(exclude_characters="\0"), max_size=30)
numbers = st.integers(min_value=0, max_value=(1 << 63) - 1)
scalars: st.SearchStrategy[Scalar] = st.one_of(strings, numbers)
values: st.SearchStrategy[Value] = st.one_of(scalars, st.lists(scalars, max_size=5))
configs = st.dictionaries(keys, values, max_size=8)


def as_read(cfg: Mapping[str, Value]) -> dict[str, Value]:
    """cfg as parse reads it back: a number as its text."""

    def read(value: Value) -> Value:
        return [read(v) for v in value] if isinstance(value, list) else str(value)

    return {key: read(value) for key, value in cfg.items()}


# Text made of xl.cfg's own pieces reaches deeper into the parser than st.text().
xlish = st.text(st.sampled_from(list("ab_Z09x.=+[],;#'\"\\ \t\n\r-\0é")), max_size=60)


@settings(max_examples=300)
@given(configs)
def test_dump_round_trips(cfg: dict[str, Value]) -> None:
    assert parse(dump(cfg)) == as_read(cfg)


@settings(max_examples=300)
@given(configs, st.lists(st.tuples(keys, values), max_size=3))
def test_overrides_replace_settings(cfg: dict[str, Value], pairs: list[tuple[str, Value]]) -> None:
    overrides = [dump({key: value}) for key, value in pairs]
    assert parse(dump(cfg), overrides) == as_read(cfg | dict(pairs))


@settings(max_examples=300)
@given(st.one_of(st.text(), xlish))
def test_any_text_parses_or_raises_xlcfgerror(text: str) -> None:
    try:
        cfg = parse(text)
    except XlCfgError as err:
        assert err.line >= 1 and err.column >= 1
        assert err.line <= text.count("\n") + 1
        return
    assert parse(dump(cfg)) == cfg


@settings(max_examples=300)
@given(st.lists(st.one_of(st.text(max_size=20), xlish), min_size=1, max_size=3))
def test_any_override_parses_or_raises_xlcfgerror(overrides: list[str]) -> None:
    try:
        parse("", overrides)
    except XlCfgError as err:
        assert err.source == "<command line>"
        assert err.override is not None and 0 <= err.override < len(overrides)
