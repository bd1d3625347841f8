"""`domsnap`: the agent's command line, shaped like `xl`.

    domsnap [global options] <subcommand> [args]

The subcommands form one declarative table (`VERB_LIST`): name, synopsis, help,
arguments and handler. Global options come before the subcommand, as in xl;
they are also accepted after it, since `domsnap snapshot-list --json` is what
people type.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from domsnap import __version__

from . import connection
from .exits import EXIT_BROKEN_PIPE, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError, UsageError

if TYPE_CHECKING:
    from .commands import Handler, Session



@dataclass(frozen=True)
class Arg:
    """One `add_argument` call, kept as data."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class OneOf:
    """Mutually exclusive options, e.g. `--internal|--external`."""

    args: tuple[Arg, ...]


@dataclass(frozen=True)
class Verb:
    name: str
    # Everything after `domsnap <name>`, in xl's notation.
    synopsis: str
    help: str
    args: tuple[Arg | OneOf, ...]
    # The name of its function in commands.py, loaded only to run it.
    handler: str
    # Longer text for `domsnap help <name>`.
    details: str = ""
    # Runs against several agents at once (`-H a,b,...`), results grouped per agent.
    many_hosts: bool = False


def _domain(help_text: str = "a domain name or domid") -> Arg:
    return arg("domain", metavar="<Domain>", help=help_text)


def _snapshot() -> Arg:
    return arg("snapshot", metavar="<path|name>", help=_SNAPSHOT_REF)


def _group_name() -> Arg:
    return arg("name", metavar="NAME", help="the group snapshot's name (each member's snapshot name)")


def _group_members() -> Arg:
    return arg("members", nargs="+", metavar="DOMAIN@ADDR", help="a member: a domain and its agent (as -H takes)")


def _dry_run(what: str) -> Arg:
    return arg("--dry-run", action="store_true", help=f"print the plan ({what}) and touch nothing")


def _help(parser: argparse.ArgumentParser, subcommand: str | None) -> int:
    if subcommand is None:
        sys.stdout.write(_top_parser().format_help())
        return EXIT_OK
    verb = VERBS.get(subcommand)
    if verb is None:
        return _parse_error(parser, f"unknown subcommand {subcommand!r}{_did_you_mean(subcommand)}")
    sys.stdout.write(_verb_parser(verb).format_help())
    return EXIT_OK


def _did_you_mean(word: str) -> str:
    import difflib

    close = difflib.get_close_matches(word, [v.name for v in VERB_LIST], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


_SNAPSHOT_REF = "a snapshot's name, or its directory (a path with a '/', e.g. ./snap)"

VERB_LIST: tuple[Verb, ...] = (
    Verb(
        "list",
        "[-l] [<Domain> ...]",
        "List information about all/some domains",
        (
            arg("-l", "--long", action="store_true", help="print each domain's configuration"),
            arg("domains", nargs="*", default=[], metavar="<Domain>", help="domain names or domids; default: all"),
        ),
        "cmd_list",
        many_hosts=True,
    ),
    Verb(
        "create",
        "<cfgfile> [KEY=VALUE ...] [-p] [--force]",
        "Create a domain from config file <cfgfile>",
        (
            arg("cfgfile", metavar="<cfgfile>", help="xl.cfg file, read here and sent as text; - reads stdin"),
            arg(
                "overrides", nargs="*", default=[], metavar="KEY=VALUE", help="settings appended to the file, as in xl"
            ),
            arg("-p", dest="paused", action="store_true", help="leave the domain paused after creating it"),
            arg(
                "--force",
                action="store_true",
                help="a disk that is a snapshot's frozen layer: start on a fresh overlay over it instead of refusing",
            ),
        ),
        "cmd_create",
    ),
    Verb("destroy", "<Domain>", "Terminate a domain immediately", (_domain(),), "cmd_destroy"),
    Verb("pause", "<Domain>", "Pause execution of a domain", (_domain(),), "cmd_pause"),
    Verb("unpause", "<Domain>", "Unpause a paused domain", (_domain(),), "cmd_unpause"),
    Verb(
        "cd-insert",
        "<Domain> <VirtualDevice> <path>",
        "Insert a CD-ROM image into a domain's CD-ROM drive",
        (
            _domain(),
            arg("vdev", metavar="<VirtualDevice>", help="the CD-ROM drive, as in the domain's disk list (hdc)"),
            arg("path", metavar="<path>", help="a raw image (an ISO) on the agent's host"),
        ),
        "cmd_cd_insert",
    ),
    Verb(
        "cd-eject",
        "<Domain> <VirtualDevice>",
        "Eject the medium of a domain's CD-ROM drive",
        (_domain(), arg("vdev", metavar="<VirtualDevice>", help="the CD-ROM drive (hdc)")),
        "cmd_cd_eject",
    ),
    Verb(
        "snapshot-create",
        "<Domain> [<cfgfile>] [--name NAME] [--live] [--internal|--external] [--quiesce [--quiesce-best-effort] "
        "[--freeze-timeout SECONDS]] [--label KEY=VALUE ...] [<path>] [KEY=VALUE ...] [--dry-run]",
        "Create a snapshot (RAM and every disk) of a domain",
        (
            _domain(),
            arg("args", nargs="*", default=[], metavar="[<cfgfile>] [<path>] [KEY=VALUE]", help=argparse.SUPPRESS),
            arg("--name", metavar="NAME", help="the snapshot's name, [A-Za-z0-9._-]{1,64}; default: UTC time"),
            arg(
                "--live",
                action="store_true",
                help="save memory while the domain runs; pause only for the disks",
            ),
            OneOf(
                (
                    arg(
                        "--internal",
                        dest="method",
                        action="store_const",
                        const="internal",
                        default=None,
                        help="snapshot every disk inside its image (qcow2 tag, LVM snapshot)",
                    ),
                    arg(
                        "--external",
                        dest="method",
                        action="store_const",
                        const="external",
                        help="freeze every image; the domain goes on in a new overlay or copy",
                    ),
                )
            ),
            arg(
                "--path",
                metavar="PATH",
                help="the snapshot's directory, when it could pass for something else",
            ),
            arg("--description", metavar="TEXT", help="free text kept with the snapshot"),
            arg(
                "--quiesce",
                action="store_true",
                help="freeze the guest's filesystems (QEMU guest agent) just before the instant, thaw just after",
            ),
            arg(
                "--quiesce-best-effort",
                action="store_true",
                help="--quiesce, but a guest that cannot be frozen is snapshotted unfrozen instead of refused",
            ),
            arg(
                "--freeze-timeout",
                metavar="SECONDS",
                type=float,
                default=0.0,
                help="the longest the filesystems may stay frozen (default 10): thawed then, and the create fails",
            ),
            arg(
                "--label",
                dest="labels",
                metavar="KEY=VALUE",
                action="append",
                default=[],
                help="recorded with the snapshot (repeatable); domsnap.dev/schedule=NAME marks a schedule's",
            ),
            _dry_run("the directory, and the method and file of every disk"),
        ),
        "cmd_snapshot_create",
        details=(
            "Free arguments are told apart by how they are spelt: KEY=VALUE is a setting appended\n"
            "to the cfg text; an existing regular file (or -, stdin) is the <cfgfile>, sent as text;\n"
            "a word with a '/' is <path>, the snapshot's directory, which must not exist yet. A bare\n"
            "word that is no file is refused: say --name NAME for a name, ./NAME for a directory.\n"
            "Default <path>: the agent's <snapshot_root>/<Domain>/<name>. Default method: per disk,\n"
            "the cheapest one its storage supports."
        ),
    ),
    Verb(
        "snapshot-revert",
        "<Domain> <path|name|cfgfile>|--current [--running|--paused] [--force] [--reset-nvram] [--dry-run]",
        "Revert a domain to a snapshot",
        (
            _domain(),
            arg("snapshot", nargs="?", metavar="<path|name|cfgfile>", help=f"{_SNAPSHOT_REF}, or a snapshot cfgfile"),
            arg("--current", action="store_true", help="the snapshot the domain's state descends from"),
            OneOf(
                (
                    arg(
                        "--running",
                        dest="run_state",
                        action="store_const",
                        const="running",
                        default=None,
                        help="leave the domain running, whatever it was at the snapshot",
                    ),
                    arg(
                        "--paused",
                        dest="run_state",
                        action="store_const",
                        const="paused",
                        help="leave the domain paused",
                    ),
                )
            ),
            arg(
                "--force",
                action="store_true",
                help="revert even when risky (config changed, domain gone, a frozen layer written, ...)",
            ),
            arg(
                "--reset-nvram",
                action="store_true",
                help="a UEFI domain's firmware variables start over from the firmware's template",
            ),
            _dry_run("what each disk goes back to, the state it ends in, the risks"),
        ),
        "cmd_snapshot_revert",
    ),
    Verb(
        "snapshot-list",
        "[<Domain>] [--tree] [--parent NAME|--roots|--leaves] [--name PATTERN]",
        "List snapshots",
        (
            arg("domain", nargs="?", metavar="<Domain>", help="only this domain's; default: every domain's"),
            arg("--tree", action="store_true", help="draw each domain's snapshots as parent/child trees"),
            OneOf(
                (
                    arg("--parent", metavar="NAME", help="only the snapshots taken on top of NAME"),
                    arg("--roots", action="store_true", help="only the snapshots with no parent"),
                    arg("--leaves", action="store_true", help="only the snapshots with no children"),
                )
            ),
            arg("--name", metavar="PATTERN", help="only the names that match PATTERN (shell wildcards: web-*)"),
        ),
        "cmd_snapshot_list",
        many_hosts=True,
    ),
    Verb(
        "snapshot-info",
        "<Domain> <path|name>",
        "Show a snapshot's details",
        (_domain(), _snapshot()),
        "cmd_snapshot_info",
    ),
    Verb(
        "snapshot-delete",
        "<Domain> <path|name> [--children] [--dry-run]",
        "Delete a snapshot",
        (
            _domain(),
            _snapshot(),
            arg("--children", action="store_true", help="delete the snapshots taken on top of it too"),
            _dry_run("every snapshot it would delete"),
        ),
        "cmd_snapshot_delete",
    ),
    Verb(
        "snapshot-prune",
        "<Domain> --keep N [--schedule NAME] [--prefix P] [--dry-run]",
        "Delete a schedule's oldest snapshots, keeping the newest N",
        (
            _domain(),
            arg("--keep", metavar="N", type=int, required=True, help="how many of the marked snapshots to keep"),
            arg("--schedule", metavar="NAME", help="only the snapshots schedule NAME made; default: any schedule's"),
            arg("--prefix", metavar="P", default="", help="only the marked snapshots whose names begin with P"),
            arg("--dry-run", action="store_true", help="list what would be deleted, delete nothing"),
        ),
        "cmd_snapshot_prune",
        details=(
            "Only snapshots that carry a schedule's mark (the label domsnap.dev/schedule, given at\n"
            "create by --label, as the domsnap-snapshot@.service unit does) are counted and deleted,\n"
            "oldest first, each through the normal chain-aware delete; any other snapshot is left\n"
            "alone."
        ),
    ),
    Verb(
        "snapshot-current",
        "<Domain>",
        "Show the snapshot the domain's state descends from",
        (_domain(),),
        "cmd_snapshot_current",
    ),
    Verb(
        "snapshot-edit",
        "<Domain> <path|name> [--description TEXT] [--rename NAME]",
        "Change a snapshot's description or name",
        (
            _domain(),
            _snapshot(),
            arg("--description", metavar="TEXT", help="the new description"),
            arg("--rename", metavar="NAME", help="the new name (not where a disk holds the name)"),
        ),
        "cmd_snapshot_edit",
        details="A snapshot whose disks hold its name (a qcow2 tag, an LVM snapshot volume) keeps its name.",
    ),
    Verb(
        "snapshot-dumpmanifest",
        "<Domain> <path|name>",
        "Print a snapshot's manifest (snapshot.json) as the agent read it",
        (_domain(), _snapshot()),
        "cmd_snapshot_dumpmanifest",
    ),
    Verb(
        "group-snapshot-create",
        "NAME DOMAIN@ADDR... [--live] [--quiesce] [--lease SECONDS]",
        "Snapshot several domains, on one agent or many, at one instant",
        (
            _group_name(),
            _group_members(),
            arg("--live", action="store_true", help="save each member's memory while it runs; pause only at the end"),
            arg("--quiesce", action="store_true", help="freeze the guests' filesystems around the instant"),
            arg("--lease", metavar="SECONDS", type=float, default=10.0,
                help="how long each agent waits for the next step before it rolls back by itself (default: 10)"),
        ),
        "cmd_group_snapshot_create",
        details=(
            "Every member pauses before any member's state is taken, and all resume after it: the\n"
            "members' pause intervals overlap (each manifest records paused_at and resumed_at).\n"
            "All or nothing: a member that fails, or a coordinator that dies or hangs, and every\n"
            "member resumes its guest and rolls back (within the lease, at worst). ADDR is anything\n"
            "-H takes; each member's snapshot is named NAME."
        ),
    ),
    Verb(
        "group-snapshot-revert",
        "NAME DOMAIN@ADDR... [--paused]",
        "Revert several domains to their group snapshot",
        (
            _group_name(),
            _group_members(),
            arg("--paused", action="store_true", help="leave every member paused"),
        ),
        "cmd_group_snapshot_revert",
        details="Every member is reverted paused, then all are resumed together (unless --paused).",
    ),
    Verb(
        "group-snapshot-list",
        "DOMAIN@ADDR...",
        "List the group snapshots of some domains",
        (_group_members(),),
        "cmd_group_snapshot_list",
    ),
    Verb(
        "group-snapshot-delete",
        "NAME DOMAIN@ADDR...",
        "Delete a group snapshot from every member that holds it",
        (_group_name(), _group_members()),
        "cmd_group_snapshot_delete",
    ),
    Verb(
        "watch",
        "<operation-id>",
        "Follow a running or finished operation",
        (arg("operation_id", metavar="<operation-id>"),),
        "cmd_watch",
    ),
    Verb(
        "cancel",
        "<operation-id>",
        "Stop an operation and roll it back",
        (arg("operation_id", metavar="<operation-id>"),),
        "cmd_cancel",
    ),
    Verb(
        "operations",
        "[<Domain>]",
        "List running and recent operations",
        (arg("domain", nargs="?", metavar="<Domain>", help="only this domain's; default: every domain's"),),
        "cmd_operations",
    ),
    Verb(
        "events",
        "[<Domain>] [--since TOKEN] [--count N]",
        "Follow the agent's change feed: operations, domains, snapshots",
        (
            arg("domain", nargs="?", metavar="<Domain>", help="only this domain's; default: every domain's"),
            arg("--since", metavar="TOKEN", default="",
                help="resume after this event's token (default: from now on)"),
            arg("--count", metavar="N", type=int, default=0, help="stop after N events (default: never)"),
        ),
        "cmd_events",
    ),
    Verb(
        "info",
        "",
        "Get information about the agent and its hypervisor",
        (),
        "cmd_info",
        many_hosts=True,
    ),
    Verb(
        "help",
        "[<subcommand>]",
        "Print help for a subcommand, or list them all",
        (arg("subcommand", nargs="?", metavar="<subcommand>"),),
        "help",
    ),
)

VERBS = {verb.name: verb for verb in VERB_LIST}

# Where the global options land; they may come again after the subcommand.
_GLOBAL_DESTS = ("address", "json", "utc", "timeout", "request_id", "ca", "cert", "key")


def _addresses(text: str) -> tuple[connection.Address, ...]:
    try:
        return connection.parse_addresses(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _add_global_options(parser: argparse.ArgumentParser, *, repeated: bool) -> None:
    """The options before the subcommand; `repeated` for their copy after it.

    The copy has no defaults, so only what the user wrote after the
    subcommand overrides what came before it, and no help lines, so a
    subcommand's help shows its own options only.
    """

    def opts(default: object, help_text: str) -> dict[str, Any]:
        if repeated:
            return {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
        return {"default": default, "help": help_text}

    parser.add_argument(
        "-H",
        dest="address",
        metavar="ADDR",
        type=_addresses,
        **opts(
            connection.default_address(),
            f"the agent: {connection.ADDRESS_LIST_SYNTAX} (default: ${connection.ADDRESS_ENV}, "
            f"else {connection.DEFAULT_ADDRESS})",
        ),
    )
    parser.add_argument("--json", action="store_true", **opts(False, "print JSON (one object per event)"))
    parser.add_argument("--utc", action="store_true", **opts(False, "print times in UTC (default: local, as TZ says)"))
    parser.add_argument(
        "-t",
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        **opts(
            connection.DEFAULT_TIMEOUT,
            f"give up on a short call after SECONDS (default: {connection.DEFAULT_TIMEOUT:g})",
        ),
    )
    parser.add_argument(
        "--request-id",
        metavar="ID",
        **opts(None, "the id of a mutating request, to retry it without doing it twice (default: random)"),
    )
    env = connection.TlsFiles.from_env()
    for flag, default, what, var in (
        ("--ca", env.ca, "the CA that signed the agent's certificate (TCP)", connection.CA_ENV),
        ("--cert", env.cert, "our client certificate (TCP; PEM)", connection.CERT_ENV),
        ("--key", env.key, "our client certificate's private key (TCP; PEM)", connection.KEY_ENV),
    ):
        parser.add_argument(flag, metavar="FILE", **opts(default, f"{what} (default: ${var})"))


def _top_parser() -> argparse.ArgumentParser:
    width = max(len(v.name) for v in VERB_LIST) + 2
    listing = "\n".join(f" {v.name:<{width}}{v.help}" for v in VERB_LIST)
    parser = argparse.ArgumentParser(
        prog="domsnap",
        usage="domsnap [-H ADDR] [--ca FILE --cert FILE --key FILE] [--json] [--utc] [-t SECONDS] [--request-id ID] "
              "<subcommand> [args]",
        description=f"domsnap full list of subcommands:\n\n{listing}",
        epilog="'domsnap help <subcommand>' or 'domsnap <subcommand> --help' shows its synopsis.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _add_global_options(parser, repeated=False)
    parser.add_argument("--version", action="version", version=f"domsnap {__version__}")
    parser.add_argument("subcommand", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _verb_parser(verb: Verb) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"domsnap {verb.name}",
        usage=f"domsnap {verb.name} {verb.synopsis}".rstrip(),
        description=f"{verb.help}.\n\n{verb.details}" if verb.details else f"{verb.help}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    _add_global_options(parser, repeated=True)
    for spec in verb.args:
        if isinstance(spec, OneOf):
            group = parser.add_mutually_exclusive_group()
            for a in spec.args:
                group.add_argument(*a.flags, **a.options)
        else:
            parser.add_argument(*spec.flags, **spec.options)
    return parser


def _parse(parser: argparse.ArgumentParser, args: Sequence[str], *, intermixed: bool) -> argparse.Namespace | int:
    """Parse, or the exit status argparse asked for (help, version, usage error)."""
    try:
        if intermixed:
            # Options may sit between positionals: `snapshot-create d --live /p`.
            return parser.parse_intermixed_args(args)
        return parser.parse_args(args)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    parsed = _parse(top, args, intermixed=False)
    if isinstance(parsed, int):
        return parsed
    if parsed.subcommand is None:
        top.print_help(sys.stderr)
        return EXIT_USAGE
    verb = VERBS.get(parsed.subcommand)
    if verb is None:
        sys.stderr.write(f"domsnap: {parsed.subcommand!r} is not a subcommand{_did_you_mean(parsed.subcommand)} "
                         "See 'domsnap help'.\n")
        return EXIT_USAGE
    parser = _verb_parser(verb)
    ns = _parse(parser, parsed.rest, intermixed=True)
    if isinstance(ns, int):
        return ns
    if verb.handler == "help":
        return _help(parser, ns.subcommand)
    options = {dest: getattr(ns, dest, getattr(parsed, dest)) for dest in _GLOBAL_DESTS}
    addresses: tuple[connection.Address, ...] = options["address"]
    if len(addresses) > 1 and not verb.many_hosts:
        several = ", ".join(v.name for v in VERB_LIST if v.many_hosts)
        return _parse_error(parser, f"-H names {len(addresses)} agents; only {several} run on several")
    # The CLI says what went wrong in one line; gRPC's C core would log a
    # failed TLS handshake on stderr too. It reads this once, when it loads
    # (below); an explicit GRPC_VERBOSITY (e.g. debug) wins.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from . import commands

    handler: Handler = getattr(commands, verb.handler)
    if len(addresses) > 1:
        handler = functools.partial(commands.run_on_hosts, handler, addresses)
    session = commands.Session(
        address=addresses[0],
        json=options["json"],
        utc=options["utc"],
        timeout=options["timeout"],
        request_id=options["request_id"],
        tls=connection.TlsFiles(options["ca"], options["cert"], options["key"]),
        out=sys.stdout,
        err=sys.stderr,
    )
    return _run(handler, parser, session, ns)


def _run(handler: Handler, parser: argparse.ArgumentParser, session: Session, ns: argparse.Namespace) -> int:
    """Run a handler; every failure becomes one stderr line and an exit status."""
    from .errors import DomsnapError, TlsError, refusal_line

    try:
        return handler(session, ns)
    except UsageError as err:
        _fail_json(session, "usage", str(err))
        return _parse_error(parser, str(err))
    except DomsnapError as err:
        _fail(session, f"TLS: {err.message}" if isinstance(err, TlsError) else refusal_line(err), err.code.name)
    except CliError as err:
        _fail(session, str(err), "client")
    except KeyboardInterrupt:
        session.err.write("\ndomsnap: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as err:
        # A bug of ours; still one line, so scripts parsing stderr never
        # meet a traceback.
        _fail(session, f"internal error: {type(err).__name__}: {err}", "internal")
    finally:
        session.close()
    return EXIT_ERROR


def _parse_error(parser: argparse.ArgumentParser, message: str) -> int:
    try:
        parser.error(message)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


def _fail(session: Session, message: str, code: str) -> None:
    _fail_json(session, code, message)
    session.err.write(f"domsnap: {message}\n")


def _fail_json(session: Session, code: str, message: str) -> None:
    """Under --json, the error is JSON on stdout too: what a program reads."""
    if session.json:
        session.out.write(json.dumps({"error": {"code": code, "message": message}}) + "\n")


def _silence_stdout() -> None:
    # The reader went away; Python would still flush stdout at exit and print
    # a traceback about it. Point stdout at /dev/null instead.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
