#!/usr/bin/env bash
# Refresh the vendored uPlot (static/vendor/uplot/) from the npm registry: the dashboard serves
# it from our own static files, never from a CDN. Needs npm; run by hand, then commit.
#   scripts/vendor-uplot.sh [VERSION]   (default: the version below)
set -euo pipefail
version="${1:-1.6.32}"
here="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "uplot@$version" >/dev/null && tar xzf "uplot-$version.tgz")
dest="$here/static/vendor/uplot"
mkdir -p "$dest"
cp "$work/package/dist/uPlot.iife.min.js" "$work/package/dist/uPlot.min.css" \
   "$work/package/LICENSE" "$dest/"
echo "uPlot $version vendored into $dest"
