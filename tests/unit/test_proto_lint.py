"""buf's lint of the API (buf.yaml: STANDARD, less the argued exceptions),
and proof that it finds what it is there to find."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from domsnap.v1 import domsnap_pb2

REPO = Path(__file__).resolve().parents[2]
BUF = REPO / "tools" / "buf" / "node_modules" / ".bin" / "buf"


def buf_lint(workdir: Path) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        pytest.fail("tools/buf/node_modules is missing: run scripts/setup (it runs npm ci there)")
    return subprocess.run([str(BUF), "lint"], cwd=workdir, capture_output=True, text=True, timeout=120)


def test_the_proto_passes_buf_lint() -> None:
    out = buf_lint(REPO)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


def test_the_lint_finds_an_enum_without_an_unspecified_zero(tmp_path: Path) -> None:
    shutil.copy(REPO / "buf.yaml", tmp_path)
    shutil.copytree(REPO / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("*.py", "*.pyi", "*.typed"))
    api = tmp_path / "proto" / "domsnap" / "v1" / "domsnap.proto"
    api.write_text(api.read_text().replace("DOMAIN_STATE_UNSPECIFIED = 0;", "DOMAIN_STATE_NONE = 0;"))
    out = buf_lint(tmp_path)
    assert out.returncode != 0 and "\"DOMAIN_STATE_NONE\" should be suffixed with \"_UNSPECIFIED\"" in out.stdout, out


def test_every_field_of_the_api_says_its_behavior() -> None:
    """google.api.field_behavior on every field (the .proto's header says what each means)."""
    def fields(message: Descriptor) -> Iterator[FieldDescriptor]:
        yield from message.fields
        for nested in message.nested_types:
            if not nested.GetOptions().map_entry:
                yield from fields(nested)

    bare = [f.full_name for m in domsnap_pb2.DESCRIPTOR.message_types_by_name.values() for f in fields(m)
            if "google.api.field_behavior" not in {d.full_name for d, _ in f.GetOptions().ListFields()}]
    assert bare == []


def test_the_reasons_the_agent_gives_are_the_ones_the_proto_lists() -> None:
    """Each reason the agent raises is in the .proto's list, and each listed one is raised or a class's default
    (each is asserted on the wire in tests/integration: test_error_reasons and the tests it names)."""
    api = (REPO / "proto" / "domsnap" / "v1" / "domsnap.proto").read_text()
    table = api.split("Reasons, by code")[1].split("// Transport.")[0]
    rows = [re.match(r"//   ([A-Z_]+)\s+(.*)", line) for line in table.splitlines()]
    listed = {word for row in rows if row for word in re.findall(r"\b[A-Z][A-Z_]*[A-Z]\b", row[2])}
    listed |= {word for line in table.splitlines() if line.startswith("//" + " " * 23)
               for word in re.findall(r"\b[A-Z][A-Z_]*[A-Z]\b", line)}
    risks = {"DOMAIN_GONE", "CONFIG_CHANGED", "HYPERVISOR_CHANGED", "LAYER_GONE", "LAYER_WRITTEN"}
    source = "\n".join(p.read_text() for p in (REPO / "agent").rglob("*.py"))
    raised = set(re.findall(r'reason="([A-Z_]+)"', source))
    defaults = set(re.findall(r'default_reason(?:: str)? = "([A-Z_]+)"', source))
    assert raised - listed == set()
    assert listed - risks - raised - defaults == set()
