"""The CLI's exit statuses, and the two errors that end a command with one.

Apart from commands.py so that `domsnap --help` and a usage error, which
never reach a command, load nothing of gRPC (see cli.py)."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
# 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
EXIT_INTERRUPTED = 130
# 128 + SIGPIPE, as a shell reports `domsnap snapshot-list | head`.
EXIT_BROKEN_PIPE = 141


class CliError(Exception):
    """Fails the command with one line on stderr and exit status 1."""


class UsageError(Exception):
    """The arguments parse but do not make sense together (exit status 2)."""
