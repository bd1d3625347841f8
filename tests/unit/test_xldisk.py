"""xl disk specs: the man page's examples, xl's own parse tests, errors, and round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domsnap.agent.domain import DomainConfig
from domsnap.agent.errors import InvalidArgument
from domsnap.agent.journal import JournalEntry
from domsnap.agent.snapshot_revert import Stranded
from domsnap.agent.xldisk import (
    BACKEND_TYPES,
    EXTRA_PARAMETERS,
    FLAGS,
    FORMATS,
    MAX_SPEC,
    DiskSpec,
    XlVersion,
    parse_disk,
    valid_vdev,
)

# Each group: specs that xl-disk-configuration(5) or xl's check-xl-disk-parse
# say are equivalent, and what they mean.
EQUIVALENT = [
    (
        DiskSpec(target="/dev/vg/guest-volume", vdev="hda"),
        [
            "/dev/vg/guest-volume,,hda",
            "/dev/vg/guest-volume,raw,hda,rw",
            "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
            "raw:/dev/vg/guest-volume,hda,w",
        ],
    ),
    (
        DiskSpec(target="/root/image.iso", vdev="hdc", access="ro", devtype="cdrom"),
        [
            "/root/image.iso,,hdc,cdrom",
            "/root/image.iso,,hdc,,cdrom",
            "/root/image.iso,raw,hdc,devtype=cdrom",
            "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
            "raw:/root/image.iso,hdc:cdrom,ro",
            "/root/image.iso,raw,hdc,rw,cdrom",  # xl makes every cdrom read-only
        ],
    ),
    (
        DiskSpec(target="", vdev="hdc", format="empty", access="ro", devtype="cdrom"),
        [
            "devtype=cdrom,,,hdc",
            ",,hdc:cdrom,r",
            ",hdc:cdrom,r",
            "vdev=hdc,access=r,devtype=cdrom,target=",
            ",empty,hdc:cdrom,r",
            "vdev=hdc,access=r,devtype=cdrom,format=empty",
            "vdev=hdc,access=r,devtype=cdrom",
        ],
    ),
    (
        DiskSpec(target="/dev/vg/guest-volume", vdev="xvdb", backendtype="phy"),
        ["backendtype=phy,vdev=xvdb,access=w,target=/dev/vg/guest-volume"],
    ),
    (
        DiskSpec(
            target="iqn.2001-05.com.equallogic:0-8a0906-23fe93404-c82797962054a96d-examplehost",
            vdev="xvda",
            script="block-iscsi",
        ),
        [
            "iscsi:iqn.2001-05.com.equallogic:0-8a0906-23fe93404-c82797962054a96d-examplehost,xvda,w",
            "vdev=xvda,access=w,script=block-iscsi,"
            "target=iqn.2001-05.com.equallogic:0-8a0906-23fe93404-c82797962054a96d-examplehost",
        ],
    ),
    (
        DiskSpec(target="app01", vdev="hda", script="block-drbd"),
        ["drbd:app01,hda,w", "vdev=hda,access=w,script=block-drbd,target=app01"],
    ),
    (
        DiskSpec(target="/srv/xen/guest.qcow2", vdev="xvda", format="qcow2"),
        [
            "/srv/xen/guest.qcow2,qcow2,xvda,w",
            "  /srv/xen/guest.qcow2,\tqcow2,  xvda",
            "qcow2:/srv/xen/guest.qcow2,xvda,w",
            "tap:qcow2:/srv/xen/guest.qcow2,xvda,w",
            "format=qcow2,vdev=xvda,target=/srv/xen/guest.qcow2",
            "vdev=xvda,format=qcow2,/srv/xen/guest.qcow2",
        ],
    ),
    (
        DiskSpec(target="/dev/vg0/guest-disk", vdev="xvda"),
        [
            "phy:/dev/vg0/guest-disk,xvda,w",
            "file:/dev/vg0/guest-disk,xvda,w",
            "tap:aio:/dev/vg0/guest-disk,xvda,w",
        ],
    ),
    (
        DiskSpec(target="/dev/vg0/guest-disk", vdev="xvda", access="ro"),
        [
            "phy:/dev/vg0/guest-disk,xvda,r",
            "/dev/vg0/guest-disk,,xvda,access=ro",
            "access=r,/dev/vg0/guest-disk,,xvda",
        ],
    ),
    (
        # Snapshot cfgfiles: an empty target means an internal disk snapshot.
        DiskSpec(target="", vdev="xvdb"),
        [",,xvdb", "vdev=xvdb,target=", ",raw,xvdb,rw"],
    ),
    (
        DiskSpec(target="/a,b=c, d ", vdev="xvda"),
        ["vdev=xvda,target=/a,b=c, d ", "vdev=xvda,target=/a,b=c, d ,", ",,xvda,target=/a,b=c, d "],
    ),
    (
        DiskSpec(
            target="/srv/x.img",
            vdev="xvdc",
            backendtype="qdisk",
            extra={"backend": "driver-dom", "specification": "xen"},
            flags=frozenset({"no-discard", "direct-io-safe"}),
        ),
        [
            "/srv/x.img,raw,xvdc,w,backendtype=qdisk,backend=driver-dom,specification=xen,"
            "discard,no-discard,direct-io-safe",
            "backend=driver-dom,no-discard,direct-io-safe,specification=xen,specification=xen,"
            "backendtype=qdisk,format=raw,vdev=xvdc,target=/srv/x.img",
            "backend=,backend=driver-dom,/srv/x.img,,xvdc,direct-io-safe,no-discard,backendtype=qdisk,specification=xen",
        ],
    ),
]
# Xen 4.19's parameters, which 4.17's xl does not have.
XEN_4_19 = XlVersion(4, 19)
NEWER = DiskSpec(
    target="/srv/x.img", vdev="xvdc", extra={"grant_usage": "0"}, flags=frozenset({"direct-io-safe", "untrusted"})
)
NEWER_SPECS = [
    "/srv/x.img,raw,xvdc,w,direct-io-safe,trusted,untrusted,grant_usage=0",
    "grant_usage=0,untrusted,direct-io-safe,format=raw,vdev=xvdc,target=/srv/x.img",
]


@pytest.mark.parametrize(("expected", "spec"), [(disk, spec) for disk, specs in EQUIVALENT for spec in specs])
def test_parse(expected: DiskSpec, spec: str) -> None:
    assert parse_disk(spec) == expected
    assert parse_disk(spec, XEN_4_19) == expected


@pytest.mark.parametrize("disk", [disk for disk, _ in EQUIVALENT])
def test_to_spec_round_trips(disk: DiskSpec) -> None:
    assert parse_disk(disk.to_spec()) == disk


@pytest.mark.parametrize("spec", NEWER_SPECS)
def test_parameters_newer_than_the_xl_are_refused_naming_the_version(spec: str) -> None:
    assert parse_disk(spec, XEN_4_19) == NEWER
    assert parse_disk(NEWER.to_spec(), XEN_4_19) == NEWER
    with pytest.raises(InvalidArgument, match=r"needs Xen 4\.19 or later \(xl here is 4\.17\)"):
        parse_disk(spec)  # Debian 12's 4.17 is the default
    with pytest.raises(InvalidArgument, match=r"\(xl here is 4\.18\)"):
        parse_disk(spec, XlVersion.parse("4.18.2"))


def test_domain_configs_follow_the_xl_given() -> None:
    text = "name = 'g'\ndisk = ['vdev=xvda,untrusted,target=/x']\n"
    assert DomainConfig.parse(text, xl=XEN_4_19).disks[0].flags == {"untrusted"}
    with pytest.raises(InvalidArgument, match=r"needs Xen 4\.19"):
        DomainConfig.parse(text)


def test_a_stranded_domains_config_is_read_with_the_drivers_xl() -> None:
    text = "name = 'g'\ndisk = ['vdev=xvda,untrusted,target=/x']\n"
    journal = JournalEntry("op", "revert", "g", "s1", "", {"current_config": text})
    assert Stranded(journal, "failed", XEN_4_19).config.disks[0].flags == {"untrusted"}
    with pytest.raises(InvalidArgument, match=r"needs Xen 4\.19"):
        _ = Stranded(journal, "failed", XlVersion(4, 17)).config


def test_xl_version_is_read_from_xen_version() -> None:
    assert XlVersion.parse("4.17.7") == (4, 17) and str(XlVersion.parse("4.20-rc")) == "4.20"
    with pytest.raises(InvalidArgument, match="cannot read a Xen version"):
        XlVersion.parse("unknown")


def test_to_spec_is_keyed_with_the_target_last() -> None:
    disk = parse_disk("phy:/dev/vg0/a,xvda,r")
    assert disk.to_spec() == "format=raw,vdev=xvda,access=ro,target=/dev/vg0/a"
    assert DiskSpec(target="/a,", vdev="xvda").to_spec() == "format=raw,vdev=xvda,access=rw,target=/a,,"


def test_diskspec_is_immutable_and_hashable() -> None:
    disk = parse_disk("/a,raw,xvda,backend=dd")
    assert hash(disk) == hash(parse_disk("backend=dd,/a,raw,xvda"))
    with pytest.raises(TypeError):
        disk.extra["backend"] = "other"  # type: ignore[index]


ERRORS = [
    ("", "no vdev specified"),
    ("/srv/a.img", "no vdev specified"),
    ("vdev=xvda", "no target specified"),
    ("/a,qcow3,xvda", "unknown format 'qcow3'"),
    ("/a,raw,xvda,rx", "unknown access 'rx'"),
    ("/a,raw,xvda,w,extra", "too many positional parameters at 'extra'"),
    ("/a,raw,xvda ", "invalid vdev 'xvda '"),
    ("/a,raw,xvda0", "invalid vdev 'xvda0'"),
    ("/a,raw,hde", "invalid vdev 'hde'"),
    ("/a=b,raw,xvda", "bad disk syntax near '/a=b'"),
    ("Format=raw,/a,,xvda", "bad disk syntax"),
    ("colour=red,/a,,xvda", "unknown parameter 'colour'"),
    ("http://host/a,,xvda", "unknown deprecated disk prefix 'http:'"),
    ("/a,raw,xvda:floppy", "unknown deprecated device type 'floppy'"),
    ("vdev=xvda,vdev=xvda,target=/a", "vdev respecified"),
    ("/a,raw,xvda,vdev=xvdb", "vdev respecified"),
    ("/a,raw,xvda,format=qcow2", "format respecified"),
    ("/a,raw,xvda,target=/b", "target respecified"),
    ("/a,,xvda,backendtype=phy,backendtype=tap", "backendtype respecified"),
    ("/a,,xvda,backendtype=nfs", "unknown backendtype 'nfs'"),
    ("/a,,xvda,devtype=floppy", "unknown devtype 'floppy'"),
    ("/a,,xvda,specification=scsi", "unknown specification 'scsi'"),
    ("/a,,xvda,grant_usage=0", "'grant_usage' needs Xen 4.19 or later"),
    ("vdev=hdc,cdrom,trusted", "'trusted' needs Xen 4.19 or later"),
    ("/a,,xvda,colo-port=http", "colo-port 'http' is not a port number"),
    ("/a,,xvda,backend=d1,backend=d2", "backend respecified"),
    ("/a,,xvda,backend=d1,backend=d1", "backend respecified"),  # libxlu: even when equal
    ("/a,,xvda,colo-host=h,colo-host=h", "colo-host respecified"),
    ("/a,,xvda,active-disk=/x,active-disk=/x", "active-disk respecified"),
    ("/a,,xvda,specification=xen,specification=virtio", "specification respecified"),
    ("iscsi:x,xvda,script=block-nbd", "script respecified"),
    ("/a,raw,xvda\n", "newline"),
    ("/a\0,raw,xvda", "NUL"),
    ("x" * (MAX_SPEC + 1), "too long"),
]


@pytest.mark.parametrize(("spec", "reason"), ERRORS)
def test_errors_name_the_spec(spec: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_disk(spec)
    message = caught.value.message
    assert message.startswith("invalid disk spec ")
    assert repr(spec[:50]).rstrip("'") in message
    assert reason in message


@pytest.mark.parametrize(
    "vdev",
    [
        "xvda",
        "xvdz",
        "xvdaa",
        "xvdb1",
        "xvda255",
        "xvdbzzz",
        "hda",
        "hdd",
        "hdc63",
        "sda",
        "sdp",
        "sdb15",
        "d0p0",
        "d1p2",
        "d536p37",
        "d1048575p255",
        "51712",
        "0xca00",
        "0",
        "0777",
    ],
)
def test_valid_vdev(vdev: str) -> None:
    assert valid_vdev(vdev)


@pytest.mark.parametrize(
    "vdev",
    [
        "",
        "xvd",
        "xvda0",
        "xvda256",
        "xvda01",
        "XVDA",
        "xvdA",
        "hde",
        "hda64",
        "sdq",
        "sda16",
        "vda",
        "d0",
        "d1048576p0",
        "d0p256",
        "0x80000000",
        "2147483648",
        "08",
        "-1",
        "xvda ",
        "/dev/xvda",
        "xvdzzzzz",
    ],
)
def test_invalid_vdev(vdev: str) -> None:
    assert not valid_vdev(vdev)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"format": "qcow3"}, "unknown format"),
        ({"access": "w"}, "unknown access 'w'"),
        ({"vdev": "vda"}, "invalid vdev"),
        ({"devtype": "floppy"}, "unknown devtype"),
        ({"devtype": "cdrom"}, "a cdrom is read-only"),
        ({"devtype": "cdrom", "access": "ro", "target": ""}, "an empty cdrom drive has format 'empty'"),
        ({"backendtype": "nfs"}, "unknown backendtype"),
        ({"script": "a,b"}, "must not contain a comma"),
        ({"target": "a\nb"}, "newline"),
        ({"extra": {"colour": "red"}}, "unknown parameter 'colour'"),
        ({"extra": {"backend": "a,b"}}, "must not contain a comma"),
        ({"flags": frozenset({"cdrom"})}, "unknown flag 'cdrom'"),
        ({"flags": frozenset({"discard", "no-discard"})}, "contradict"),
    ],
)
def test_diskspec_refuses_what_xl_cannot_mean(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason):
        DiskSpec(**{"target": "/a", "vdev": "xvda", **fields})  # type: ignore[arg-type]


# --- properties -------------------------------------------------------------

vdevs = st.one_of(
    st.from_regex(r"xvd[a-z]{1,3}([1-9][0-9]?)?", fullmatch=True),
    st.from_regex(r"hd[a-d]|sd[a-p]|d(0|[1-9][0-9]{0,2})p(0|[1-9][0-9]?)", fullmatch=True),
)
# Values that sit between commas in a keyed spec.
plain = st.text(st.characters(exclude_characters=",\n\0"), max_size=12)


def extra_values(name: str) -> st.SearchStrategy[str]:
    allowed = EXTRA_PARAMETERS[name]
    if name == "colo-port":
        return st.from_regex(r"[1-9][0-9]{0,4}", fullmatch=True)
    return st.sampled_from(sorted(allowed)) if allowed else plain


extras = st.fixed_dictionaries({}, optional={name: extra_values(name) for name in EXTRA_PARAMETERS})
flag_sets = st.sets(st.sampled_from(sorted(FLAGS))).map(
    lambda flags: frozenset(flag for flag in flags if FLAGS[flag] not in flags or flag < str(FLAGS[flag]))
)


@st.composite
def disks(draw: st.DrawFn) -> DiskSpec:
    devtype = draw(st.sampled_from([None, "disk", "cdrom"]))
    target = draw(st.text(st.characters(exclude_characters="\n\0"), max_size=20))
    empty_cdrom = devtype == "cdrom" and not target
    return DiskSpec(
        target=target,
        vdev=draw(vdevs),
        format="empty" if empty_cdrom else draw(st.sampled_from(sorted(FORMATS))),
        access="ro" if devtype == "cdrom" else draw(st.sampled_from(["ro", "rw"])),
        devtype=devtype,
        backendtype=draw(st.none() | st.sampled_from(sorted(BACKEND_TYPES))),
        script=draw(st.none() | plain),
        extra=draw(extras),
        flags=draw(flag_sets),
    )


@settings(max_examples=300)
@given(disks())
def test_any_diskspec_round_trips(disk: DiskSpec) -> None:
    assert parse_disk(disk.to_spec(), XEN_4_19) == disk


# Text made of disk-spec pieces reaches deeper than st.text().
spec_pieces = st.sampled_from(
    [
        "/a",
        ",",
        "=",
        ":",
        " ",
        "xvda",
        "hdc",
        "raw",
        "qcow2",
        "rw",
        "r",
        "cdrom",
        "target=",
        "vdev=",
        "format=",
        "access=",
        "devtype=",
        "phy:",
        "tap:",
        "iscsi:",
        "foo:",
        "discard",
        "backend=",
        "",
        "\t",
    ]
)
spec_like = st.lists(spec_pieces, max_size=12).map("".join)


@settings(max_examples=300)
@given(st.one_of(st.text(), spec_like))
def test_any_text_parses_or_raises_invalid_argument(spec: str) -> None:
    try:
        disk = parse_disk(spec)
    except InvalidArgument as err:
        assert err.message.startswith("invalid disk spec ")
        return
    assert parse_disk(disk.to_spec()) == disk
