"""Generates the Python code for every .proto under protos/ (one command: `make protos`).

The generated modules land under sdk/tensorgate/<service>/v1/ (the SDK carries the
contract) so that users import
`tensorgate.gateway.v1.gateway_pb2_grpc`. They are committed, never edited by
hand, and tests/unit/test_proto_drift.py fails when they differ from what this
script produces.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
SDK = ROOT / "sdk"


def proto_files() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


def protoc(*args: str, env: dict[str, str] | None = None, what: str = "") -> None:
    """Runs grpcio-tools' protoc over protos/ (and the well-known types) with `args`;
    SystemExit with its complaint when it fails."""
    well_known = str(resources.files("grpc_tools") / "_proto")
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"-I{well_known}", *args]
    # In a process of its own: protoc forks its plugins, and forking a process that runs
    # gRPC threads (the test suite's servers) can hang or crash it.
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"protoc failed{what}: {done.stderr.strip()}")


def generate(out: Path) -> list[Path]:
    """Writes the generated modules (and their package __init__ files) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    # The mypy plugins are scripts beside this interpreter; protoc finds them on PATH.
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    for proto in proto_files():
        rel = proto.relative_to(PROTOS)
        protoc(
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            str(rel),
            env=env,
            what=f" on {rel}",
        )
        package_dir = out / rel.parent
        for parent in [package_dir, *package_dir.parents]:
            if parent == out or out not in parent.parents:
                break
            (parent / "__init__.py").touch()
    return generated_files(out)


def generated_files(root: Path) -> list[Path]:
    """The generated modules under `root`, relative to it."""
    found: list[Path] = []
    for proto in proto_files():
        rel = proto.relative_to(PROTOS).with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            found.append(rel.parent / f"{rel.name}{suffix}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=SDK, help="output root (default: sdk/)")
    args = parser.parse_args()
    files = generate(args.out)
    print(f"generated {len(files)} files from {len(proto_files())} protos under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
