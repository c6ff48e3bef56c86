#!/usr/bin/env bash
# Makes a CA and one node certificate for a test or a first deployment of kvgate with TLS:
#
#   bash scripts/make_certs.sh DIR [NAME ...]
#
# DIR/ca.pem (give it to --tls-ca on every node and client), DIR/node.pem and DIR/node.key
# (--tls-cert / --tls-key on every coordinator and worker). The node certificate is valid for
# localhost, 127.0.0.1 and each NAME (a host name or an IP address), as server and as client
# (mutual TLS). Keys are P-256, certificates last 365 days; the CA key stays in DIR/ca.key:
# keep it offline in a real deployment. Needs openssl (Debian: apt-get install openssl).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/make_certs.sh DIR [NAME ...]" >&2
  exit 2
fi
command -v openssl >/dev/null || { echo "make_certs.sh: openssl is not installed" >&2; exit 1; }
dir=$1
shift
mkdir -p "$dir"
umask 077
san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san="$san,IP:$name"; else san="$san,DNS:$name"; fi
done
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
  -subj "/CN=kvgate test CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=kvgate node" \
  -keyout "$dir/node.key" -out "$dir/node.csr" 2>/dev/null
cat > "$dir/node.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
EXT
openssl x509 -req -in "$dir/node.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 365 -extfile "$dir/node.ext" -out "$dir/node.pem" 2>/dev/null
rm -f "$dir/node.csr" "$dir/node.ext" "$dir/ca.srl"
chmod 644 "$dir/ca.pem" "$dir/node.pem"
echo "make_certs.sh: $dir/ca.pem, $dir/node.pem, $dir/node.key (valid for $san)"
