#!/usr/bin/env bash
# Make a private CA and a SuperLink server certificate signed by it.
#
#   deploy/make_certs.sh OUT_DIR [NAME ...]
#
# OUT_DIR gets ca.crt (give it to every SuperNode and to the `flwr` CLI),
# ca.key (keep it offline), server.pem and server.key (the SuperLink's).
# The certificate is valid for localhost, 127.0.0.1 and every NAME given:
# add the DNS names or IP addresses the SuperNodes use to reach the SuperLink,
# e.g. `deploy/make_certs.sh certs superlink.example.org 203.0.113.7`.
set -euo pipefail

out=${1:?usage: make_certs.sh OUT_DIR [DNS-NAME-OR-IP ...]}
shift
mkdir -p "$out"
cd "$out"

# subjectAltName: TLS clients check the address they dial against these
# entries (the Common Name is ignored), so every address must be listed.
sans="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
        sans+=",IP:$name"
    else
        sans+=",DNS:$name"
    fi
done

openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out ca.key
openssl req -x509 -new -key ca.key -days 365 -sha256 -subj "/CN=dpfl federation CA" -out ca.crt
openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out server.key
openssl req -new -key server.key -subj "/CN=dpfl SuperLink" -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -days 365 -sha256 -out server.pem \
    -extfile <(printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$sans")
rm -f server.csr ca.srl
chmod 600 ca.key server.key
echo "certificates in $(pwd): ca.crt, server.pem, server.key (SANs: $sans)"
