# Sourced by scripts/main_job.sh and scripts/fetch_data.sh: the DVC remote this clone uses.
# .dvc/config names a local folder outside the repo (~/.local/share/hivlp/dvc-remote), so every clone on
# this machine shares it, offline. HIVLP_DVC_REMOTE=/path points this clone elsewhere: it is written to
# .dvc/config.local (git ignores it), as `dvc remote modify --local hivlp url /path` would by hand.
if [ -n "${HIVLP_DVC_REMOTE:-}" ]; then
    "${DVC:-dvc}" remote modify --local hivlp url "$HIVLP_DVC_REMOTE"
fi
HIVLP_REMOTE_URL=$("${DVC:-dvc}" remote list 2>/dev/null | awk '$1 == "hivlp" {print $2}' || true)
