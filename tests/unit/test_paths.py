"""confine(): snapshot paths stay inside the snapshot roots, whatever the path says."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domsnap.agent.errors import InvalidArgument
from domsnap.agent.paths import confine


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/root (the snapshot root) and tmp/outside, with symlinks between them."""
    make_tree(tmp_path)
    return tmp_path


def make_tree(base: Path) -> None:
    root, outside = base / "root", base / "outside"
    (root / "a" / "b").mkdir(parents=True)
    (root / "state").mkdir()
    outside.mkdir()
    (outside / "secret").write_text("x")
    (root / "file").write_text("x")
    (root / "in_link").symlink_to(root / "a")
    (root / "out_link").symlink_to(outside)
    (root / "dangling_out").symlink_to(outside / "nothing")
    (root / "dangling_in").symlink_to(root / "a" / "nothing")
    (root / "loop").symlink_to(root / "loop")
    (root / "rel_out").symlink_to("../outside")
    os.mkfifo(root / "fifo")


def refused(path: str, roots: list[Path], forbidden: tuple[Path, ...] = (), match: str = "") -> str:
    with pytest.raises(InvalidArgument) as info:
        confine(path, roots, forbidden)
    assert match in info.value.message
    return info.value.message


def snapshot(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*"))


def test_inside_the_root_is_accepted_and_resolved(tree: Path) -> None:
    root = tree / "root"
    assert confine(str(root / "snap1"), [root]) == root / "snap1"
    assert confine(str(root / "a" / "b" / "new"), [root]) == root / "a" / "b" / "new"
    assert confine(str(root / "a" / ".." / "x"), [root]) == root / "x"
    assert confine(str(root / "in_link" / "x"), [root]) == root / "a" / "x"
    assert confine(str(root / "dangling_in"), [root]) == root / "a" / "nothing"
    assert confine(str(root / "file"), [root]) == root / "file"


def test_relative_empty_nul_and_overlong_paths_are_refused(tree: Path) -> None:
    root = tree / "root"
    refused("root/snap", [root], match="absolute")
    refused("./snap", [root], match="absolute")
    refused("", [root], match="empty")
    refused(f"{root}/a\0b", [root], match="NUL")
    refused(f"{root}/" + "a/" * 2100, [root], match="longer than 4096")


def test_dotdot_escapes_are_refused(tree: Path) -> None:
    root = tree / "root"
    refused(f"{root}/../outside/x", [root], match="outside the snapshot roots")
    refused(f"{root}/a/../../outside", [root], match="outside the snapshot roots")
    refused(f"{root}/nothing/../../../etc/passwd", [root], match="outside the snapshot roots")
    refused(f"{root}/..", [root], match="outside the snapshot roots")


def test_the_root_itself_is_not_a_snapshot_path(tree: Path) -> None:
    root = tree / "root"
    refused(str(root), [root], match="outside the snapshot roots")
    refused(f"{root}/a/..", [root], match="outside the snapshot roots")


def test_symlinks_out_of_the_root_are_refused(tree: Path) -> None:
    root = tree / "root"
    message = refused(f"{root}/out_link/x", [root], match="outside the snapshot roots")
    assert f"that is {tree / 'outside' / 'x'}" in message
    refused(f"{root}/out_link/secret", [root])
    refused(f"{root}/rel_out/new", [root])
    # A link that leads nowhere yet would be followed by whoever creates the file.
    refused(f"{root}/dangling_out", [root], match="outside the snapshot roots")


def test_symlink_loops_are_refused(tree: Path) -> None:
    root = tree / "root"
    refused(f"{root}/loop", [root], match="cannot be resolved")
    refused(f"{root}/loop/x", [root])


def test_device_files_and_fifos_are_refused(tree: Path) -> None:
    refused("/dev/null", [Path("/dev")], match="device file")
    refused("/dev/zero", [Path("/")], match="the agent's own")
    refused(str(tree / "root" / "fifo"), [tree / "root"], match="fifo")


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_device_node_inside_the_root_is_refused(tree: Path) -> None:
    node = tree / "root" / "disk"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    refused(str(node), [tree / "root"], match="device file")


def test_system_directories_are_refused_even_under_a_root(tree: Path) -> None:
    refused("/proc/self/mem", [Path("/")], match="the agent's own")
    refused("/sys/kernel/x", [Path("/")], match="the agent's own")


def test_the_state_dir_is_refused(tree: Path) -> None:
    root = tree / "root"
    refused(f"{root}/state/journal", [root], (root / "state",), match="the agent's own")
    refused(f"{root}/state", [root], (root / "state",), match="the agent's own")
    # Through a symlink into the state dir, too.
    (root / "to_state").symlink_to(root / "state")
    refused(f"{root}/to_state/x", [root], (root / "state",), match="the agent's own")


def test_a_root_inside_the_state_dir_is_carved_out(tmp_path: Path) -> None:
    # The defaults: /var/lib/domsnap (state) and /var/lib/domsnap/snapshots (root).
    state = tmp_path / "state"
    root = state / "snapshots"
    root.mkdir(parents=True)
    assert confine(str(root / "dom" / "snap"), [root], (state,)) == root / "dom" / "snap"
    refused(str(state / "journal"), [root], (state,), match="outside the snapshot roots")
    refused(f"{root}/../catalogue.json", [root], (state,), match="outside the snapshot roots")


def test_several_roots_and_a_symlinked_root(tmp_path: Path) -> None:
    one, real = tmp_path / "one", tmp_path / "real"
    one.mkdir()
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert confine(str(one / "s"), [one, link]) == one / "s"
    assert confine(str(link / "s"), [one, link]) == real / "s"
    assert confine(str(real / "s"), [one, link]) == real / "s"
    refused(str(tmp_path / "s"), [one, link], match="outside the snapshot roots")


def test_through_a_file_or_a_world_writable_directory_is_refused(tree: Path) -> None:
    root = tree / "root"
    refused(f"{root}/file/x", [root], match="not a directory")
    shared = root / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    refused(f"{shared}/x", [root], match="world-writable")
    refused(str(shared), [root], match="world-writable")


def test_confine_creates_nothing(tree: Path) -> None:
    before = snapshot(tree)
    root = tree / "root"
    for attempt in (f"{root}/new/deeper/x", f"{root}/out_link/x/y", f"{root}/../outside/z", "rel/x"):
        with contextlib.suppress(InvalidArgument):
            confine(attempt, [root])
    assert snapshot(tree) == before


# ---------------------------------------------------------------- properties ----

COMPONENTS = ["a", "b", "..", ".", "", "in_link", "out_link", "rel_out", "dangling_out", "dangling_in", "loop",
              "file", "fifo", "state", "secret", "new"]


@pytest.fixture(scope="module")
def shared_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("confine")
    make_tree(base)
    return base


def _inside(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.sampled_from(["root", "outside", "", "root/a", "root/state"]),
       parts=st.lists(st.sampled_from(COMPONENTS), max_size=8))
def test_property_never_outside_the_roots(shared_tree: Path, start: str, parts: list[str]) -> None:
    root = shared_tree / "root"
    state = root / "state"
    path = "/".join([str(shared_tree / start), *parts])
    try:
        result = confine(path, [root], (state,))
    except InvalidArgument:
        return
    real_root = Path(os.path.realpath(root))
    assert result.is_absolute()
    assert os.path.realpath(result) == str(result), "the result still holds a symlink or .."
    assert _inside(result, real_root)
    assert not result.is_relative_to(Path(os.path.realpath(state)))
    if os.path.lexists(result):
        mode = os.lstat(result).st_mode
        assert stat.S_ISREG(mode) or stat.S_ISDIR(mode)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_property_any_text_is_refused_cleanly_or_confined(shared_tree: Path, text: str) -> None:
    root = shared_tree / "root"
    for path in (text, f"{root}/{text}"):
        try:
            result = confine(path, [root], (root / "state",))
        except InvalidArgument:
            continue
        assert _inside(result, Path(os.path.realpath(root)))
