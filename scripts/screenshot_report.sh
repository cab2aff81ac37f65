#!/usr/bin/env bash
# Render RUN/report.html in headless Chromium and save a full-page screenshot, to check the report by eye.
# Usage: scripts/screenshot_report.sh RUN [OUT.png]   (needs Debian's chromium: apt-get install chromium)
set -euo pipefail
run=${1:?usage: scripts/screenshot_report.sh RUN [OUT.png]}
out=${2:-$run/report_screenshot.png}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# The flags keep Chromium off the network (this machine has none) and away from the user's profile.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size=1200,5200 --screenshot="$out" "file://$(realpath "$run")/report.html" 2>/dev/null
echo "wrote $out"
