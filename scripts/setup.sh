#!/usr/bin/env bash
# Everything a fresh machine needs: CPU-usable torch (pinned), lfnnify with its dev tools, Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  (export DEBIAN_FRONTEND=noninteractive; $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "setup: could not install dataset-fashion-mnist; the demo falls back to synthetic data" >&2
fi

python3 -m pip install -q torch==2.14.1 torchvision==0.29.1
python3 -m pip install -q -e '.[dev]'
