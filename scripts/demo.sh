#!/usr/bin/env bash
# Set up, fetch a small set of real photos (Debian packages + wheels), fine-tune the tiny
# recipe with TDC on 2 CPU cores, convert to GQ and print continuous-vs-GQ metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gq demo "$@"
