#!/usr/bin/env bash
# Everything a fresh machine needs: CPU-usable torch (pinned), lfnnify with its dev tools, Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: Fashion-MNIST (the demo's and the tests' real data) and, where missing, iproute2 (the hosts
# testbed: network namespaces and tc) and util-linux (taskset, unshare)
packages=""
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || packages="dataset-fashion-mnist"
command -v ip >/dev/null && command -v tc >/dev/null || packages="$packages iproute2"
command -v taskset >/dev/null && command -v unshare >/dev/null || packages="$packages util-linux"
if [ -n "$packages" ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  (export DEBIAN_FRONTEND=noninteractive; $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $packages >/dev/null) \
    || echo "setup: could not install$packages; the demo falls back to synthetic data and skips the hosts" >&2
fi

python3 -m pip install -q torch==2.14.1 torchvision==0.29.1
python3 -m pip install -q -e '.[dev]'
