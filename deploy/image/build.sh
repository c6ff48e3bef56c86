#!/usr/bin/env bash
# Builds kvgate's container image with Debian's buildah, on a Debian 12 base made here with
# debootstrap (no image registry is needed), runs `kvgate generate` on the default model inside
# it and checks the output, then prints the image's size. For people and benchmarks (minutes:
# the image compiles kvgate), not CI. Needs root (or sudo) for debootstrap and buildah.
#
#   bash deploy/image/build.sh                  # kvgate:0.1.0 (CPU)
#   VARIANT=cuda bash deploy/image/build.sh     # kvgate:0.1.0-cuda (reaches NVIDIA's apt repo)
#   buildah push kvgate:0.1.0 docker://registry.example/kvgate:0.1.0
#
# Settings: TAG, VARIANT (cpu, cuda), MIRROR (a Debian mirror for debootstrap),
# STORAGE_DRIVER (buildah's; default vfs, which works inside containers too).
set -euo pipefail
cd "$(dirname "$0")/../.."
VARIANT=${VARIANT:-cpu}
TAG=${TAG:-kvgate:0.1.0$([[ $VARIANT == cuda ]] && echo -cuda || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BASE=localhost/kvgate-debian:12
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO=sudo
step() { echo "== build.sh: $* ($(date +%T))"; }

missing=()
for p in buildah debootstrap; do command -v "$p" >/dev/null || missing+=("$p"); done
if (( ${#missing[@]} )); then
  step "installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The base: a minimal Debian 12 root file system, imported once and reused.
if ! $SUDO buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  ROOTFS=$(mktemp -d)
  trap '$SUDO rm -rf "$ROOTFS"' EXIT
  step "debootstrap bookworm from $MIRROR"
  $SUDO debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" | grep -E "^I: (Retrieving|Base)" || true
  # Security updates too, as Debian's own images have.
  echo "deb http://deb.debian.org/debian-security bookworm-security main" \
    | $SUDO tee -a "$ROOTFS/etc/apt/sources.list" >/dev/null
  $SUDO rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
  step "importing it as $BASE"
  ctr=$($SUDO buildah from scratch)
  mnt=$($SUDO buildah mount "$ctr")
  $SUDO cp -a "$ROOTFS"/. "$mnt"/
  $SUDO buildah umount "$ctr" >/dev/null
  $SUDO buildah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  $SUDO buildah commit --quiet --rm "$ctr" "$BASE" >/dev/null
  $SUDO rm -rf "$ROOTFS"
  trap - EXIT
fi

step "building $TAG (VARIANT=$VARIANT) from deploy/image/Dockerfile"
$SUDO buildah bud --layers --format docker -f deploy/image/Dockerfile \
  --build-arg BASE="$BASE" --build-arg VARIANT="$VARIANT" -t "$TAG" .

step "checking: kvgate generate on the default model inside $TAG"
PROMPT="Once upon a time"
ctr=$($SUDO buildah from "$TAG")
trap '$SUDO buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
out=$($SUDO buildah run "$ctr" -- kvgate generate --model /models/kvgate-default \
  --prompt "$PROMPT" --max-tokens 24 --temperature 0 --json)
echo "$out" | python3 -c '
import json, sys
r = json.load(sys.stdin)
assert r["token_ids"], "no tokens generated"
print("   generated", len(r["token_ids"]), "tokens:", repr(r["text"][:80]))'
# The same as the binary built here, token for token, when there is one.
if [[ -x build/cli/kvgate ]]; then
  want=$(build/cli/kvgate generate --model models/kvgate-default --prompt "$PROMPT" \
    --max-tokens 24 --temperature 0 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')
  got=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')
  [[ $want == "$got" ]] || { echo "build.sh: the image generates $got, the build here $want" >&2; exit 1; }
  echo "   equal to build/cli/kvgate's output"
fi
step "done: $TAG, $($SUDO buildah images --format '{{.Size}}' "$TAG" | head -1)" \
  "(base $($SUDO buildah images --format '{{.Size}}' "$BASE" | head -1))"
