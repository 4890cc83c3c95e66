#!/usr/bin/env bash
# Rebuild pipeline/collector/static/touchpoint.js from src/ and the pinned npm packages (Node 18+; npm registry only).
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npm run build
cp node_modules/web-vitals/LICENSE ../../pipeline/collector/static/web-vitals.LICENSE
