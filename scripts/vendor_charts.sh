#!/usr/bin/env bash
# Vendor the dashboard's charting library from its npm package, so the page needs no CDN.
# Usage: scripts/vendor_charts.sh            (run from anywhere; needs npm and network access)
# To upgrade, change VERSION, run the script, and check the page (tests/test_dashboard.py).
set -euo pipefail

VERSION="4.6.2"  # chart.js, pinned
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/src/fedsecure/dashboard/static/vendor"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

(cd "$WORK" && npm pack --silent "chart.js@$VERSION" >/dev/null)
tar -xzf "$WORK/chart.js-$VERSION.tgz" -C "$WORK"
mkdir -p "$DEST"
cp "$WORK/package/dist/chart.umd.min.js" "$DEST/chart.umd.min.js"
cp "$WORK/package/LICENSE.md" "$DEST/chart.js.LICENSE.md"
echo "chart.js $VERSION" > "$DEST/VERSION"
echo "vendored chart.js $VERSION into $DEST"
