"""The man pages (docs/) and the bash completion (client/completion.bash)
against the code they describe.

The pages must render without a warning, and name every subcommand and
option of the CLI, every flag of the agent and every key of its config; the
completion script must offer what the CLI's verb table accepts, and ask the
agent named on the command line for domain, snapshot and operation names.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, Field, fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest

from domsnap.agent import config as agent_config
from domsnap.agent import main as agent_main
from domsnap.agent import manifest
from domsnap.agent.domain import DomainConfig
from domsnap.agent.drivers import qemu_spec
from domsnap.agent.errors import InvalidArgument
from domsnap.agent.snapshot_create import parse_request
from domsnap.client import cli, connection, exits, views
from domsnap.v1 import domsnap_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = ("domsnap.1", "domsnapd.8", "domsnap.cfg.5")
COMPLETION = REPO / "client" / "completion.bash"
DOMSNAP = Path(sys.executable).parent / "domsnap"

# The domain config keys the qemu driver acts on (agent/domain.py and
# agent/drivers/qemu_argv.py).
QEMU_DOMAIN_KEYS = tuple(sorted(qemu_spec.KEYS - {"builder"}))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: scripts/setup installs it")
    return path


# ------------------------------------------------------------ man pages ----


def _render(page: str) -> str:
    """The page as plain text, on lines long enough that nothing is hyphenated."""
    proc = subprocess.run(
        [_tool("groff"), "-man", "-Tutf8", "-rLL=250n", "-rHY=0", "-P-cbou", str(DOCS / page)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    # Hyphens and minus signs come out as ASCII or as their Unicode forms,
    # depending on the groff setup; options are compared in ASCII.
    return proc.stdout.replace("\u2010", "-").replace("\u2212", "-")


def _sections(text: str) -> dict[str, str]:
    """Each top-level section (a line in column 0) and its text."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines()[1:-1]:  # without the header and footer lines
        if line and not line[0].isspace():
            current = out.setdefault(line.strip(), [])
        else:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in out.items()}


def _entries(section: str, indent: int = 7) -> dict[str, str]:
    """The tagged paragraphs of a section: tag line -> the text up to the next tag at that indent."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    tag = re.compile(rf"^ {{{indent}}}\S")
    for line in section.splitlines():
        if tag.match(line):
            current = out.setdefault(line.strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in out.items()}


def _entry(entries: dict[str, str], first_word: str) -> str:
    """The paragraph whose tag starts with `first_word`, tag included, blanks collapsed."""
    for tag, body in entries.items():
        if tag.split()[0] == first_word:
            return " ".join(f"{tag}\n{body}".split())
    raise AssertionError(f"no paragraph tagged {first_word!r}; tags: {list(entries)}")


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _example(section: str, title: str = "Example") -> str:
    """The text of a section's `Example` subsection (or another), dedented."""
    match = re.search(rf"^ {{3}}{title}\n(.*?)(?=^ {{0,3}}\S|\Z)", section, re.M | re.S)
    assert match is not None, "no Example subsection"
    return textwrap.dedent(match.group(1)).strip("\n") + "\n"


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_without_warnings(page: str) -> None:
    proc = subprocess.run(
        [_tool("groff"), "-man", "-Tutf8", "-ww", "-z", str(DOCS / page)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_man_reads_the_page(page: str) -> None:
    proc = subprocess.run(
        [_tool("man"), "--warnings", "-l", str(DOCS / page)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat"},
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "NAME" in proc.stdout


@pytest.mark.parametrize("page", PAGES)
def test_page_passes_mandoc_lint(page: str) -> None:
    mandoc = shutil.which("mandoc")
    if mandoc is None:
        pytest.skip("mandoc is not installed")
    proc = subprocess.run(
        [mandoc, "-T", "lint", "-W", "warning", str(DOCS / page)], capture_output=True, text=True, timeout=30
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_page_has_the_usual_sections(page: str) -> None:
    sections = _sections(_render(page))
    for name in ("NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "BUGS", "SEE ALSO"):
        assert name in sections, f"{page}: no {name} section"


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _verb_options(verb: cli.Verb) -> list[str]:
    """The options the table gives this verb (not the global ones)."""
    out: list[str] = []
    for spec in verb.args:
        for a in spec.args if isinstance(spec, cli.OneOf) else (spec,):
            out += [flag for flag in a.flags if flag.startswith("-")]
    return out


def test_domsnap_page_documents_every_subcommand_and_its_options() -> None:
    sections = _sections(_render("domsnap.1"))
    subcommands = {
        tag: body
        for name, text in sections.items()
        if name.endswith("SUBCOMMANDS")
        for tag, body in _entries(text).items()
    }
    for verb in cli.VERB_LIST:
        body = _entry(subcommands, verb.name)
        for option in _verb_options(verb):
            assert _mentions(body, option), f"domsnap.1: {verb.name} does not document {option}"


def test_domsnap_page_documents_the_global_options_exit_codes_and_files() -> None:
    sections = _sections(_render("domsnap.1"))
    for option in _option_strings(cli._top_parser()):
        assert _mentions(sections["GLOBAL OPTIONS"], option), f"domsnap.1: global option {option} missing"
    codes = [tag.split()[0] for tag in _entries(sections["EXIT STATUS"])]
    for code in (
        exits.EXIT_OK,
        exits.EXIT_ERROR,
        exits.EXIT_USAGE,
        exits.EXIT_INTERRUPTED,
        exits.EXIT_BROKEN_PIPE,
    ):
        assert str(code) in codes, f"domsnap.1: exit status {code} missing"
    assert connection.ADDRESS_ENV in _entries(sections["ENVIRONMENT"])
    files = sections["FILES"]
    for name in (connection.DEFAULT_ADDRESS.removeprefix("unix:"), manifest.MEMORY, manifest.MANIFEST):
        assert _mentions(files, name), f"domsnap.1: FILES does not name {name}"
    # snapshot-delete is implemented (c6d123a): the page must not call it, or anything, unimplemented.
    assert "not implemented" not in " ".join(_render("domsnap.1").split()).lower()


def test_domsnapd_page_documents_every_flag_and_default() -> None:
    sections = _sections(_render("domsnapd.8"))
    options = " ".join(sections["OPTIONS"].split())
    for option in _option_strings(agent_main._parser()):
        assert _mentions(options, option), f"domsnapd.8: option {option} missing"
    defaults = agent_config.AgentConfig()
    for value in (
        agent_config.DEFAULT_CONFIG_FILE,
        agent_config.DEFAULT_SOCKET,
        defaults.state_dir,
        defaults.snapshot_root,
        *agent_config.DRIVERS,
    ):
        assert _mentions(options, str(value)), f"domsnapd.8: OPTIONS does not name {value}"
    files = sections["FILES"]
    for name in (str(agent_config.DEFAULT_CONFIG_FILE), manifest.MEMORY, manifest.MANIFEST):
        assert _mentions(files, name), f"domsnapd.8: FILES does not name {name}"


def _toml(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    return f'"{value}"'


def _default(f: Field[Any]) -> object:
    if f.default is not MISSING:
        return f.default
    assert f.default_factory is not MISSING
    return f.default_factory()


def test_cfg_page_documents_every_agent_setting_with_its_default() -> None:
    sections = _sections(_render("domsnap.cfg.5"))
    section = sections["AGENT CONFIGURATION FILE"]
    settings = _entries(section)
    for f in fields(agent_config.AgentConfig):
        default = _default(f)
        if is_dataclass(default):
            # A [table] of its own: its heading, then each of its settings,
            # looked up under that heading (`listen` is also a top-level key).
            table = re.search(rf"^ {{3}}The \[{f.name}\] table$(.*?)(?=^ {{3}}\S|\Z)", section, re.M | re.S)
            assert table is not None, f"domsnap.cfg.5: no [{f.name}]"
            for g in fields(default):
                body = _entry(_entries(table.group(1)), g.name)
                assert f"Default: {_toml(_default(g))}" in body, f"domsnap.cfg.5: [{f.name}] {g.name}: no default"
        else:
            body = _entry(settings, f.name)
            assert f"Default: {_toml(default)}" in body, f"domsnap.cfg.5: {f.name}: no default"
    for word in (*agent_config.DRIVERS, *agent_config.LIVE_MODES):
        assert _mentions(sections["AGENT CONFIGURATION FILE"], f'"{word}"'), f"domsnap.cfg.5: {word} missing"


def test_cfg_page_toml_example_is_a_valid_agent_config(tmp_path: Path) -> None:
    example = _example(_sections(_render("domsnap.cfg.5"))["AGENT CONFIGURATION FILE"])
    assert tomllib.loads(example)["qemu"]
    (tmp_path / "domsnapd.toml").write_text(example)
    config = agent_config.load(tmp_path / "domsnapd.toml")
    assert config.driver == "qemu"


def test_cfg_page_documents_every_snapshot_cfgfile_key() -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_request("d", name="", live=False, method=None, path="", description="", cfg_text="", overrides=("x=1",))
    known = re.search(r"known: ([^)]*)", err.value.message)
    assert known is not None
    section = _sections(_render("domsnap.cfg.5"))["SNAPSHOT CFGFILE"]
    keys = _entries(section)
    for key in known.group(1).split(", "):
        _entry(keys, key)
    # The example parses, and means what it says.
    cfg = _example(section).split("\n\n")[0] + "\n"  # a file ends with a newline (xl needs one after a comment)
    req = parse_request("web", name="", live=False, method=None, path="", description="", cfg_text=cfg, overrides=())
    assert req.name == "nightly" and set(req.disk_choices) == {"xvda", "xvdb"}


def test_cfg_page_documents_the_domain_keys_the_qemu_driver_reads() -> None:
    section = _sections(_render("domsnap.cfg.5"))["DOMAIN CONFIGURATION"]
    keys = _entries(section)
    for key in QEMU_DOMAIN_KEYS:
        _entry(keys, key)
    config = DomainConfig.parse(_example(section))
    assert (config.name, config.memory_mib, config.vcpus) == ("web", 512, 2)
    assert [d.vdev for d in config.disks] == ["xvda", "xvdb"]
    # The HVM example is one the driver runs: UEFI, a CD-ROM on IDE, a NIC, VNC.
    hvm = _example(section, "HVM example")
    spec = qemu_spec.guest_spec(DomainConfig.parse(hvm[hvm.index("type"):]))
    assert (spec.hvm, spec.firmware, spec.boot, [d.cdrom for d in spec.drives]) == (True, "ovmf", "cd", [False, True])
    assert spec.vnc is not None and spec.vnc.listen == "127.0.0.1" and len(spec.nics) == 1


# ----------------------------------------------------------- completion ----


def _bash(script: str, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", f'source "$0"\n{script}', str(COMPLETION), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    return proc.stdout


def complete(
    words: Sequence[str], *, line: str | None = None, cword: int | None = None, cwd: Path | None = None
) -> list[str]:
    """What _domsnap offers for the last word (or word `cword`) of `words`."""
    env = {"CWORD": str(len(words) - 1 if cword is None else cword)}
    if line is not None:
        env["LINE"] = line
    out = _bash(
        'COMP_WORDS=("$@"); COMP_CWORD=$CWORD\n'
        "if [[ -n ${LINE+set} ]]; then COMP_LINE=$LINE; COMP_POINT=${#LINE}; fi\n"
        '_domsnap; printf "%s\\n" "${COMPREPLY[@]}"',
        *words,
        cwd=cwd,
        env=env,
    )
    return [word for word in out.splitlines() if word]


def test_completes_subcommands() -> None:
    assert complete(["domsnap", ""]) == [v.name for v in cli.VERB_LIST]
    assert complete(["domsnap", "snap"]) == [v.name for v in cli.VERB_LIST if v.name.startswith("snap")]
    assert complete(["domsnap", "-H", "unix:/x", "--json", "un"]) == ["unpause"]
    assert complete(["domsnap", "help", "snapshot-r"]) == ["snapshot-revert"]


def test_completes_the_options_each_parser_accepts() -> None:
    assert set(complete(["domsnap", "-"])) == _option_strings(cli._top_parser())
    for verb in cli.VERB_LIST:
        offered = complete(["domsnap", "--json", verb.name, "x", "-"])
        assert set(offered) == _option_strings(cli._verb_parser(verb)), verb.name
    assert complete(["domsnap", "snapshot-revert", "web", "--ru"]) == ["--running"]


def test_an_options_value_is_not_completed_as_something_else() -> None:
    assert complete(["domsnap", "snapshot-create", "web", "--name", ""]) == []
    assert complete(["domsnap", "-t", ""]) == []
    # After the value, positionals count again: `snap` is the subcommand.
    assert complete(["domsnap", "-t", "5", "snapshot-l"]) == ["snapshot-list"]


_KINDS = {
    "<Domain>": "domain",
    "<VirtualDevice>": "vdev",
    "<path>": "file",
    "<cfgfile>": "file",
    "KEY=VALUE": "setting",
    "[<cfgfile>] [<path>] [KEY=VALUE]": "file-or-path",
    "<path|name>": "snapshot",
    "<path|name|cfgfile>": "snapshot-or-file",
    "<operation-id>": "operation",
    "<subcommand>": "command",
    "NAME": "name",
    "DOMAIN@ADDR": "member",
}


def _positional_kinds(verb: cli.Verb) -> str:
    kinds = []
    for spec in verb.args:
        if isinstance(spec, cli.Arg) and not spec.flags[0].startswith("-"):
            metavar = spec.options["metavar"]
            assert metavar in _KINDS, f"{verb.name}: teach the completion (and this test) about {metavar}"
            repeats = spec.options.get("nargs") in ("*", "+")
            kinds.append(_KINDS[metavar] + ("..." if repeats else ""))
    return " ".join(kinds)


def test_completion_lists_match_the_cli_table() -> None:
    verbs = [v.name for v in cli.VERB_LIST]
    out = _bash(
        'printf "%s\\n" "$_domsnap_commands" "$_domsnap_global_opts" "$_domsnap_top_only_opts" "$_domsnap_value_opts"\n'
        'for v in "$@"; do printf "%s|%s|%s\\n" "$v" "$(_domsnap_verb_opts "$v")" "$(_domsnap_verb_args "$v")"; done',
        *verbs,
    ).splitlines()
    command_list, global_opts, top_only, value_opts = (line.split() for line in out[:4])
    assert command_list == verbs
    top = cli._top_parser()
    after = {o for v in cli.VERB_LIST for o in _option_strings(cli._verb_parser(v))} - {
        o for v in cli.VERB_LIST for o in _verb_options(v)
    }
    assert set(global_opts) == after
    assert set(top_only) == _option_strings(top) - after
    parsers = [top, *(cli._verb_parser(v) for v in cli.VERB_LIST)]
    assert set(value_opts) == {s for p in parsers for a in p._actions if a.nargs != 0 for s in a.option_strings}
    for line, verb in zip(out[4:], cli.VERB_LIST, strict=True):
        name, opts, kinds = line.split("|")
        assert name == verb.name
        assert opts.split() == _verb_options(verb), verb.name
        assert kinds == _positional_kinds(verb), verb.name


@pytest.fixture
def fake_domsnap(tmp_path: Path) -> Iterator[Path]:
    """A `domsnap` that prints what the real one prints for a canned agent, and logs its arguments."""
    domains = [
        pb.Domain(
            name="web",
            domid=1,
            disks=[pb.Disk(vdev="xvda", target="/srv/web.qcow2", format="qcow2")],
            config='name = "web"\n',
        ),
        pb.Domain(name="db", domid=2),
    ]
    snapshots = [
        pb.Snapshot(
            name="base",
            domain="web",
            disks=[pb.DiskSnapshot(vdev="xvda", format="qcow2", tag="base")],
            memory=pb.MemoryImage(path="/s/memory.save"),
        ),
        pb.Snapshot(name="nightly", domain="web", parent="base"),
    ]
    operations = [pb.Operation(id="0123456789abcdef", domain="web", result=pb.Snapshot(name="base"))]
    for name, messages in (("domains", domains), ("snapshots", snapshots), ("operations", operations)):
        (tmp_path / f"{name}.json").write_text(views.json_text([views.to_dict(m) for m in messages]) + "\n")
    fake = tmp_path / "domsnap"
    fake.write_text(
        "#!/bin/bash\n"
        'here=$(dirname "$0")\n'
        'printf "%s\\n" "$*" >>"$here/calls.log"\n'
        'case " $* " in\n'
        '    *" snapshot-list "*) cat "$here/snapshots.json" ;;\n'
        '    *" operations "*) cat "$here/operations.json" ;;\n'
        '    *" list "*) cat "$here/domains.json" ;;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    (tmp_path / "cwd").mkdir()
    yield fake


def _calls(fake: Path) -> list[str]:
    log = fake.parent / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_completes_domain_names_from_the_agent_named_by_H(fake_domsnap: Path) -> None:
    cwd = fake_domsnap.parent / "cwd"
    assert complete([str(fake_domsnap), "-H", "unix:/tmp/a.sock", "pause", ""], cwd=cwd) == ["web", "db"]
    assert _calls(fake_domsnap) == ["-H unix:/tmp/a.sock -t 2 --json list"]
    assert complete([str(fake_domsnap), "list", "web", "d"], cwd=cwd) == ["db"]
    assert _calls(fake_domsnap)[-1] == "-t 2 --json list"


def test_H_split_by_bash_at_the_colon_is_put_back_together(fake_domsnap: Path) -> None:
    words = [str(fake_domsnap), "-H", "unix", ":", "/tmp/b.sock", "destroy", "w"]
    line = f"{fake_domsnap} -H unix:/tmp/b.sock destroy w"
    assert complete(words, line=line, cwd=fake_domsnap.parent / "cwd") == ["web"]
    assert _calls(fake_domsnap) == ["-H unix:/tmp/b.sock -t 2 --json list"]
    # Glued -H value, global options after the subcommand.
    assert complete([str(fake_domsnap), "-Hunix:/tmp/c.sock", "unpause", "--json", ""]) == ["web", "db"]
    assert _calls(fake_domsnap)[-1] == "-H unix:/tmp/c.sock -t 2 --json list"


def test_completes_snapshot_names_of_the_domain_given(fake_domsnap: Path) -> None:
    cwd = fake_domsnap.parent / "cwd"
    assert complete([str(fake_domsnap), "snapshot-info", "web", ""], cwd=cwd) == ["base", "nightly"]
    assert _calls(fake_domsnap) == ["-t 2 --json snapshot-list web"]
    assert complete([str(fake_domsnap), "snapshot-delete", "--children", "web", "n"], cwd=cwd) == ["nightly"]
    # A revert also takes a snapshot cfgfile.
    (cwd / "nightly.cfg").write_text('name = "nightly"\n')
    assert complete([str(fake_domsnap), "snapshot-revert", "web", "n"], cwd=cwd) == ["nightly", "nightly.cfg"]
    # Nothing more after the snapshot.
    assert complete([str(fake_domsnap), "snapshot-info", "web", "base", ""], cwd=cwd) == []


def test_completes_operation_ids(fake_domsnap: Path) -> None:
    assert complete([str(fake_domsnap), "watch", ""]) == ["0123456789abcdef"]
    assert _calls(fake_domsnap) == ["-t 2 --json operations"]


def test_completes_files_for_cfgfiles(tmp_path: Path) -> None:
    (tmp_path / "web.cfg").write_text('name = "web"\n')
    (tmp_path / "snaps").mkdir()
    assert complete(["domsnap", "create", "w"], cwd=tmp_path) == ["web.cfg"]
    assert complete(["domsnap", "snapshot-create", "web", "--path", ""], cwd=tmp_path) == ["snaps"]


def test_an_unreachable_agent_gives_no_names_silently_and_fast(tmp_path: Path) -> None:
    assert DOMSNAP.exists()
    start = time.monotonic()
    words = [str(DOMSNAP), "-H", f"unix:{tmp_path}/no-agent.sock", "pause", ""]
    assert complete(words, cwd=tmp_path) == []  # and complete() checked that stderr is empty
    assert time.monotonic() - start < 4
