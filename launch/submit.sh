#!/usr/bin/env bash
# Kept for old instructions: the same as `tunebal submit --dashboard ADDRESS METHOD [options]`
# (docs/cluster.md), which checks the options, the address and the token before submitting.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 DASHBOARD_URL METHOD [tunebal search options...]  (prefer: tunebal submit --dashboard URL ...)" >&2
  exit 2
fi
address=$1
shift
exec tunebal submit --dashboard "$address" "$@"
