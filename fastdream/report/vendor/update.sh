#!/usr/bin/env bash
# Vendor <model-viewer> (which bundles three.js and lit) from the npm registry into this folder:
#   fastdream/report/vendor/update.sh [VERSION]
# The report inlines model-viewer.min.js, so pages never fetch scripts at view time.
set -euo pipefail
version="${1:-4.4.0}"
here="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
npm pack --silent "@google/model-viewer@$version" > /dev/null
tar xzf "google-model-viewer-$version.tgz"
three_range="$(node -p "require('./package/package.json').peerDependencies.three")"
three="$(npm view "three@$three_range" version | tail -n 1 | awk '{print $NF}' | tr -d "'")"
npm pack --silent "three@$three" > /dev/null
tar xzf "three-$three.tgz" package/LICENSE --transform "s|package/LICENSE|LICENSE.three|"
cp package/dist/model-viewer.min.js "$here/model-viewer.min.js"
cp package/LICENSE "$here/LICENSE.model-viewer"
cp LICENSE.three "$here/LICENSE.three"
printf '@google/model-viewer %s (Apache-2.0; bundles three.js %s, MIT, and lit, BSD-3-Clause)\nsha256 %s\n' \
  "$version" "$three" "$(sha256sum "$here/model-viewer.min.js" | cut -d' ' -f1)" > "$here/VERSION"
cat "$here/VERSION"
