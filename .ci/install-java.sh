#!/usr/bin/env bash
# Java runtime for METEOR (pycocoevalcap ships METEOR 1.5 as a jar; training/evaluate/metrics.py runs it).
# Idempotent: nothing is installed when `java` already runs.
#
# Usage: bash .ci/install-java.sh   (as root, or with sudo available)
set -euo pipefail

if java -version >/dev/null 2>&1; then
    echo "java: $(java -version 2>&1 | head -1)"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends default-jre-headless
java -version 2>&1 | head -1
