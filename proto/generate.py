"""Generate the Python stubs (and their type stubs) from the .proto files.

`python proto/generate.py` writes them next to the .proto files;
`python proto/generate.py --check` fails when what is committed is stale.
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
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _include_dirs() -> list[str]:
    tools_protos = Path(protoc.__file__).resolve().parent / "_proto"
    googleapis = Path(next(iter(google.rpc.__path__))).resolve().parent.parent
    return [str(PROTO_ROOT), str(tools_protos), str(googleapis)]


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
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh = _generated(out)
        if args.check:
            stale = [str(p) for p in fresh if not (PROTO_ROOT / p).exists()
                     or not filecmp.cmp(out / p, PROTO_ROOT / p, shallow=False)]
            stale += [str(p) for p in _generated(PROTO_ROOT) if p not in fresh]
            if stale:
                print("stale generated code, run `python proto/generate.py`: " + ", ".join(stale), file=sys.stderr)
                return 1
            return 0
        for p in fresh:
            shutil.copyfile(out / p, PROTO_ROOT / p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
