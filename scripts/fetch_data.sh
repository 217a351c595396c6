#!/usr/bin/env bash
# Bring Flickr8k into data/flickr8k without network, at exactly the version pinned by data.dvc.
#  1. `dvc checkout data.dvc` restores it from the local DVC cache when the cache has it (a no-op when
#     data/ is already in place).
#  2. Otherwise `dvc pull data.dvc` restores it from the DVC remote (scripts/dvc_remote.sh) when that has it.
#  3. Otherwise the images are imported from the shared read-only copy (HIVLP_SHARED_DATA, default
#     ../shared/data) into the DVC cache with `dvc add`, and the result must hash to the md5 already
#     recorded in data.dvc: a different dataset is refused rather than silently used.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${HIVLP_SHARED_DATA:-../shared/data}
DVC=${DVC:-dvc}
source scripts/dvc_remote.sh

if [ -f data/flickr8k/dataset_flickr8k.json ] && $DVC status data.dvc 2>/dev/null | grep -q "up to date"; then
    echo "data: data/flickr8k is in place and matches data.dvc"
    exit 0
fi
if $DVC checkout data.dvc >/dev/null 2>&1 && [ -f data/flickr8k/dataset_flickr8k.json ]; then
    echo "data: restored data/ from the local DVC cache"
    exit 0
fi
if $DVC pull -q data.dvc >/dev/null 2>&1 && [ -f data/flickr8k/dataset_flickr8k.json ]; then
    echo "data: restored data/ from the DVC remote $HIVLP_REMOTE_URL"
    exit 0
fi
if [ ! -f "$SRC/flickr8k/dataset_flickr8k.json" ]; then
    echo "data: no DVC cache and no shared copy at $SRC/flickr8k; set HIVLP_SHARED_DATA, or HIVLP_DVC_REMOTE to a DVC remote that holds it" >&2
    exit 1
fi
echo "data: importing $SRC/flickr8k into the DVC cache"
want=$(grep -m1 'md5:' data.dvc | awk '{print $NF}')
rm -rf data/flickr8k
mkdir -p data
cp -r "$SRC/flickr8k" data/flickr8k
chmod -R u+w data/flickr8k
$DVC add -q data
got=$(grep -m1 'md5:' data.dvc | awk '{print $NF}')
if [ -n "$want" ] && [ "$want" != "$got" ]; then
    git checkout -- data.dvc 2>/dev/null || true
    echo "data: $SRC/flickr8k hashes to $got, but data.dvc pins $want; refusing to use a different dataset" >&2
    exit 1
fi
echo "data: data/flickr8k ready (md5 $got)"
