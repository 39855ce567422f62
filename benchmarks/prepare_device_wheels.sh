#!/usr/bin/env bash
# Run here (with network) before a GPU session: the GPU machine has no network and lacks optuna,
# jsonschema and mistral-common (the tokenizer's home). Fills .whl/, which every device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/tools/device-wheels.sh .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any -d .whl mistral-common
ls .whl
