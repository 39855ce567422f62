#!/usr/bin/env bash
# Run here (with network) before a GPU session: the GPU machine has no network and lacks optuna,
# jsonschema, mistral-common (the tokenizer's home) and the server's FastAPI stack. Fills .whl/, which
# every device call carries. The image already has prometheus-client, httpx, anyio, h11, click, uvloop,
# tqdm and typing-extensions (KINDS.md), so only the rest is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/tools/device-wheels.sh .whl
# pure-Python wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any -d .whl mistral-common fastapi starlette annotated-doc annotated-types typing-inspection uvicorn \
  openai distro sniffio opentelemetry-api httpx2 httpcore2 truststore typing-extensions idna anyio h11
# (fastapi >= 0.16x imports opentelemetry-api; openai 3.x talks through httpx2; pydantic 2.14 needs
#  typing-extensions >= 4.16: the GPU image's own copies of these are missing or too old)
# compiled wheels: pydantic's core, openai's JSON parser, and httptools (uvicorn's fast HTTP parser)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pydantic pydantic-core jiter httptools
ls .whl
