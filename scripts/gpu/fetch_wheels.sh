#!/usr/bin/env bash
# Fill gpu_wheels/ (gitignored) with what scripts/gpu_check.sh installs on the lent GPU machine, which has no
# network, no deepspeed and no bitsandbytes. Run it HERE (where pip reaches the registry), before the device call.
#
#   bash scripts/gpu/fetch_wheels.sh      # ~47 MB: bitsandbytes 43 MB, deepspeed 1.6 MB, the rest ~2.5 MB
#
# Python 3.12 manylinux x86_64 wheels, --no-deps (each need is named): bitsandbytes 0.50.2 (needs torch, numpy,
# packaging: on the image), deepspeed 0.19.8 (only an sdist exists: built here into a pure-Python wheel) and what
# deepspeed imports that the image lacks: hjson, pydantic + pydantic-core, annotated-types, typing-inspection,
# typing-extensions (einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo, tqdm are on the image).
# Also writes gpu_wheels/COMMIT (the device machine gets a copy of the tree without .git).
set -euo pipefail
cd "$(dirname "$0")/../.."
D=gpu_wheels
PY=${PYTHON:-python3}
mkdir -p "$D"
rm -f "$D"/*.whl
get() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$D" "$@"; }
get --platform manylinux_2_24_x86_64 bitsandbytes==0.50.2
get --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 pydantic-core==2.50.5
get pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 hjson==3.1.0
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$D" deepspeed==0.19.8
commit=$(git rev-parse --short HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit+dirty"
echo "$commit" >"$D/COMMIT"
ls -l "$D"
total=$(du -cb "$D" | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "wheels $((total / 1048576)) MiB + tracked tree $((tree / 1048576)) MiB (the device tool carries at most 64 MiB)"
[ $((total + tree)) -lt $((60 * 1048576)) ] || { echo "too large for the device tool" >&2; exit 1; }
