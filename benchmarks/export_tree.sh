#!/usr/bin/env bash
# Exports HEAD (committed files only) to .snap/ for the device to run, with its revision in
# .snap/REVISION: the device copies the working tree as it is, and a tree others are editing is
# not a state anyone committed. .snap/ is ignored by git (.git/info/exclude) and named in `carry`.
#   bash benchmarks/export_tree.sh
#   device run (carry .whl .snap): cd .snap && RLPT_GIT_REV=$(cat REVISION) bash benchmarks/gpu_sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.snap/' .git/info/exclude || echo '/.snap/' >> .git/info/exclude
rm -rf .snap && mkdir .snap
git archive HEAD | tar -x -C .snap
git rev-parse --short HEAD > .snap/REVISION
du -sh .snap
