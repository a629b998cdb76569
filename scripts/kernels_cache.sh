#!/usr/bin/env bash
# On a GPU device machine: carry qmamba's built CUDA extension from one device call to the next (a fresh machine
# spends ~2.5 min building it). The cache is keyed by a hash of csrc/ and the build directory's name (torch, CUDA,
# architecture), so a changed kernel source is never served a stale build: a carried build of another csrc/ is restored
# with its objects dated before the changed files (per-file hashes saved beside it), so ninja rebuilds only what a
# changed file touches (its depfiles name the headers) and relinks.
#   save:     bash scripts/kernels_cache.sh save "$OUT"   -> $OUT/qmamba_kernels_cache.tgz (~6 MB); copy it here into
#             .whl/ from the call's files_at for the next call
#   restore:  bash scripts/kernels_cache.sh restore       (device_setup.sh does it when .whl/ holds the file)
set -uo pipefail
mode=${1:?save DIR | restore}
cache=$HOME/.cache/qmamba
sums=$(find csrc -type f | LC_ALL=C sort | xargs sha256sum)  # one line a source: hash, path
key=$(echo "$sums" | sha256sum | cut -c1-16)
if [ "$mode" = save ]; then
  [ -d "$cache/kernels" ] || { echo "kernels_cache: nothing built in $cache/kernels"; exit 1; }
  echo "$key" > "$cache/kernels/csrc.key"
  echo "$sums" > "$cache/kernels/csrc.sums"
  tar czf "${2:?save needs a directory}/qmamba_kernels_cache.tgz" -C "$cache" kernels && echo "kernels_cache: saved ($key)"
else
  f=.whl/qmamba_kernels_cache.tgz
  [ -f "$f" ] || exit 0
  [ -d "$cache/kernels" ] && { echo "kernels_cache: a build is already here; not restored"; exit 0; }
  t=$(mktemp -d) && tar xzf "$f" -C "$t"
  if [ "$(cat "$t/kernels/csrc.key" 2>/dev/null)" != "$key" ]; then
    [ -f "$t/kernels/csrc.sums" ] || { echo "kernels_cache: the carried build is of another csrc/; it will be rebuilt"; exit 0; }
    now=$(date +%s)
    mkdir -p "$cache" && mv "$t/kernels" "$cache/" || exit 0
    # unchanged sources oldest, then the carried objects, then the changed sources (now): ninja rebuilds those only
    find "$cache/kernels" -type f -exec touch -d "@$((now - 60))" {} +
    # the current lines not in the carried build's list: the sources changed or added since
    changed=$(LC_ALL=C comm -13 <(LC_ALL=C sort "$cache/kernels/csrc.sums") <(echo "$sums" | LC_ALL=C sort) | cut -c67-)
    find csrc -type f -exec touch -d "@$((now - 120))" {} +
    [ -z "$changed" ] || echo "$changed" | xargs touch -d "@$now"
    changed=$(echo -n "$changed" | grep -c .)
    echo "kernels_cache: restored a build of another csrc/; $changed changed file(s) will be rebuilt"
    exit 0
  fi
  # outputs newer than the carried sources (copied just now), so ninja takes them as up to date
  mkdir -p "$cache" && mv "$t/kernels" "$cache/" && find "$cache/kernels" -type f -exec touch {} + &&
    echo "kernels_cache: restored ($key)"
fi
