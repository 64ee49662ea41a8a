#!/bin/sh
# Build ipd_<version>_all.deb with dpkg-deb alone: `make deb`.
# Usage: tools/build_deb.sh OUTPUT_DIR
set -eu
cd "$(dirname "$0")/.."
out=${1:-dist}
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' ipd.py)
stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
install -d "$stage/DEBIAN" "$stage/usr/lib/ipd" "$stage/usr/bin" \
    "$stage/lib/systemd/system" "$stage/etc" "$stage/usr/share/doc/ipd"
install -m 0755 ipd.py tools/nginx-reload "$stage/usr/lib/ipd/"
ln -s ../lib/ipd/ipd.py "$stage/usr/bin/ipd"
sed -e 's|^ExecStart=.*|ExecStart=/usr/bin/ipd serve|' \
    -e 's|file:///usr/local/lib/ipd/README.md|file:///usr/share/doc/ipd/README.md|' \
    ipd.service > "$stage/lib/systemd/system/ipd.service"
# ipd-nginx.path: nginx reloads for the Docker examples (README).
install -m 0644 ipd-nginx.path "$stage/lib/systemd/system/ipd-nginx.path"
sed -e 's|^ExecStart=.*|ExecStart=/usr/lib/ipd/nginx-reload|' \
    ipd-nginx.service > "$stage/lib/systemd/system/ipd-nginx.service"
install -m 0644 ipd.conf.example "$stage/etc/ipd.conf"
install -m 0644 README.md ipd.conf.example ipd-run-as.conf "$stage/usr/share/doc/ipd/"
install -m 0644 LICENSE "$stage/usr/share/doc/ipd/copyright"
# The documents the README links to, beside it.
install -d "$stage/usr/share/doc/ipd/docs"
install -m 0644 docs/*.md "$stage/usr/share/doc/ipd/docs/"
# The example control.sh scripts the README tells to copy, modes kept.
cp -R examples "$stage/usr/share/doc/ipd/examples"
find "$stage/usr/share/doc/ipd/examples" -name __pycache__ -prune -exec rm -rf {} +
install -m 0755 tools/deb/postinst tools/deb/prerm tools/deb/postrm "$stage/DEBIAN/"
echo /etc/ipd.conf > "$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: ipd
Version: $version
Architecture: all
Maintainer: ipd developers <ipd@localhost>
Installed-Size: $size
Depends: python3 (>= 3.8), passwd
Recommends: docker.io | docker-ce, nginx
Section: admin
Priority: optional
Description: Image Push and Deploy: a deploy endpoint for CI
 ipd receives an app's container image and deploy package over HTTP and
 switches the server to the new container by running the project's
 control.sh. One file of standard library Python.
CONTROL
mkdir -p "$out"
dpkg-deb --root-owner-group --build "$stage" "$out/ipd_${version}_all.deb" >/dev/null
echo "$out/ipd_${version}_all.deb"
