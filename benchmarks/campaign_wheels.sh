#!/usr/bin/env bash
# Fill the two wheel folders benchmarks/gpu_campaign.sh installs from on a GPU machine with no network
# (--pipeline-wheels DIR/pipeline --peer-wheels DIR/peers), here, where pip reaches PyPI:
#
#   bash benchmarks/campaign_wheels.sh DIR [PYTHON_VERSION]      # default 3.12, the lent machines' Python
#
# DIR/pipeline: what the project needs beyond a torch + triton image (Ray, DeepSpeed, OmegaConf, WebDataset,
# pydantic, jsonschema and their own needs that such an image lacks), each without its dependencies, so no
# second torch comes along. DeepSpeed has no wheel on PyPI: it is built here (pure Python, no compiled ops;
# needs this python's torch). Ray's wheel (79 MB for 3.12) is made smaller: its Java jars and the
# dashboard's web client go (the pipeline starts Ray without the dashboard, and runs no Java), 45 MB, so
# that everything fits the 64 MiB one call to a lent machine carries. DIR/peers: mlstm_kernels and xlstm
# (their own needs are in such an image). Needs pip, and zip. Prints the folders' sizes.
set -euo pipefail
DIR=${1:?usage: bash benchmarks/campaign_wheels.sh DIR [PYTHON_VERSION]}
VER=${2:-3.12}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
mkdir -p "$DIR/pipeline" "$DIR/peers"
P=(--no-deps --only-binary=:all: --python-version "$VER" --implementation cp --platform manylinux2014_x86_64
   --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --disable-pip-version-check -q)
"$PY" -m pip download "${P[@]}" -d "$DIR/pipeline" ray jsonschema jsonschema-specifications referencing rpds-py \
  hjson pydantic pydantic-core annotated-types typing-inspection omegaconf webdataset braceexpand
"$PY" -m pip wheel --no-deps --no-build-isolation --disable-pip-version-check -q -w "$DIR/pipeline" \
  "deepspeed==$("$PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
"$PY" -m pip download "${P[@]}" -d "$DIR/peers" mlstm_kernels xlstm
for whl in "$DIR"/pipeline/ray-*.whl; do
  zip -q -d "$whl" 'ray/jars/*' 'ray/dashboard/client/*' || [ $? -eq 12 ]  # 12: nothing left to delete (done before)
done
du -sh "$DIR/pipeline" "$DIR/peers"
