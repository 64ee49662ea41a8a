"""A PEP 517 / PEP 660 build backend for ipd, standard library only.

ipd is one module, so its wheel is one file and four lines of metadata;
building it needs no setuptools download, which keeps `pip install .`,
`pip install -e .` and `pip wheel .` working on air-gapped hosts.

    python3 tools/wheel_backend.py wheel dist/    # what `make wheel` runs
    python3 tools/wheel_backend.py sdist dist/

The version has one home: __version__ in ipd.py.
"""

import base64
import hashlib
import io
import os
import re
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "ipd"
SUMMARY = ("Image Push and Deploy: receive app images over HTTP and switch "
           "the server to the new container")
REQUIRES_PYTHON = ">=3.8"
SCRIPTS = {"ipd": "ipd:main"}
TAG = "py3-none-any"
# Zip entries get a fixed date, so that the same source makes the same wheel.
EPOCH = (1980, 1, 1, 0, 0, 0)
SDIST_FILES = ("ipd.py", "README.md", "LICENSE", "pyproject.toml",
               "tools/wheel_backend.py", "ipd.service", "ipd.conf.example",
               "Makefile", "ipd-nginx.path", "ipd-nginx.service", "tools/nginx-reload",
               "ipd-run-as.conf", "docs/DETAILS.md", "docs/GUARANTEES.md",
               "docs/PERFORMANCE.md")


def version():
    """__version__ of ipd.py, read without importing it."""
    with open(os.path.join(ROOT, "ipd.py"), encoding="utf-8") as file:
        match = re.search(r'^__version__ = "([^"]+)"', file.read(), re.M)
    return match.group(1)


def metadata():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        readme = file.read()
    return ("Metadata-Version: 2.1\nName: %s\nVersion: %s\nSummary: %s\n"
            "Requires-Python: %s\nLicense: MIT\n"
            "Description-Content-Type: text/markdown\n\n%s"
            % (NAME, version(), SUMMARY, REQUIRES_PYTHON, readme))


def license_text():
    with open(os.path.join(ROOT, "LICENSE"), "rb") as file:
        return file.read()


def dist_info_files():
    """{path in the wheel: bytes} of the .dist-info folder but RECORD."""
    info = "%s-%s.dist-info" % (NAME, version())
    return {
        info + "/METADATA": metadata().encode(),
        info + "/WHEEL": ("Wheel-Version: 1.0\nGenerator: ipd tools/wheel_backend.py"
                          "\nRoot-Is-Purelib: true\nTag: %s\n" % TAG).encode(),
        info + "/entry_points.txt": ("[console_scripts]\n" + "".join(
            "%s = %s\n" % item for item in SCRIPTS.items())).encode(),
        info + "/LICENSE": license_text(),
    }


def write_wheel(directory, files):
    """A wheel of files ({path: bytes}) with its RECORD; returns its name."""
    name = "%s-%s-%s.whl" % (NAME, version(), TAG)
    info = "%s-%s.dist-info" % (NAME, version())
    records = []
    with zipfile.ZipFile(os.path.join(directory, name), "w",
                         zipfile.ZIP_DEFLATED) as wheel:
        for path, data in sorted(files.items()):
            entry = zipfile.ZipInfo(path, EPOCH)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(entry, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest())
            records.append("%s,sha256=%s,%d" % (path, digest.rstrip(b"=").decode(),
                                                len(data)))
        records.append(info + "/RECORD,,")
        entry = zipfile.ZipInfo(info + "/RECORD", EPOCH)
        entry.external_attr = 0o644 << 16
        wheel.writestr(entry, "\n".join(records) + "\n")
    return name


# --- the PEP 517 and PEP 660 hooks

def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with open(os.path.join(ROOT, "ipd.py"), "rb") as file:
        files = {"ipd.py": file.read()}
    files.update(dist_info_files())
    return write_wheel(wheel_directory, files)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    """A wheel whose .pth puts this source folder on sys.path."""
    files = {"__editable__.%s.pth" % NAME: (ROOT + "\n").encode()}
    files.update(dist_info_files())
    return write_wheel(wheel_directory, files)


def build_sdist(sdist_directory, config_settings=None):
    base = "%s-%s" % (NAME, version())
    name = base + ".tar.gz"
    with tarfile.open(os.path.join(sdist_directory, name), "w:gz") as tar:
        for path in SDIST_FILES:
            tar.add(os.path.join(ROOT, path), "%s/%s" % (base, path))
        info = tarfile.TarInfo(base + "/PKG-INFO")
        data = metadata().encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return name


if __name__ == "__main__":
    kind, directory = sys.argv[1], sys.argv[2]
    os.makedirs(directory, exist_ok=True)
    build = {"wheel": build_wheel, "sdist": build_sdist}[kind]
    print(os.path.join(directory, build(directory)))
