"""Roles, identities, request limits and the security settings of the config."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from domsnap.agent import auth, limits, reflection
from domsnap.agent import config as agent_config
from domsnap.agent.auth import Authorizer, Role
from domsnap.agent.config import RolesConfig
from domsnap.agent.errors import InvalidArgument
from domsnap.agent.unix_socket import PeerCred, PeerTable, peer_credentials
from domsnap.v1 import domsnap_pb2 as pb

AGENT = pb.DESCRIPTOR.services_by_name["SnapshotAgent"]
SERVED = [AGENT, health_pb2.DESCRIPTOR.services_by_name["Health"],
          reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]


def methods() -> list[str]:
    # Reflection v1 is v1alpha's service under another name (agent/reflection.py).
    return [f"/{service.full_name}/{m.name}" for service in SERVED for m in service.methods] + [
        f"/{reflection.V1_SERVICE}/ServerReflectionInfo"]


# ------------------------------------------------------------------ roles ----

def test_every_rpc_served_has_a_role() -> None:
    missing = [m for m in methods() if m not in auth.RPC_ROLES]
    assert not missing, f"add these RPCs to auth.RPC_ROLES: {missing}"


def test_the_role_table_names_no_rpc_that_does_not_exist() -> None:
    assert set(auth.RPC_ROLES) <= set(methods())


def test_read_only_rpcs_are_exactly_the_ones_that_look() -> None:
    read_only = {auth.rpc_name(m) for m, role in auth.RPC_ROLES.items() if role is Role.READ_ONLY}
    assert read_only == {"GetAgentInfo", "ListDomains", "GetDomain", "ListSnapshots", "GetSnapshot",
                         "ListOperations", "WatchOperation", "GetOperation", "WatchEvents",
                         "ServerReflectionInfo"}
    anyone = {auth.rpc_name(m) for m, role in auth.RPC_ROLES.items() if role is Role.NONE}
    assert anyone == {"Check", "Watch", "List"}


def test_an_rpc_missing_from_the_table_needs_admin() -> None:
    assert auth.required_role("/domsnap.v1.SnapshotAgent/SomethingNew") is Role.ADMIN


def tls(cn: str = "", *sans: str) -> dict[str, list[bytes]]:
    ctx = {"transport_security_type": [b"ssl"], "x509_subject_alternative_name": [s.encode() for s in sans]}
    if cn:
        ctx["x509_common_name"] = [cn.encode()]
    return ctx


PLAIN = {"transport_security_type": [b"insecure"]}


def test_certificate_identities_map_to_roles() -> None:
    authz = Authorizer(RolesConfig(admin=("CN=ops", "SAN=spiffe://site/ctl"), read_only=("CN=monitor",)))
    assert authz.caller("ipv4:127.0.0.1:5000", tls("ops")) == auth.Caller(Role.ADMIN, "CN=ops")
    assert authz.caller("ipv4:10.0.0.1:5000", tls("x", "spiffe://site/ctl")).role is Role.ADMIN
    assert authz.caller("ipv4:127.0.0.1:5000", tls("monitor")).role is Role.READ_ONLY
    assert authz.caller("ipv4:127.0.0.1:5000", tls("stranger", "stranger.example")).role is Role.NONE
    assert authz.caller("ipv4:127.0.0.1:5000", tls()).role is Role.NONE
    # A SAN value is no CN, and the other way round.
    assert authz.caller("ipv4:127.0.0.1:5000", tls("", "ops")).role is Role.NONE
    assert authz.caller("ipv4:127.0.0.1:5000", tls("spiffe://site/ctl")).role is Role.NONE


def test_unix_peers_map_to_roles_by_uid_and_groups() -> None:
    peers = PeerTable()
    authz = Authorizer(RolesConfig(), peers=peers, admin_gid=50, socket_gid=100)
    cases = {
        "unix-abstract:00001": (PeerCred(1, 0, 0), Role.ADMIN),
        "unix-abstract:00002": (PeerCred(2, 1000, 1000, frozenset({1000, 50})), Role.ADMIN),
        "unix-abstract:00003": (PeerCred(3, 1001, 100), Role.READ_ONLY),
        "unix-abstract:00004": (PeerCred(4, 1002, 1002, frozenset({1002, 100})), Role.READ_ONLY),
        "unix-abstract:00005": (PeerCred(5, 1003, 1003, frozenset({1003, 4})), Role.NONE),
    }
    for peer, (cred, _) in cases.items():
        peers.add(peer, cred)
    for peer, (_, role) in cases.items():
        assert authz.caller(peer, PLAIN).role is role, peer
    # Straight onto the private socket, or a connection already gone.
    assert authz.caller("unix-abstract:99999", PLAIN).role is Role.NONE
    assert authz.caller("unix:", PLAIN).role is Role.NONE
    peers.remove("unix-abstract:00001")
    assert authz.caller("unix-abstract:00001", PLAIN).role is Role.NONE


def test_without_groups_only_root_is_anyone_on_the_unix_socket() -> None:
    authz = Authorizer(RolesConfig())
    assert authz.unix_role(PeerCred(1, 0, 0)) is Role.ADMIN
    assert authz.unix_role(PeerCred(1, 1000, 100, frozenset({100, 50}))) is (
        Role.ADMIN if os.geteuid() == 1000 else Role.NONE)


def test_plain_loopback_is_the_loopback_identity() -> None:
    assert Authorizer(RolesConfig()).caller("ipv4:127.0.0.1:4000", PLAIN).role is Role.NONE
    authz = Authorizer(RolesConfig(read_only=("loopback",)))
    assert authz.caller("ipv4:127.0.0.1:4000", PLAIN).role is Role.READ_ONLY
    assert authz.caller("ipv6:[::1]:4000", PLAIN).role is Role.READ_ONLY
    assert authz.caller("ipv4:192.0.2.7:4000", PLAIN).role is Role.NONE
    # A certificate's CN cannot claim to be `loopback`.
    assert authz.caller("ipv4:127.0.0.1:4000", tls("loopback")).role is Role.NONE


def test_denial_messages_name_the_caller_and_the_need() -> None:
    message = auth.denial(auth.Caller(Role.READ_ONLY, "CN=monitor"), "/domsnap.v1.SnapshotAgent/CreateSnapshot",
                          Role.ADMIN)
    assert message == ("permission denied: CN=monitor is read-only; CreateSnapshot needs admin: use a certificate "
                       "listed under [roles] admin")
    assert "has no role" in auth.denial(auth.Caller(Role.NONE, "CN=x"), "/a/B", Role.READ_ONLY)


# ----------------------------------------------------------------- limits ----

def request_types() -> list[type[Message]]:
    return [getattr(pb, m.input_type.name) for m in AGENT.methods]


def test_every_request_string_field_has_a_limit() -> None:
    missing = [f"{t.DESCRIPTOR.name}.{f.name}" for t in request_types() for f in t.DESCRIPTOR.fields
               if f.type == f.TYPE_STRING and f.name not in limits.STRING_LIMITS]
    assert not missing, f"add these fields to limits.STRING_LIMITS: {missing}"


def test_limits_as_specified() -> None:
    assert limits.STRING_LIMITS["domain"] == limits.STRING_LIMITS["name"] == 64
    assert limits.STRING_LIMITS["path"] == 4096
    assert limits.STRING_LIMITS["config"] == 1 << 20
    assert limits.REPEATED_LIMITS["overrides"] == 256


def biggest_create() -> pb.CreateSnapshotRequest:
    return pb.CreateSnapshotRequest(
        request_id="r" * limits.ID, domain_name="d" * 64, name="n" * 64, path="/" + "p" * 4095, config="c" * (1 << 20),
        overrides=["k=" + "v" * (limits.OVERRIDE - 2)] * 256, description="x" * limits.TEXT,
        method=pb.SNAPSHOT_METHOD_EXTERNAL)


def test_requests_at_the_limits_pass_and_fit_the_message_size() -> None:
    request = biggest_create()
    limits.check_request(request)
    assert request.ByteSize() < limits.MAX_REQUEST_BYTES


@pytest.mark.parametrize(("request_", "match"), [
    (pb.GetDomainRequest(domain_name="d" * 65), "domain_name: 65 bytes, at most 64"),
    (pb.CreateSnapshotRequest(name="é" * 33), "name: 66 bytes"),
    (pb.CreateSnapshotRequest(path="/" + "p" * 4096), "path: 4097 bytes"),
    (pb.CreateDomainRequest(config="c" * ((1 << 20) + 1)), "config:"),
    (pb.CreateDomainRequest(overrides=["a=b"] * 257), "overrides: 257 items, at most 256"),
    (pb.CreateDomainRequest(overrides=["a=" + "b" * 5000]), "overrides: 5002 bytes"),
    (pb.RevertSnapshotRequest(snapshot_path="/snap\0/x"), "NUL"),
    (pb.CreateSnapshotRequest(method=7), "method: 7 is not a SnapshotMethod value"),  # type: ignore[arg-type]
    (pb.RevertSnapshotRequest(run_state=-1), "run_state: -1"),  # type: ignore[arg-type]
    (pb.WatchOperationRequest(operation_id="o" * 129), "operation_id"),
])
def test_over_the_limits_is_invalid_argument(request_: object, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        limits.check_request(request_)  # type: ignore[arg-type]


def test_other_services_messages_get_the_default_limit() -> None:
    limits.check_request(health_pb2.HealthCheckRequest(service="x" * limits.DEFAULT_STRING))
    with pytest.raises(InvalidArgument):
        limits.check_request(health_pb2.HealthCheckRequest(service="x" * (limits.DEFAULT_STRING + 1)))


# ----------------------------------------------------------------- config ----

def load(tmp_path: Path, toml: str, **overrides: object) -> agent_config.AgentConfig:
    file = tmp_path / "domsnapd.toml"
    file.write_text(toml)
    return agent_config.load(file, **overrides)


def test_defaults_are_a_unix_socket_and_no_tls(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    assert cfg.listen == ("unix:/run/domsnap/domsnapd.sock",)
    assert (cfg.socket_group, cfg.admin_group, cfg.allow_plaintext_loopback) == ("domsnap", "", False)
    assert not cfg.tls.enabled
    assert cfg.roots == (cfg.snapshot_root,)


@pytest.mark.parametrize("addr", ["0.0.0.0:7411", "192.0.2.1:7411", "[::]:7411"])
def test_plain_tcp_beyond_loopback_is_refused(tmp_path: Path, addr: str) -> None:
    with pytest.raises(InvalidArgument, match="TCP needs TLS with client certificates"):
        load(tmp_path, "allow_plaintext_loopback = true\n", listen=(addr,))


def test_plain_tcp_on_loopback_needs_the_switch(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="allow_plaintext_loopback = true"):
        load(tmp_path, "", listen=("127.0.0.1:7411",))
    cfg = load(tmp_path, "allow_plaintext_loopback = true\n", listen=("127.0.0.1:0", "[::1]:7411"))
    assert [agent_config.parse_listen(a).loopback for a in cfg.listen] == [True, True]


def test_tls_allows_any_tcp_address(tmp_path: Path) -> None:
    cfg = load(tmp_path, '[tls]\ncert = "/c.pem"\nkey = "/k.pem"\nclient_ca = "/ca.pem"\n', listen=("0.0.0.0:7411",))
    assert cfg.tls.enabled
    assert cfg.tls.client_ca == Path("/ca.pem")


def test_tls_needs_all_three_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"cert, key and client_ca together \(got only cert, key\)"):
        load(tmp_path, '[tls]\ncert = "/c.pem"\nkey = "/k.pem"\n')


@pytest.mark.parametrize(("toml", "match"), [
    ('[roles]\nadmin = ["ops"]\n', "expected CN=<common name>"),
    ('[roles]\nread_only = ["CN="]\n', "expected CN=<common name>"),
    ("[roles]\nadmin = [1]\n", "list of strings"),
    ('[tls]\ncert = ""\n', "expected a path"),
    ('[roles]\nsuperuser = ["CN=x"]\n', "unknown setting 'superuser'"),
    ("allow_plaintext_loopback = 1\n", "expected a bool"),
    ("socket_group = 100\n", "expected a str"),
    ('tls = "on"\n', r"must be a \[tls\] section"),
    ('snapshot_roots = ["relative"]\n', "must be an absolute path"),
    ('snapshot_roots = ["/srv/a"]\nsnapshot_root = "/srv/b"\n', "must lie inside one of snapshot_roots"),
])
def test_bad_security_settings(tmp_path: Path, toml: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        load(tmp_path, toml)


def test_roles_and_roots(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'snapshot_roots = ["/srv/snap", "/var/lib/domsnap"]\n'
                         '[roles]\nadmin = ["CN=ops"]\nread_only = ["SAN=mon.example", "loopback"]\n')
    assert cfg.roles.admin == ("CN=ops",)
    assert cfg.roles.read_only == ("SAN=mon.example", "loopback")
    assert cfg.roots == (Path("/srv/snap"), Path("/var/lib/domsnap"))


def test_peer_credentials_come_from_the_kernel() -> None:
    a, b = socket.socketpair()
    with a, b:
        cred = peer_credentials(a)
    assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert set(os.getgroups()) <= cred.groups


def test_a_certificate_name_cannot_forge_a_log_line() -> None:
    authz = Authorizer(RolesConfig(admin=("CN=ops\nINFO forged",)))
    caller = authz.caller("ipv4:127.0.0.1:1", tls("ops\nINFO forged"))
    assert caller == auth.Caller(Role.ADMIN, "CN=ops\\nINFO forged")
