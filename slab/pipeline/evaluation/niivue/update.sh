#!/usr/bin/env bash
# Replace the NiiVue bundle slab's viewer carries with another release of @niivue/niivue from npm:
#   bash slab/pipeline/evaluation/niivue/update.sh 0.69.0
# then run tests/pipeline/evaluation/test_viewer.py (a real Chromium opens a page) and update LICENSE's version line.
set -euo pipefail
version="${1:?usage: update.sh VERSION}"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@niivue/niivue@${version}" >/dev/null && tar xzf niivue-niivue-*.tgz)
grep -q '"license": "BSD-2-Clause"' "$work/package/package.json" || { echo "licence changed: check it" >&2; exit 1; }
cp "$work/package/dist/niivue.umd.js" "$here/niivue.umd.js"
echo "$version" > "$here/VERSION"
echo "NiiVue $version in $here/niivue.umd.js"
