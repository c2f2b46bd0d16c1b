#!/usr/bin/env bash
# Install a Salala node on Android, in Termux: ./scripts/install-termux.sh [SOURCE]
#
# Termux's pip takes only pure and android_* wheels, so this installs the compiled
# dependencies Termux packages with pkg, and builds the rest from their sdists with the
# variables below. `make check-android` checks on a PC that the same sources, variables and
# constraints (scripts/termux-constraints.txt) fit together. SOURCE is what pip installs:
# this checkout by default. No extras: a phone hosts and serves; it does not split models.
set -euo pipefail

: "${PREFIX:?run this inside Termux}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source="${1:-$here/..}"

pkg update -y
# Compiled Python packages Termux builds for us (python-pydantic-core: typer needs pydantic),
# the C libraries the sdists link, the tools that build them, and termux-api for
# termux-battery-status (the Termux:API app must be installed as well).
pkg install -y \
	python python-pip \
	python-onnxruntime python-numpy python-cryptography python-psutil python-grpcio \
	python-msgpack python-pydantic-core \
	libsodium libgmp libsecp256k1 libffi openssl \
	clang make cmake ninja pkg-config rust binutils \
	termux-api

py="$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
export SODIUM_INSTALL=system          # pynacl: link Termux's libsodium
export COINCURVE_IGNORE_SYSTEM_LIB=OFF # coincurve: link Termux's libsecp256k1
export SKIP_CYTHON=1                  # zeroconf: pure Python
export ANDROID_API_LEVEL=24           # Rust builds (maturin: blake3)
export LDFLAGS="-L$PREFIX/lib -lpython$py" # Android extensions must link libpython
# The versions make check-android built; they also bind the build requirements.
export PIP_CONSTRAINT="$here/termux-constraints.txt"

pip install "$source"
echo "Installed. Next: termux-wake-lock, then: salala node start (see docs/termux.md)"
