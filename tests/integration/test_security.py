"""Security on a real agent: mTLS and roles over TCP (127.0.0.1 only), the
unix socket's mode, group and peer credentials, refusals at start, request
limits and a bounded fuzz of every request's strings.

No guest is needed but for the path-escape test: roles are checked with calls
that change nothing (ListDomains, CreateSnapshot on a domain that does not exist).
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from domsnap.agent import limits
from domsnap.v1 import domsnap_pb2 as pb
from domsnap.v1 import domsnap_pb2_grpc as pb_grpc
from testbed.harness import BIN, Agent
from tests.integration.conftest import BootGuest, error_info
from tests.tlscerts import CA, Pair

ADMIN_CN, READER_CN, STRANGER_CN = "ops", "monitor", "stranger"


class Pki:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        ca, other = CA("domsnap test CA"), CA("some other CA")
        self.ca = ca.write(folder / "ca.crt")
        self.other_ca = other.write(folder / "other-ca.crt")
        self.server = ca.server(folder)
        self.admin = ca.issue(folder, "admin", ADMIN_CN)
        self.reader = ca.issue(folder, "reader", READER_CN)
        self.stranger = ca.issue(folder, "stranger", STRANGER_CN)
        self.expired = ca.issue(folder, "expired", ADMIN_CN, expired=True)
        # Same CN as the admin, wrong issuer.
        self.foreign = other.issue(folder, "foreign", ADMIN_CN)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_toml(pki: Pki, extra: str = "") -> str:
    return (f'{extra}[tls]\ncert = "{pki.server.cert}"\nkey = "{pki.server.key}"\nclient_ca = "{pki.ca}"\n'
            f'[roles]\nadmin = ["CN={ADMIN_CN}"]\nread_only = ["CN={READER_CN}"]\n')


def tcp_port(agent: Agent) -> int:
    found = re.findall(r"listening on .*?127\.0\.0\.1:(\d+) \(", agent.log.read_text())
    assert found, "the agent did not log its TCP port"
    return int(found[-1])


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Agent]:
    a = Agent(tmp_path_factory.mktemp("tls"), config_toml=tls_toml(pki), extra_listen=("127.0.0.1:0",))
    a.start()
    yield a
    a.stop()


def channel(agent: Agent, pki: Pki, pair: Pair | None, ca: Path | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca).read_bytes(),
        private_key=pair.key.read_bytes() if pair else None,
        certificate_chain=pair.cert.read_bytes() if pair else None,
    )
    return grpc.secure_channel(f"127.0.0.1:{tcp_port(agent)}", creds)


def code_of(call: Any, *args: Any, timeout: float = 10) -> grpc.StatusCode:
    try:
        result = call(*args, timeout=timeout)
        if hasattr(result, "__iter__") and not isinstance(result, Message):
            list(result)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def create_nosuch(path: str = "") -> pb.CreateSnapshotRequest:
    return pb.CreateSnapshotRequest(domain_name="nosuch", name="s1", path=path, request_id=uuid.uuid4().hex)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DOMSNAP_")}
    return subprocess.run([str(BIN / "domsnap"), *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})})


def tls_args(agent: Agent, pki: Pki, pair: Pair | None, ca: Path | None = None) -> list[str]:
    args = ["-H", f"127.0.0.1:{tcp_port(agent)}", "--ca", str(ca or pki.ca)]
    return args + (["--cert", str(pair.cert), "--key", str(pair.key)] if pair else [])


# ------------------------------------------------------------ TLS + roles ----

def test_admin_certificate_reaches_everything(tls_agent: Agent, pki: Pki) -> None:
    with channel(tls_agent, pki, pki.admin) as ch:
        stub = pb_grpc.SnapshotAgentStub(ch)
        assert code_of(stub.ListDomains, pb.ListDomainsRequest()) == grpc.StatusCode.OK
        # Past the role check, into the servicer: the domain does not exist.
        assert code_of(stub.CreateSnapshot, create_nosuch()) == grpc.StatusCode.NOT_FOUND
        assert code_of(stub.CancelOperation, pb.CancelOperationRequest(operation_id="x")) == grpc.StatusCode.NOT_FOUND


def test_read_only_certificate_reads_and_changes_nothing(tls_agent: Agent, pki: Pki, tmp_path: Path) -> None:
    target = tmp_path / "snap"
    with channel(tls_agent, pki, pki.reader) as ch:
        stub = pb_grpc.SnapshotAgentStub(ch)
        reads: list[tuple[Any, Message]] = [
            (stub.GetAgentInfo, pb.GetAgentInfoRequest()), (stub.ListDomains, pb.ListDomainsRequest()),
            (stub.ListSnapshots, pb.ListSnapshotsRequest()), (stub.ListOperations, pb.ListOperationsRequest())]
        for call, request in reads:
            assert code_of(call, request) == grpc.StatusCode.OK
        assert code_of(stub.GetDomain, pb.GetDomainRequest(domain_name="nosuch")) == grpc.StatusCode.NOT_FOUND
        operations = len(stub.ListOperations(pb.ListOperationsRequest(), timeout=10).operations)
        mutations = [
            (stub.CreateSnapshot, create_nosuch(str(target))),
            (stub.RevertSnapshot, pb.RevertSnapshotRequest(domain_name="nosuch", snapshot_name="s1")),
            (stub.DeleteSnapshot, pb.DeleteSnapshotRequest(domain_name="nosuch", snapshot_name="s1")),
            (stub.CreateDomain, pb.CreateDomainRequest(config='name = "x"\n')),
            (stub.DestroyDomain, pb.DestroyDomainRequest(domain_name="nosuch")),
            (stub.PauseDomain, pb.PauseDomainRequest(domain_name="nosuch")),
            (stub.UnpauseDomain, pb.UnpauseDomainRequest(domain_name="nosuch")),
            (stub.CancelOperation, pb.CancelOperationRequest(operation_id="x")),
        ]
        for call, request in mutations:
            assert code_of(call, request) == grpc.StatusCode.PERMISSION_DENIED, call
        with pytest.raises(grpc.RpcError) as info:
            list(stub.CreateSnapshot(create_nosuch(), timeout=10))
        assert info.value.details() == (f"permission denied: CN={READER_CN} is read-only; CreateSnapshot needs admin: "
                                         "use a certificate listed under [roles] admin")
        assert len(stub.ListOperations(pb.ListOperationsRequest(), timeout=10).operations) == operations
    assert not target.exists()
    assert not any(tls_agent.snapshot_root.iterdir())


def test_unknown_identity_gets_health_only(tls_agent: Agent, pki: Pki) -> None:
    with channel(tls_agent, pki, pki.stranger) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.SnapshotAgentStub(ch)
        with pytest.raises(grpc.RpcError) as denied:
            stub.ListDomains(pb.ListDomainsRequest(), timeout=10)
        assert error_info(denied.value) == ("PERMISSION_DENIED", "PERMISSION_DENIED", {})
        assert code_of(stub.GetAgentInfo, pb.GetAgentInfoRequest()) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(stub.CreateSnapshot, create_nosuch()) == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("who", ["expired", "foreign", None])
def test_bad_client_certificates_cannot_connect(tls_agent: Agent, pki: Pki, who: str | None) -> None:
    with channel(tls_agent, pki, getattr(pki, who) if who else None) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert code_of(stub.Check, health_pb2.HealthCheckRequest()) == grpc.StatusCode.UNAVAILABLE


def test_plain_client_on_the_tls_port_cannot_call(tls_agent: Agent) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{tcp_port(tls_agent)}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert code_of(stub.Check, health_pb2.HealthCheckRequest()) == grpc.StatusCode.UNAVAILABLE


def test_cli_with_certificates_from_flags_and_env(tls_agent: Agent, pki: Pki) -> None:
    ok = cli(*tls_args(tls_agent, pki, pki.admin), "list")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Name")
    env = {"DOMSNAP_HOST": f"127.0.0.1:{tcp_port(tls_agent)}", "DOMSNAP_CA": str(pki.ca),
           "DOMSNAP_CERT": str(pki.reader.cert), "DOMSNAP_KEY": str(pki.reader.key)}
    assert cli("list", env=env).returncode == 0
    denied = cli("snapshot-create", "nosuch", env=env)
    assert (denied.returncode, denied.stderr) == (
        1, f"domsnap: permission denied: CN={READER_CN} is read-only; CreateSnapshot needs admin: use a "
        "certificate listed under [roles] admin\n")


def test_cli_one_line_for_each_tls_failure(tls_agent: Agent, pki: Pki) -> None:
    port = tcp_port(tls_agent)
    cases = {
        "expired": (tls_args(tls_agent, pki, pki.expired),
                    rf"domsnap: TLS: the client certificate {pki.expired.cert} expired on \d{{4}}-\d\d-\d\d "),
        "other CA": (tls_args(tls_agent, pki, pki.foreign),
                     rf"domsnap: TLS: the agent at 127\.0\.0\.1:{port} refused the client certificate "
                     rf"{pki.foreign.cert} \(CN={ADMIN_CN}\): not issued by the CA it trusts"),
        "no certificate": (tls_args(tls_agent, pki, None),
                           r"domsnap: TLS: the agent at .* requires a client certificate: give --cert and --key"),
        "untrusted agent": (tls_args(tls_agent, pki, pki.admin, ca=pki.other_ca),
                            rf"domsnap: TLS: the agent's certificate at 127\.0\.0\.1:{port} is not trusted by "
                            rf"--ca {pki.other_ca}: unable to get local issuer certificate"),
        "key of another": (["-H", f"127.0.0.1:{port}", "--ca", str(pki.ca), "--cert", str(pki.admin.cert),
                            "--key", str(pki.reader.key)],
                           rf"domsnap: TLS: --cert {pki.admin.cert} and --key {pki.reader.key}: "),
        "missing file": (["-H", f"127.0.0.1:{port}", "--ca", str(pki.folder / "nope.crt")],
                         r"domsnap: TLS: cannot read --ca .*nope\.crt: No such file or directory"),
    }
    for name, (args, pattern) in cases.items():
        out = cli(*args, "list")
        assert out.returncode == 1, name
        assert re.fullmatch(pattern + r".*\n", out.stderr), f"{name}: {out.stderr!r}"
        assert out.stderr.count("\n") == 1, name


def test_audit_lines_name_caller_rpc_fields_and_outcome(tls_agent: Agent, pki: Pki) -> None:
    request_id = uuid.uuid4().hex
    for pair, code in ((pki.admin, grpc.StatusCode.NOT_FOUND), (pki.reader, grpc.StatusCode.PERMISSION_DENIED)):
        with channel(tls_agent, pki, pair) as ch:
            request = pb.CreateSnapshotRequest(domain_name="nosuch", name="s9", path="/x/y", request_id=request_id)
            assert code_of(pb_grpc.SnapshotAgentStub(ch).CreateSnapshot, request) == code
    audit = [line for line in tls_agent.log.read_text().splitlines() if "domsnap.audit" in line and request_id in line]
    assert len(audit) == 2, audit
    fields = f"domain_name='nosuch' name='s9' path='/x/y' request_id='{request_id}'"
    assert audit[0].endswith(f"caller='CN={ADMIN_CN}' role=admin rpc=CreateSnapshot {fields} code=NOT_FOUND")
    assert audit[1].endswith(f"caller='CN={READER_CN}' role=read_only rpc=CreateSnapshot {fields} "
                             "code=PERMISSION_DENIED")


# ----------------------------------------------------- refusals at start ----

def start_refused(tmp_path: Path, toml: str, *listen: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "domsnapd.toml"
    config.write_text(toml)
    argv = [str(BIN / "domsnapd"), "--config", str(config), "--state-dir", str(tmp_path / "state"),
            "--snapshot-root", str(tmp_path / "snapshots"), "--driver", "qemu"]
    for addr in listen:
        argv += ["--listen", addr]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    return proc


def test_plain_tcp_beyond_loopback_is_refused_at_start(tmp_path: Path) -> None:
    # Refused when the config loads, before anything is bound.
    proc = start_refused(tmp_path, "allow_plaintext_loopback = true\n", "0.0.0.0:7411")
    assert proc.returncode == 2
    assert proc.stderr == ("domsnapd: listen address '0.0.0.0:7411': TCP needs TLS with client certificates: "
                           "set [tls] cert, key and client_ca, or listen on a unix socket\n")


def test_plain_tcp_on_loopback_is_refused_unless_allowed(tmp_path: Path) -> None:
    proc = start_refused(tmp_path, "", "127.0.0.1:0")
    assert proc.returncode == 2
    assert "allow_plaintext_loopback = true" in proc.stderr


def test_a_key_that_is_not_the_certificates_is_refused_at_start(tmp_path: Path, pki: Pki) -> None:
    toml = f'[tls]\ncert = "{pki.server.cert}"\nkey = "{pki.admin.key}"\nclient_ca = "{pki.ca}"\n'
    proc = start_refused(tmp_path, toml, f"unix:{tmp_path}/d.sock", "127.0.0.1:0")
    assert f"domsnapd: [tls] cert {pki.server.cert} and key {pki.admin.key}:" in proc.stderr


def test_plain_loopback_when_allowed_is_the_loopback_identity(tmp_path_factory: pytest.TempPathFactory) -> None:
    toml = 'allow_plaintext_loopback = true\n[roles]\nread_only = ["loopback"]\n'
    a = Agent(tmp_path_factory.mktemp("plain"), config_toml=toml, extra_listen=("127.0.0.1:0",))
    a.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{tcp_port(a)}") as ch:
            stub = pb_grpc.SnapshotAgentStub(ch)
            assert code_of(stub.ListDomains, pb.ListDomainsRequest()) == grpc.StatusCode.OK
            assert code_of(stub.CreateSnapshot, create_nosuch()) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        a.stop()


# ------------------------------------------------------------ unix socket ----

def group_or_skip(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pytest.skip(f"no group {name!r} on this machine")


NOBODY = 65534
# Imports first, as root (the interpreter lives under /root), then the
# process becomes NOBODY with the given groups and runs the CLI. The CLI
# loads its client library (and gRPC) only once it runs a command, and a
# mutating command its progress renderer and uuid, so those are imported
# here too.
AS_USER = """
import os, sys, shutil, gettext, textwrap, locale, difflib, fnmatch, uuid
from domsnap.client import api, cli, commands, errors, progress
uid, gid, *groups = (int(x) for x in sys.argv[1].split(","))
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
sys.exit(cli.main(sys.argv[2:]))
"""


def cli_as(ids: tuple[int, ...], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DOMSNAP_")}
    return subprocess.run([sys.executable, "-c", AS_USER, ",".join(map(str, ids)), *args], capture_output=True,
                          text=True, timeout=60, cwd="/", env=clean)


@pytest.fixture(scope="module")
def group_agent() -> Iterator[Agent]:
    """An agent whose socket other users can reach: `users` may read, `staff` is admin."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to be other users")
    group_or_skip("users")
    group_or_skip("staff")
    # Outside pytest's 0700 temp dirs, so that another user can reach the socket.
    base = Path(tempfile.mkdtemp(prefix="domsnap-sec-"))
    base.chmod(0o755)
    a = Agent(base, config_toml='socket_group = "users"\nadmin_group = "staff"\n',
              extra_listen=(f"unix:{base}/run/second.sock",))
    try:
        a.start()
        yield a
    finally:
        if a.proc is not None:
            a.stop()
        shutil.rmtree(base)


def test_socket_mode_group_and_directory(group_agent: Agent) -> None:
    users = grp.getgrnam("users").gr_gid
    for sock in (group_agent.sock, group_agent.base / "run" / "second.sock"):
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, users)
    made = os.lstat(group_agent.base / "run")
    assert (stat.S_IMODE(made.st_mode), made.st_uid, made.st_gid) == (0o750, 0, users)
    private = os.lstat(group_agent.base / ".domsnapd.sock.private")
    assert stat.S_IMODE(private.st_mode) == 0o700


def test_unix_roles_follow_the_peers_groups(group_agent: Agent) -> None:
    users, staff = grp.getgrnam("users").gr_gid, grp.getgrnam("staff").gr_gid
    for address in (group_agent.address, f"unix:{group_agent.base}/run/second.sock"):
        reader = (NOBODY, NOBODY, users)
        assert cli_as(reader, "-H", address, "list").returncode == 0
        denied = cli_as(reader, "-H", address, "snapshot-create", "nosuch")
        assert denied.returncode == 1
        assert re.fullmatch(r"domsnap: permission denied: uid=65534\(\w+\) pid=\d+ is read-only; "
                            r"CreateSnapshot needs admin: run it as root or as a member of the agent's admin_group\n",
                            denied.stderr), denied.stderr
        # The primary group counts as much as a supplementary one.
        assert cli_as((NOBODY, users), "-H", address, "list").returncode == 0
        admin = cli_as((NOBODY, NOBODY, users, staff), "-H", address, "snapshot-create", "nosuch")
        assert admin.stderr == "domsnap: domain 'nosuch' does not exist\n"
        outsider = cli_as((NOBODY, NOBODY), "-H", address, "list")
        assert outsider.returncode == 1
        # The way out: the socket's group, or root.
        assert outsider.stderr.endswith("Permission denied. Only root and the agent's socket_group (domsnap by "
                                        "default) may connect: join that group and log in again, or run as root\n"
                                        ), outsider.stderr
    # The gRPC server's own socket is out of reach, even for the socket's group.
    private = f"unix:{group_agent.base}/.domsnapd.sock.private/grpc.sock"
    behind = cli_as((NOBODY, NOBODY, users, staff), "-H", private, "list")
    assert (behind.returncode, "Permission denied" in behind.stderr) == (1, True), behind.stderr
    audit = [line for line in group_agent.log.read_text().splitlines() if "domsnap.audit" in line]
    assert any("caller='uid=65534" in line and "role=read_only" in line and "code=PERMISSION_DENIED" in line
               for line in audit)
    assert any("caller='uid=65534" in line and "role=admin" in line and "code=NOT_FOUND" in line for line in audit)


def test_unsafe_socket_places_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.sock"
    link = tmp_path / "link.sock"
    link.symlink_to(target)
    proc = start_refused(tmp_path, "", f"unix:{link}")
    assert f"unix socket {link}: is a symlink" in proc.stderr
    assert not target.exists()

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    proc = start_refused(tmp_path, "", f"unix:{shared}/d.sock")
    assert f"{shared} is world-writable" in proc.stderr

    plain = tmp_path / "file.sock"
    plain.write_text("not a socket")
    proc = start_refused(tmp_path, "", f"unix:{plain}")
    assert "exists and is not a socket" in proc.stderr
    assert plain.read_text() == "not a socket"


def test_a_missing_socket_group_keeps_roots_group(tmp_path_factory: pytest.TempPathFactory) -> None:
    a = Agent(tmp_path_factory.mktemp("nogroup"), config_toml='socket_group = "no-such-group-here"\n')
    a.start()
    try:
        st = os.lstat(a.sock)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, os.getegid())
        assert "socket_group 'no-such-group-here' does not exist" in a.log.read_text()
    finally:
        a.stop()


# --------------------------------------------------------- limits + fuzz ----

@pytest.fixture(scope="module")
def plain_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(tmp_path_factory.mktemp("fuzz"))
    a.start()
    yield a
    a.stop()


def test_size_limits_and_message_size(plain_agent: Agent) -> None:
    with plain_agent.channel() as ch:
        stub = pb_grpc.SnapshotAgentStub(ch)
        too_long = pb.CreateDomainRequest(config="#" * ((1 << 20) + 1))
        assert code_of(stub.CreateDomain, too_long) == grpc.StatusCode.INVALID_ARGUMENT
        huge = pb.CreateDomainRequest(config="#" * (3 << 20))
        assert code_of(stub.CreateDomain, huge) == grpc.StatusCode.RESOURCE_EXHAUSTED
        many = pb.CreateSnapshotRequest(domain_name="nosuch", overrides=["a=b"] * 257)
        assert code_of(stub.CreateSnapshot, many) == grpc.StatusCode.INVALID_ARGUMENT
        nul = pb.GetSnapshotRequest(domain_name="nosuch", snapshot_path="/a\0b")
        assert code_of(stub.GetSnapshot, nul) == grpc.StatusCode.INVALID_ARGUMENT


AGENT = pb.DESCRIPTOR.services_by_name["SnapshotAgent"]
# What a fuzzed request may end with: a caller mistake, never a crash.
FINE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED}
# The change feed never ends by itself: a valid request runs until its
# deadline; a token it does not hold is OUT_OF_RANGE.
ENDLESS = {"WatchEvents": {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OUT_OF_RANGE}}
NASTY = ["", ".", "..", "/", "/dev/null", "../../etc/passwd", "-rf", "a" * 65, "x" * 5000, "\x00", "a\nb",
         "name = \"x\"", "disk = [ '/dev/sda,raw,xvda,w' ]", "memory_path = '/etc/shadow'", "é" * 40, "1", "0"]
strings = st.one_of(st.text(max_size=80), st.sampled_from(NASTY))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, Message, bool]:
    method = draw(st.sampled_from(list(AGENT.methods)))
    cls = getattr(pb, method.input_type.name)
    fields: dict[str, Any] = {}
    for f in cls.DESCRIPTOR.fields:
        # One field of a oneof at most: a second would clear the first.
        if f.type != f.TYPE_STRING or (f.containing_oneof is not None and any(
                g.name in fields for g in f.containing_oneof.fields)):
            continue
        if f.is_repeated:
            fields[f.name] = draw(st.one_of(st.lists(strings, max_size=4), st.just(["a=b"] * 257)))
        else:
            fields[f.name] = draw(strings)
    over = any(
        (len(v) > limits.REPEATED_LIMITS.get(k, 256)) or any(len(s.encode()) > limits.STRING_LIMITS[k] or "\0" in s
                                                            for s in v)
        if isinstance(v, list) else (len(v.encode()) > limits.STRING_LIMITS[k] or "\0" in v)
        for k, v in fields.items())
    return method.name, cls(**fields), over


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=requests())
def test_fuzz_request_strings(plain_agent: Agent, case: tuple[str, Message, bool]) -> None:
    name, request, over = case
    # A client-streaming method (GroupSnapshot) takes its requests as an iterator.
    sent = iter([request]) if AGENT.methods_by_name[name].client_streaming else request
    with plain_agent.channel() as ch:
        code = code_of(getattr(pb_grpc.SnapshotAgentStub(ch), name), sent, timeout=1 if name in ENDLESS else 10)
    event(f"{name}: {code.name}")
    if over:
        # A field over its limit is named (INVALID_ARGUMENT); a request over
        # the whole message limit is refused by gRPC before it is read.
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), code
    else:
        assert code in FINE | ENDLESS.get(name, set()), f"{name}({request}) ended with {code}"


def test_the_private_socket_gives_no_role_even_to_root(plain_agent: Agent) -> None:
    # Straight onto the gRPC server, past the relay: nobody the agent knows.
    with grpc.insecure_channel(f"unix:{plain_agent.base}/.domsnapd.sock.private/grpc.sock") as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.SnapshotAgentStub(ch)
        with pytest.raises(grpc.RpcError) as denied:
            stub.ListDomains(pb.ListDomainsRequest(), timeout=10)
        assert error_info(denied.value) == ("PERMISSION_DENIED", "PERMISSION_DENIED", {})


def test_fuzzing_changed_nothing(plain_agent: Agent) -> None:
    with plain_agent.channel() as ch:
        assert not pb_grpc.SnapshotAgentStub(ch).ListDomains(pb.ListDomainsRequest(), timeout=10).domains
    assert not any(plain_agent.snapshot_root.iterdir())
    log = plain_agent.log.read_text()
    assert "Traceback" not in log
    # Names with newlines did not forge log lines: every line is a record of its own.
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ", line) for line in log.splitlines())


# ----------------------------------------------------------- path escapes ----

@pytest.mark.guest
def test_snapshot_paths_cannot_escape_the_roots(agent: Agent, boot_guest: BootGuest,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    # The suite's agent has pytest's base temp dir as its one snapshot root
    # (conftest.py): every escape below leaves it.
    top = tmp_path_factory.getbasetemp()
    g = boot_guest("qcow2", wait=False)
    root = agent.snapshot_root
    outside = Path(tempfile.mkdtemp(prefix="domsnap-outside-"))
    link = root / f"link-{g.name}"
    link.symlink_to(outside)
    ups = "/..".join("" for _ in range(len(root.relative_to(top).parts) + 2))
    escaped = Path(os.path.realpath(f"{root}{ups}")) / f"escape-{g.name}"
    assert not escaped.is_relative_to(top)
    try:
        outside_roots = "outside the snapshot roots"
        attempts: dict[str, tuple[dict[str, Any], str]] = {
            "relative": ({"path": "relative/snap"}, "must be an absolute path"),
            "dotdot": ({"path": f"{root}{ups}/escape-{g.name}"}, outside_roots),
            "symlink out": ({"path": f"{link}/snap"}, outside_roots),
            "device": ({"path": "/dev/shm/domsnap-escape"}, outside_roots),
            "state dir": ({"path": f"{agent.state_dir}/snap"}, "the agent's own"),
            "state dir by ..": ({"path": f"{root}/../state/snap"}, "the agent's own"),
            "memory_path": ({"config": f'memory_path = "{outside}/memory.save"\n'}, outside_roots),
            "external disk": ({"config": f"disks = [ '{outside}/xvda.qcow2,qcow2,xvda' ]\n",
                               "method": pb.SNAPSHOT_METHOD_EXTERNAL}, outside_roots),
        }
        for i, (what, (fields, rule)) in enumerate(attempts.items()):
            with pytest.raises(grpc.RpcError) as info:
                g.create_snapshot(name=f"escape{i}", **fields)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, info.value.details())
            assert rule in (info.value.details() or ""), (what, info.value.details())
        assert not list(outside.iterdir())
        assert not escaped.exists()
        assert not Path("/dev/shm/domsnap-escape").exists()
        assert not (agent.state_dir / "snap").exists()
        assert not agent.stub().ListSnapshots(pb.ListSnapshotsRequest(domain_name=g.name), timeout=30).snapshots
        assert g.domain().state == pb.DOMAIN_STATE_RUNNING
    finally:
        link.unlink()
        shutil.rmtree(outside)
