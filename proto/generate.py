"""Generate the Python stubs (and their type stubs) from the .proto files.

`python proto/generate.py` writes them next to the .proto files, and copies
the googleapis .proto files that domsnap.proto imports (google/rpc/...,
google/api/...) from the googleapis-common-protos package into
proto/googleapis/,
so that a client in any language finds every file it needs in this
repository; `python proto/generate.py --check` fails when what is committed
is stale.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import google.rpc
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PROTOS = sorted(PROTO_ROOT.glob("domsnap/v1/*.proto"))
# What domsnap.proto imports from googleapis (Apache-2.0, shipped as they are).
GOOGLEAPIS = ("google/api/field_behavior.proto", "google/rpc/error_details.proto", "google/rpc/status.proto")
# Not proto/google: beside generate.py, a folder named google would shadow the
# Python package google for tools that put proto/ on their path (mypy).
VENDORED = PROTO_ROOT / "googleapis"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _googleapis() -> Path:
    """Where the googleapis-common-protos package keeps its .proto files."""
    return Path(next(iter(google.rpc.__path__))).resolve().parent.parent


def _include_dirs() -> list[str]:
    tools_protos = Path(protoc.__file__).resolve().parent / "_proto"
    return [str(PROTO_ROOT), str(VENDORED), str(tools_protos)]


def generate(out: Path) -> None:
    bindir = Path(sys.executable).parent
    argv = ["protoc", *(f"-I{d}" for d in _include_dirs())]
    argv += [f"--plugin=protoc-gen-{p}={bindir / f'protoc-gen-{p}'}" for p in ("mypy", "mypy_grpc")]
    argv += [f"--{kind}_out={out}" for kind in ("python", "grpc_python", "mypy", "mypy_grpc")]
    argv += [str(p) for p in PROTOS]
    if protoc.main(argv) != 0:
        raise SystemExit("protoc failed")


def _generated(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for s in GENERATED_SUFFIXES for p in root.glob(f"domsnap/v1/*{s}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args()
    if not args.check:
        for name in GOOGLEAPIS:
            (VENDORED / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_googleapis() / name, VENDORED / name)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh = _generated(out)
        if args.check:
            stale = [str(p) for p in fresh if not (PROTO_ROOT / p).exists()
                     or not filecmp.cmp(out / p, PROTO_ROOT / p, shallow=False)]
            stale += [str(p) for p in _generated(PROTO_ROOT) if p not in fresh]
            stale += [name for name in GOOGLEAPIS if not (VENDORED / name).exists()
                      or not filecmp.cmp(_googleapis() / name, VENDORED / name, shallow=False)]
            if stale:
                print("stale generated code, run `python proto/generate.py`: " + ", ".join(stale), file=sys.stderr)
                return 1
            return 0
        for p in fresh:
            shutil.copyfile(out / p, PROTO_ROOT / p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
