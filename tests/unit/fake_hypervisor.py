"""An in-process hypervisor for the core's tests: domains are records in a
JSON file (so, like a real hypervisor, they outlive an agent killed in a
forked child), a memory image is a small file naming the domain, and
disk operations on a "running" domain's images are what QEMU would do to them,
done by real qemu-img on real (tiny) files. The guest's RAM is not modelled:
the disks' content is what the tests check.

Failures are injected by name: `fail` holds the methods (and block
operations, "block:<op>") that raise instead of acting.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from domsnap.agent import runner
from domsnap.agent.domain import Domain, DomainConfig, RunState
from domsnap.agent.drivers.base import BeforePause, BeforeResume, CheckpointResult, Hypervisor, InPause, Step, no_step
from domsnap.agent.errors import AlreadyExists, FailedPrecondition, InternalError, NotFound
from domsnap.agent.progress import StepProgress
from domsnap.agent.storage import qemu_img
from domsnap.agent.storage.base import BlockOps

TIMEOUT = 30.0


@dataclass
class FakeHypervisor(Hypervisor):
    world: Path
    fail: set[str] = field(default_factory=set)
    # For a test that needs an operation under way: a checkpoint sets
    # `at_gate` and waits until `gate` is set (or its task is cancelled).
    gate: asyncio.Event | None = None
    at_gate: asyncio.Event = field(default_factory=asyncio.Event)
    name = "fake"

    # ------------------------------------------------------------ the world

    def _load(self) -> dict[str, dict[str, object]]:
        if not self.world.exists():
            return {}
        data: dict[str, dict[str, object]] = json.loads(self.world.read_text())
        return data

    def _save(self, domains: Mapping[str, Mapping[str, object]]) -> None:
        self.world.write_text(json.dumps(domains))

    def _domain(self, name: str) -> Domain:
        try:
            d = self._load()[name]
        except KeyError:
            raise NotFound(f"domain {name} does not exist") from None
        return Domain(int(str(d["domid"])), DomainConfig.parse(str(d["config"])), RunState(str(d["state"])))

    def _put(self, config: DomainConfig, state: RunState) -> Domain:
        domains = self._load()
        domid = int(str(domains[config.name]["domid"])) if config.name in domains else len(domains) + 1
        domains[config.name] = {"domid": domid, "config": config.to_text(), "state": str(state)}
        self._save(domains)
        return self._domain(config.name)

    def _set_state(self, name: str, state: RunState) -> Domain:
        return self._put(self._domain(name).config, state)

    def _check(self, what: str) -> None:
        if what in self.fail:
            raise InternalError(f"fake hypervisor: {what} failed (injected)")

    # ------------------------------------------------------- the interface

    async def probe(self) -> str:
        return "Fake 1.0"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def capabilities(self) -> list[str]:
        return ["snapshot"]

    async def list_domains(self) -> list[Domain]:
        return [self._domain(n) for n in self._load()]

    async def lookup(self, ref: str) -> Domain:
        return self._domain(ref)

    async def create(self, config: DomainConfig, *, paused: bool) -> Domain:
        if config.name in self._load():
            raise AlreadyExists(f"domain {config.name} exists")
        return self._put(config, RunState.PAUSED if paused else RunState.RUNNING)

    async def destroy(self, name: str) -> None:
        self._check("destroy")
        domains = self._load()
        domains.pop(self._domain(name).name)
        self._save(domains)

    async def pause(self, name: str) -> Domain:
        return self._set_state(name, RunState.PAUSED)

    async def unpause(self, name: str) -> Domain:
        return self._set_state(name, RunState.RUNNING)

    def block_ops(self, name: str) -> BlockOps:
        return FakeBlockOps(self, name)

    async def checkpoint(
        self, domain: Domain, memory: Path, *, live: bool, in_pause: InPause, progress: StepProgress,
        step: Step = no_step, before_pause: BeforePause | None = None, before_resume: BeforeResume | None = None,
    ) -> CheckpointResult:
        self._check("checkpoint")
        if self.gate is not None:
            self.at_gate.set()
            await self.gate.wait()
        image = json.dumps({"domain": domain.name})
        if live:  # pre-copy: the image is written while the guest runs, then it pauses for the rest
            memory.write_text(image)
        if before_pause is not None:
            await before_pause()
        self._set_state(domain.name, RunState.PAUSED)
        await in_pause(self.block_ops(domain.name))
        if not live:
            memory.write_text(image)
        if before_resume is not None:
            await before_resume()
        progress(1.0, done=memory.stat().st_size, total=memory.stat().st_size, message="memory saved")
        self._set_state(domain.name, domain.state)
        return CheckpointResult(memory.stat().st_size, 0.001)

    async def abandon_transfers(self, name: str) -> None:
        pass

    def facts(self, domain: Domain) -> dict[str, str]:
        return {"machine": "fake"}

    async def check_facts(self, facts: Mapping[str, str]) -> None:
        if facts != {"machine": "fake"}:
            raise FailedPrecondition(f"fake hypervisor: cannot restore an image made with {dict(facts)}")

    async def restore(
        self, config: DomainConfig, memory: Path, *, facts: Mapping[str, str], paused: bool,
        progress: StepProgress, reset_nvram: bool = False,
    ) -> Domain:
        # No firmware here: reset_nvram changes nothing.
        self._check("restore")
        if json.loads(memory.read_text())["domain"] != config.name or facts != {"machine": "fake"}:
            raise InternalError(f"fake hypervisor: {memory} is not an image of {config.name}")
        domain = await self.create(config, paused=paused)
        progress(1.0, message="restored")
        return domain


@dataclass
class FakeBlockOps:
    """What QEMU does to the images of a domain it runs, done offline."""

    hypervisor: FakeHypervisor
    domain: str

    def _target(self, vdev: str) -> str:
        return self.hypervisor._domain(self.domain).config.disk(vdev).target

    def _move(self, vdev: str, target: str, fmt: str) -> None:
        d = self.hypervisor._domain(self.domain)
        disks = [replace(x, target=target, format=fmt) if x.vdev == vdev else x for x in d.config.disks]
        self.hypervisor._put(d.config.with_disks(disks), d.state)

    async def internal_snapshot(self, vdev: str, tag: str) -> None:
        self.hypervisor._check("block:internal_snapshot")
        await runner.run(qemu_img.snapshot_create("qemu-img", self._target(vdev), tag), timeout=TIMEOUT)

    async def delete_internal_snapshot(self, vdev: str, tag: str) -> None:
        await runner.run(qemu_img.snapshot_delete("qemu-img", self._target(vdev), tag), timeout=TIMEOUT)

    async def external_snapshot(self, vdev: str, overlay: Path, fmt: str) -> None:
        self.hypervisor._check("block:external_snapshot")
        d = self.hypervisor._domain(self.domain).config.disk(vdev)
        await runner.run(qemu_img.create_overlay("qemu-img", overlay, d.target, d.format), timeout=TIMEOUT)
        self._move(vdev, str(overlay), fmt)

    async def drop_overlay(self, vdev: str, backing: Path, fmt: str) -> None:
        if self._target(vdev) != str(backing):
            await runner.run(qemu_img.commit("qemu-img", self._target(vdev)), timeout=TIMEOUT)
        self._move(vdev, str(backing), fmt)

    async def commit(self, vdev: str, top: Path, base: Path) -> None:
        # As QEMU's block-commit: the data into `base`, then the layer above `top` reads `base`.
        out = await runner.run(qemu_img.backing_chain("qemu-img", self._target(vdev)), timeout=TIMEOUT)
        chain = qemu_img.parse_chain(out.stdout)
        above = chain[chain.index(str(top)) - 1]
        await runner.run(qemu_img.commit("qemu-img", top), timeout=TIMEOUT)
        # The chains of these tests are all qcow2.
        await runner.run(qemu_img.rebase_unsafe("qemu-img", above, base, "qcow2"), timeout=TIMEOUT)

    def can_overlay(self, vdev: str) -> bool:
        return True
