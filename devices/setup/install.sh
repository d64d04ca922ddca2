#!/usr/bin/env bash
# Install edgesparse on the board from a wheelhouse built on the workstation (devices/wheelhouse),
# into a virtual environment; nothing is downloaded or compiled on the board.
#
#   devices/setup/install.sh BOARD WHEELHOUSE [VENV]      BOARD: pi4, pi5, jetson-nano, orin-nano
#   devices/setup/BOARD.sh WHEELHOUSE [VENV]               the same, per board
#
# VENV defaults to ~/edgesparse-venv. PYTHON picks the interpreter (default python3). Checks first
# that this is an aarch64 machine whose Python and glibc match the wheelhouse, and says what to do
# when they do not (Jetson Nano: see devices/README.md).
set -euo pipefail

usage() { echo "usage: devices/setup/install.sh BOARD WHEELHOUSE [VENV]" >&2; exit 2; }
fail() { echo "devices/setup: $*" >&2; exit 1; }
[ $# -ge 2 ] || usage
board=$1 wheels=$2 venv=${3:-$HOME/edgesparse-venv}
python=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)

case "$board" in
  pi4|pi5)   os_hint="Raspberry Pi OS Bookworm (64-bit) ships Python 3.11: build the wheelhouse with 'devices/wheelhouse 3.11'" ;;
  orin-nano) os_hint="JetPack 6 (Ubuntu 22.04) ships Python 3.10: build the wheelhouse with 'devices/wheelhouse 3.10'" ;;
  jetson-nano) os_hint="JetPack 4.6, the last for this board, is Ubuntu 18.04: Python 3.6 and glibc 2.27, and edgesparse needs Python >= 3.10 and glibc >= 2.28 (onnxruntime's aarch64 wheels are manylinux_2_28). Run an OS image with glibc >= 2.28 and a Python >= 3.10 (devices/README.md)" ;;
  *) fail "BOARD: expected pi4, pi5, jetson-nano or orin-nano, got '$board'" ;;
esac
[ -f "$here/../profiles/$board.json" ] || fail "no profile devices/profiles/$board.json next to this script"
[ "$(uname -m)" = aarch64 ] || fail "this is a $(uname -m) machine; the wheelhouse is for aarch64 (64-bit OS on the board)"
[ -d "$wheels" ] || fail "WHEELHOUSE: no directory '$wheels' (build it on the workstation with devices/wheelhouse)"
ls "$wheels"/edgesparse-*.whl >/dev/null 2>&1 || fail "WHEELHOUSE: no edgesparse wheel in '$wheels'"
command -v "$python" >/dev/null || fail "no '$python' on PATH (set PYTHON=...)"

# The interpreter must match the wheelhouse's CPython tag (numpy's wheel carries it), and glibc must
# be new enough for its manylinux wheels.
have=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
want=$(ls "$wheels"/numpy-*.whl 2>/dev/null | sed -n 's/.*-\(cp3[0-9]*\)-cp3[0-9]*-.*/\1/p' | head -n 1)
[ -n "$want" ] || fail "WHEELHOUSE: no numpy wheel in '$wheels'"
[ "$have" = "$want" ] || fail "$python is $have, the wheelhouse is for $want. $os_hint"
glibc=$("$python" -c 'import platform; print(platform.libc_ver()[1] or "0")')
"$python" -c "import sys; v = tuple(map(int, '$glibc'.split('.'))); sys.exit(v < (2, 28))" \
  || fail "glibc $glibc is older than 2.28, which the wheels need. $os_hint"

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --no-index --find-links "$wheels" "edgesparse[plots]"
"$venv/bin/edgesparse" --version
# Numba compiles its kernels for this CPU on first use; this checks that it and ORT load at all.
"$venv/bin/python" -c "import numba, onnxruntime, numpy; print('numba', numba.__version__, '| onnxruntime', onnxruntime.__version__, '| numpy', numpy.__version__)"
cat >&2 <<EOF
edgesparse is installed in $venv. Next:
  source $venv/bin/activate
  edgesparse run PKG -p "The capital of France is" --stats       # a package copied from the workstation
  devices/measure PKG --board $board                              # bench -> devices/results/$board-DATE.json
EOF
