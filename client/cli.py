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
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from domsnap import __version__
from domsnap.v1 import domsnap_pb2 as pb

from . import commands, connection
from .commands import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, CliError, Handler, Session, UsageError

DEFAULT_TIMEOUT = 30.0
# 128 + SIGPIPE, as a shell reports `domsnap snapshot-list | head`.
EXIT_BROKEN_PIPE = 141


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
    handler: Handler
    # Longer text for `domsnap help <name>`.
    details: str = ""
    # Runs against several agents at once (`-H a,b,...`), results grouped per agent.
    many_hosts: bool = False


def _domain(help_text: str = "a domain name or domid") -> Arg:
    return arg("domain", metavar="<Domain>", help=help_text)


def _cmd_help(s: Session, ns: argparse.Namespace) -> int:
    if ns.subcommand is None:
        s.out.write(_top_parser().format_help())
        return commands.EXIT_OK
    verb = VERBS.get(ns.subcommand)
    if verb is None:
        raise UsageError(f"unknown subcommand {ns.subcommand!r}")
    s.out.write(_verb_parser(verb).format_help())
    return commands.EXIT_OK


_SNAPSHOT_REF = "a snapshot's name, or its directory (a path with a '/', e.g. ./snap)"

VERB_LIST: tuple[Verb, ...] = (
    Verb(
        "list",
        "[-l] [<Domain> ...]",
        "List information about all/some domains",
        (
            arg("-l", "--long", action="store_true", help="print each domain's configuration"),
            arg("domains", nargs="*", metavar="<Domain>", help="domain names or domids; default: all"),
        ),
        commands.cmd_list,
        many_hosts=True,
    ),
    Verb(
        "create",
        "<cfgfile> [KEY=VALUE ...] [-p]",
        "Create a domain from config file <cfgfile>",
        (
            arg("cfgfile", metavar="<cfgfile>", help="xl.cfg file, read here and sent as text; - reads stdin"),
            arg("overrides", nargs="*", metavar="KEY=VALUE", help="settings appended to the file, as in xl"),
            arg("-p", dest="paused", action="store_true", help="leave the domain paused after creating it"),
        ),
        commands.cmd_create,
    ),
    Verb("destroy", "<Domain>", "Terminate a domain immediately", (_domain(),), commands.cmd_destroy),
    Verb("pause", "<Domain>", "Pause execution of a domain", (_domain(),), commands.cmd_pause),
    Verb("unpause", "<Domain>", "Unpause a paused domain", (_domain(),), commands.cmd_unpause),
    Verb(
        "cd-insert",
        "<Domain> <VirtualDevice> <path>",
        "Insert a CD-ROM image into a domain's CD-ROM drive",
        (
            _domain(),
            arg("vdev", metavar="<VirtualDevice>", help="the CD-ROM drive, as in the domain's disk list (hdc)"),
            arg("path", metavar="<path>", help="a raw image (an ISO) on the agent's host"),
        ),
        commands.cmd_cd_insert,
    ),
    Verb(
        "cd-eject",
        "<Domain> <VirtualDevice>",
        "Eject the medium of a domain's CD-ROM drive",
        (_domain(), arg("vdev", metavar="<VirtualDevice>", help="the CD-ROM drive (hdc)")),
        commands.cmd_cd_eject,
    ),
    Verb(
        "snapshot-create",
        "<Domain> [<cfgfile>] [--name NAME] [--live] [--internal|--external] [<path>] [KEY=VALUE ...]",
        "Create a snapshot (RAM and every disk) of a domain",
        (
            _domain(),
            arg("args", nargs="*", metavar="[<cfgfile>] [<path>] [KEY=VALUE]", help=argparse.SUPPRESS),
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
                        const=pb.SNAPSHOT_METHOD_INTERNAL,
                        default=pb.SNAPSHOT_METHOD_DEFAULT,
                        help="snapshot every disk inside its image (qcow2 tag, LVM snapshot)",
                    ),
                    arg(
                        "--external",
                        dest="method",
                        action="store_const",
                        const=pb.SNAPSHOT_METHOD_EXTERNAL,
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
        ),
        commands.cmd_snapshot_create,
        details=(
            "Free arguments are told apart by what they are: KEY=VALUE is a setting appended to\n"
            "the cfg text; an existing regular file (or -, stdin) is the <cfgfile>, sent as text;\n"
            "anything else is <path>, the snapshot's directory, which must not exist yet.\n"
            "Default <path>: the agent's <snapshot_root>/<Domain>/<name>. Default method: per disk,\n"
            "the cheapest one its storage supports."
        ),
    ),
    Verb(
        "snapshot-revert",
        "<Domain> <path|name|cfgfile> [--running|--paused] [--force] [--reset-nvram]",
        "Revert a domain to a snapshot",
        (
            _domain(),
            arg("snapshot", metavar="<path|name|cfgfile>", help=f"{_SNAPSHOT_REF}, or a snapshot cfgfile"),
            OneOf(
                (
                    arg(
                        "--running",
                        dest="run_state",
                        action="store_const",
                        const=pb.RUN_STATE_AFTER_REVERT_RUNNING,
                        default=pb.RUN_STATE_AFTER_REVERT_SNAPSHOT,
                        help="leave the domain running, whatever it was at the snapshot",
                    ),
                    arg(
                        "--paused",
                        dest="run_state",
                        action="store_const",
                        const=pb.RUN_STATE_AFTER_REVERT_PAUSED,
                        help="leave the domain paused",
                    ),
                )
            ),
            arg(
                "--force",
                action="store_true",
                help="revert even when risky (config changed, domain gone, ...)",
            ),
            arg(
                "--reset-nvram",
                action="store_true",
                help="a UEFI domain's firmware variables start over from the firmware's template",
            ),
        ),
        commands.cmd_snapshot_revert,
    ),
    Verb(
        "snapshot-list",
        "[<Domain>] [--tree]",
        "List snapshots",
        (
            arg("domain", nargs="?", metavar="<Domain>", help="only this domain's; default: every domain's"),
            arg("--tree", action="store_true", help="draw each domain's snapshots as parent/child trees"),
        ),
        commands.cmd_snapshot_list,
        many_hosts=True,
    ),
    Verb(
        "snapshot-info",
        "<Domain> <path|name>",
        "Show a snapshot's details",
        (_domain(), arg("snapshot", metavar="<path|name>", help=_SNAPSHOT_REF)),
        commands.cmd_snapshot_info,
    ),
    Verb(
        "snapshot-delete",
        "<Domain> <path|name> [--children]",
        "Delete a snapshot",
        (
            _domain(),
            arg("snapshot", metavar="<path|name>", help=_SNAPSHOT_REF),
            arg("--children", action="store_true", help="delete the snapshots taken on top of it too"),
        ),
        commands.cmd_snapshot_delete,
    ),
    Verb(
        "watch",
        "<operation-id>",
        "Follow a running or finished operation",
        (arg("operation_id", metavar="<operation-id>"),),
        commands.cmd_watch,
    ),
    Verb(
        "cancel",
        "<operation-id>",
        "Stop an operation and roll it back",
        (arg("operation_id", metavar="<operation-id>"),),
        commands.cmd_cancel,
    ),
    Verb(
        "operations",
        "[<Domain>]",
        "List running and recent operations",
        (arg("domain", nargs="?", metavar="<Domain>", help="only this domain's; default: every domain's"),),
        commands.cmd_operations,
    ),
    Verb(
        "info",
        "",
        "Get information about the agent and its hypervisor",
        (),
        commands.cmd_info,
        many_hosts=True,
    ),
    Verb(
        "help",
        "[<subcommand>]",
        "Print help for a subcommand, or list them all",
        (arg("subcommand", nargs="?", metavar="<subcommand>"),),
        _cmd_help,
    ),
)

VERBS = {verb.name: verb for verb in VERB_LIST}

# Where the global options land; they may come again after the subcommand.
_GLOBAL_DESTS = ("address", "json", "timeout", "request_id", "ca", "cert", "key")


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
    parser.add_argument(
        "-t",
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        **opts(DEFAULT_TIMEOUT, f"give up on a short call after SECONDS (default: {DEFAULT_TIMEOUT:g})"),
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
        usage="domsnap [-H ADDR] [--ca FILE --cert FILE --key FILE] [--json] [-t SECONDS] [--request-id ID] "
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
        sys.stderr.write(f"domsnap: {parsed.subcommand!r} is not a subcommand. See 'domsnap help'.\n")
        return EXIT_USAGE
    parser = _verb_parser(verb)
    ns = _parse(parser, parsed.rest, intermixed=True)
    if isinstance(ns, int):
        return ns
    options = {dest: getattr(ns, dest, getattr(parsed, dest)) for dest in _GLOBAL_DESTS}
    addresses: tuple[connection.Address, ...] = options["address"]
    handler = verb.handler
    if len(addresses) > 1:
        if not verb.many_hosts:
            several = ", ".join(v.name for v in VERB_LIST if v.many_hosts)
            return _parse_error(parser, f"-H names {len(addresses)} agents; only {several} run on several")
        handler = functools.partial(commands.run_on_hosts, verb.handler, addresses)
    session = Session(
        address=addresses[0],
        json=options["json"],
        timeout=options["timeout"],
        request_id=options["request_id"],
        tls=connection.TlsFiles(options["ca"], options["cert"], options["key"]),
        out=sys.stdout,
        err=sys.stderr,
    )
    return _run(handler, parser, session, ns)


def _run(handler: Handler, parser: argparse.ArgumentParser, session: Session, ns: argparse.Namespace) -> int:
    """Run a handler; every failure becomes one stderr line and an exit status."""
    try:
        return handler(session, ns)
    except UsageError as err:
        return _parse_error(parser, str(err))
    except grpc.RpcError as err:
        _fail(session, session.rpc_error_message(err))
    except CliError as err:
        _fail(session, str(err))
    except KeyboardInterrupt:
        session.err.write("\ndomsnap: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as err:
        # A bug of ours; still one line, so scripts parsing stderr never
        # meet a traceback.
        _fail(session, f"internal error: {type(err).__name__}: {err}")
    finally:
        session.close()
    return EXIT_ERROR


def _parse_error(parser: argparse.ArgumentParser, message: str) -> int:
    try:
        parser.error(message)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE


def _fail(session: Session, message: str) -> None:
    session.err.write(f"domsnap: {message}\n")


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
