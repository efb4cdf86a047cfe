#!/usr/bin/env bash
# Generate the secrets deploy/compose.yaml reads, once, into deploy/secrets/ (or the directory given): the Django
# secret key, the provider-key keyring, the session signing keys, the channel-layer key, the PostgreSQL password
# (and the DATABASE_URL holding it) and, unless present, a self-signed TLS certificate for localhost (replace
# tls_cert.pem and tls_key.pem with your own for a real host name). Existing files are kept: rerunning never rotates
# anything (README: rotating the keyring and the session keys).
#
# The directory is 0700; the files are 0644 because the containers read them as their own users (uid 10001, the
# PostgreSQL and Caddy users) through bind mounts, and the directory's mode keeps other host users out.
set -euo pipefail
dir="${1:-$(dirname "$0")/secrets}"
mkdir -p "$dir"
chmod 0700 "$dir"
cd "$dir"

gen() {  # gen <file> <python expression printing the value>
  [ -s "$1" ] && return 0
  python3 -c "import base64, secrets; print($2)" > "$1.tmp"
  chmod 0644 "$1.tmp"
  mv "$1.tmp" "$1"
  echo "generated $dir/$1"
}
key='"1:" + base64.b64encode(secrets.token_bytes(32)).decode()'
gen secret_key 'secrets.token_urlsafe(50)'
gen keyring "$key"
gen session_keys "$key"
gen channel_layer_key 'secrets.token_urlsafe(32)'
gen postgres_password 'secrets.token_hex(24)'
if [ ! -s database_url ]; then
  printf 'postgres://cesaflow:%s@postgres:5432/cesaflow\n' "$(cat postgres_password)" > database_url.tmp
  chmod 0644 database_url.tmp
  mv database_url.tmp database_url
  echo "generated $dir/database_url"
fi
if [ ! -s tls_cert.pem ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout tls_key.pem -out tls_cert.pem 2>/dev/null
  chmod 0644 tls_cert.pem tls_key.pem
  echo "generated a self-signed certificate for localhost (30 days): $dir/tls_cert.pem"
fi
