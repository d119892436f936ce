"""Regenerate the Python code for protos/ into the importable package mlsignal.v1 (run via `make protos`)."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted((PROTO_DIR / "mlsignal" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> None:
    """Compile every .proto into out_dir (which receives mlsignal/v1/*_pb2*.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_DIR)) for p in proto_files()],
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repository)")
    args = parser.parse_args(argv)
    generate(args.out)
    pkg = args.out / "mlsignal"
    for d in (pkg, pkg / "v1"):
        init = d / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated gRPC/protobuf code for the mlsignal API (do not edit; run `make protos`)."""\n')
    print(f"generated {len(proto_files())} proto files into {pkg / 'v1'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
