"""Generate the protobuf/gRPC modules in ``ps/v1`` from ``proto/ps/v1/*.proto``.

Run ``python -m ps.protogen`` from the repository root after editing a .proto file
(needs grpcio-tools, in the ``dev`` and ``test`` extras). ``--check`` exits 1 when the
checked-in modules differ from what the .proto files produce.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_DIR = ROOT / "ps" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "ps" / "v1").glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root`` (which receives ``ps/v1/...``); return the files written."""
    from grpc_tools import protoc  # dev/test dependency only
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted(p for p in (out_root / "ps" / "v1").iterdir() if p.name.endswith(SUFFIXES))


def stale_files() -> list[str]:
    """Names of generated modules that are missing, extra or differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        current = {p.name: p for p in OUT_DIR.iterdir() if p.name.endswith(SUFFIXES)}
        names = sorted(set(fresh) | set(current))
        return [n for n in names if n not in fresh or n not in current
                or not filecmp.cmp(fresh[n], current[n], shallow=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift; exit 1 if any")
    ns = parser.parse_args(argv)
    if ns.check:
        stale = stale_files()
        for name in stale:
            print(f"out of date: ps/v1/{name}", file=sys.stderr)
        return 1 if stale else 0
    for old in OUT_DIR.iterdir():
        if old.name.endswith(SUFFIXES):
            old.unlink()
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
