#!/usr/bin/env bash
# A local S3 for development, one command: moto_server on 127.0.0.1 with a bucket, in the foreground
# (Ctrl-C stops it). Prints the endpoint and the flags that point a padistill run at it.
#   infra/local-s3.sh [PORT] [BUCKET]          (defaults: 9000, padistill-dev)
# moto keeps everything in memory and accepts any credentials; the dummy ones printed below are
# moto's documented test values, not secrets. With MinIO instead: run `minio server` and use its
# endpoint and keys the same way.
set -euo pipefail
PORT="${1:-${PADISTILL_S3_PORT:-9000}}"
BUCKET="${2:-${PADISTILL_S3_BUCKET:-padistill-dev}}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
# the project's own moto (a system-wide one may be a release that breaks pyarrow's multipart uploads)
MOTO="$HERE/.venv/bin/moto_server"
[ -x "$MOTO" ] || MOTO="$(command -v moto_server || true)"
[ -x "$MOTO" ] || { echo "moto_server not found: pip install 'moto[server]' (make install does)" >&2; exit 1; }
PY="$HERE/.venv/bin/python"; [ -x "$PY" ] || PY="$(command -v python3)"

"$MOTO" -H 127.0.0.1 -p "$PORT" >/dev/null 2>&1 &
MOTO_PID=$!
trap 'kill "$MOTO_PID" 2>/dev/null || true; wait "$MOTO_PID" 2>/dev/null || true' EXIT INT TERM
ENDPOINT="http://127.0.0.1:$PORT"
for _ in $(seq 1 300); do  # wait until it answers
  if "$PY" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1] + '/moto-api/', timeout=1)" "$ENDPOINT" 2>/dev/null; then
    break
  fi
  kill -0 "$MOTO_PID" 2>/dev/null || { echo "moto_server exited (port $PORT in use?)" >&2; exit 1; }
  sleep 0.2
done
AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing "$PY" - "$ENDPOINT" "$BUCKET" <<'PYEOF'
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1").create_bucket(Bucket=sys.argv[2])
PYEOF
cat <<EOT
local S3 (moto) at $ENDPOINT, bucket s3://$BUCKET
in another shell:
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
  padistill distill --config toy_digits --set storage.endpoint_url=$ENDPOINT --set run_root=s3://$BUCKET/toy_digits
S3 FLAGS: --set storage.endpoint_url=$ENDPOINT --set run_root=s3://$BUCKET/toy_digits
(Ctrl-C stops it; everything it held is gone)
EOT
wait "$MOTO_PID"
