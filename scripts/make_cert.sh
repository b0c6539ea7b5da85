#!/usr/bin/env bash
# Make a self-signed certificate for local TLS (never commit it: certs/ is gitignored).
#   certs/server.crt  CN=localhost, SAN localhost + 127.0.0.1, valid 365 days
#   certs/server.key  RSA 2048, unencrypted, mode 600
# Usage: bash scripts/make_cert.sh [OUT_DIR]      (default: certs/ in the repository root)
# Then set tls.enabled=true, tls.cert_path=certs/server.crt, tls.key_path=certs/server.key.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="${1:-$repo_root/certs}"

if ! command -v openssl >/dev/null 2>&1; then
  echo "make_cert.sh: openssl is not installed (apt-get install openssl)" >&2
  exit 1
fi

mkdir -p "$out_dir"
umask 077
# openssl prints key-generation progress on stderr; keep it for the error case only.
if ! log="$(openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 365 \
  -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -keyout "$out_dir/server.key" -out "$out_dir/server.crt" 2>&1)"; then
  echo "$log" >&2
  exit 1
fi
chmod 644 "$out_dir/server.crt"
echo "wrote $out_dir/server.crt and $out_dir/server.key"
