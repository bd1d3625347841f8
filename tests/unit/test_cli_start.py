"""A CLI that starts fast: `--help`, `help` and usage errors load nothing of
gRPC or of the API's messages, and the client library has no side effects
at import. Each case runs in a fresh interpreter, whose module table is
what the command really loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, os, sys
argv = json.loads(sys.argv[1])
if argv is None:
    from domsnap.client import Client, errors  # the library, for a controller
    rc = 0
else:
    from domsnap.client import cli
    try:
        rc = cli.main(argv)
    except SystemExit as exit_:
        rc = exit_.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("grpc", "grpc_status") or m.startswith(
    ("google.protobuf", "google.rpc", "domsnap.v1")))
lazy = sorted(m for m in ("domsnap.client.progress", "uuid") if m in sys.modules)
print(json.dumps({"rc": rc, "heavy": heavy, "lazy": lazy, "verbosity": os.environ.get("GRPC_VERBOSITY")}),
      file=sys.stderr)
"""


def probe(argv: list[str] | None) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin"})
    result: dict[str, object] = json.loads(proc.stderr.splitlines()[-1])
    return result


@pytest.mark.parametrize(
    ("argv", "rc"),
    [
        (["--help"], 0),
        (["help"], 0),
        (["help", "snapshot-create"], 0),
        (["snapshot-create", "--help"], 0),
        (["snapshot-create"], 2),
        (["snapshot-lst"], 2),
        (["--version"], 0),
    ],
)
def test_help_and_usage_errors_load_no_grpc(argv: list[str], rc: int) -> None:
    result = probe(argv)
    assert result["rc"] == rc
    assert result["heavy"] == [], f"domsnap {' '.join(argv)} loaded {result['heavy']}"


def test_the_library_sets_nothing_at_import() -> None:
    # Before, importing domsnap.client set GRPC_VERBOSITY for the whole process.
    assert probe(None)["verbosity"] is None


def test_a_read_loads_neither_the_progress_renderer_nor_uuid(tmp_path: Path) -> None:
    # They serve the long, mutating commands only; `domsnap list` starts without them.
    result = probe(["-H", f"unix:{tmp_path}/no-agent.sock", "list"])
    assert result["rc"] != 0  # no agent: the command still ran through its connection
    assert result["lazy"] == []
