#!/usr/bin/env bash
# The GPU check in one command (see benchmarks/device_check.py for its steps and files):
#   bash benchmarks/device_check.sh                       on a machine with a CUDA GPU
#   bash benchmarks/device_check.sh --device cpu --quick  the same steps, tiny, on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
if [ ! -x "$python" ]; then
  make setup >/dev/null
fi
exec "$python" benchmarks/device_check.py "$@"
