#!/usr/bin/env bash
# Re-make docs/tensorboard.png: run the quickstart, serve TensorBoard on loopback, screenshot its Custom Scalars tab.
# Needs Debian's chromium (apt-get install chromium). Run from the repository root.
set -euo pipefail
repo=$(pwd)
work=$(mktemp -d)
cd "$work"
lightning-align fit --config "$repo/configs/quickstart.yaml" --trainer.enable_progress_bar=false >/dev/null
tensorboard --logdir lightning_logs --port 6125 --host 127.0.0.1 >/dev/null 2>&1 &
tb=$!
trap 'kill $tb' EXIT
sleep 8
# The suite's own dashboard as a run shows it: the Custom Scalars tab, no tag filter.
chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking --disable-component-update \
  --disable-sync --user-data-dir="$work/chromium" --window-size=1500,1100 --virtual-time-budget=25000 \
  --screenshot="$repo/docs/tensorboard.png" "http://127.0.0.1:6125/#custom_scalars"
