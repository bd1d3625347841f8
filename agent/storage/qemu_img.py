"""Every qemu-img command line the agent runs, and the parsers of their output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def info(binary: str, image: Path | str) -> list[str]:
    # -U: the image may be held by a running QEMU; reading its header is safe.
    return [binary, "info", "-U", "--output=json", str(image)]


def backing_chain(binary: str, image: Path | str) -> list[str]:
    return [binary, "info", "-U", "--backing-chain", "--output=json", str(image)]


def parse_chain(text: str) -> list[str]:
    """The files of an image's backing chain, the image first."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("qemu-img info --backing-chain: expected a JSON list")
    return [str(d["filename"]) for d in data]


def snapshot_create(binary: str, image: Path | str, tag: str) -> list[str]:
    return [binary, "snapshot", "-c", tag, str(image)]


def snapshot_apply(binary: str, image: Path | str, tag: str) -> list[str]:
    return [binary, "snapshot", "-a", tag, str(image)]


def snapshot_delete(binary: str, image: Path | str, tag: str) -> list[str]:
    return [binary, "snapshot", "-d", tag, str(image)]


def create_overlay(binary: str, overlay: Path | str, backing: Path | str, backing_fmt: str) -> list[str]:
    return [binary, "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", backing_fmt, str(overlay)]


def commit(binary: str, overlay: Path | str) -> list[str]:
    """Write an overlay's data into its backing image; the overlay keeps its
    data (-d: not emptied, as it is removed or was left redundant anyway)."""
    return [binary, "commit", "-q", "-d", str(overlay)]


def rebase_unsafe(binary: str, image: Path | str, backing: Path | str, backing_fmt: str) -> list[str]:
    """Point `image` at another backing file holding the same data (only the header changes)."""
    return [binary, "rebase", "-u", "-b", str(backing), "-F", backing_fmt, str(image)]


def parse_info(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("qemu-img info: expected a JSON object")
    return data


def snapshot_tags(info: dict[str, Any]) -> list[str]:
    """Internal snapshot tags, from `parse_info` (the JSON keeps names with any character intact)."""
    return [str(s["name"]) for s in info.get("snapshots", [])]
