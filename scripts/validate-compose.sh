#!/usr/bin/env bash
# Validates deploy/docker-compose.yml and deploy/docker-compose.gpu.yml (or the files given)
# against the Compose specification's JSON schema, without a Docker engine.
#
# The schema comes from the PyPI package docker-compose==1.29.2, which ships it as
# compose/config/compose_spec.json; the check runs with the `jsonschema` and `PyYAML` packages.
# Everything goes into the project's .tools/ (never system-wide):
#   .tools/compose-spec/compose_spec.json   the schema
#   .tools/venv                              jsonschema and PyYAML (the venv scripts/tools.sh makes)
# Idempotent: what is present is not fetched again. Exits non-zero when a file is invalid.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$root/.tools"
DOCKER_COMPOSE_VERSION=1.29.2
JSONSCHEMA_VERSION="${JSONSCHEMA_VERSION:-4.23.0}"
PYYAML_VERSION="${PYYAML_VERSION:-6.0.2}"

if [ "$#" -eq 0 ]; then
  set -- "$root/deploy/docker-compose.yml" "$root/deploy/docker-compose.gpu.yml"
fi

command -v python3 >/dev/null 2>&1 || { echo "validate-compose: python3 is required" >&2; exit 1; }
[ -x "$tools/venv/bin/python" ] || python3 -m venv "$tools/venv"
py="$tools/venv/bin/python"

if ! "$py" -c 'import jsonschema, yaml' >/dev/null 2>&1; then
  echo "validate-compose: installing jsonschema and PyYAML into $tools/venv" >&2
  "$tools/venv/bin/pip" install --quiet --disable-pip-version-check \
    "jsonschema==$JSONSCHEMA_VERSION" "PyYAML==$PYYAML_VERSION" >&2
fi

schema="$tools/compose-spec/compose_spec.json"
if [ ! -s "$schema" ]; then
  echo "validate-compose: fetching the schema from docker-compose==$DOCKER_COMPOSE_VERSION" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$tools/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --dest "$tmp" "docker-compose==$DOCKER_COMPOSE_VERSION" >&2
  wheel="$(find "$tmp" -name 'docker_compose-*.whl' | head -n1)"
  [ -n "$wheel" ] || { echo "validate-compose: no docker-compose wheel downloaded" >&2; exit 1; }
  mkdir -p "$tools/compose-spec"
  "$py" - "$wheel" "$schema.part" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read("compose/config/compose_spec.json")
open(sys.argv[2], "wb").write(data)
PY
  mv "$schema.part" "$schema"
fi

"$py" - "$schema" "$@" <<'PY'
import json, sys
import jsonschema, yaml

schema = json.load(open(sys.argv[1]))
validator = jsonschema.Draft7Validator(schema)
bad = 0
for path in sys.argv[2:]:
    try:
        doc = yaml.safe_load(open(path))
    except (OSError, yaml.YAMLError) as e:
        print(f"validate-compose: {path}: {e}", file=sys.stderr)
        bad += 1
        continue
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    for e in errors:
        where = "/".join(str(p) for p in e.path) or "(top level)"
        print(f"validate-compose: {path}: {where}: {e.message}", file=sys.stderr)
    if errors:
        bad += 1
    else:
        print(f"validate-compose: {path}: valid")
sys.exit(1 if bad else 0)
PY
