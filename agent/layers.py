"""Frozen layers: the files a snapshot needs unchanged for ever (the image an
external snapshot froze below its overlay, a raw copy; each backend says
which, `DiskBackend.frozen_layers`).

A domain started on one again writes it and silently corrupts the snapshot
(its RAM then meets a disk that never existed). So the agent refuses to start
or snapshot a domain on a frozen layer, and a snapshot records each layer's
size and mtime, which a revert compares before it trusts the layer: that also
catches writes the agent could not see (a domain started by plain `xl create`,
a `qemu-img` run by hand).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from . import manifest
from .catalogue import Catalogue
from .errors import FailedPrecondition, Risk
from .manifest import Manifest
from .storage import Backends
from .storage.base import DiskRecord, Method
from .xldisk import DiskSpec

# What a manifest keeps of each layer: {"size": bytes, "mtime_ns": ns}.
Fingerprint = dict[str, int]


@dataclass(frozen=True)
class FrozenLayer:
    path: str
    domain: str
    snapshot: str
    record: DiskRecord

    @property
    def overlay(self) -> str:
        """The file the domain went on with over this layer; "" for a copy."""
        if self.record.method is Method.EXTERNAL and self.record.image == self.path:
            return self.record.file
        return ""


def fingerprint(path: str) -> Fingerprint:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprints(backends: Backends, records: Iterable[DiskRecord]) -> dict[str, Fingerprint]:
    """Each frozen layer of a new snapshot as it is now, for its manifest."""
    return {layer: fingerprint(layer) for rec in records for layer in backends.for_record(rec).frozen_layers(rec)}


def refresh(catalogue: Catalogue, backends: Backends, domain: str, touched: Iterable[str]) -> None:
    """Record anew the layers the agent itself rewrote keeping every snapshot's
    content (a delete merging a layer down and rebasing the ones above), and
    forget the layers a snapshot no longer has; idempotent."""
    rewritten = {os.path.realpath(p) for p in touched}
    for e in catalogue.entries(domain):
        m = e.manifest
        now = [layer for rec in m.disks for layer in backends.for_record(rec).frozen_layers(rec)]
        fresh = {layer: m.layers[layer] for layer in now if layer in m.layers}
        fresh.update({layer: fingerprint(layer) for layer in now
                      if os.path.realpath(layer) in rewritten and os.path.exists(layer)})
        if fresh != m.layers:
            manifest.write(e.path, replace(m, layers=fresh))
            catalogue.reindex(domain, m.name, e.path)


def changed(backends: Backends, m: Manifest) -> list[Risk]:
    """The risks of trusting a snapshot's layers: each one missing or not as recorded."""
    risks = []
    for rec in m.disks:
        for layer in backends.for_record(rec).frozen_layers(rec):
            recorded = m.layers.get(layer)
            if recorded is None:
                continue  # a snapshot from before layers were recorded
            try:
                now = fingerprint(layer)
            except FileNotFoundError:
                risks.append(Risk("LAYER_GONE", layer, f"disk {rec.vdev}'s frozen layer {layer} is gone"))
                continue
            if now != recorded:
                when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now["mtime_ns"] / 1e9))
                risks.append(Risk(
                    "LAYER_WRITTEN", layer,
                    f"disk {rec.vdev}'s frozen layer {layer} was written since the snapshot (size "
                    f"{recorded['size']} -> {now['size']} bytes, modified {when}): the snapshot's disk is no "
                    "longer what the guest's memory expects"))
    return risks


def frozen(catalogue: Catalogue, backends: Backends) -> dict[str, FrozenLayer]:
    """Every frozen layer of every snapshot the agent knows, by real path."""
    out: dict[str, FrozenLayer] = {}
    for domain in catalogue.domains():
        for e in catalogue.entries(domain):
            for rec in e.manifest.disks:
                for layer in backends.for_record(rec).frozen_layers(rec):
                    out.setdefault(os.path.realpath(layer), FrozenLayer(layer, domain, e.manifest.name, rec))
    return out


def on_frozen(disks: Iterable[DiskSpec], layers: Mapping[str, FrozenLayer]) -> list[tuple[DiskSpec, FrozenLayer]]:
    """The writable disks whose image is a frozen layer."""
    return [(d, layers[real]) for d in disks
            if d.target and d.access != "ro" and (real := os.path.realpath(d.target)) in layers]


def refusal(disk: DiskSpec, layer: FrozenLayer, *, way_out: str) -> FailedPrecondition:
    what = (f"disk {disk.vdev}: {disk.target} is the frozen layer of snapshot {layer.snapshot} of domain "
            f"{layer.domain}; writing it would corrupt that snapshot")
    if layer.overlay:
        what = (f"{what}. Start the domain on the overlay it went on with ({layer.overlay}), go back to the "
                f"snapshot (domsnap snapshot-revert {layer.domain} {layer.snapshot}), or {way_out}")
    else:
        what = f"{what}; it is the snapshot's copy: start the domain on a copy of it"
    return FailedPrecondition(what, reason="FROZEN_LAYER", domain=layer.domain, snapshot=layer.snapshot,
                              vdev=disk.vdev, path=disk.target)
