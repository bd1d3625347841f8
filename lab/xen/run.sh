#!/bin/bash
# Build (cached) and boot the Xen lab, run its dom0 self-test, print the
# results. Arguments go to run.py: [--out DIR] [--timeout S] [--tests a,b] [--no-build]
exec python3 "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/run.py" "$@"
