"""A domain's identity and run state asked of libxl inside the agent's own
process: what `xl list <domain>` prints, without starting xl.

Each operation begins by finding its domain. Through xl that is a process
per question, and under a slow dom0 (the lab's TCG: 0.2-0.3 s for `xl
list`, most of it the dynamic linking of xl's dozen libraries) it was the
agent's largest overhead. libxl's public calls answer the same question in
microseconds: `libxl_name_to_domid`, `libxl_domain_info` (Xen's
getdomaininfo: the flags xl prints, and the domain's UUID) and
`libxl_domid_to_name`, on one context opened once.

Only read-only calls are made: everything that changes a domain still goes
through xl (xl_argv). The library is the one of the xl the host runs
(`libxenlight.so.<major>.<minor>`, from `xl info`'s version): libxl keeps
its API across releases, and the head of `libxl_dominfo` read here is the
one of libxl_types.idl. The driver checks it against xl all the same: each
time it asks `xl list -l` of a domain, the UUID read here must be the
config's, or this path is not used again (xen.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import uuid
from dataclasses import dataclass
from typing import Final, Protocol

log = logging.getLogger(__name__)

# xentoollog's levels (xentoollog.h): XTL_ERROR. libxl reports its own
# errors through this logger, to the agent's stderr.
_XTL_ERROR: Final = 8
# xl's letter for each libxl_shutdown_reason, 0 to 5 (xl_info.c:
# shutdown_reason_letters): poweroff, reboot, suspend, crash, watchdog, soft reset.
_REASONS: Final = "-rscwS"


class _DomInfo(ctypes.Structure):
    """The head of libxl_dominfo (libxl_types.idl), then room for what
    later releases append: libxl_dominfo_init clears the whole struct."""

    _fields_ = (
        ("uuid", ctypes.c_uint8 * 16),
        ("domid", ctypes.c_uint32),
        ("ssidref", ctypes.c_uint32),
        ("ssid_label", ctypes.c_void_p),
        ("running", ctypes.c_bool),
        ("blocked", ctypes.c_bool),
        ("paused", ctypes.c_bool),
        ("shutdown", ctypes.c_bool),
        ("dying", ctypes.c_bool),
        ("never_stop", ctypes.c_bool),
        ("shutdown_reason", ctypes.c_int),
        ("outstanding_memkb", ctypes.c_uint64),
        ("current_memkb", ctypes.c_uint64),
        ("shared_memkb", ctypes.c_uint64),
        ("paged_memkb", ctypes.c_uint64),
        ("max_memkb", ctypes.c_uint64),
        ("cpu_time", ctypes.c_uint64),
        ("vcpu_max_id", ctypes.c_uint32),
        ("vcpu_online", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 512),
    )


@dataclass(frozen=True)
class DomInfo:
    """One domain as `xl list` shows it, and its UUID."""

    domid: int
    name: str
    uuid: str
    # xl list's six state letters (xl_info.c: list_domains).
    flags: str
    memory_mib: int
    vcpus: int
    cpu_seconds: float


class DomainInfo(Protocol):
    def find(self, ref: str, hint: int | None = None) -> DomInfo | None:
        """The domain `ref` names (a domid, as xl reads one, or a name); None
        when it is not found here: xl is then asked, for its own error.
        `hint`: the domid the name had last, asked first."""


class LibxlDomainInfo:
    """libxl's read-only domain queries on one context, opened once."""

    def __init__(self, libxl: ctypes.CDLL, libc: ctypes.CDLL, ctx: ctypes.c_void_p) -> None:
        self._xl = libxl
        self._libc = libc
        self._ctx = ctx

    def find(self, ref: str, hint: int | None = None) -> DomInfo | None:
        domid = _domid(ref)
        # The name's domid of last time, if it still has that name: no walk
        # over every domain's name (libxl_name_to_domid).
        if domid is None and hint is not None and (known := self.info(hint)) is not None and known.name == ref:
            return known
        if domid is None:
            found = ctypes.c_uint32()
            if self._xl.libxl_name_to_domid(self._ctx, ref.encode(), ctypes.byref(found)) != 0:
                return None
            domid = found.value
        return self.info(domid)

    def info(self, domid: int) -> DomInfo | None:
        raw = _DomInfo()
        self._xl.libxl_dominfo_init(ctypes.byref(raw))
        try:
            if self._xl.libxl_domain_info(self._ctx, ctypes.byref(raw), domid) != 0 or raw.domid != domid:
                return None
            name = self._name(domid)
            if name is None:
                return None
            reason = raw.shutdown_reason if raw.shutdown else 0
            flags = "".join((
                "r" if raw.running else "-", "b" if raw.blocked else "-", "p" if raw.paused else "-",
                "s" if raw.shutdown else "-", _REASONS[reason] if 0 <= reason < len(_REASONS) else "?",
                "d" if raw.dying else "-",
            ))
            return DomInfo(domid, name, str(uuid.UUID(bytes=bytes(raw.uuid))), flags,
                           (raw.current_memkb + raw.outstanding_memkb) // 1024, raw.vcpu_online,
                           raw.cpu_time / 1e9)
        finally:
            self._xl.libxl_dominfo_dispose(ctypes.byref(raw))

    def _name(self, domid: int) -> str | None:
        # xs_read's buffer, malloc'd: freed here.
        ptr = self._xl.libxl_domid_to_name(self._ctx, domid)
        if not ptr:
            return None
        try:
            return ctypes.string_at(ptr).decode(errors="replace")
        finally:
            self._libc.free(ptr)


def _domid(ref: str) -> int | None:
    # xl takes a reference that is all digits as a domid (libxl_domain_qualifier_to_domid).
    return int(ref) if ref.isascii() and ref.isdigit() else None


def library_name(xen_version: str) -> str:
    """libxenlight's soname for a Xen version as `xl info` prints it ("4.17.7" → libxenlight.so.4.17)."""
    major, minor = xen_version.split(".")[:2]
    return f"libxenlight.so.{int(major)}.{int(minor)}"


def open_domain_info(xen_version: str) -> LibxlDomainInfo | None:
    """A context on this host's libxl, or None (said once in the log) where
    there is none to open: the driver asks xl then, as before."""
    try:
        name = library_name(xen_version)
        libxl = ctypes.CDLL(name)
        toollog = ctypes.CDLL("libxentoollog.so.1")
        libc = ctypes.CDLL(None)
    except (OSError, ValueError) as err:
        log.info("libxl is not loadable here (%s): domains are looked up through xl", err)
        return None
    libc.fdopen.restype = ctypes.c_void_p
    libc.fdopen.argtypes = (ctypes.c_int, ctypes.c_char_p)
    libc.free.argtypes = (ctypes.c_void_p,)
    toollog.xtl_createlogger_stdiostream.restype = ctypes.c_void_p
    toollog.xtl_createlogger_stdiostream.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint)
    libxl.libxl_ctx_alloc.argtypes = (ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_uint,
                                      ctypes.c_void_p)
    libxl.libxl_name_to_domid.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32))
    libxl.libxl_domain_info.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DomInfo), ctypes.c_uint32)
    libxl.libxl_dominfo_init.argtypes = (ctypes.POINTER(_DomInfo),)
    libxl.libxl_dominfo_init.restype = None
    libxl.libxl_dominfo_dispose.argtypes = (ctypes.POINTER(_DomInfo),)
    libxl.libxl_dominfo_dispose.restype = None
    libxl.libxl_domid_to_name.argtypes = (ctypes.c_void_p, ctypes.c_uint32)
    libxl.libxl_domid_to_name.restype = ctypes.c_void_p
    stream = libc.fdopen(os.dup(2), b"w")
    logger = toollog.xtl_createlogger_stdiostream(stream, _XTL_ERROR, 0) if stream else None
    ctx = ctypes.c_void_p()
    # LIBXL_VERSION 0: the API this code was written against, the oldest.
    if not logger or libxl.libxl_ctx_alloc(ctypes.byref(ctx), 0, 0, logger) != 0 or not ctx:
        log.warning("libxl (%s) would not open a context: domains are looked up through xl", name)
        return None
    log.info("domains are looked up through libxl (%s) in the agent's process", name)
    return LibxlDomainInfo(libxl, libc, ctx)
