#!/usr/bin/env python3
"""Tests of ipd: the parser on bytes, packages and settings as units, and
the real daemon, started as a process on port 0 and spoken to over HTTP,
running real control.sh scripts.

    python3 test_ipd.py            # all of them (make test)
    python3 test_ipd.py -k Upload  # some of them
"""

import argparse
import base64
import bz2
import errno
import collections
import fcntl
import functools
import gzip
import hashlib
import hmac
import html
import html.parser
import http.client
import http.server
import importlib.util
import io
import json
import logging
import os
import py_compile
import random
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import threading
import time
import unittest
import urllib.parse
import uuid
import warnings
import zipfile

import ipd

HERE = os.path.dirname(os.path.abspath(__file__))
# IPD_SOAK=1 (make soak, once per CI run) runs the soaks at full size: the
# 20,000-request fuzz, 50 uploads with kill -9, 1 GiB pushes.  Otherwise
# they run smaller, so that each Python's suite stays quick.
SOAK = os.environ.get("IPD_SOAK") == "1"


def soak(full, quick):
    """full under IPD_SOAK=1, else quick."""
    return full if SOAK else quick


IPD = os.path.join(HERE, "ipd.py")
# Most tests run ipd.py as `python -m ipd`: the same file, from bytecode the
# runner compiles once, not compiled anew at each of the suite's hundreds
# of starts (that is half of what a start costs).
IPD_RUN = [sys.executable, "-m", "ipd"]


def ipd_environ(*extra, **changes):
    """os.environ with changes, and the folder of ipd.py on PYTHONPATH for
    IPD_RUN."""
    environ = dict(os.environ, **changes)
    for more in extra:
        environ.update(more or {})
    environ["PYTHONPATH"] = os.pathsep.join(
        [HERE] + [path for path in environ.get("PYTHONPATH", "").split(os.pathsep) if path])
    return environ


def kill_processes_in(folder):
    """SIGKILL every process whose working folder or command line is in
    folder: what a test's control.sh left behind after its daemon was
    killed (a gate it waits for would never come once folder is gone)."""
    folder = os.path.realpath(folder)
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cwd = os.readlink("/proc/%s/cwd" % name)
            with open("/proc/%s/cmdline" % name, "rb") as file:
                command = file.read().decode("utf-8", "replace")
        except OSError:
            continue
        if cwd == folder or cwd.startswith(folder + os.sep) or folder + os.sep in command:
            try:
                os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass


def serve_in_thread(test, handler):
    """A ThreadingHTTPServer of handler on 127.0.0.1 port 0, serving in a
    thread until test ends."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    test.addCleanup(server.server_close)
    test.addCleanup(server.shutdown)
    return server


def read_text(path):
    """The whole text of the file at path, closed again."""
    with open(path, encoding="utf-8", errors="replace") as file:
        return file.read()


def read_bytes(path):
    with open(path, "rb") as file:
        return file.read()


def wait_until(condition, timeout=30, interval=0.02, message="condition"):
    """Call condition until it returns a true value; return that value.
    timeout bounds what will come: long enough for a busy machine, as it
    costs nothing while the condition is met in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s not met within %s s" % (message, timeout))
        time.sleep(interval)


# --- raw HTTP, for what http.client will not send

ADMIN_AUTH = "Basic " + base64.b64encode(b"admin:admin-pw").decode()


def read_answer(file):
    """One HTTP answer from a socket's file: (status, headers, body), or
    None at the connection's end."""
    line = file.readline()
    if not line:
        return None
    status = int(line.split()[1])
    headers = {}
    while True:
        line = file.readline().decode("latin-1").rstrip("\r\n")
        if not line:
            break
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 100:
        return read_answer(file)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int(file.readline().split(b";")[0], 16)
            if not size:
                file.readline()
                break
            body += file.read(size)
            file.readline()
    else:
        body = file.read(int(headers.get("content-length", "0")))
    return status, headers, body


def raw_request(method, path, body=b"", headers=None, version="HTTP/1.1"):
    """The bytes of one request, with the admin's login."""
    fields = dict({"Host": "127.0.0.1", "Authorization": ADMIN_AUTH}, **(headers or {}))
    if body and "Transfer-Encoding" not in fields:
        fields.setdefault("Content-Length", str(len(body)))
    return ("%s %s %s\r\n" % (method, path, version)).encode() + "".join(
        "%s: %s\r\n" % item for item in fields.items()).encode() + b"\r\n" + body


def upload_request(project="app", package=None, query="", headers=None, force=False):
    content_type, body = multipart([("project", project), ("force", "1" if force else "0"),
                                    ("package", ("package.tar.gz",
                                                 package or control_script(OK_SCRIPT)))])
    return raw_request("POST", "/deploy/upload" + query, body,
                       dict({"Content-Type": content_type}, **(headers or {})))


def raw_exchange(port, data, timeout=10, pieces=None):
    """Send data (or pieces, with a pause between them so that they arrive
    in separate reads), close our side, read the whole answer.

    Returns the answer's bytes, or None when the server did not close the
    connection within timeout (a hang)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        try:
            for number, piece in enumerate(pieces or [data]):
                if number:
                    time.sleep(0.01)
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before all is sent
        answer = b""
        while True:
            try:
                piece = sock.recv(65536)
            except socket.timeout:
                return None
            except ConnectionResetError:
                return answer
            if not piece:
                return answer
            answer += piece
    finally:
        sock.close()


def answer_status(answer):
    """The final status of an answer (after any 100 Continue), or None."""
    answer = re.sub(rb"\AHTTP/1\.1 100 Continue\r\n\r\n", b"", answer or b"")
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    return int(match.group(1)) if match else None


def sha256_hex(text):
    return hashlib.sha256(text.encode()).hexdigest()


###############################################################################
# Multipart bodies, built independently of ipd's parser #######################
###############################################################################

def multipart(fields, boundary="testboundary1234"):
    """[(name, value or (filename, bytes))] -> (content type, body bytes)."""
    out = io.BytesIO()
    for name, value in fields:
        out.write(b"--" + boundary.encode() + b"\r\n")
        if isinstance(value, tuple):
            filename, data = value
            out.write(('Content-Disposition: form-data; name="%s"; filename="%s"'
                       '\r\nContent-Type: application/octet-stream\r\n\r\n'
                       % (name, filename)).encode())
            out.write(data)
        else:
            out.write(('Content-Disposition: form-data; name="%s"\r\n\r\n'
                       % name).encode())
            out.write(value.encode() if isinstance(value, str) else value)
        out.write(b"\r\n")
    out.write(b"--" + boundary.encode() + b"--\r\n")
    return "multipart/form-data; boundary=" + boundary, out.getvalue()


def tar_bytes(files, mode="w:gz"):
    """{name: (bytes, mode)} or {name: bytes} -> a tar archive."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as tar:
        for name, content in files.items():
            data, file_mode = content if isinstance(content, tuple) else (content, 0o644)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = file_mode
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def tar_with(*infos):
    """A tar of prepared (TarInfo, data or None) pairs."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in infos:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def tar_info(name, kind=tarfile.REGTYPE, size=0, linkname="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.linkname = linkname
    info.mode = mode
    return info


def control_script(body):
    """A package (tar.gz) whose control.sh runs body (shell)."""
    script = "#!/bin/sh\n" + textwrap.dedent(body)
    return tar_bytes({"control.sh": (script.encode(), 0o755)})


# control.sh that succeeds (exit 1) on every step and says what it ran
OK_SCRIPT = """
echo "step $1"
exit 1
"""


###############################################################################
# The real daemon #############################################################
###############################################################################

USERS = {
    "admin": ("ADMIN", "admin-pw"),
    "dev": ("USER", "dev-pw"),
}


class DaemonProcess:
    """ipd serve, as a real process on 127.0.0.1 port 0, in its own folder."""

    def __init__(self, folder, settings=None, users=USERS, extra_users="",
                 program=IPD):
        self.folder = folder
        self.program = program
        os.makedirs(folder, exist_ok=True)
        self.upload_dir = os.path.join(folder, "uploads")
        self.users_file = os.path.join(folder, "users.txt")
        self.config = os.path.join(folder, "ipd.conf")
        self.settings = {"LISTEN": "127.0.0.1:0", "UPLOAD_DIR": self.upload_dir,
                         "LOG_DIR": folder, "AUTH_DB": self.users_file,
                         "KILL_GRACE": "2", "SHUTDOWN_GRACE": "5"}
        self.settings.update(settings or {})
        if not os.path.exists(self.users_file):
            with open(self.users_file, "w") as file:
                for name, (role, password) in users.items():
                    file.write("%s:%s:%s\n" % (role, name, sha256_hex(password)))
                file.write(extra_users)
        with open(self.config, "w") as file:
            for key, value in self.settings.items():
                file.write("%s=%s\n" % (key, value))
        self.process = None
        self.port = None
        self.start_command = None  # what runs the Python (issue 14: setpriv)

    def start(self, env=None):
        os.makedirs(self.upload_dir, exist_ok=True)  # ipd makes no UPLOAD_DIR
        self.stderr_path = os.path.join(self.folder, "stderr-%d.txt" % time.time_ns())
        with open(self.stderr_path, "wb") as stderr:
            # ipd.py runs with this test's Python; an installed `ipd`
            # command (a virtualenv's, the package's) runs as it is.
            if self.program == IPD and not self.start_command:
                command = IPD_RUN
            elif self.program.endswith(".py"):
                command = (self.start_command or [sys.executable]) + [self.program]
            else:
                command = [self.program]
            self.process = subprocess.Popen(
                command + ["--config", self.config, "serve"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                env=ipd_environ(env))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = read_text(self.stderr_path)
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)/", text)
            if match:
                self.port = int(match.group(1))
                return self
            if self.process.poll() is not None:
                raise AssertionError("ipd did not start: " + text)
            time.sleep(0.005)  # a small file read: each test starts one or more
        raise AssertionError("ipd did not start in time")

    def stop(self, signum=signal.SIGTERM, timeout=30):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(timeout)
        return self.process.returncode

    def kill(self):
        return self.stop(signal.SIGKILL)

    def restart(self):
        self.stop()
        return self.start()

    def connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def request(self, method, path, user="admin", body=None, headers=None,
                root="/deploy"):
        """-> (status, headers, body text)."""
        headers = dict(headers or {})
        if user:
            password = USERS[user][1] if user in USERS else user.split(":", 1)[1]
            name = user.split(":", 1)[0]
            token = base64.b64encode(("%s:%s" % (name, password)).encode()).decode()
            headers["Authorization"] = "Basic " + token
        connection = self.connection()
        try:
            connection.request(method, root + path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.headers, response.read().decode()
        finally:
            connection.close()

    def get(self, path, user="admin", **kwargs):
        return self.request("GET", path, user, **kwargs)

    def get_json(self, path, user="admin"):
        status, _, body = self.get(path, user, headers={"Accept": "application/json"})
        return status, json.loads(body)

    def upload(self, project="app", package=None, image=None, user="admin",
               extra=()):
        fields = [("project", project)] if project is not None else []
        if image is not None:
            fields.append(("image", ("image.tar", image)))
        if package is not None:
            fields.append(("package", ("package.tar.gz", package)))
        fields.extend(extra)
        content_type, body = multipart(fields)
        return self.request("POST", "/upload", user, body=body,
                            headers={"Content-Type": content_type})

    def deploy(self, script=OK_SCRIPT, project="app", **kwargs):
        """Upload a package with control.sh; return the deployment id."""
        status, _, body = self.upload(project, control_script(script), **kwargs)
        if status != 202:
            raise AssertionError("upload answered %d: %s" % (status, body))
        return body.strip()

    def state(self, project, deployment=None):
        path = "/status/%s" % project + ("/%s" % deployment if deployment else "")
        return self.get(path)[2].strip()

    def wait_state(self, project, deployment, states=None, timeout=30):
        """Poll until the state is one of states (default: any final)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(project, deployment)
            if (states and state in states) or \
                    (not states and state not in ("await", "active")):
                return state
            time.sleep(0.02)
        raise AssertionError("%s/%s still %s" % (project, deployment, state))

    def log(self, project, deployment):
        return self.get("/log/%s/%s" % (project, deployment))[2]

    def daemon_log(self, expect=None, timeout=30):
        """ipd.log's text; with expect, wait until it matches (the access
        line is written just after the answer is sent)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(os.path.join(self.folder, "ipd.log")) as file:
                    text = file.read()
            except FileNotFoundError:
                text = ""
            if not expect or re.search(expect, text) or time.monotonic() > deadline:
                return text
            time.sleep(0.02)

    def leftovers(self):
        """Temporary upload files or folders in UPLOAD_DIR."""
        return [name for name in os.listdir(self.upload_dir)
                if name.startswith(".upload-")]


class DaemonTestCase(unittest.TestCase):
    settings = {}

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        self.daemon = self.start_daemon(self.settings)

    def start_daemon(self, settings=None, **kwargs):
        daemon = DaemonProcess(self.tmp, settings, **kwargs)
        daemon.start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        return daemon

    def wait_for_file(self, path, timeout=20):
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise AssertionError("%s never appeared" % path)
            time.sleep(0.01)


def process_running(pid):
    try:
        with open("/proc/%d/stat" % pid) as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


###############################################################################
# Steering deployments, and the CI client #####################################
###############################################################################

def gate_script(gate, before="", after=""):
    """control.sh whose deploy step waits for the file gate."""
    return ('[ "$1" = deploy ] || exit 1\n%s\n'
            'while [ ! -e %s ]; do sleep 0.02; done\n%s\nexit 1\n'
            % (before, gate, after))


def parse_prometheus(text):
    """Prometheus text format -> ({(name, sorted labels): value}, {name: type});
    raises on any line that is not of the format."""
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        match = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
        if not match:
            raise AssertionError("not Prometheus text: %r" % line)
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or "")))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples, types


###############################################################################
# Accountable pushes: refused early, audited, notified, idempotent ############
###############################################################################

class Listener:
    """A local HTTP server that records the JSON POSTed to it."""

    def __init__(self):
        self.received = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                if len(body) < length:
                    return  # its sender was stopped mid-POST: a test's end
                received.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/hook" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class CountingRelay:
    """A TCP relay from 127.0.0.1 (its port) to a server's port that counts
    the bytes clients send through it: what a client put on the wire,
    whether or not the server read it.  It reads each client to its end,
    also after the server has closed, so nothing sent goes uncounted."""

    def __init__(self, test, port):
        self.target = port
        self.sent = 0
        self.lock = threading.Lock()
        self.sockets = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        test.addCleanup(self.close)

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.sockets.extend((client, server))
            threading.Thread(target=self._pump, args=(client, server, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, source, target, counted):
        forward = True
        while True:
            try:
                data = source.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            if counted:
                with self.lock:
                    self.sent += len(data)
            try:
                if forward:
                    target.sendall(data)
            except OSError:
                forward = False  # the other side is gone: count on
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes its pump
                except OSError:
                    pass
                sock.close()


###############################################################################
# Install paths and upgrades ##################################################
###############################################################################

def build(kind, folder):
    """Build the wheel or sdist (tools/wheel_backend.py) into folder."""
    result = subprocess.run([sys.executable, os.path.join(HERE, "tools",
                                                          "wheel_backend.py"),
                             kind, folder], stdout=subprocess.PIPE, check=True)
    return result.stdout.decode().strip()


def make_venv(folder):
    """A fresh virtualenv, as the original installation makes in /opt/ipd."""
    subprocess.run([sys.executable, "-m", "venv", folder], check=True)
    return os.path.join(folder, "bin")


def pip_install(bin_dir, *args):
    result = subprocess.run([os.path.join(bin_dir, "python"), "-m", "pip", "install",
                             "-q", "--no-index", "--disable-pip-version-check"]
                            + list(args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=300)
    if result.returncode:
        raise AssertionError(result.stdout.decode())


class WebDriver:
    """Debian's chromium driven through chromedriver's W3C WebDriver JSON API,
    with http.client: headless, no network beyond loopback."""

    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

    def __init__(self, folder):
        log = os.path.join(folder, "chromedriver.log")
        with open(log, "wb") as out:
            self.process = subprocess.Popen(["chromedriver", "--port=0"], stdout=out,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            match = re.search(r"started successfully on port (\d+)", read_text(log))
            if match:
                self.port = int(match.group(1))
                break
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError("chromedriver did not start: " + read_text(log))
            time.sleep(0.05)
        options = {"binary": shutil.which("chromium"), "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--window-size=900,900",
            "--user-data-dir=" + os.path.join(folder, "chromium-profile")]}
        self.session = self.call("POST", "/session", {"capabilities": {
            "alwaysMatch": {"goog:chromeOptions": options}}})["sessionId"]

    def call(self, method, path, body=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        connection.request(method, path, body=json.dumps(body) if body is not None
                           else None, headers={"Content-Type": "application/json"})
        answer = json.loads(connection.getresponse().read() or b"{}")
        connection.close()
        value = answer.get("value")
        if isinstance(value, dict) and value.get("error"):
            raise AssertionError("WebDriver %s %s: %s" % (method, path,
                                                          value.get("message", "")[:300]))
        return value

    def session_call(self, method, path, body=None):
        return self.call(method, "/session/%s%s" % (self.session, path), body)

    def cdp(self, command, params):
        return self.session_call("POST", "/goog/cdp/execute", {"cmd": command,
                                                               "params": params})

    def open(self, url):
        self.session_call("POST", "/url", {"url": url})

    def find(self, css):
        return self.session_call("POST", "/element", {"using": "css selector",
                                                      "value": css})[self.ELEMENT]

    def text(self, css):
        return self.session_call("GET", "/element/%s/text" % self.find(css))

    def click(self, css):
        self.session_call("POST", "/element/%s/click" % self.find(css), {})

    def wait_text(self, css, expected, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.text(css)
            except AssertionError:
                text = ""
            if expected in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError("%r never showed %r, only %r" % (css, expected,
                                                                      text[-300:]))
            time.sleep(0.1)

    def screenshot(self, path):
        data = base64.b64decode(self.session_call("GET", "/screenshot"))
        with open(path, "wb") as file:
            file.write(data)
        return data

    def quit(self):
        try:
            self.session_call("DELETE", "")
        finally:
            self.process.kill()
            self.process.wait()


def png_colours(data):
    """How many different byte values the PNG's pixels hold (1: blank)."""
    import zlib
    position, idat = 8, b""
    while position < len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kind = data[position + 4:position + 8]
        if kind == b"IDAT":
            idat += data[position + 8:position + 8 + length]
        position += 12 + length
    return len(set(zlib.decompress(idat)))


ATTACK_PAGE = """<!DOCTYPE html><html><head><title>a cat picture</title></head><body>
<form id="f" method="post" enctype="multipart/form-data" action="%(ipd)s/upload">
<input name="project" value="app"><input type="file" name="package" id="p"></form>
<script>
const bytes = Uint8Array.from(atob("%(package)s"), c => c.charCodeAt(0));
const files = new DataTransfer();
files.items.add(new File([bytes], "package.tar.gz"));
document.getElementById("p").files = files.files;
const post = path => fetch("%(ipd)s" + path, {method: "POST", mode: "no-cors",
                                                credentials: "include"});
Promise.allSettled([post("/cancel/app/%(running)s"), post("/redeploy/app/%(running)s")])
  .then(() => { document.title = "sent"; document.getElementById("f").submit(); });
</script></body></html>"""


###############################################################################
# In process: the store, the queue and the real Server in a thread ############
###############################################################################

class AuditRecorder(logging.Handler):
    """The audit events ipd writes while it is attached, as dicts."""

    def __init__(self):
        super().__init__()
        self.events = []

    def emit(self, record):
        self.events.append(json.loads(record.getMessage()))

    def states(self, deployment_id):
        return [(event["event"], event.get("state")) for event in self.events
                if event.get("deployment") == deployment_id]


class InProcessServerTestCase(unittest.TestCase):
    """The real Server on ('127.0.0.1', 0) in a thread of this process."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        users = os.path.join(self.tmp, "users.txt")
        with open(users, "w") as file:
            file.write("ADMIN:admin:%s\n" % sha256_hex("admin-pw"))
        os.makedirs(os.path.join(self.tmp, "uploads"))
        settings = ipd.load_settings(os.devnull, environ={
            "UPLOAD_DIR": os.path.join(self.tmp, "uploads"), "LOG_DIR": self.tmp,
            "AUTH_DB": users, "LISTEN": "127.0.0.1:0", "KILL_GRACE": "1"})
        self.daemon = ipd.Daemon(settings)
        self.server = ipd.Server(settings.LISTEN, self.daemon)
        self.daemon.load(settings.KILL_GRACE)
        self.daemon.worker.start()
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(self.daemon.worker.stop, 5)
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.port = self.server.server_address[1]


###############################################################################
# Signed releases and deploy tokens ###########################################
###############################################################################

def ssh_key(folder, name):
    """A new ed25519 key pair in folder; -> (private key path, public key text)."""
    path = os.path.join(folder, name)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                    "-f", path], check=True, stdin=subprocess.DEVNULL)
    with open(path + ".pub") as file:
        return path, " ".join(file.read().split()[:2])


###############################################################################
# OpenID Connect ID tokens: keys made by openssl, tokens signed here ##########
###############################################################################

GITHUB = "https://token.actions.githubusercontent.com"
AUDIENCE = "https://deploy.example.com"
GITHUB_SUB = "repo:acme/web:ref:refs/heads/main"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_uint(number):
    return b64url(number.to_bytes((number.bit_length() + 7) // 8, "big"))


def need_openssl():
    if not shutil.which("openssl"):
        if os.environ.get("CI"):
            raise AssertionError("CI without openssl")
        raise unittest.SkipTest("needs openssl (Debian: openssl)")


class RsaKey:
    """An RSA key made by `openssl genrsa` (its numbers read back from
    `openssl rsa -text`), signing RS256 in pure Python: pow(m, d, n)."""

    made = {}  # (bits, kid) -> key: each made once a run

    @staticmethod
    def generate(bits, kid, folder):
        """The path of a private key of bits made by `openssl genrsa`: in
        folder, or in the folder the runner shares among its workers
        (IPD_TEST_KEYS), made there by the first one that asks."""
        folder = os.environ.get("IPD_TEST_KEYS") or folder
        path = os.path.join(folder, "%d-%s.pem" % (bits, kid))
        with open(os.path.join(folder, "lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one maker; the others wait
            if not os.path.exists(path):
                subprocess.run(["openssl", "genrsa", "-out", path + ".new", str(bits)],
                               check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                os.rename(path + ".new", path)
        return path

    def __init__(self, bits, kid):
        folder = tempfile.mkdtemp(prefix="ipd-test-key-")
        try:
            path = self.generate(bits, kid, folder)
            text = subprocess.run(["openssl", "rsa", "-in", path, "-noout", "-text"],
                                  check=True, stdout=subprocess.PIPE).stdout.decode()
            self.public_pem = subprocess.run(
                ["openssl", "rsa", "-in", path, "-pubout"], check=True,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        finally:
            shutil.rmtree(folder, True)

        def number(label, following):
            found = re.search(r"(?m)^%s:\s*\n((?:\s+[0-9a-f:]+\n)+)%s" % (label, following),
                              text)
            return int(re.sub(r"[^0-9a-f]", "", found.group(1)), 16)
        self.n = number("modulus", "publicExponent")
        self.e = int(re.search(r"publicExponent: (\d+)", text).group(1))
        self.d = number("privateExponent", "prime1")
        self.kid = kid
        self.bits = self.n.bit_length()

    @classmethod
    def get(cls, bits, kid):
        if (bits, kid) not in cls.made:
            cls.made[bits, kid] = cls(bits, kid)
        return cls.made[bits, kid]

    def jwk(self):
        return {"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                "n": b64url_uint(self.n), "e": b64url_uint(self.e)}

    def sign(self, message):
        """RSASSA-PKCS1-v1_5 with SHA-256, written out (RFC 8017 9.2)."""
        size = (self.n.bit_length() + 7) // 8
        info = bytes.fromhex("3031300d060960864801650304020105000420") + \
            hashlib.sha256(message).digest()
        encoded = b"\x00\x01" + b"\xff" * (size - len(info) - 3) + b"\x00" + info
        return pow(int.from_bytes(encoded, "big"), self.d, self.n).to_bytes(size, "big")


def jwks_text(*keys):
    return json.dumps({"keys": [key.jwk() for key in keys]})


def mint(key, claims, header=None):
    """A compact JWS of claims signed RS256 by key (header: its own)."""
    header = header or {"alg": "RS256", "typ": "JWT", "kid": key.kid}
    signing = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    return signing + "." + b64url(key.sign(signing.encode()))


def github_claims(**changes):
    """The claims of a GitHub Actions job of acme/web on main; a change
    to None leaves that claim out."""
    now = int(time.time())
    claims = {"iss": GITHUB, "aud": AUDIENCE, "sub": GITHUB_SUB,
              "repository": "acme/web", "repository_owner": "acme",
              "ref": "refs/heads/main", "sha": "a" * 40, "workflow": "deploy",
              "run_id": "4242", "run_attempt": "1", "environment": "production",
              "actor": "alice", "jti": str(uuid.uuid4()),
              "iat": now - 5, "nbf": now - 5, "exp": now + 300}
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


def oidc_upload(daemon, authorization, project="web", address="127.0.0.1"):
    """Upload an ok package to project with that Authorization; -> (status,
    body)."""
    content_type, body = multipart([("project", project), ("force", "1"), (
        "package", ("p.tgz", control_script(OK_SCRIPT)))])
    status, _, text = daemon.request("POST", "/upload", user=None, body=body, headers={
        "Content-Type": content_type, "Authorization": authorization,
        "X-Real-IP": address})
    return status, text


def audit_events(folder, event):
    return [json.loads(line) for line in read_text(os.path.join(folder, "audit.log"))
            .splitlines() if '"event": "%s"' % event in line]


class OidcTestCase(DaemonTestCase):
    """A daemon with OIDC_TRUST: rules written by rules(), keys made once."""

    @classmethod
    def setUpClass(cls):
        need_openssl()
        cls.key = RsaKey.get(2048, "key-1")
        cls.rotated = RsaKey.get(2048, "key-2")
        cls.weak = RsaKey.get(1024, "weak")

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        self.trust = os.path.join(self.tmp, "oidc-trust.txt")
        with open(self.trust, "w") as file:
            file.write(self.rules())
        self.daemon = self.start_daemon(dict(self.daemon_settings(), OIDC_TRUST=self.trust))

    def rules(self):
        return ""

    def daemon_settings(self):
        return {}

    def bearer(self, claims, key=None, header=None):
        return "Bearer " + mint(key or self.key, claims, header)


def make_test_ca(folder):
    """A CA and a certificate for 127.0.0.1 it signed, made by openssl;
    -> (CA certificate path, server certificate path, server key path)."""
    def openssl(*args):
        subprocess.run(["openssl"] + list(args), check=True, cwd=folder,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
            "-out", "ca.pem", "-days", "2", "-subj", "/CN=ipd test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
            "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    with open(os.path.join(folder, "server.ext"), "w") as file:
        file.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
                   "authorityKeyIdentifier=keyid,issuer\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2",
            "-extfile", "server.ext")
    return tuple(os.path.join(folder, name) for name in
                 ("ca.pem", "server.pem", "server.key"))


class FakeIssuer:
    """An OpenID issuer over HTTPS on 127.0.0.1 (certificate of a test CA):
    issuers https://127.0.0.1:PORT/NAME, each answering discovery and its
    JWKS as self.modes[NAME] says: 'keys' (self.keys), 'hang' (until the
    test ends) or 'garbage'.  Counts each path it was asked for."""

    def __init__(self, test, certificate, key):
        self.keys, self.modes, self.hits = [], {}, collections.Counter()
        self.entered = threading.Event()  # a request reached a 'hang'
        self.release = threading.Event()
        test.addCleanup(self.release.set)
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                issuer.hits[self.path] += 1
                name, _, rest = self.path.strip("/").partition("/")
                mode = issuer.modes.get(name)
                if mode == "hang":
                    issuer.entered.set()
                    issuer.release.wait(60)
                    return
                if mode == "garbage":
                    body = b"\x00{{{ not JSON"
                elif rest == ".well-known/openid-configuration":
                    body = json.dumps({"issuer": issuer.url(name),
                                       "jwks_uri": issuer.url(name) + "/jwks"}).encode()
                else:
                    body = jwks_text(*issuer.keys).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate, key)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        test.addCleanup(self.server.server_close)
        test.addCleanup(self.server.shutdown)

    def url(self, name):
        return "https://127.0.0.1:%d/%s" % (self.server.server_address[1], name)

    def fetches(self, name):
        """(discovery fetches, JWKS fetches) of issuer name."""
        return (self.hits["/%s/.well-known/openid-configuration" % name],
                self.hits["/%s/jwks" % name])


class FakeActionsTokens:
    """GitHub Actions' ID token endpoint (ACTIONS_ID_TOKEN_REQUEST_URL), on
    127.0.0.1: each GET with the right bearer mints a token for the asked
    audience, valid for `lifetime` seconds by ipd's clock (leeway included)."""

    SECRET = "actions-request-token"

    def __init__(self, test, key, lifetime=300):
        self.key, self.lifetime, self.minted = key, lifetime, []
        tokens = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                if (self.headers.get("Authorization") != "Bearer " + tokens.SECRET or
                        query.get("api-version") != ["2.0"]):
                    self.send_error(403)
                    return
                body = json.dumps({"count": 1, "value": tokens.mint(
                    query.get("audience", [""])[0])}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.server = serve_in_thread(test, Handler)
        self.environ = {
            "ACTIONS_ID_TOKEN_REQUEST_URL": "http://127.0.0.1:%d/token?api-version=2.0"
                                            % self.server.server_address[1],
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": self.SECRET}

    def mint(self, audience):
        # ipd takes a token up to OIDC_LEEWAY s after its exp
        exp = int(time.time() + self.lifetime - ipd.OIDC_LEEWAY)
        self.minted.append((audience, exp + ipd.OIDC_LEEWAY))  # refused from then
        return mint(self.key, github_claims(aud=audience, exp=exp))


###############################################################################
# Registry: docker push deploys (issue #24) ###################################
###############################################################################

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# Server-side control.sh of a registry project: tells what it got, keeps $IMAGE.
REGISTRY_SCRIPT = """#!/bin/sh
[ "$1" = deploy ] || exit 1
[ -e "$PROJECT_DIR/gate" ] || [ ! -e "$PROJECT_DIR/hold" ] || while [ ! -e "$PROJECT_DIR/gate" ]; do sleep 0.02; done
echo "IMAGE_REF=$IMAGE_REF"
echo "IMAGE_DIGEST=$IMAGE_DIGEST"
cp "$IMAGE" "$PROJECT_DIR/image-$DEPLOY.tar"
exit 1
"""


def gzip_layer(files):
    """A gzip-compressed tar layer of {name: bytes}."""
    return gzip.compress(plain_tar(sorted(files.items())), mtime=0)


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_manifest(layers, architecture="amd64", media_type=DOCKER_MANIFEST):
    """(config, manifest) bytes of an image of gzip layers (bytes)."""
    config = json.dumps({"architecture": architecture, "os": "linux",
                         "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers", "diff_ids": [
                             digest_of(gzip.decompress(layer)) for layer in layers]}
                         }).encode()
    oci = "oci" in media_type
    manifest = {"schemaVersion": 2, "mediaType": media_type,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json" if oci
                           else "application/vnd.docker.container.image.v1+json",
                           "digest": digest_of(config), "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"
                            if oci else "application/vnd.docker.image.rootfs.diff.tar.gzip",
                            "digest": digest_of(layer), "size": len(layer)}
                           for layer in layers]}
    return config, json.dumps(manifest, indent=3).encode()


class RegistryTestCase(DaemonTestCase):
    """A daemon, project web with a control.sh on the server (as an
    image-only upload needs), and a registry client made of http.client."""
    project = "web"

    def setUp(self):  # DaemonTestCase's, with a user of project api only
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        self.daemon = self.start_daemon(self.settings, extra_users=(
            "USER:other:%s:api\n" % sha256_hex("other-pw")))
        self.place_script(self.daemon, self.project)

    def place_script(self, daemon, project, script=REGISTRY_SCRIPT):
        folder = os.path.join(daemon.upload_dir, project)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "control.sh")
        with open(path, "w") as file:
            file.write(script)
        os.chmod(path, 0o755)

    def call(self, method, path, body=None, headers=None, user="admin", daemon=None):
        """-> (status, headers, body bytes) of a registry request."""
        headers = dict(headers or {})
        if user:
            name, password = ((user, USERS[user][1]) if user in USERS
                              else user.split(":", 1))
            headers["Authorization"] = "Basic " + base64.b64encode(
                ("%s:%s" % (name, password)).encode()).decode()
        connection = (daemon or self.daemon).connection()
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()

    def assertError(self, answer, status, code):
        """answer is status with the spec's error JSON of code (a HEAD's:
        status and type, as it has no body)."""
        self.assertEqual(answer[0], status, answer[2][:300])
        self.assertEqual(answer[1]["Content-Type"], "application/json")
        if not answer[2] and answer[1]["Content-Length"] != "0":
            return ""
        errors = json.loads(answer[2].decode())["errors"]
        self.assertEqual(errors[0]["code"], code, errors)
        self.assertTrue(errors[0]["message"])
        return errors[0]["message"]

    def push_blob(self, data, project=None, user="admin", daemon=None):
        """POST, one streamed PATCH, PUT ?digest=, as docker push does."""
        project = project or self.project
        status, headers, _ = self.call("POST", "/v2/%s/blobs/uploads/" % project,
                                       user=user, daemon=daemon)
        self.assertEqual(status, 202)
        status, headers, _ = self.call(  # chunked: http.client's for an iterable
            "PATCH", headers["Location"], iter([data]),
            {"Content-Type": "application/octet-stream"}, user=user, daemon=daemon)
        self.assertEqual(status, 202)
        location = headers["Location"] + "?digest=" + urllib.parse.quote(digest_of(data))
        status, headers, body = self.call("PUT", location, b"", user=user, daemon=daemon)
        self.assertEqual(status, 201, body)
        return digest_of(data)

    def push_image(self, tag, layers, project=None, user="admin", daemon=None, **kwargs):
        """Push the layers, the config and the manifest by tag -> the
        manifest PUT's (status, headers, body) and the manifest."""
        config, manifest = image_manifest(layers, **kwargs)
        for blob in layers + [config]:
            self.push_blob(blob, project, user, daemon)
        answer = self.call("PUT", "/v2/%s/manifests/%s" % (project or self.project, tag),
                           manifest, {"Content-Type": json.loads(manifest)["mediaType"]},
                           user=user, daemon=daemon)
        return answer, manifest

    def deployed(self, answer, state="ok"):
        """The deployment a tag push made, once it ended in state."""
        self.assertEqual(answer[0], 201, answer[2])
        deployment = answer[1]["Ipd-Deployment"]
        self.assertEqual(self.daemon.wait_state(self.project, deployment), state)
        return deployment

    def partial_files(self):
        root = os.path.join(self.daemon.upload_dir, ".segments", "partial")
        return [name for folder, _, names in os.walk(root) for name in names]


###############################################################################
# Guarantees: tests that attack ipd and count ################################
###############################################################################

def report(text):
    """A figure for the README's Guarantees section, printed as it is measured."""
    sys.stderr.write("\n  guarantee: %s\n" % text)


###############################################################################
# Docker and nginx, for real ##################################################
###############################################################################

def docker_unavailable():
    """Why the Docker tests cannot run here, or None when they can."""
    for tool in ("docker", "nginx", "busybox", "curl"):
        if not shutil.which(tool):
            return "%s is not installed" % tool
    result = subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, universal_newlines=True)
    if result.returncode:
        return "no Docker engine answers: " + (result.stderr.strip().splitlines()
                                                or ["?"])[-1]
    return None


def docker(*args, check=True, stdin=None):
    """Run the docker CLI; return its stdout."""
    result = subprocess.run(("docker",) + args, input=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=300)
    if check and result.returncode:
        raise AssertionError("docker %s: %s" % (" ".join(args),
                                                result.stderr.decode()))
    return result.stdout.decode()


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (where the test nginx listens)."""

    def __init__(self, path, timeout=10):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


# The README and the files it links to (issue #27 moved its depths there).
DOC_FILES = ("README.md", "docs/DETAILS.md", "docs/GUARANTEES.md", "docs/PERFORMANCE.md",
             "examples/docker/README.md", "examples/swarm/README.md")


def readme_nginx_location():
    """The nginx location block of the README (the original's)."""
    readme = read_text(os.path.join(HERE, "README.md"))
    match = re.search(r"\n(    location /deploy \{.*?\n    \})\n", readme, re.S)
    return match.group(1)


class Nginx:
    """A real nginx in front of ipd and of the apps, listening on unix
    sockets in its own folder."""

    def __init__(self, folder, ipd_port, include):
        self.folder = folder
        self.front = os.path.join(folder, "front.sock")
        self.command = ["nginx", "-p", folder, "-c", os.path.join(folder, "nginx.conf"),
                        "-e", os.path.join(folder, "error.log")]
        temp_paths = "".join("    %s_temp_path %s/%s;\n" % (kind, folder, kind)
                             for kind in ("client_body", "proxy", "fastcgi",
                                          "uwsgi", "scgi"))
        location = readme_nginx_location().replace("localhost:9955",
                                                    "127.0.0.1:%d" % ipd_port)
        with open(os.path.join(folder, "nginx.conf"), "w") as file:
            file.write("user root;\npid %s/nginx.pid;\nerror_log %s/error.log;\n"
                       "events { worker_connections 512; }\nhttp {\n"
                       "    access_log off;\n%s    include %s;\n"
                       "    server {\n        listen unix:%s;\n%s\n    }\n}\n"
                       % (folder, folder, temp_paths, include, self.front, location))

    def start(self):
        subprocess.run(self.command, check=True)
        return self

    def stop(self):
        subprocess.run(self.command + ["-s", "stop"], stderr=subprocess.DEVNULL)

    def shell_command(self):
        return " ".join(self.command)


def busybox_image(tag, folder, version, healthy=True,
                  command=("/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"),
                  extra=()):
    """Build an image from a busybox root file system (no image can be
    pulled here), with extra files ((name, bytes, mode)...), docker save it
    as a user's CI would; return the tar."""
    rootfs = io.BytesIO()
    with tarfile.open(fileobj=rootfs, mode="w") as tar:
        tar.add(os.path.realpath(shutil.which("busybox")), "bin/busybox")
        for name in ("sh", "wget"):
            link = tarfile.TarInfo("bin/" + name)
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        files = {"www/index.html": version.encode() + b"\n"}
        if healthy:
            files["www/health"] = b"ok\n"
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, data, mode in extra:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    docker("import", "--change", "CMD " + json.dumps(list(command)),
           "-", tag, stdin=rootfs.getvalue())
    path = os.path.join(folder, tag.replace(":", "-").replace("/", "-") + ".tar")
    docker("save", "-o", path, tag)
    docker("rmi", tag)
    return path


class DockerTestCase(unittest.TestCase):
    """ipd behind nginx deploying real images to a real Docker engine.

    Skipped where there is no engine; IPD_TEST_DOCKER=required (as in CI)
    makes that a failure instead."""
    system = True  # the same on every Python: once per CI run

    script = None  # examples/*/control.sh
    serial = "docker"  # one engine (and Swarm) for all: one test at a time

    @classmethod
    def setUpClass(cls):
        why = docker_unavailable()
        if why and os.environ.get("IPD_TEST_DOCKER") == "required":
            raise AssertionError("IPD_TEST_DOCKER=required but " + why)
        if why:
            raise unittest.SkipTest("Docker tests need docker, nginx, busybox and "
                                    "curl: " + why)

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-docker-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        self.project = "web-" + uuid.uuid4().hex[:8]
        self.daemon = DaemonProcess(self.tmp, {"PASS_ENV": "DOCKER_HOST",
                                               "STEP_TIMEOUT": "180"})
        self.daemon.start()
        self.addCleanup(self.daemon.stop, signal.SIGKILL)
        self.nginx = Nginx(self.tmp, self.daemon.port,
                           os.path.join(self.daemon.upload_dir, "*", "nginx.conf"))
        self.nginx.start()
        self.addCleanup(self.nginx.stop)
        self.app_socket = os.path.join(self.tmp, "app.sock")
        self.deployments = []
        self.package = os.path.join(self.tmp, "package.tar.gz")
        with tarfile.open(self.package, "w:gz") as tar:
            tar.add(os.path.join(HERE, self.script), "control.sh")

    def write_settings(self, text):
        """deploy.env in PROJECT_DIR before the first deploy (prepare keeps it)."""
        project_dir = os.path.join(self.daemon.upload_dir, self.project)
        os.makedirs(project_dir, exist_ok=True)
        with open(os.path.join(project_dir, "deploy.env"), "w") as file:
            file.write(textwrap.dedent(text) + 'NGINX_LISTEN="unix:%s"\n'
                       'NGINX_SERVER_NAME=localhost\nNGINX="%s"\n'
                       % (self.app_socket, self.nginx.shell_command()))

    def curl_upload(self, image):
        """Upload with curl through nginx, as the README shows; return the id."""
        result = subprocess.run(
            ["curl", "-sS", "-f", "--unix-socket", self.nginx.front, "-u",
             "admin:admin-pw", "-F", "project=" + self.project, "-F",
             "image=@" + image, "-F", "package=@" + self.package,
             "http://localhost/deploy/upload"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    def deploy(self, image, expect="ok"):
        deployment = self.curl_upload(image)
        state = self.daemon.wait_state(self.project, deployment, timeout=240)
        log = self.daemon.log(self.project, deployment)
        self.assertEqual(state, expect, log)
        self.deployments.append(deployment)
        return log

    def app(self):
        """(status, body) of the app through nginx."""
        connection = UnixHTTPConnection(self.app_socket, timeout=5)
        try:
            connection.request("GET", "/")
            response = connection.getresponse()
            return response.status, response.read().decode().strip()
        finally:
            connection.close()

    def image(self, version, healthy=True):
        return busybox_image("ipd-test-%s:%s" % (self.project, version), self.tmp,
                             version, healthy)


# The Docker example's deploy.env in its tests: quick health checks and
# drains, two images kept.
DOCKER_EXAMPLE_SETTINGS = """
    APP_PORT=8080
    HEALTH_PATH=/health
    HEALTH_TIMEOUT=8
    DRAIN_SECONDS=1
    STOP_TIMEOUT=2
    KEEP_IMAGES=2
    DOCKER_RUN_OPTS=
    """


def layered_busybox_image(tag, folder, version, filler, changed):
    """(#16) A three-layer image: the busybox base, a filler layer (the same
    bytes in every version) and a top layer with www/index.html = version
    and www/changed.bin = changed; loaded into Docker and saved again as
    the engine writes it."""
    def layer(files, links=()):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o755, 1700000000
                tar.addfile(info, io.BytesIO(data))
            for name in links:
                link = tarfile.TarInfo(name)
                link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "busybox", 1700000000
                tar.addfile(link)
        return out.getvalue()
    with open(os.path.realpath(shutil.which("busybox")), "rb") as file:
        busybox = file.read()
    layers = [layer({"bin/busybox": busybox, "www/health": b"ok\n"},
                    ("bin/sh", "bin/wget")),
              layer({"opt/filler.bin": filler}),
              layer({"www/index.html": version.encode() + b"\n",
                     "www/changed.bin": changed})]
    machine = os.uname().machine
    built = layered_image(os.path.join(folder, "built-%s.tar" % version), layers,
                          tag=tag, config={"Cmd": ["/bin/busybox", "httpd", "-f", "-p",
                                                   "8080", "-h", "/www"]},
                          architecture={"x86_64": "amd64", "aarch64": "arm64"}.get(
                              machine, machine))
    docker("load", "-i", built)
    os.unlink(built)
    path = os.path.join(folder, tag.replace(":", "-").replace("/", "-") + ".tar")
    docker("save", "-o", path, tag)
    docker("rmi", tag)
    return path


def busybox_context(folder, version):
    """A docker build context FROM scratch: busybox-static, then www/ (so a
    new version changes only the top layer); -> its folder."""
    context = os.path.join(folder, "context-" + version)
    os.makedirs(os.path.join(context, "www"))
    shutil.copy(os.path.realpath(shutil.which("busybox")), os.path.join(context, "busybox"))
    for name, text in (("index.html", version + "\n"), ("health", "ok\n")):
        with open(os.path.join(context, "www", name), "w") as file:
            file.write(text)
    with open(os.path.join(context, "Dockerfile"), "w") as file:
        file.write('FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\n'
                   'CMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]\n')
    return context


class ScriptsUserDocker(DockerTestCase):
    """Issue 14: ipd as in DockerTestCase, but its scripts run as
    SCRIPTS_UID in the group of the Docker socket (as RUN_AS=ipd-run:ipd-run,docker
    does), PROJECT_DIR is the project's work/ folder, and nginx runs as
    that user too so that the script may reload it (the README's sudo
    line, without sudo)."""

    def setUp(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to switch users")
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        if not host.startswith("unix://"):
            self.skipTest("needs the Docker socket's group")
        docker_gid = os.stat(host[len("unix://"):]).st_gid
        self.tmp = tempfile.mkdtemp(prefix="ipd-docker-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        os.chmod(self.tmp, 0o711)
        self.project = "web-" + uuid.uuid4().hex[:8]
        self.daemon = DaemonProcess(self.tmp, {
            "PASS_ENV": "DOCKER_HOST", "STEP_TIMEOUT": "180", "SCRIPTS": "package",
            "RUN_AS": "%d:%d,%d" % (SCRIPTS_UID, SCRIPTS_GID, docker_gid)})
        self.daemon.start()
        self.addCleanup(self.daemon.stop, signal.SIGKILL)
        front = os.path.join(self.tmp, "nginx")
        os.mkdir(front)
        os.chown(front, SCRIPTS_UID, SCRIPTS_GID)
        # nginx runs as the scripts' user, who may not list UPLOAD_DIR:
        # no wildcard before the project (as root, README's */work/ works)
        self.nginx = Nginx(front, self.daemon.port, os.path.join(
            self.daemon.upload_dir, self.project, "work", "nginx.con[f]"))
        subprocess.run(["setpriv", "--reuid=%d" % SCRIPTS_UID, "--regid=%d"
                        % SCRIPTS_GID, "--clear-groups"] + self.nginx.command,
                       check=True)
        self.addCleanup(self.nginx.stop)
        self.app_socket = os.path.join(front, "app.sock")
        self.deployments = []
        self.package = os.path.join(self.tmp, "package.tar.gz")
        with tarfile.open(self.package, "w:gz") as tar:
            tar.add(os.path.join(HERE, self.script), "control.sh")

    def write_settings(self, text):
        """deploy.env in the work folder, which the administrator made."""
        work = os.path.join(self.daemon.upload_dir, self.project, "work")
        os.makedirs(work)
        os.chown(work, 0, SCRIPTS_GID)
        os.chmod(work, 0o770)
        settings = os.path.join(work, "deploy.env")
        with open(settings, "w") as file:
            file.write(textwrap.dedent(text) + 'NGINX_LISTEN="unix:%s"\n'
                       'NGINX_SERVER_NAME=localhost\nNGINX="%s"\n'
                       % (self.app_socket, self.nginx.shell_command()))
        os.chown(settings, SCRIPTS_UID, SCRIPTS_GID)  # prepare adds PORT_BASE


# --- Issue #17: Docker examples an operator can leave running for months:
# restarts, disks, reloads and failures.

def image_id(path):
    """The ID of the image in a `docker save` tar (its config's digest)."""
    with tarfile.open(path) as tar:
        config = json.load(tar.extractfile("manifest.json"))[0]["Config"]
    return "sha256:" + os.path.basename(config).split(".")[0]


def image_exists(reference):
    return subprocess.run(["docker", "image", "inspect", reference],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def listening_addresses(port):
    """The local addresses that listen on TCP port (IPv4 and IPv6), as hex."""
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as file:
            for line in file.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:
                    found.append(address)
    return found


class RequestLoop:
    """A client asking the app through nginx, a new connection a request,
    until the with block ends: what each request got, and when."""

    def __init__(self, ask):
        self.ask = ask
        self.answers = []  # (time.monotonic(), (status, body) or an error)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self):
        while not self.stopping.is_set():
            try:
                answer = self.ask()
            except (OSError, http.client.HTTPException) as error:
                answer = repr(error)
            self.answers.append((time.monotonic(), answer))
            time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stopping.set()
        self.thread.join()

    def failures(self):
        """(time, answer) of every request that got no 200."""
        return [(when, answer) for when, answer in self.answers
                if not isinstance(answer, tuple) or answer[0] != 200]

    def wait_for(self, answer, after, timeout=20):
        """The time of the first `answer` got after `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, got in list(self.answers):
                if when > after and got == answer:
                    return when
            time.sleep(0.05)
        raise AssertionError("no %r within %ds: %r" % (answer, timeout,
                                                       self.answers[-3:]))


def crash(container):
    """Kill a container's main process from the host, as a crash would."""
    os.kill(int(docker("inspect", "-f", "{{.State.Pid}}", container)), signal.SIGKILL)


class PathUnit:
    """What systemd does with ipd-nginx.path, outside systemd: watch the
    folder, and on every change run ipd-nginx.service's ExecStart (as root,
    as the test runs) with the test's nginx."""

    def __init__(self, folder, nginx, status):
        self.folder = folder
        self.env = dict(os.environ, NGINX_COMMAND=nginx.shell_command(), STATUS=status)
        unit = read_text(os.path.join(HERE, "ipd-nginx.service"))
        program = re.search(r"(?m)^ExecStart=(\S+)$", unit).group(1)
        self.program = os.path.join(HERE, "tools", os.path.basename(program))
        self.runs = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.watch)

    def state(self):
        return sorted((entry.name, entry.stat().st_mtime_ns, entry.stat().st_size)
                      for entry in os.scandir(self.folder))

    def watch(self):
        seen = self.state()
        while not self.stopping.wait(0.05):
            now = self.state()
            if now != seen:
                seen = now
                subprocess.run([self.program], env=self.env, stderr=subprocess.DEVNULL)
                self.runs += 1

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        self.thread.join()


###############################################################################
# One daemon per data folder, start-up checks, command line (issue #15) #######
###############################################################################

def run_ipd(*args, env=None, cwd=None, timeout=60, stdin_text=None):
    """ipd.py as a process: -> CompletedProcess with text stdout/stderr."""
    return subprocess.run(IPD_RUN + list(args), cwd=cwd,
                          env=ipd_environ(env), input=stdin_text,
                          stdin=None if stdin_text is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


def start_demo(test, cwd):
    """ipd.py demo on port 0 in cwd -> the process, with .port and .hint
    (the 'try:' line it printed)."""
    stderr_path = os.path.join(cwd, "demo-stderr.txt")
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen([sys.executable, IPD, "demo", "--listen",
                                    "127.0.0.1:0"], cwd=cwd, stderr=stderr,
                                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    test.addCleanup(process.wait)
    test.addCleanup(process.kill)
    deadline = time.monotonic() + 30
    while "try:" not in read_text(stderr_path):
        test.assertIsNone(process.poll(), read_text(stderr_path))
        test.assertLess(time.monotonic(), deadline)
        time.sleep(0.02)
    text = read_text(stderr_path)
    process.port = int(re.search(r":(\d+)/deploy/", text).group(1))
    process.hint = re.search(r"^try:\s+(.*)$", text, re.M).group(1)
    return process


class Element:
    """An element of a parsed page: tag, attributes, children, its text."""

    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent = tag, dict(attrs), parent
        self.children, self.parts = [], []

    def text(self):
        return "".join(part if isinstance(part, str) else part.text()
                       for part in self.parts)

    def classes(self):
        return (self.attrs.get("class") or "").split()

    def find_all(self, tag=None, css=None):
        """The elements below this one with tag and/or the class css."""
        found = []
        for child in self.children:
            if (tag is None or child.tag == tag) and (css is None or css in child.classes()):
                found.append(child)
            found.extend(child.find_all(tag, css))
        return found


class PageParser(html.parser.HTMLParser):
    """HTML text -> a tree of Elements (void elements have no children)."""

    VOID = ("meta", "br", "input", "img", "link")

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Element("document", {})
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        element = Element(tag, attrs, self.current)
        self.current.children.append(element)
        self.current.parts.append(element)
        if tag not in self.VOID:
            self.current = element

    def handle_endtag(self, tag):
        element = self.current
        while element is not self.root and element.tag != tag:
            element = element.parent
        if element is not self.root:
            self.current = element.parent

    def handle_data(self, data):
        self.current.parts.append(data)


def parse_page(text):
    return PageParser("".join(text)).root


# The deployments of the status page tests, oldest first: (state, seconds
# ago uploaded, started, ended, steps).
PAGE_NOW = 1800000000.0
LAYOUT_RECORDS = (
    ("ok", 7300, 7200, 7000, [("check", 0), ("prepare", 1), ("deploy", 1)]),
    ("ok", 3700, 3660, 3600, [("check", 1), ("deploy", 1)]),
    ("5", 700, 660, 600, [("check", 0), ("prepare", 1), ("deploy", 5)]),
    ("timeout", 500, 490, 100, [("check", 1), ("deploy", None)]),
    ("cancelled", 90, 80, 70, []),
    ("interrupted", 60, 55, 50, [("check", 1)]),
    ("changed", 45, None, 40, []),
    ("active", 30, 12, None, [("check", 1)]),
    ("await", 5, None, None, []),
)


def layout_records(project="web", now=PAGE_NOW):
    """The Deployments of LAYOUT_RECORDS, each with an image and a package."""
    records = []
    for number, (state, created, started, ended, steps) in enumerate(LAYOUT_RECORDS):
        files = {"image": {"name": "web.tar", "size": 123456789,
                           "sha256": hashlib.sha256(b"%d" % number).hexdigest()}}
        records.append(ipd.Deployment(
            "%08x-0000-4000-8000-%012x" % (number, number), project, number + 1,
            "ci", files, "/c", state=state, created=now - created,
            started=started and now - started, ended=ended and now - ended,
            steps=[{"step": step, "code": code, "seconds": 1} for step, code in steps]))
    return records


def browser_logged_in(test):
    """A WebDriver for test (a DaemonTestCase) that logs in as admin."""
    browser = WebDriver(test.tmp)
    test.addCleanup(browser.quit)
    browser.cdp("Network.enable", {})
    browser.cdp("Network.setExtraHTTPHeaders", {"headers": {
        "Authorization": "Basic " + base64.b64encode(b"admin:admin-pw").decode()}})
    return browser


# Where the browser tests leave their screenshots, for people and CI to look at.
ARTEFACTS = os.path.join(HERE, "build", "artefacts")


def doc_sh_blocks(text):
    """[(line number, marker or None, code)] of each ```sh block of a
    Markdown text, indented ones (in a list) too; the marker is the HTML
    comment on the last non-blank line before the fence."""
    blocks, lines, number = [], text.split("\n"), 0
    while number < len(lines):
        line = lines[number]
        if line.strip().startswith("```"):
            end = number + 1
            while not lines[end].strip().startswith("```"):
                end += 1
            if line.strip() == "```sh":
                before = [l.strip() for l in lines[:number] if l.strip()]
                marker = before[-1] if before and before[-1].startswith("<!--") else None
                indent = len(line) - len(line.lstrip())
                code = "\n".join(l[indent:] for l in lines[number + 1:end]) + "\n"
                blocks.append((number + 1, marker, code))
            number = end
        number += 1
    return blocks


def doc_anchors(text):
    """The anchors GitHub makes of a Markdown text's headings."""
    anchors, seen = set(), collections.Counter()
    for line in re.sub(r"(?ms)^ *```.*?^ *```", "", text).split("\n"):
        if re.match(r"#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            anchors.add(slug if not seen[slug] else "%s-%d" % (slug, seen[slug]))
            seen[slug] += 1
    return anchors


###############################################################################
# Layer pushes, resumable segments, disk that holds each layer once (#16) #####
###############################################################################

def layered_image(path, layers, oci=False, tag="example/app:1", declared=None,
                  **config_extra):
    """A tar laid out as docker save writes it (legacy, or OCI with
    blobs/sha256/...), each layer (bytes) a member of its own; declared
    gives other digests for the layers than theirs (a lying image)."""
    members = []
    digests = ["sha256:" + (declared[number] if declared and declared[number] else
                            hashlib.sha256(data).hexdigest())
               for number, data in enumerate(layers)]
    config = json.dumps(dict({"architecture": "amd64", "os": "linux",
                              "rootfs": {"type": "layers", "diff_ids": digests}},
                             **config_extra)).encode()
    config_name = hashlib.sha256(config).hexdigest()
    if oci:
        names = ["blobs/sha256/" + digest[7:] for digest in digests]
        members.append(("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'))
        members.append(("blobs/sha256/" + config_name, config))
        config_member = "blobs/sha256/" + config_name
    else:
        names = ["%s/layer.tar" % digest[7:] for digest in digests]
        members.append((config_name + ".json", config))
        config_member = config_name + ".json"
    members.extend(zip(names, layers))
    members.append(("manifest.json", json.dumps([{
        "Config": config_member, "RepoTags": [tag], "Layers": names}]).encode()))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data))
    return path


def plain_tar(members):
    """The bytes of a tar of (name, bytes) members, in order (names may
    repeat)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# control.sh that prints the SHA-256 of $IMAGE in its deploy step
SHA_SCRIPT = '[ "$1" = deploy ] && sha256sum "$IMAGE"; exit 1\n'


class LayerPushTestCase(DaemonTestCase):
    """Issue #16: ipd.py push sends only the segments the server lacks."""

    users = ""

    def setUp(self):
        super().setUp()
        if self.users:
            with open(self.daemon.users_file, "a") as file:
                file.write(self.users)
        self.package = self.write("package.tgz", control_script(SHA_SCRIPT))

    def write(self, name, data):
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as file:
            file.write(data)
        return path

    def client(self, *args, user=("admin", "admin-pw"), timeout=120, wait=True):
        environ = dict(os.environ, IPD_URL="http://127.0.0.1:%d/deploy" % self.daemon.port,
                       IPD_USER=user[0], IPD_PASSWORD=user[1], HOME=self.tmp)
        environ, command = ipd_environ(environ), IPD_RUN + list(args)
        if not wait:
            return subprocess.Popen(command, env=environ, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        return subprocess.run(command, env=environ, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              timeout=timeout)

    def log_size(self):
        try:
            return os.path.getsize(os.path.join(self.tmp, "ipd.log"))
        except FileNotFoundError:
            return 0

    def bytes_in(self, since, until_path="/deploy/push"):
        """Body bytes the daemon read since log offset since (the in= of
        its access lines), once the line of until_path is written."""
        wait_until(lambda: until_path in self.daemon.daemon_log()[since:],
                   message="access line of " + until_path)
        with open(os.path.join(self.tmp, "ipd.log"), "rb") as file:
            file.seek(since)
            text = file.read().decode()
        return sum(int(number) for number in re.findall(r" in=(\d+) ", text))

    def push(self, image, project="app", *extra, user=("admin", "admin-pw")):
        """Push with the client; -> (deployment, body bytes the daemon read)."""
        since = self.log_size()
        result = self.client("push", "--project", project, "--image", image,
                             "--package", self.package, *extra, user=user)
        self.assertEqual(result.returncode, 0, result.stderr)
        deployment = result.stdout.decode().strip()
        return deployment, self.bytes_in(
            since, "/deploy/upload" if "--whole" in extra else "/deploy/push")

    def deployed_sha(self, project, deployment):
        self.assertEqual(self.daemon.wait_state(project, deployment), "ok")
        return self.daemon.log(project, deployment).split()[0]

    def segment_files(self):
        root = os.path.join(self.daemon.upload_dir, ".segments", "sha256")
        return sorted(name for folder in os.listdir(root)
                      for name in os.listdir(os.path.join(root, folder)))

    def raw(self, method, path, body=b"", headers=None, user="admin"):
        headers = dict(headers or {})
        return self.daemon.request(method, path, user, body=body, headers=headers)


def daemon_rss(daemon, field="VmRSS"):
    """The daemon process's resident memory (or VmHWM, its peak) in bytes,
    from /proc/PID/status."""
    with open("/proc/%d/status" % daemon.process.pid) as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no %s in /proc/%d/status" % (field, daemon.process.pid))


def first_answer_line(port, head, timeout=5):
    """Send only a request's head; -> the first line the server answers
    (before any body is sent), or None."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(head)
        answer = b""
        while b"\r\n" not in answer:
            try:
                piece = sock.recv(4096)
            except socket.timeout:
                return None
            if not piece:
                break
            answer += piece
        return answer.split(b"\r\n")[0].decode("latin-1")
    finally:
        sock.close()


def send_body(port, head, body, pieces=1 << 20, timeout=30):
    """Send head and then body (bytes) in pieces on a raw socket, as far as
    the server reads it; -> the answer's status, or None."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            sock.sendall(head)
            view = memoryview(body)
            for start in range(0, len(body), pieces):
                sock.sendall(view[start:start + pieces])
        except OSError:
            pass  # refused and closed early: what the answer says
        answer = b""
        while b"\r\n\r\n" not in answer:
            try:
                piece = sock.recv(65536)
            except OSError:
                break
            if not piece:
                break
            answer += piece
        return answer_status(answer), answer
    finally:
        sock.close()


def json_head(path, length, headers=None):
    fields = dict({"Host": "127.0.0.1", "Authorization": ADMIN_AUTH,
                   "Content-Type": "application/json",
                   "Content-Length": str(length)}, **(headers or {}))
    return ("POST %s HTTP/1.1\r\n" % path).encode() + "".join(
        "%s: %s\r\n" % item for item in fields.items()).encode() + b"\r\n"


def hostile_json(rng, digest):
    """JSON text (bytes) a hostile client might send to a layer-push
    endpoint: nested, not an object, huge, or nearly right."""
    depth = rng.choice([17, 100, 1000, 50000])
    kind = rng.randrange(12)
    if kind == 0:
        return b"[" * depth + b"]" * rng.choice([depth, 0, 1])
    if kind == 1:
        return b'{"segments":' * depth + b"1" + b"}" * depth
    if kind == 2:
        return rng.choice([b"[1]", b"null", b'"x"', b"5", b"true", b"[]", b"1e999",
                           b"-0", b'{"segments": null}', b'{"files": []}'])
    if kind == 3:  # many values
        return b'{"segments": [' + b",".join([b"{}"] * rng.choice(
            [60001, 200000])) + b"]}"
    if kind == 4:
        return b'{"segments": [' + b'"%s",' % digest.encode() * rng.randrange(
            1, 30000) + b'"%s"]}' % digest.encode()
    if kind == 5:
        return b'{"size": ' + b"9" * rng.choice([39, 40, 5000]) + b"}"
    if kind == 6:  # a recipe with odd pieces and sizes
        count = rng.choice([1, 2, 10001])
        return json.dumps({"project": "app", "files": {"image": {
            "size": rng.choice([13 * count, 13, 2 ** 63, -1, 0]),
            "sha256": rng.choice([digest, "0" * 64]),
            "segments": [{"sha256": digest, "size": 13}] * count}}}).encode()
    if kind == 7:
        return json.dumps({"project": "app", "files": {"image": {
            "size": 5, "sha256": digest,
            "segments": [{"data": rng.choice(["aGVsbG8=", "*", 5, None,
                                              [[[[]]]]])}]}}}).encode()
    if kind == 8:  # truncated or mutated nearly right text
        text = bytearray(json.dumps({"segments": [digest, digest]}).encode())
        for _ in range(rng.randrange(1, 4)):
            text[rng.randrange(len(text))] = rng.choice(b'[]{}",:\\x\xff')
        return bytes(text[:rng.randrange(1, len(text) + 1)])
    if kind == 9:
        return b'{"segments": ["' + b"\\" * rng.randrange(1, 5000) + b'"]}'
    if kind == 10:
        return b'{"a": "' + b"[" * 10000 + b'"}'  # brackets in a string
    return os.urandom(rng.randrange(1, 300))


class CuttingRelay(CountingRelay):
    """A CountingRelay that, once clients have sent cut bytes, goes down:
    it closes its clients without a word to the server, whose side it
    holds open (a peer gone silent: the server's read waits), and closes
    each new client at once, until down is set False again."""

    def __init__(self, test, port, cut):
        self.cut, self.down = cut, False
        super().__init__(test, port)

    def _pump(self, source, target, counted):
        if not counted:
            return super()._pump(source, target, counted)
        while True:
            with self.lock:
                down = self.down
            if down:
                break
            try:
                data = source.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                try:
                    target.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with self.lock:
                self.sent += len(data)
                if self.cut and self.sent >= self.cut:
                    self.down, self.cut = True, 0
            try:
                target.sendall(data)
            except OSError:
                return
        try:  # a reset: what a client sees of a relay that died
            source.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                              struct.pack("ii", 1, 0))
            source.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        source.close()


def padded_upload(size, project="app", boundary="testboundary1234"):
    """A multipart upload body of exactly size bytes: a plain tar package
    with control.sh, then zeros (a tar's end padding)."""
    package = tar_bytes({"control.sh": (("#!/bin/sh\n" + OK_SCRIPT).encode(), 0o755)},
                        "w")
    content_type, body = multipart([("project", project),
                                    ("package", ("p.tar", package))], boundary)
    padding = size - len(body)
    _, body = multipart([("project", project),
                         ("package", ("p.tar", package + b"\0" * padding))], boundary)
    return content_type, body


def chunked(body, piece=65536):
    return b"".join(b"%x\r\n%s\r\n" % (len(body[start:start + piece]),
                                       body[start:start + piece])
                    for start in range(0, len(body), piece)) + b"0\r\n\r\n"


###############################################################################
# What an uploader can reach (issue 14) #######################################
###############################################################################

@functools.lru_cache(maxsize=None)
def bz2_run(byte, piece):
    return bz2.compress(byte * piece)


def bz2_runs(byte, size, piece=64 << 20):
    """size bytes of one byte value as concatenated bzip2 streams: a GiB
    in about a kilobyte, built in a second (bzip2 readers read them all)."""
    count, rest = divmod(size, piece)
    return bz2_run(byte, piece) * count + (bz2.compress(byte * rest) if rest else b"")


def raw_header(name, kind, size):
    """One 512-byte ustar header, whatever its type says."""
    return tar_info(name, kind, size=size).tobuf(tarfile.USTAR_FORMAT)


def header_bomb(kind, size=1 << 30):
    """A .tar.bz2 whose first entry is a GNU long name ('L'), long link
    ('K') or pax header ('x') of size bytes: about 1.4 KB for 1 GiB."""
    return (bz2.compress(raw_header("././@LongLink", kind, size))
            + bz2_runs(b"a", size) + bz2.compress(b"\0" * 1024))


def zip_link(target, compression):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zipped:
        info = zipfile.ZipInfo("link")
        info.external_attr = 0o120777 << 16
        info.compress_type = compression
        with zipped.open(info, "w") as entry:
            for start in range(0, len(target), 1 << 20):
                entry.write(target[start:start + (1 << 20)])
    return out.getvalue()


def many_members_tar(count):
    """A tar.gz of count empty files, built from raw headers (fast)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as packed:
        for number in range(count):
            block = tar_info("f%d" % number).tobuf(tarfile.USTAR_FORMAT)
            packed.write(block)
        packed.write(b"\0" * 1024)
    return out.getvalue()


SCRIPTS_UID, SCRIPTS_GID, SCRIPTS_GROUP = 64123, 64123, 64124
DAEMON_UID = 64100

HOSTILE_SCRIPT = """\
#!/bin/sh
try() {{ name=$1; shift; if "$@" >/dev/null 2>&1; then echo "$name=reached"
         else echo "$name=refused"; fi; }}
[ "$1" = check ] || exit 1
try read_users cat {users}
try write_other_control sh -c 'echo "echo planted" > {other}/control.sh'
try write_other_notify sh -c 'echo "echo planted" > {other}/notify.sh'
try write_other_conf sh -c 'echo SCRIPTS=package > {other}/project.conf'
try rewrite_audit sed -i s/admin/dev/ {logs}/audit.log
try append_audit sh -c 'echo forged >> {logs}/audit.log'
try rewrite_log sed -i s/admin/dev/ {logs}/ipd.log
try append_log sh -c 'echo forged >> {logs}/ipd.log'
try read_environ cat /proc/$PPID/environ
try read_memory dd if=/proc/$PPID/mem bs=1 count=1
try read_state cat {deployments}/$DEPLOY.json
try write_state sh -c 'echo {{}} > {deployments}/$DEPLOY.json'
try list_deployments ls {deployments}
try rename_deployments mv {deployments} {deployments}.x
try signal_daemon kill -STOP $PPID
try write_package_folder sh -c 'echo x > ./planted'
try read_package cat ./control.sh
try read_image cat "$IMAGE"
try write_project_dir sh -c 'echo mine > "$PROJECT_DIR/mine"'
grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status
echo "ids=$(id -u):$(id -g):$(id -G)"
echo "project_dir=$PROJECT_DIR"
exit 1
"""

ATTACKS = ("read_users", "write_other_control", "write_other_notify",
           "write_other_conf", "rewrite_audit", "append_audit", "rewrite_log",
           "append_log", "read_environ", "read_memory", "read_state",
           "write_state", "list_deployments", "rename_deployments",
           "signal_daemon", "write_package_folder")


def reachable_python():
    """A Python another user may run (pyenv's under /root is not), or None."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        path = os.path.realpath(candidate)
        parts = path.split(os.sep)
        folders = [os.sep.join(parts[:n]) or "/" for n in range(1, len(parts))]
        if os.path.exists(path) and all(os.stat(folder).st_mode & stat.S_IXOTH
                                        for folder in folders) \
                and os.stat(path).st_mode & stat.S_IXOTH:
            version = subprocess.run([path, "-c", "import sys; print(sys.version_info "
                                      ">= (3, 8))"], stdout=subprocess.PIPE,
                                     universal_newlines=True).stdout.strip()
            if version == "True":
                return path
    return None


###############################################################################
# Settings ####################################################################
###############################################################################

class SettingsTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.addCleanup(kill_processes_in, self.tmp)

    def config(self, text):
        path = os.path.join(self.tmp, "ipd.conf")
        with open(path, "w") as file:
            file.write(text)
        return path

    def test_defaults_of_the_original(self):
        settings = ipd.load_settings(self.config(""), environ={})
        self.assertEqual(settings.API_ROOT, "/deploy")
        self.assertEqual(settings.AUTH_DB, "/opt/ipd/users.txt")
        self.assertEqual(settings.UPLOAD_DIR, os.path.abspath("."))
        self.assertEqual(settings.LOG_DIR, os.path.abspath("."))
        self.assertEqual(settings.LISTEN, ("127.0.0.1", 9955))
        self.assertEqual(settings.SUCCESS_CODE, 1)

    def test_file_then_environment(self):
        path = self.config('# comment\n\nAPI_ROOT="/api"\nSTEP_TIMEOUT = 5\n'
                           "PASS_ENV=HOME DOCKER_HOST\nMAX_UPLOAD_SIZE=2G\n")
        settings = ipd.load_settings(path, environ={"STEP_TIMEOUT": "7"})
        self.assertEqual(settings.API_ROOT, "/api")
        self.assertEqual(settings.STEP_TIMEOUT, 7)
        self.assertEqual(settings.PASS_ENV, ["HOME", "DOCKER_HOST"])
        self.assertEqual(settings.MAX_UPLOAD_SIZE, 2 << 30)

    def test_config_path_from_environment(self):
        path = self.config("API_ROOT=/x\n")
        settings = ipd.load_settings(None, environ={"IPD_CONFIG": path})
        self.assertEqual(settings.API_ROOT, "/x")

    def test_errors_name_file_line_and_key(self):
        path = self.config("API_ROOT=/x\nthis is not a setting\n")
        with self.assertRaisesRegex(ipd.ConfigError, re.escape(path) + ":2: malformed"):
            ipd.load_settings(path, environ={})
        path = self.config("\nMAX_PARALLEL=many\n")
        with self.assertRaisesRegex(ipd.ConfigError,
                                    re.escape(path) + ":2: MAX_PARALLEL: "):
            ipd.load_settings(path, environ={})
        with self.assertRaisesRegex(ipd.ConfigError, "environment: LISTEN"):
            ipd.load_settings(self.config(""), environ={"LISTEN": "nowhere"})
        with self.assertRaises(ipd.ConfigError):
            ipd.load_settings(os.path.join(self.tmp, "missing.conf"), environ={})

    def test_unknown_key_is_an_error(self):  # a warning before issue #27
        with self.assertRaisesRegex(ipd.UnknownSettings, "COLOUR"):
            ipd.load_settings(self.config("COLOUR=blue\n"), environ={})

    def test_daemon_refuses_to_start_on_a_bad_setting(self):
        path = self.config("STEP_TIMEOUT=-3\n")
        result = subprocess.run([sys.executable, IPD, "--config", path, "serve"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                timeout=30, universal_newlines=True)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1)
        self.assertIn("%s:1: STEP_TIMEOUT" % path, result.stderr)


class ConfigMistakeTests(unittest.TestCase):
    """Issue #27: a mistyped setting stops the start, naming the file, the
    line and the closest known name; a users file line whose hash can
    never match is a warning naming the line; the demo takes serve's
    settings and names its own options."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)

    def test_a_mistyped_setting_stops_the_start(self):
        config = os.path.join(self.tmp, "ipd.conf")
        uploads = os.path.join(self.tmp, "uploads")
        os.makedirs(uploads)
        with open(config, "w") as file:
            file.write("LISTEN=127.0.0.1:0\nLOG_DIR=%s\n# uploads\nUPLOAD_DRI=%s\n"
                       % (self.tmp, uploads))
        work = os.path.join(self.tmp, "work")
        os.makedirs(work)
        result = run_ipd("--config", config, "serve", cwd=work)
        line = ("%s:4: unknown setting UPLOAD_DRI (did you mean UPLOAD_DIR?)"
                % config)
        self.assertEqual((result.returncode, result.stderr), (2, "ipd: %s\n" % line))
        self.assertIn("not started: " + line, read_text(os.path.join(self.tmp,
                                                                     "ipd.log")))
        self.assertEqual(os.listdir(work), [])  # no lock file in the current folder
        with open(config, "w") as file:  # a name nothing is close to: no guess
            file.write("LISTEN=127.0.0.1:0\nCOLOUR=blue\n")
        result = run_ipd("--config", config, "serve", cwd=work)
        self.assertEqual((result.returncode, result.stderr),
                         (2, "ipd: %s:2: unknown setting COLOUR\n" % config))
        self.assertEqual(os.listdir(work), [])
        result = run_ipd("--config", config, "token", "list", cwd=work)
        self.assertEqual(result.returncode, 2)
        self.assertIn("unknown setting COLOUR", result.stderr)

    def test_a_mistyped_project_conf_name_stops_the_start(self):
        daemon = DaemonProcess(self.tmp)
        project = os.path.join(daemon.upload_dir, "web")
        os.makedirs(project)
        conf = os.path.join(project, "project.conf")
        with open(conf, "w") as file:
            file.write("SCRIPTS=package\nRUN_SA=nobody\n")
        os.chmod(conf, 0o644)
        with self.assertRaisesRegex(AssertionError, re.escape(
                "%s:2: unknown setting RUN_SA (did you mean RUN_AS?): only "
                "SCRIPTS, RUN_AS and VERIFY_SECONDS may be set here" % conf)):
            daemon.start()
        self.assertEqual(daemon.process.returncode, 2)
        os.unlink(conf)  # a project.conf written while ipd runs: its uploads
        daemon.start()   # are refused with the same line
        self.addCleanup(daemon.stop, signal.SIGKILL)
        with open(conf, "w") as file:
            file.write("SCRPTS=server\n")
        os.chmod(conf, 0o644)
        status, _, body = daemon.upload("web", control_script(OK_SCRIPT))
        self.assertEqual(status, 500)
        self.assertIn("unknown setting SCRPTS (did you mean SCRIPTS?)", body)

    def test_a_sha256sum_line_pasted_whole_is_a_warning_at_start_and_reload(self):
        digest = sha256_hex("admin-pw")
        daemon = DaemonProcess(self.tmp, users={}, extra_users=(
            "# the team\nADMIN:admin:%s  -\n" % digest))
        daemon.start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        stderr = read_text(daemon.stderr_path)
        self.assertIn("line 2: the hash of admin ends in ' -', as sha256sum prints "
                      "it: cut it, keep the 64 hex digits", stderr)
        self.assertIn("line 2: the hash of admin ends in ' -'", daemon.daemon_log())
        self.assertEqual(daemon.get("/list")[0], 401)
        with open(daemon.users_file, "w") as file:  # read again at the next login
            file.write("ADMIN:admin:%s\nUSER:ci:md5-1234\n" % digest)
        self.assertEqual(daemon.get("/list")[0], 200)
        expected = ("line 2: the hash of ci is neither 64 hex digits (sha256) nor "
                    "pbkdf2_sha256$ITERATIONS$SALT$HASH")
        self.assertIn(expected, daemon.daemon_log(re.escape(expected)))
        users, warnings = ipd.parse_users("ADMIN:a:%s\nUSER:b:%s\n" % (
            digest.upper(), ipd.hash_password("x", iterations=1000)))
        self.assertEqual((sorted(users), warnings), (["a", "b"], []))

    def demo(self, *args, env=None):
        """ipd demo in self.tmp until it listens (or ends): -> (process,
        its stderr so far)."""
        process = subprocess.Popen(
            IPD_RUN + ["demo", "--dir", os.path.join(self.tmp, "demo")] + list(args),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=ipd_environ(env), universal_newlines=True)
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.wait)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        lines = []
        for line in process.stderr:
            lines.append(line)
            if line.startswith("try:"):
                break
        return process, "".join(lines)

    def test_the_demo_takes_the_settings_of_serve(self):
        signers = os.path.join(self.tmp, "allowed_signers")
        open(signers, "w").close()
        config = os.path.join(self.tmp, "demo.conf")
        with open(config, "w") as file:
            file.write("ALLOWED_SIGNERS=%s\n" % signers)
        process, stderr = self.demo("--config", config, "--listen", "127.0.0.1:0",
                                    env={"REQUIRE_SIGNATURE": "hello"})
        url = re.search(r"(http://127\.0\.0\.1:\d+/deploy/)upload", stderr).group(1)
        self.assertEqual(stderr.count("listening on"), 1, stderr)
        image = os.path.join(self.tmp, "demo", "image.tar")
        result = subprocess.run(IPD_RUN + ["push", "--project", "hello", "--image",
                                           image, "--whole"], env=ipd_environ(
            IPD_URL=url, IPD_USER="demo", IPD_PASSWORD="demo"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        self.assertEqual(result.returncode, 5, result.stderr)
        self.assertIn("takes signed pushes only", result.stderr)
        process.terminate()
        process.wait(30)
        help_text = " ".join(run_ipd("demo", "--help").stdout.split())
        self.assertIn("the same settings as serve", help_text)

    def test_the_demo_names_its_options_once(self):
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = "127.0.0.1:%d" % listener.getsockname()[1]
        process, stderr = self.demo("--config", os.devnull, "--listen", taken)
        stderr += process.stderr.read()
        self.assertEqual(process.wait(30), 2)
        self.assertEqual(stderr, "ipd: --listen %s: cannot listen: address already "
                         "in use (another ipd, or another program, listens "
                         "there): stop it or set another --listen\n" % taken)


###############################################################################
# Helpers #####################################################################
###############################################################################

class BoundedJsonTests(unittest.TestCase):
    # issue 23, item 6: the decoder's limits, each at its boundary

    def test_values_depth_and_digits_at_their_limits(self):
        def values(count):  # an object of count values: {} and commas
            return b'{"a": [' + b",".join([b"1"] * (count - 1)) + b"]}"
        ipd.load_json_object(values(1000), "x", 1000)
        with self.assertRaisesRegex(ipd.BadRequest, "more than 1000 values"):
            ipd.load_json_object(values(1001), "x", 1000)
        deep = ipd.MAX_JSON_DEPTH
        ipd.load_json_object(b'{"a":' * deep + b"1" + b"}" * deep, "x", 100)
        with self.assertRaisesRegex(ipd.BadRequest, "nested more than 16 deep"):
            ipd.load_json_object(b'{"a":' * (deep + 1) + b"1" + b"}" * (deep + 1),
                                 "x", 100)
        # brackets and escaped quotes in strings do not count
        self.assertEqual(ipd.load_json_object(b'{"a": "[[[[\\"[[[[[[[[[[[[[[[[[[["}',
                                              "x", 10), {"a": '[[[[\"[[[[[[[[[[[[[[[[[[['})
        self.assertEqual(ipd.load_json_object(b'{"a": ' + b"9" * 40 + b"}", "x", 10),
                         {"a": int("9" * 40)})
        with self.assertRaisesRegex(ipd.BadRequest, "40 digits"):
            ipd.load_json_object(b'{"a": ' + b"9" * 41 + b"}", "x", 10)

    def test_a_manifest_may_be_dated_ahead_by_the_skew_only(self):
        now = 1800000000
        ipd.check_manifest_time(now + ipd.MANIFEST_CLOCK_SKEW, now)
        with self.assertRaisesRegex(ipd.Forbidden, "ahead"):
            ipd.check_manifest_time(now + ipd.MANIFEST_CLOCK_SKEW + 1, now)
        self.assertIn("after the epoch", ipd.iso_time(2 ** 62))


###############################################################################
# Users and passwords #########################################################
###############################################################################

class UsersTests(unittest.TestCase):

    def test_original_sha256_lines(self):
        users, warnings = ipd.parse_users(
            "# team\n\nADMIN:alice:%s\nUSER:bob:%s:web,api\nBAD LINE\n"
            % (sha256_hex("pw1"), sha256_hex("pw2")))
        self.assertEqual(sorted(users), ["alice", "bob"])
        self.assertEqual(len(warnings), 1)
        self.assertTrue(ipd.check_password("pw1", users["alice"].password_hash))
        self.assertFalse(ipd.check_password("pw2", users["alice"].password_hash))
        self.assertTrue(users["bob"].may_use("web"))
        self.assertFalse(users["bob"].may_use("db"))
        self.assertTrue(users["alice"].may_use("db"))

    def test_sha256sum_output_matches(self):
        digest = subprocess.run(["sha256sum"], input="mypassword", stdout=subprocess.PIPE,
                                universal_newlines=True).stdout.split()[0]
        self.assertTrue(ipd.check_password("mypassword", digest))

    def test_pbkdf2(self):
        stored = ipd.hash_password("secret", iterations=1000)
        self.assertTrue(stored.startswith("pbkdf2_sha256$1000$"))
        self.assertNotIn(":", stored)
        self.assertTrue(ipd.check_password("secret", stored))
        self.assertFalse(ipd.check_password("Secret", stored))
        self.assertFalse(ipd.check_password("x", "pbkdf2_sha256$broken"))

    def test_passwd_command(self):
        tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, tmp)
        self.addCleanup(kill_processes_in, tmp)
        users = os.path.join(tmp, "users.txt")
        with open(users, "w") as file:
            file.write("# keep me\nUSER:bob:%s\n" % sha256_hex("old"))
        for role, name, password in (("ADMIN", "alice", "a-pw"),
                                     ("USER", "bob", "new-pw")):
            result = subprocess.run(
                [sys.executable, IPD, "--config", os.devnull, "passwd", role, name,
                 "--auth-db", users], input=password + "\n",
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                universal_newlines=True, timeout=60)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertNotIn(password, result.stderr + result.stdout)
        text = read_text(users)
        self.assertIn("# keep me", text)
        self.assertNotIn("new-pw", text)
        parsed, _ = ipd.parse_users(text)
        self.assertEqual(parsed["alice"].role, "ADMIN")
        self.assertTrue(ipd.check_password("new-pw", parsed["bob"].password_hash))
        self.assertEqual(text.count(":bob:"), 1)


class AuthTests(DaemonTestCase):

    def test_401_is_the_same_for_unknown_user_and_wrong_password(self):
        answers = []
        for user in ("admin:wrong", "nobody:admin-pw", None):
            status, headers, body = self.daemon.get("/stat", user=user)
            answers.append((status, headers["WWW-Authenticate"], body))
        self.assertEqual(answers[0][0], 401)
        self.assertIn("Basic", answers[0][1])
        self.assertEqual(answers[0], answers[1])
        self.assertIn("wrong user name or password", answers[0][2])  # issue #27
        self.assertEqual(answers[2][:2], answers[0][:2])
        self.assertIn("authentication required", answers[2][2])  # none given
        for broken in ("Basic !!!", "Bearer x", "Basic " +
                       base64.b64encode(b"no-colon").decode()):
            status, _, _ = self.daemon.get("/stat", user=None,
                                           headers={"Authorization": broken})
            self.assertEqual(status, 401)

    def test_every_endpoint_but_welcome_needs_login(self):
        for method, path in (("GET", "/list"), ("GET", "/info"), ("GET", "/stat"),
                             ("GET", "/status/app"), ("GET", "/status/app/x"),
                             ("GET", "/log/app/x"), ("POST", "/upload")):
            with self.subTest(path):
                self.assertEqual(self.daemon.request(method, path, None)[0], 401)

    def test_user_role(self):
        for path in ("/list", "/info", "/stat"):
            with self.subTest(path):
                status, _, body = self.daemon.get(path, user="dev")
                self.assertEqual(status, 403)
                self.assertIn("ADMIN", body)
        deployment = self.daemon.deploy(user="dev")
        self.assertEqual(self.daemon.wait_state("app", deployment), "ok")
        self.assertEqual(self.daemon.get("/status/app/" + deployment, user="dev")[0], 200)
        self.assertEqual(self.daemon.get("/log/app/" + deployment, user="dev")[0], 200)

    def test_users_file_edit_takes_effect_without_restart(self):
        self.assertEqual(self.daemon.get("/stat", user="carol:c-pw")[0], 401)
        with open(self.daemon.users_file, "a") as file:
            file.write("ADMIN:carol:%s\n" % sha256_hex("c-pw"))
        self.assertEqual(self.daemon.get("/stat", user="carol:c-pw")[0], 200)
        with open(self.daemon.users_file, "w") as file:
            file.write("USER:carol:%s\n" % sha256_hex("c-pw"))
        self.assertEqual(self.daemon.get("/stat", user="carol:c-pw")[0], 403)
        self.assertEqual(self.daemon.get("/stat", user="admin")[0], 401)

    def test_pbkdf2_users_and_project_lists(self):
        with open(self.daemon.users_file, "a") as file:
            file.write("USER:web-ci:%s:web,docs\n"
                       % ipd.hash_password("ci-pw", iterations=2000))
        deployment = self.daemon.deploy(project="web", user="web-ci:ci-pw")
        self.assertEqual(self.daemon.wait_state("web", deployment), "ok")
        status, _, body = self.daemon.upload("api", control_script(OK_SCRIPT),
                                             user="web-ci:ci-pw")
        self.assertEqual(status, 403)
        self.assertEqual(self.daemon.leftovers(), [])
        self.assertEqual(self.daemon.get("/status/api", user="web-ci:ci-pw")[0], 403)


class LoginCostTests(DaemonTestCase):
    alone = True  # measures time: runs while no other test does
    extra = "ADMIN:fast:%s\n" % sha256_hex("fast-pw")

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        hashed = ipd.hash_password("slow-pw")
        self.daemon = self.start_daemon(extra_users=self.extra + "ADMIN:slow:%s\n" % hashed)

    def test_every_wrong_login_costs_the_same(self):
        timings = {"unknown": [], "slow": [], "fast": []}
        for _ in range(3):  # 9 failures: under the throttle's 10
            for name in timings:
                started = time.perf_counter()
                status = self.daemon.get("/stat", user="%s:wrong" % name)[0]
                timings[name].append(time.perf_counter() - started)
                self.assertEqual(status, 401)
        median = {name: sorted(values)[1] for name, values in timings.items()}
        report("wrong logins, median: unknown user %.1f ms, PBKDF2 user %.1f ms, "
               "SHA-256 user %.1f ms" % tuple(1000 * median[n]
                                              for n in ("unknown", "slow", "fast")))
        for name in ("unknown", "fast"):
            self.assertGreater(median[name] / median["slow"], 0.4, median)


class PromiseLoginThrottleTests(DaemonTestCase):
    # issue 23, item 10: a throttled login costs no password hash
    alone = True  # measures time: runs while no other test does

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        hashed = ipd.hash_password("slow-pw")
        self.daemon = self.start_daemon(extra_users="ADMIN:slow:%s\n" % hashed)

    def timed(self):
        started = time.perf_counter()
        status = self.daemon.get("/stat", user="slow:wrong")[0]
        return status, time.perf_counter() - started

    def test_the_throttle_is_checked_before_the_password(self):
        wrong = []
        for _ in range(40):
            status, seconds = self.timed()
            if status == 429:
                break
            self.assertEqual(status, 401)
            wrong.append(seconds)
        self.assertEqual(status, 429)
        throttled = []
        for _ in range(3):
            status, seconds = self.timed()
            self.assertEqual(status, 429)
            throttled.append(seconds)
        median_wrong = sorted(wrong)[len(wrong) // 2]
        median_throttled = sorted(throttled)[1]
        report("a wrong login %.1f ms, a throttled one %.1f ms (medians)"
               % (1000 * median_wrong, 1000 * median_throttled))
        self.assertLess(median_throttled, 0.4 * median_wrong)


###############################################################################
# Signed releases and deploy tokens ###########################################
###############################################################################

class SignedPushTests(DaemonTestCase):
    """Pushes signed with OpenSSH keys (real ssh-keygen), checked before
    anything is queued."""

    @classmethod
    def setUpClass(cls):
        if not shutil.which("ssh-keygen"):
            if os.environ.get("CI"):
                raise AssertionError("CI without ssh-keygen (openssh-client)")
            raise unittest.SkipTest("needs ssh-keygen (Debian: openssh-client)")

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        keys = os.path.join(self.tmp, "keys")
        os.makedirs(keys)
        self.ci_key, ci_public = ssh_key(keys, "ci")
        self.old_key, old_public = ssh_key(keys, "old")
        self.stranger_key, _ = ssh_key(keys, "stranger")
        self.other_key, other_public = ssh_key(keys, "other")
        self.signers = os.path.join(self.tmp, "allowed_signers")
        with open(self.signers, "w") as file:
            file.write('ci@web,ci@api namespaces="ipd" %s\n' % ci_public)
            file.write('old@* namespaces="ipd",valid-before="20200101" %s\n' % old_public)
            file.write('other@api namespaces="ipd" %s\n' % other_public)
        self.daemon = self.start_daemon({"ALLOWED_SIGNERS": self.signers,
                                         "REQUIRE_SIGNATURE": "web"})
        self.package = os.path.join(self.tmp, "package.tar.gz")
        with open(self.package, "wb") as file:
            file.write(control_script('echo "signer=$SIGNER key=$SIGNER_KEY"\n'
                                      + OK_SCRIPT))

    def push(self, key=None, project="web", *extra):
        command = IPD_RUN + ["push", "--url", "http://127.0.0.1:%d/deploy"
                             % self.daemon.port, "--user", "admin", "--project", project,
                             "--package", self.package] + (["--sign", key] if key else []) \
            + list(extra)
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=ipd_environ(IPD_PASSWORD="admin-pw"), timeout=60)
        return done.returncode, done.stdout.decode().strip(), done.stderr.decode()

    def deployments(self, project="web"):
        folder = os.path.join(self.daemon.upload_dir, project, "deployments")
        if not os.path.isdir(folder):
            return []
        return sorted(name for name in os.listdir(folder) if name.endswith(".json"))

    def test_a_signed_push_deploys_and_records_its_signer(self):
        status, deployment, err = self.push(self.ci_key)
        self.assertEqual(status, 0, err)
        self.assertEqual(self.daemon.wait_state("web", deployment), "ok")
        _, record = self.daemon.get_json("/status/web/" + deployment)
        self.assertEqual(record["signer"]["principal"], "ci@web")
        self.assertRegex(record["signer"]["fingerprint"], r"\ASHA256:")
        log = self.daemon.log("web", deployment)
        self.assertIn("signer=ci@web key=%s" % record["signer"]["fingerprint"], log)
        audit = [json.loads(line) for line in
                 read_text(os.path.join(self.tmp, "audit.log")).splitlines()]
        upload = [e for e in audit if e["event"] == "upload"][0]
        self.assertEqual(upload["signer"]["principal"], "ci@web")
        _, _, page = self.daemon.get("/ui/web", headers={"Accept": "text/html"})
        self.assertIn("ci@web", page)

    def test_every_bad_push_is_refused_with_nothing_kept(self):
        cases = {"unsigned": (None, "web"), "a stranger's key": (self.stranger_key, "web"),
                 "signed for another project": (self.other_key, "web"),
                 "key past valid-before": (self.old_key, "web")}
        for name, (key, project) in cases.items():
            with self.subTest(name):
                status, out, err = self.push(key, project)
                self.assertEqual(status, 5, (out, err))  # 403
                self.assertIn("ipd: HTTP 403", err)
        self.assertEqual(self.deployments(), [])
        self.assertEqual(self.daemon.leftovers(), [])
        refused = [json.loads(line) for line in
                   read_text(os.path.join(self.tmp, "audit.log")).splitlines()
                   if '"signature_refused"' in line]
        self.assertEqual(len(refused), 4)
        # Unsigned pushes still go to projects that do not ask for signatures.
        self.assertEqual(self.push(None, "free")[0], 0)

    def test_manifest_must_match_what_arrived_and_never_be_replayed(self):
        manifest = ipd.make_manifest("web", {"package": ("0" * 64, 10)})
        signature = ipd.sign_manifest(self.ci_key, manifest)
        package = read_bytes(self.package)
        status, _, text = self.signed_upload(manifest, signature, package)
        self.assertEqual(status, 403, text)
        self.assertIn("do not match", text)
        digest = hashlib.sha256(package).hexdigest()
        newer = ipd.make_manifest("web", {"package": (digest, len(package))})
        older = ipd.make_manifest("web", {"package": (digest, len(package))},
                                  created=time.time() - 3600)
        signed_newer = ipd.sign_manifest(self.ci_key, newer)
        status, _, deployment = self.signed_upload(newer, signed_newer, package)
        self.assertEqual(status, 202, deployment)
        self.assertEqual(self.daemon.wait_state("web", deployment.strip()), "ok")
        for manifest, why in ((newer, "pushed before"), (older, "older than")):
            status, _, text = self.signed_upload(
                manifest, ipd.sign_manifest(self.ci_key, manifest)
                if manifest is older else signed_newer, package)
            self.assertEqual(status, 403, text)
            self.assertIn(why, text)
        # A signature over other bytes than the manifest sent: refused.
        tampered = newer.replace(b'"project":"web"', b'"project":"web" ')
        status, _, text = self.signed_upload(tampered, signed_newer, package)
        self.assertEqual(status, 403, text)
        self.assertIn("not a valid signature", text)
        self.assertEqual(len(self.deployments()), 1)
        self.assertEqual(self.daemon.leftovers(), [])
        # An ADMIN may still roll back on purpose; the redeploy keeps the signer.
        status, _, answer = self.daemon.request("POST", "/redeploy/web/" +
                                                deployment.strip())
        self.assertEqual(status, 202, answer)

    def signed_upload(self, manifest, signature, package, project="web"):
        content_type, body = multipart([("project", project),
                                        ("manifest", manifest.decode()),
                                        ("signature", signature),
                                        ("package", ("p.tgz", package))])
        return self.daemon.request("POST", "/upload", body=body,
                                   headers={"Content-Type": content_type})

    def test_the_documented_curl_line(self):
        """The README's curl recipe: sha256sum, a manifest, ssh-keygen -Y sign."""
        script = textwrap.dedent("""\
            set -e
            sum=$(sha256sum "$PACKAGE" | cut -d' ' -f1)
            size=$(stat -c %s "$PACKAGE")
            printf '{"created":%s,"files":{"package":{"sha256":"%s","size":%s}},"ipd_manifest":1,"nonce":"%s","project":"web"}' \\
                "$(date +%s)" "$sum" "$size" "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')" > manifest.json
            ssh-keygen -Y sign -f "$KEY" -n ipd manifest.json 2>/dev/null
            curl -sS -u admin:admin-pw -F project=web -F manifest='<manifest.json' \\
                -F signature='<manifest.json.sig' -F package=@"$PACKAGE" "$URL/upload"
            """)
        done = subprocess.run(["sh", "-c", script], cwd=self.tmp, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60, env=dict(
                                  os.environ, PACKAGE=self.package, KEY=self.ci_key,
                                  URL="http://127.0.0.1:%d/deploy" % self.daemon.port))
        deployment = done.stdout.decode().strip()
        self.assertRegex(deployment, r"\A[0-9a-f-]{36}\Z", done.stderr)
        self.assertEqual(self.daemon.wait_state("web", deployment), "ok")


class TokenTests(DaemonTestCase):
    """Deploy tokens: shown once, scoped to projects, expiring, revocable."""

    def token(self, *args):
        done = subprocess.run(IPD_RUN + ["--config", self.daemon.config,
                                         "token"] + list(args), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=30, env=ipd_environ())
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.decode()

    def upload_with(self, authorization, project="web"):
        content_type, body = multipart([("project", project), ("force", "1"), (
            "package", ("p.tgz", control_script(OK_SCRIPT)))])
        return self.daemon.request("POST", "/upload", user=None, body=body, headers={
            "Content-Type": content_type, "Authorization": authorization})[0]

    def test_create_use_expire_revoke(self):
        secret = self.token("create", "--project", "web", "--expires", "1h").strip()
        self.assertRegex(secret, r"\Aipd_[0-9a-f]{12}_")
        token_id = secret.split("_")[1]
        stored = read_text(os.path.join(self.tmp, "tokens.txt"))
        self.assertNotIn(secret, stored)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.tmp, "tokens.txt"))
                                      .st_mode), 0o640)
        basic = "Basic " + base64.b64encode(("ci:" + secret).encode()).decode()
        self.assertEqual(self.upload_with(basic), 202)
        self.assertEqual(self.upload_with("Bearer " + secret), 202)
        self.assertEqual(self.upload_with("Bearer " + secret, "other"), 403)
        self.assertIn("last_use=20", self.token("list"))
        self.token("revoke", token_id)
        wrong = self.upload_with("Bearer " + secret[:-1] + "x")
        self.assertEqual((self.upload_with("Bearer " + secret), wrong), (401, 401))
        self.assertIn("revoked", self.token("list"))
        # An expired token: the same answer as a wrong password, audited.
        expired = self.token("create", "--project", "web", "--expires", "1s").strip()
        time_to_expire = time.time() + 1.2
        wait_until(lambda: time.time() > time_to_expire, 3)
        self.assertEqual(self.upload_with("Bearer " + expired), 401)
        audit = read_text(os.path.join(self.tmp, "audit.log"))
        self.assertIn("revoked", audit)
        self.assertIn("expired", audit)
        self.assertNotIn(secret, audit + self.daemon.daemon_log())

    def test_a_refused_token_push_sends_no_file_bytes(self):
        secret = self.token("create", "--project", "web").strip()
        content_type, body = multipart([("project", "other"), (
            "image", ("i", b"\0" * (20 << 20)))])
        connection = self.daemon.connection()
        self.addCleanup(connection.close)
        connection.putrequest("POST", "/deploy/upload")
        for name, value in (("Authorization", "Bearer " + secret),
                            ("Content-Type", content_type), ("X-Ipd-Project", "other"),
                            ("Content-Length", str(len(body))),
                            ("Expect", "100-continue")):
            connection.putheader(name, value)
        connection.endheaders()
        self.assertEqual(connection.getresponse().status, 403)
        self.assertRegex(self.daemon.daemon_log(r'"POST /deploy/upload" 403'),
                         r'"POST /deploy/upload" 403 user=token:\w+ in=0 ')


class TokenFileLockTests(unittest.TestCase):
    # issue 23, item 5: the tokens, last-use and users files are changed
    # under one lock each, by as many commands at once as you like

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.config = os.path.join(self.tmp, "ipd.conf")
        self.users = os.path.join(self.tmp, "users.txt")
        with open(self.config, "w") as file:
            file.write("AUTH_DB=%s\nUPLOAD_DIR=%s\n" % (self.users, self.tmp))
        self.tokens = os.path.join(self.tmp, "tokens.txt")

    def start(self, *args, stdin_text=None):
        # IPD_RUN: ipd.py from its compiled bytecode; this class starts 53
        # commands, and the lock, not how each one starts, is what it tests
        return subprocess.Popen(IPD_RUN + ["--config", self.config] + list(args),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=ipd_environ())

    def finish(self, processes, stdin_text=None):
        outputs = []
        for process in processes:
            out, err = process.communicate(stdin_text, timeout=60)
            self.assertEqual(process.returncode, 0, err)
            outputs.append(out.decode())
        return outputs

    def stored(self):
        return ipd.parse_tokens(read_text(self.tokens))

    def test_twelve_creates_at_once_are_all_kept(self):
        secrets_shown = self.finish([self.start("token", "create", "--project", "web")
                                     for _ in range(12)])
        ids = {secret.strip().split("_")[1] for secret in secrets_shown}
        self.assertEqual(set(self.stored()), ids)
        self.assertEqual(len(ids), 12)

    def test_a_revoke_that_said_revoked_stays_revoked(self):
        ids = [out.strip().split("_")[1] for out in self.finish(
            [self.start("token", "create", "--project", "web") for _ in range(8)])]
        for token_id in ids:  # each round: a revoke among creates
            processes = [self.start("token", "create", "--project", "web")
                         for _ in range(2)]
            processes.insert(1, self.start("token", "revoke", token_id))
            processes += [self.start("token", "create", "--project", "api")]
            self.finish(processes)
            self.assertTrue(self.stored()[token_id].revoked, token_id)
        self.assertEqual(len(self.stored()), 8 + 8 * 3)
        self.assertTrue(all(self.stored()[token_id].revoked for token_id in ids))

    def test_users_written_at_once_are_all_kept(self):
        # what `passwd` does once it has the hash (PBKDF2 spaces real ones
        # out), from 16 threads let go at once; then a real passwd
        barrier = threading.Barrier(16)

        def add(number):
            barrier.wait()
            ipd.set_user(self.users, "USER", "user%d" % number, sha256_hex("pw"))
        threads = [threading.Thread(target=add, args=(number,)) for number in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.finish([self.start("passwd", "USER", "last", "--auth-db", self.users)],
                    b"a-password\n")
        names = set(ipd.parse_users(read_text(self.users))[0])
        self.assertEqual(names, {"user%d" % number for number in range(16)} | {"last"})

    def test_last_uses_noted_at_once_are_all_kept(self):
        secrets_made = [ipd.create_token(self.tokens, ["web"], 0, "ci")
                        for _ in range(8)]
        databases = [ipd.TokenDB(self.tokens) for _ in secrets_made]
        threads = [threading.Thread(target=database.authenticate, args=(secret,))
                   for database, secret in zip(databases, secrets_made)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        used = ipd.read_token_uses(self.tokens)
        self.assertEqual(set(used), {secret.split("_")[1] for secret in secrets_made})


###############################################################################
# OpenID Connect ID tokens ####################################################
###############################################################################

class OidcVerifyTests(unittest.TestCase):
    """RS256 and the token's rules, in this process (no daemon)."""

    # RFC 7515, Appendix A.2: the RS256 example and the key of RFC 7517
    # Appendix A.1 it verifies with (exp 1300819380: March 2011).
    RFC_TOKEN = (
        "eyJhbGciOiJSUzI1NiJ9"
        ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
        ".cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W"
        "2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvk"
        "SjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqvhJ1phC"
        "nvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw")
    RFC_N = (
        "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0"
        "Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS"
        "5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH"
        "7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ")

    def test_the_rfc_7515_a2_example_verifies_against_its_published_key(self):
        n, e = ipd.b64url_int(self.RFC_N), ipd.b64url_int("AQAB")
        self.assertEqual(n.bit_length(), 2048)
        header, claims, signed, signature = ipd.parse_compact_jws(self.RFC_TOKEN)
        self.assertEqual((header, claims["iss"], claims["exp"]),
                         ({"alg": "RS256"}, "joe", 1300819380))
        self.assertTrue(ipd.rsa_sha256_verify(n, e, signed, signature))
        for flipped in (signed[:-1] + b"R", signed):  # the message, the signature
            forged = signature if flipped != signed else \
                signature[:100] + bytes([signature[100] ^ 1]) + signature[101:]
            self.assertFalse(ipd.rsa_sha256_verify(n, e, flipped, forged))
        self.assertFalse(ipd.rsa_sha256_verify(n, e, signed, signature[1:]))
        with self.assertRaisesRegex(ipd.TokenRefused, "expired"):  # 2011
            ipd.check_token_times(claims, time.time())
        ipd.check_token_times(claims, 1300819380 - 1)

    def test_times_have_at_most_60_s_of_leeway(self):
        now = 2000000000
        self.assertEqual(ipd.OIDC_LEEWAY, 60)
        ipd.check_token_times({"exp": now - 59}, now)
        ipd.check_token_times({"exp": now + 1, "nbf": now + 59, "iat": now + 59}, now)
        for claims, reason in (({"exp": now - 60}, "expired"), ({}, "no exp"),
                               ({"exp": "soon"}, "no exp"), ({"exp": True}, "no exp"),
                               ({"exp": now + 9, "nbf": now + 61}, "not valid yet"),
                               ({"exp": now + 9, "iat": now + 61}, "not valid yet"),
                               ({"exp": float("nan")}, "no exp"), ({"exp": 10 ** 30}, "no exp"),
                               ({"exp": now + 9, "nbf": float("inf")}, "nbf is not a number"),
                               ({"exp": now + 9, "iat": "0"}, "iat is not a number")):
            with self.subTest(claims), self.assertRaisesRegex(ipd.TokenRefused, reason):
                ipd.check_token_times(claims, now)

    def test_token_size_and_json_depth_are_bounded(self):
        deep = b64url(b'{"a":' * 9 + b"1" + b"}" * 9)
        plain = b64url(b'{"alg":"RS256"}')
        for token, reason in ((plain + "." + deep + ".AA", "deeper"),
                              (plain + "." + "A" * ipd.OIDC_MAX_TOKEN + ".AA", "too large"),
                              (b64url(b'{"alg":"RS256","alg":"none"}') + "." + plain + ".",
                               "twice"),
                              (plain + "." + plain, "three parts"),
                              (plain + "." + b64url(b'{"exp":NaN}') + ".", "not a JSON number"),
                              (plain + ".e30.A", "base64url"),
                              (b64url(b"[1]") + ".e30.", "objects")):
            with self.subTest(reason), self.assertRaisesRegex(ipd.TokenRefused, reason):
                ipd.parse_compact_jws(token)
        self.assertEqual(ipd.parse_compact_jws(plain + ".e30.")[1], {})

    def test_hostile_tokens_are_refused_never_raise(self):
        folder = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, folder, True)
        with open(os.path.join(folder, "rfc.jwks"), "w") as file:
            json.dump({"keys": [{"kty": "RSA", "kid": "rfc", "n": self.RFC_N,
                                 "e": "AQAB"}]}, file)
        with open(os.path.join(folder, "trust"), "w") as file:
            file.write("%s %s * repository=* jwks=rfc.jwks\n" % (GITHUB, AUDIENCE))
        logins = ipd.OidcLogins(os.path.join(folder, "trust"), os.path.join(folder, "c"))
        header = b64url(b'{"alg":"RS256","kid":"rfc"}')
        signature = self.RFC_TOKEN.split(".")[2]
        crafted = ['{"iss":"%s","aud":"%s","repository":"x","sub":"s","exp":%s,"nbf":%s}'
                   % (GITHUB, AUDIENCE, exp, nbf) for exp, nbf in (
                       ("NaN", 0), ("Infinity", 0), ("1e400", 0), ("9" * 5000, 0),
                       ("2000000000", "-Infinity"), ("2000000000", "1e300"),
                       ("2000000000", "[]"), ('"x"', 0), ("-1", 0))]
        crafted += ['{"iss":%s}' % value for value in ("1", "null", "[]", '{"a":1}')]
        crafted += ['{"iss":"%s","aud":[[],{},1,null]}' % GITHUB, "[]", "1", '"x"', "",
                    "\udcff", '{"iss":"%s","iss":"%s"}' % (GITHUB, GITHUB)]
        tokens = [header + "." + b64url(claims.encode("utf-8", "surrogatepass")) + "." +
                  signature for claims in crafted]
        generator = random.Random(26)
        alphabet = "eyJ._-AZaz09=+/ \x00\xff"
        for _ in range(2000):
            token = list(generator.choice(tokens + [self.RFC_TOKEN]))
            for _ in range(generator.randint(1, 4)):
                token[generator.randrange(len(token))] = generator.choice(alphabet)
            tokens.append("".join(token))
        for token in tokens:
            user, reason = logins.authenticate(token)
            self.assertIsNone(user, token)
            self.assertTrue(reason.startswith("ID token refused: "), reason)
            self.assertIn("issuer", reason.audit)

    def test_trust_rules_and_their_warnings(self):
        text = "\n".join([
            "# ISSUER AUDIENCE PROJECTS CLAIM=GLOB...",
            "%s %s web,api repository=acme/web ref=refs/heads/main" % (GITHUB, AUDIENCE),
            "https://gitlab.example.com ipd * project_path=acme/* jwks=keys/gitlab.json",
            "http://plain.example ipd web repository=acme/web",
            "%s %s web" % (GITHUB, AUDIENCE),
            "%s %s ../etc repository=x" % (GITHUB, AUDIENCE),
            "%s %s web =x" % (GITHUB, AUDIENCE),
            "%s %s web repository=acme/web jwks=test-keys.json" % (GITHUB, AUDIENCE),
            "", "   # indented comment"])
        rules, warnings = ipd.parse_trust(text, "trust.txt", "/etc/ipd")
        self.assertEqual([(r.issuer, r.audience, r.projects, r.claims, r.jwks, r.line)
                          for r in rules],
                         [(GITHUB, AUDIENCE, frozenset({"web", "api"}),
                           [("repository", "acme/web"), ("ref", "refs/heads/main")], None, 2),
                          ("https://gitlab.example.com", "ipd", None,
                           [("project_path", "acme/*")], "/etc/ipd/keys/gitlab.json", 3)])
        self.assertEqual([w.split(":")[0] for w in warnings],
                         ["trust.txt, line 4", "trust.txt, line 5", "trust.txt, line 6",
                          "trust.txt, line 7", "trust.txt, line 8"])
        self.assertIn("keys come from discovery on an earlier line", warnings[4])
        self.assertIn("https://", warnings[0])
        self.assertIn("at least one CLAIM=GLOB", warnings[1])
        self.assertTrue(all(w.endswith("line ignored") for w in warnings))
        self.assertIsNone(rules[0].mismatch(github_claims()))
        self.assertIn("ref=refs/heads/dev does not match",
                      rules[0].mismatch(github_claims(ref="refs/heads/dev")))
        self.assertIn("missing", rules[0].mismatch(github_claims(ref=None)))
        gitlab = ipd.TrustRule("x", "ipd", None, [("ref_protected", "true")])
        self.assertIsNone(gitlab.mismatch({"ref_protected": True}))
        self.assertIsNone(gitlab.mismatch({"ref_protected": "true"}))

    def test_user_names_and_recorded_claims(self):
        self.assertEqual(ipd.short_issuer(GITHUB), "github")
        self.assertEqual(ipd.short_issuer("https://gitlab.com"), "gitlab")
        self.assertEqual(ipd.short_issuer("https://gitlab.example.com"), "gitlab.example.com")
        self.assertEqual(ipd.short_issuer(GITHUB + "/acme"),
                         "token.actions.githubusercontent.com/acme")
        rules = [ipd.TrustRule(GITHUB, AUDIENCE, frozenset({"web"}), [("ref", "*")]),
                 ipd.TrustRule(GITHUB, AUDIENCE, frozenset({"api"}), [("ref", "*/main")]),
                 ipd.TrustRule(GITHUB, "other", None, [("ref", "*")])]
        user = ipd.oidc_user(github_claims(sub="repo:acme/web:ref:refs/heads/main x"), rules)
        self.assertEqual(user.name, "oidc:github:repo:acme/web:ref:refs/heads/main_x")
        self.assertEqual((user.role, user.projects), ("USER", frozenset({"web", "api"})))
        self.assertEqual(user.oidc["repository"], "acme/web")
        self.assertEqual(user.oidc["run_id"], "4242")
        self.assertNotIn("jti", user.oidc)
        self.assertTrue(user.may_use("api") and not user.may_use("db"))
        with self.assertRaisesRegex(ipd.TokenRefused, "audience"):
            ipd.oidc_user(github_claims(aud=["a", "b"]), rules)
        self.assertEqual(ipd.oidc_user(github_claims(aud=["x", "other"]), rules).projects,
                         None)


class OidcTests(OidcTestCase):
    """ID tokens with keys from a JWKS file: what deploys, what is refused."""

    def rules(self):
        with open(os.path.join(self.tmp, "github.jwks"), "w") as file:
            file.write(jwks_text(self.key, self.weak))
        return ("# who may deploy what\n"
                "%s %s web repository=acme/web ref=refs/heads/main jwks=github.jwks\n"
                "%s %s web,api\n" % (GITHUB, AUDIENCE, GITHUB, AUDIENCE))

    def daemon_settings(self):
        self.listener = Listener()
        self.addCleanup(self.listener.close)
        return {"NOTIFY_URL": self.listener.url}

    def test_a_token_that_logged_in_outlives_its_exp_for_its_push(self):
        # docker push sends its login's one password with each request: an
        # ID token that logged in to the registry before its exp stays good
        # there OIDC_SESSION longer; elsewhere, and one never used, refused
        exp = int(time.time()) - ipd.OIDC_LEEWAY + 3  # three seconds left
        token = mint(self.key, github_claims(exp=exp))

        def registry(token):
            login = base64.b64encode(("oidc:" + token).encode()).decode()
            return self.daemon.request("GET", "/v2/", user=None, root="", headers={
                "Authorization": "Basic " + login})[0]
        self.assertEqual(registry(token), 200)
        wait_until(lambda: time.time() >= exp + ipd.OIDC_LEEWAY + 0.2, 30,
                   message="the token's exp")
        self.assertEqual(registry(token), 200)
        self.assertEqual(oidc_upload(self.daemon, "Bearer " + token)[0], 401)
        unused = mint(self.key, github_claims(exp=exp, run_id="2"))
        self.assertEqual(registry(unused), 401)
        self.assertIn("expired", audit_events(self.tmp, "login_refused")[-1]["reason"])

    def test_a_matching_token_deploys_its_rules_project_and_only_it(self):
        self.assertIn("line 3: a rule needs projects and at least one CLAIM=GLOB",
                      self.daemon.daemon_log("line 3"))
        token = self.bearer(github_claims())
        status, deployment = oidc_upload(self.daemon, token)
        self.assertEqual(status, 202, deployment)
        deployment = deployment.strip()
        self.assertEqual(self.daemon.wait_state("web", deployment), "ok")
        self.assertEqual(oidc_upload(self.daemon, token, "api")[0], 403)
        basic = "Basic " + base64.b64encode(b"oidc:" + token[7:].encode()).decode()
        self.assertEqual(oidc_upload(self.daemon, basic)[0], 202)
        # who deployed, exactly: the record, /status JSON, audit, notification, page
        status, record = self.daemon.get_json("/status/web/" + deployment)
        self.assertEqual(record["user"], "oidc:github:" + GITHUB_SUB)
        expected = {"issuer": GITHUB, "sub": GITHUB_SUB, "repository": "acme/web",
                    "ref": "refs/heads/main", "workflow": "deploy", "run_id": "4242",
                    "environment": "production"}
        self.assertEqual({k: record["oidc"].get(k) for k in expected}, expected)
        upload = [e for e in audit_events(self.tmp, "upload")
                  if e["deployment"] == deployment]
        self.assertEqual(upload[0]["user"], "oidc:github:" + GITHUB_SUB)
        self.assertEqual(upload[0]["oidc"]["repository"], "acme/web")
        told = wait_until(lambda: [m for m in self.listener.received
                                   if m["deployment"] == deployment], 20)
        self.assertEqual(told[0]["oidc"]["run_id"], "4242")
        page = self.daemon.get("/ui/web/" + deployment)[2]
        for text in ("oidc:github:repo:acme/web", "acme/web</code>", "refs/heads/main",
                     "4242", "production"):
            self.assertIn(text, page)
        self.assertIn("acme/web", self.daemon.get("/ui/web")[2])
        # a rollback by a token: its own claims, not the earlier push's
        status, _, again = self.daemon.request(
            "POST", "/redeploy/web/" + deployment, user=None, headers={
                "Authorization": self.bearer(github_claims(run_id="4343"))})
        self.assertEqual(status, 202, again)
        self.assertEqual(self.daemon.get_json("/status/web/" + again.strip())[1]["oidc"]
                         ["run_id"], "4343")
        # a restart reads it back; the token itself is nowhere
        self.daemon.restart()
        self.assertEqual(self.daemon.get_json("/status/web/" + deployment)[1]["oidc"],
                         record["oidc"])
        everything = read_text(os.path.join(self.tmp, "audit.log")) + \
            self.daemon.daemon_log() + read_text(os.path.join(
                self.daemon.upload_dir, "web", "deployments", deployment + ".json"))
        self.assertNotIn(token[7:], everything)
        self.assertNotIn(token.split(".")[2], everything)

    def refusals(self):
        """(what, Authorization, reason in the audit log) of each token
        that must not log in."""
        now = int(time.time())
        good = github_claims()
        header = {"alg": "RS256", "typ": "JWT", "kid": self.key.kid}
        unsigned = b64url(json.dumps({"alg": "none"}).encode()) + "." + \
            b64url(json.dumps(good).encode()) + "."
        hs_header = b64url(json.dumps({"alg": "HS256", "typ": "JWT",
                                       "kid": self.key.kid}).encode())
        hs_input = hs_header + "." + b64url(json.dumps(good).encode())
        hs256 = hs_input + "." + b64url(hmac.new(self.key.public_pem, hs_input.encode(),
                                                 "sha256").digest())
        signed = mint(self.key, good)
        body, signature = signed.rsplit(".", 1)
        raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
        raw[-1] ^= 1
        flipped = body + "." + b64url(bytes(raw))
        huge = mint(self.key, github_claims(padding="x" * (1 << 20)))
        return [
            ("wrong iss", self.bearer(github_claims(iss="https://token.example.com")),
             "issuer not trusted"),
            ("wrong aud", self.bearer(github_claims(aud="https://other.example")),
             "audience"),
            ("unmatched claim", self.bearer(github_claims(ref="refs/heads/dev")),
             "claim ref=refs/heads/dev does not match"),
            ("a claim missing", self.bearer(github_claims(repository=None)),
             "claim repository is missing"),
            ("expired", self.bearer(github_claims(exp=now - 61)), "expired"),
            ("no exp", self.bearer(github_claims(exp=None)), "no exp"),
            ("not yet valid", self.bearer(github_claims(nbf=now + 120)), "not valid yet"),
            ("alg none", "Bearer " + unsigned, "alg 'none' refused"),
            ("HS256 keyed with the public key", "Bearer " + hs256, "alg 'HS256' refused"),
            ("unknown kid", self.bearer(good, header=dict(header, kid="key-9")),
             "unknown kid"),
            ("1,024-bit key", self.bearer(good, self.weak), "has 1024 bits"),
            ("flipped signature bit", "Bearer " + flipped, "bad signature"),
            ("signed by another key", self.bearer(good, self.rotated, header),
             "bad signature"),
            ("jku header", self.bearer(good, header=dict(header, jku="https://evil/k")),
             "header parameter jku refused"),
            ("a token of 1 MiB", "Bearer " + huge, "token too large"),
        ]

    def test_each_bad_token_is_a_401_audited_and_queues_nothing(self):
        wrong_password = self.daemon.upload("web", control_script(OK_SCRIPT),
                                            user="dev:wrong")
        for number, (what, authorization, reason) in enumerate(self.refusals()):
            with self.subTest(what):
                if len(authorization) > 60000:  # over http.server's line limit:
                    authorization = "\r\n ".join(  # folded (RFC 9112 5.2 obs-fold)
                        authorization[i:i + 60000]
                        for i in range(0, len(authorization), 60000))
                status, body = oidc_upload(self.daemon, authorization,
                                           address="10.0.0.%d" % number)
                self.assertEqual((status, body), wrong_password[::2])
                refused = audit_events(self.tmp, "login_refused")[-1]
                self.assertIn(reason, refused["reason"])
                self.assertEqual(refused["address"], "10.0.0.%d" % number)
                # a token too large is not even decoded
                self.assertEqual(refused["issuer"], {"wrong iss": "https://token.example.com",
                                                     "a token of 1 MiB": ""}.get(what, GITHUB))
        self.assertEqual(self.daemon.get("/status/web")[0], 404)
        self.assertFalse(os.path.exists(os.path.join(self.daemon.upload_dir, "web")))
        text = read_text(os.path.join(self.tmp, "audit.log")) + self.daemon.daemon_log()
        for _, authorization, _ in self.refusals()[:3]:
            self.assertNotIn(authorization.split(".")[2], text)

    def test_rules_are_read_again_when_the_file_changes(self):
        token = self.bearer(github_claims(ref="refs/heads/release"))
        self.assertEqual(oidc_upload(self.daemon, token)[0], 401)
        with open(self.trust, "a") as file:
            file.write("%s %s web,api repository=acme/* ref=refs/heads/release "
                       "jwks=github.jwks\n" % (GITHUB, AUDIENCE))
        self.assertEqual(oidc_upload(self.daemon, token, "api")[0], 202)
        os.remove(self.trust)
        self.assertEqual(oidc_upload(self.daemon, token, "api")[0], 401)

    def test_require_signature_still_applies(self):
        self.daemon.stop()
        with open(self.daemon.config, "a") as file:
            file.write("REQUIRE_SIGNATURE=web\n")
        self.daemon.start()
        status, body = oidc_upload(self.daemon, self.bearer(github_claims()))
        self.assertEqual(status, 403, body)
        self.assertIn("signed pushes only", body)


class OidcDiscoveryTests(OidcTestCase):
    """Keys fetched by OpenID discovery over HTTPS (OIDC_CA_FILE names the
    test's CA), cached on disk, fetched again at most once a minute."""

    def rules(self):
        self.ca, certificate, key = make_test_ca(self.tmp)
        self.issuer = FakeIssuer(self, certificate, key)
        self.issuer.modes = {"ci": "keys", "hang": "hang", "garbage": "garbage"}
        return "".join("%s ipd web repository=acme/web\n" % self.issuer.url(name)
                       for name in ("ci", "hang", "garbage"))

    def daemon_settings(self):
        return {"OIDC_CA_FILE": self.ca}

    def token(self, name="ci", key=None):
        return self.bearer(github_claims(iss=self.issuer.url(name), aud="ipd"), key)

    def test_keys_over_https_cached_and_a_rotated_key_fetched_once(self):
        self.issuer.keys = [self.key]
        self.assertEqual(oidc_upload(self.daemon, self.token())[0], 202)
        self.assertEqual(self.issuer.fetches("ci"), (1, 1))
        self.assertEqual(oidc_upload(self.daemon, self.token())[0], 202)
        # the issuer rotates its key: within the minute of the last fetch a
        # new kid is refused without asking again
        self.issuer.keys = [self.key, self.rotated]
        self.assertEqual(oidc_upload(self.daemon, self.token(key=self.rotated))[0], 401)
        self.assertEqual(self.issuer.fetches("ci"), (1, 1))
        self.assertIn("unknown kid", audit_events(self.tmp, "login_refused")[-1]["reason"])
        # a new daemon: the keys come from its disk cache, the new kid is
        # fetched once, and kids no set has are not fetched again
        self.daemon.restart()
        self.assertEqual(oidc_upload(self.daemon, self.token())[0], 202)
        self.assertEqual(self.issuer.fetches("ci"), (1, 1))
        for _ in range(2):
            self.assertEqual(oidc_upload(self.daemon, self.token(key=self.rotated))[0], 202)
        unknown = self.bearer(github_claims(iss=self.issuer.url("ci"), aud="ipd"),
                              header={"alg": "RS256", "kid": "key-3"})
        for number in range(3):
            self.assertEqual(oidc_upload(self.daemon, unknown,
                                         address="10.1.0.%d" % number)[0], 401)
        self.assertEqual(self.issuer.fetches("ci"), (2, 2))
        cached = os.listdir(os.path.join(self.daemon.upload_dir, ".oidc"))
        self.assertEqual(len(cached), 1)

    def test_keys_older_than_their_max_age_are_asked_for_again(self):
        # an issuer withdraws a key that leaked: once the fetched keys are
        # OIDC_KEYS_MAX_AGE old, the next login asks for them again
        self.issuer.keys = [self.key]
        self.assertEqual(oidc_upload(self.daemon, self.token())[0], 202)
        self.assertEqual(self.issuer.fetches("ci"), (1, 1))
        folder = os.path.join(self.daemon.upload_dir, ".oidc")
        path = os.path.join(folder, os.listdir(folder)[0])
        with open(path) as file:
            cached = json.load(file)
        cached["fetched"] -= ipd.OIDC_KEYS_MAX_AGE + 60
        with open(path, "w") as file:
            json.dump(cached, file)
        self.daemon.restart()
        self.issuer.keys = [self.rotated]  # the old key withdrawn
        self.assertEqual(oidc_upload(self.daemon, self.token())[0], 401)
        self.assertEqual(self.issuer.fetches("ci"), (2, 2))
        self.assertEqual(oidc_upload(self.daemon, self.token(key=self.rotated))[0], 202)

    def test_a_hanging_or_garbage_issuer_blocks_no_other_request(self):
        self.issuer.keys = [self.key]
        answers = {}

        def hanging_login():
            started = time.monotonic()
            answers["hang"] = oidc_upload(self.daemon, self.token("hang"))[0]
            answers["took"] = time.monotonic() - started
        thread = threading.Thread(target=hanging_login)
        thread.start()
        self.addCleanup(thread.join, 60)
        self.assertTrue(self.issuer.entered.wait(30))
        for authorization, expected in ((self.token("garbage"), 401),
                                        (self.token("ci"), 202), (ADMIN_AUTH, 202)):
            started = time.monotonic()
            self.assertEqual(oidc_upload(self.daemon, authorization)[0], expected)
            self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(self.daemon.get("/status/web")[0], 200)
        thread.join(30)
        self.assertEqual(answers["hang"], 401)
        self.assertGreaterEqual(answers["took"], ipd.OIDC_FETCH_TIMEOUT - 0.5)
        self.assertLess(answers["took"], 3 * ipd.OIDC_FETCH_TIMEOUT)
        log = self.daemon.daemon_log("no answer within")
        self.assertIn("cannot fetch the keys of OIDC issuer %s" % self.issuer.url("hang"),
                      log)
        self.assertIn("cannot fetch the keys of OIDC issuer %s" % self.issuer.url("garbage"),
                      log)
        self.assertEqual(self.issuer.fetches("garbage"), (1, 0))
        reasons = {event["issuer"]: event["reason"] for event in
                   audit_events(self.tmp, "login_refused")}
        for name in ("hang", "garbage"):
            self.assertIn("no keys of this issuer", reasons[self.issuer.url(name)])


class OidcPushTests(OidcTestCase):
    """ipd.py push --oidc AUDIENCE and --oidc-env NAME, as CI jobs run them."""

    def rules(self):
        with open(os.path.join(self.tmp, "ci.jwks"), "w") as file:
            file.write(jwks_text(self.key))
        return ("%s %s web repository=acme/web ref=refs/heads/main jwks=ci.jwks\n"
                "https://gitlab.example.com ipd web project_path=acme/web "
                "ref_protected=true jwks=ci.jwks\n" % (GITHUB, AUDIENCE))

    def push(self, *args, env=None):
        environ = {"IPD_URL": "http://127.0.0.1:%d/deploy" % self.daemon.port,
                   "HOME": self.tmp}
        for name in ("IPD_USER", "IPD_PASSWORD", "ACTIONS_ID_TOKEN_REQUEST_URL",
                     "ACTIONS_ID_TOKEN_REQUEST_TOKEN"):
            environ[name] = ""
        environ.update(env or {})
        return subprocess.run(IPD_RUN + ["push", "--project", "web"] + list(args),
                              env=ipd_environ(environ), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              timeout=120)

    def package(self, size=0):
        """A package with control.sh and size random (incompressible) bytes."""
        path = os.path.join(self.tmp, "package.tar.gz")
        with open(path, "wb") as file:
            file.write(tar_bytes({"control.sh": (("#!/bin/sh\n" + OK_SCRIPT).encode(),
                                                 0o755), "data": os.urandom(size)}))
        return path

    def test_push_oidc_deploys_with_a_token_from_github_actions(self):
        tokens = FakeActionsTokens(self, self.key)
        result = self.push("--oidc", AUDIENCE, "--package", self.package(), "--wait",
                           env=tokens.environ)
        self.assertEqual(result.returncode, 0, result.stderr)
        deployment = result.stdout.decode().splitlines()[0]
        self.assertEqual(tokens.minted[0][0], AUDIENCE)
        record = self.daemon.get_json("/status/web/" + deployment)[1]
        self.assertEqual((record["state"], record["user"]),
                         ("ok", "oidc:github:" + GITHUB_SUB))
        # no GitHub variables: a usage error that says what is missing
        result = self.push("--oidc", AUDIENCE, "--package", self.package())
        self.assertEqual(result.returncode, 2)
        self.assertIn(b"ACTIONS_ID_TOKEN_REQUEST_URL", result.stderr)
        # a token for another audience is refused like a wrong password
        result = self.push("--oidc", "https://other.example", "--package",
                           self.package(), env=tokens.environ)
        self.assertEqual(result.returncode, 4, result.stderr)

    def test_a_push_longer_than_its_token_lives_completes(self):
        for whole in (True, False):
            with self.subTest(whole=whole):
                tokens = FakeActionsTokens(self, self.key, lifetime=2)
                package = self.package(400000)
                result = self.push("--oidc", AUDIENCE, "--package", package,
                                   "--limit-rate", "100K", "--wait",
                                   *(["--whole"] if whole else []), env=tokens.environ)
                self.assertEqual(result.returncode, 0, result.stderr)
                # the first token was refused by ipd long before the end
                self.assertGreater(time.time(), tokens.minted[0][1] + 1.0)
                self.assertGreater(len(tokens.minted), 1)
                deployment = result.stdout.decode().splitlines()[0]
                self.assertEqual(self.daemon.state("web", deployment), "ok")

    def test_push_oidc_env_with_a_gitlab_id_token(self):
        now = time.time()
        claims = {"iss": "https://gitlab.example.com", "aud": "ipd",
                  "sub": "project_path:acme/web:ref_type:branch:ref:main",
                  "project_path": "acme/web", "ref": "main", "ref_protected": "true",
                  "pipeline_id": "777", "job_id": "778", "environment": "production",
                  "iat": int(now), "nbf": int(now),
                  # ipd takes it for 5 to 6 s more (leeway included)
                  "exp": int(now + 6 - ipd.OIDC_LEEWAY)}
        token = mint(self.key, claims)
        result = self.push("--oidc-env", "CI_IPD_TOKEN", "--whole", "--package",
                           self.package(900000), "--limit-rate", "100K",
                           env={"CI_IPD_TOKEN": token})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertGreater(time.time(), claims["exp"] + ipd.OIDC_LEEWAY)
        deployment = result.stdout.decode().splitlines()[0]
        self.assertEqual(self.daemon.wait_state("web", deployment), "ok")
        record = self.daemon.get_json("/status/web/" + deployment)[1]
        self.assertEqual(record["user"], "oidc:gitlab.example.com:" + claims["sub"])
        self.assertEqual(record["oidc"]["pipeline_id"], "777")
        # the same token, now past its time: refused
        result = self.push("--oidc-env", "CI_IPD_TOKEN", "--package", self.package(),
                           env={"CI_IPD_TOKEN": token})
        self.assertEqual(result.returncode, 4, result.stderr)
        result = self.push("--oidc-env", "CI_IPD_NOTHING", "--package", self.package())
        self.assertEqual(result.returncode, 2)


class OidcLoginCostTests(OidcTestCase):
    alone = True  # measures time: runs while no other test does

    def rules(self):
        with open(os.path.join(self.tmp, "ci.jwks"), "w") as file:
            file.write(jwks_text(self.key))
        return "%s %s web repository=acme/web jwks=ci.jwks\n" % (GITHUB, AUDIENCE)

    def test_a_refused_token_costs_what_a_wrong_password_costs(self):
        timings = {"wrong password": [], "bad token": []}
        token = self.bearer(github_claims(ref="x", repository="acme/other"))
        password = "Basic " + base64.b64encode(b"admin:wrong").decode()
        for number in range(9):  # medians of nine, taken in turn: a busy machine
            for name, authorization in (("wrong password", password), ("bad token", token)):
                started = time.perf_counter()
                status, _, _ = self.daemon.get("/status/web", user=None, headers={
                    "Authorization": authorization, "X-Real-IP": "10.2.0.%d" % number})
                timings[name].append(time.perf_counter() - started)
                self.assertEqual(status, 401)
        median = {name: sorted(values)[4] for name, values in timings.items()}
        report("refused logins, median: wrong password %.1f ms, refused ID token %.1f ms"
               % (1000 * median["wrong password"], 1000 * median["bad token"]))
        self.assertGreater(median["bad token"] / median["wrong password"], 0.4, median)


###############################################################################
# Multipart parser ############################################################
###############################################################################

class MultipartParserTests(unittest.TestCase):

    def parse(self, body, boundary="testboundary1234", pieces=None):
        """Feed body in pieces; return [(headers, data)] of the parts."""
        parser = ipd.MultipartParser(boundary)
        parts = []
        pieces = pieces or [body]
        for piece in pieces:
            for event, value in parser.feed(bytearray(piece)):
                if event == ipd.PART_START:
                    parts.append([value, b""])
                elif event == ipd.PART_DATA:
                    parts[-1][1] += bytes(value)
        parser.close()
        return [(headers, data) for headers, data in parts]

    def test_two_parts(self):
        _, body = multipart([("project", "app"), ("image", ("a.tar", b"IMG"))])
        parts = self.parse(body)
        self.assertEqual([data for _, data in parts], [b"app", b"IMG"])
        self.assertIn('filename="a.tar"', parts[1][0]["content-disposition"])

    def test_every_split_point_of_the_body(self):
        payload = b"\r\n--testboundary123 \r\r\n-- almost a boundary\r\n" * 3
        _, body = multipart([("project", "app"), ("image", ("x", payload)),
                             ("package", ("y", b""))])
        expected = self.parse(body)
        self.assertEqual(expected[1][1], payload)
        for split in range(1, len(body)):
            with self.subTest(split=split):
                self.assertEqual(self.parse(body, pieces=[body[:split],
                                                          body[split:]]),
                                 expected)

    def test_byte_by_byte(self):
        _, body = multipart([("project", "app"), ("image", ("x", b"\r\n--t\r\n"))])
        pieces = [body[i:i + 1] for i in range(len(body))]
        self.assertEqual(self.parse(body, pieces=pieces), self.parse(body))

    def test_three_way_splits_around_the_delimiter(self):
        _, body = multipart([("image", ("x", b"A" * 50)), ("project", "p")])
        expected = self.parse(body)
        delimiter_at = body.index(b"\r\n--testboundary1234\r\n")
        for first in range(delimiter_at - 3, delimiter_at + 25):
            for second in range(first + 1, delimiter_at + 26):
                pieces = [body[:first], body[first:second], body[second:]]
                self.assertEqual(self.parse(body, pieces=pieces), expected)

    def test_preamble_epilogue_and_padding(self):
        body = (b"preamble\r\n--b\r\nContent-Disposition: form-data; name=a\r\n"
                b"\r\nvalue\r\n--b \t\r\nContent-Disposition: form-data; "
                b"name=\"c\"\r\n\r\n\r\n--b--\r\nepilogue")
        parts = self.parse(body, boundary="b")
        self.assertEqual([data for _, data in parts], [b"value", b""])

    def test_missing_final_boundary(self):
        _, body = multipart([("project", "app")])
        with self.assertRaises(ipd.MultipartError):
            self.parse(body[:-8])
        with self.assertRaises(ipd.MultipartError):
            self.parse(b"")

    def test_garbage_after_boundary(self):
        with self.assertRaises(ipd.MultipartError):
            self.parse(b"--bXX\r\n\r\n", boundary="b")

    def test_headers_too_long(self):
        body = b"--b\r\nX: " + b"a" * 20000 + b"\r\n\r\n\r\n--b--"
        with self.assertRaises(ipd.MultipartError):
            self.parse(body, boundary="b")

    def test_too_many_parts(self):
        body = b"".join(b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n"
                        b"x\r\n" for _ in range(20)) + b"--b--"
        with self.assertRaises(ipd.MultipartError):
            self.parse(body, boundary="b")

    def test_header_params(self):
        # As browsers send them (WHATWG): '"' as %22, a backslash is itself.
        kind, params = ipd.parse_header_params(
            'form-data; name="a;b"; filename="x %22y%22\\z.tar"')
        self.assertEqual((kind, params["name"], params["filename"]),
                         ("form-data", "a;b", 'x "y"\\z.tar'))
        _, params = ipd.parse_header_params(
            "form-data; name=image; filename*=UTF-8''%C3%A9t%C3%A9.tar")
        self.assertEqual(params["filename"], "\u00e9t\u00e9.tar")


###############################################################################
# Packages: safe unpacking ####################################################
###############################################################################

class PackageUnpackTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.addCleanup(kill_processes_in, self.tmp)
        self.dest = os.path.join(self.tmp, "dest")
        os.mkdir(self.dest)

    def unpack(self, data, max_bytes=0):
        shutil.rmtree(self.dest)
        os.mkdir(self.dest)
        archive = os.path.join(self.tmp, "package")
        with open(archive, "wb") as file:
            file.write(data)
        ipd.unpack_package(archive, self.dest, max_bytes)

    def outside(self):
        """Everything in tmp that is not the archive or dest."""
        return sorted(set(os.listdir(self.tmp)) - {"dest", "package"})

    def test_tar_gz_with_folders_modes_and_links(self):
        self.unpack(tar_with(
            (tar_info("./app/", tarfile.DIRTYPE, mode=0o755), None),
            (tar_info("./app/run", size=3, mode=0o4755), b"abc"),
            (tar_info("app/link", tarfile.SYMTYPE, linkname="run"), None),
            (tar_info("app/hard", tarfile.LNKTYPE, linkname="app/run"), None)))
        run = os.path.join(self.dest, "app", "run")
        self.assertEqual(read_bytes(run), b"abc")
        self.assertEqual(stat.S_IMODE(os.stat(run).st_mode), 0o755)  # no setuid
        self.assertEqual(os.readlink(os.path.join(self.dest, "app", "link")), "run")
        self.assertEqual(read_bytes(os.path.join(self.dest, "app", "hard")),
                         b"abc")

    def test_formats_known_by_content(self):
        for mode in ("w", "w:gz", "w:bz2", "w:xz"):
            with self.subTest(mode=mode):
                self.unpack(tar_bytes({"a.txt": b"hi"}, mode))
                self.assertEqual(os.listdir(self.dest), ["a.txt"])
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zipped:
            info = zipfile.ZipInfo("bin/control.sh")
            info.external_attr = (0o100755) << 16
            zipped.writestr(info, "#!/bin/sh\n")
        self.unpack(out.getvalue())
        self.assertTrue(os.access(os.path.join(self.dest, "bin", "control.sh"),
                                  os.X_OK))

    def test_not_an_archive(self):
        for data in (b"", b"hello world" * 100, b"\x1f\x8b\x08garbage",
                     b"PK\x03\x04broken"):
            with self.subTest(data=data[:10]):
                with self.assertRaises(ipd.BadRequest):
                    self.unpack(data)

    def test_corrupt_gzip_checksum_is_refused(self):
        data = bytearray(tar_bytes({"control.sh": (b"#!/bin/sh\nexit 1\n", 0o755)}))
        data[-8] ^= 0xFF  # the CRC-32 in gzip's trailer
        with self.assertRaisesRegex(ipd.BadRequest, "not a valid"):
            self.unpack(bytes(data))

    def test_traversal_corpus_is_refused(self):
        corpus = {
            "dot-dot": [(tar_info("../evil", size=1), b"x")],
            "nested dot-dot": [(tar_info("a/../../evil", size=1), b"x")],
            "absolute": [(tar_info("/tmp/evil-ipd", size=1), b"x")],
            "symlink out": [(tar_info("out", tarfile.SYMTYPE, linkname="../"), None)],
            "absolute symlink": [(tar_info("out", tarfile.SYMTYPE,
                                           linkname="/etc"), None)],
            "write through symlink": [
                (tar_info("link", tarfile.SYMTYPE, linkname="."), None),
                (tar_info("link/evil", size=1), b"x")],
            "symlink then file over it": [
                (tar_info("link", tarfile.SYMTYPE, linkname="x"), None),
                (tar_info("link", size=1), b"x")],
            "hard link out": [(tar_info("hard", tarfile.LNKTYPE,
                                        linkname="../../etc/passwd"), None)],
            "hard link to nothing": [(tar_info("hard", tarfile.LNKTYPE,
                                              linkname="missing"), None)],
            "device": [(tar_info("dev", tarfile.CHRTYPE), None)],
            "block device": [(tar_info("blk", tarfile.BLKTYPE), None)],
            "fifo": [(tar_info("fifo", tarfile.FIFOTYPE), None)],
            "backslash": [(tar_info("..\\evil", size=1), b"x")],
        }
        for name, entries in corpus.items():
            with self.subTest(name):
                with self.assertRaises(ipd.BadRequest):
                    self.unpack(tar_with(*entries))
                self.assertEqual(self.outside(), [])
        self.assertFalse(os.path.exists("/tmp/evil-ipd"))

    def test_zip_traversal_is_refused(self):
        for name in ("../evil", "/abs", "C:/evil", "c:evil", "a\\..\\..\\evil"):
            with self.subTest(name):
                out = io.BytesIO()
                with zipfile.ZipFile(out, "w") as zipped:
                    zipped.writestr(zipfile.ZipInfo(name), "x")
                with self.assertRaises(ipd.BadRequest):
                    self.unpack(out.getvalue())
                self.assertEqual(self.outside(), [])

    def test_decompression_bomb_stops_at_the_limit(self):
        bomb = tar_bytes({"zeros": b"\0" * (8 << 20)})
        self.assertLess(len(bomb), 100000)
        with self.assertRaises(ipd.TooLarge):
            self.unpack(bomb, max_bytes=1 << 20)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zipped:
            zipped.writestr("zeros", b"\0" * (8 << 20))
        with self.assertRaises(ipd.TooLarge):
            self.unpack(out.getvalue(), max_bytes=1 << 20)


class UnpackLimitTests(unittest.TestCase):
    """Issue 14: links resolved against what was written, caps on headers,
    names, entries and trailing bytes, bounded zip reads, masked modes."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp)
        self.addCleanup(kill_processes_in, self.tmp)
        self.dest = os.path.join(self.tmp, "dest")

    def unpack(self, data, max_bytes=0, **limits):
        shutil.rmtree(self.dest, True)
        os.mkdir(self.dest)
        archive = os.path.join(self.tmp, "package")
        with open(archive, "wb") as file:
            file.write(data)
        settings = ipd.Settings(limits) if limits else None
        ipd.unpack_package(archive, self.dest, max_bytes, ipd.PackageLimits(settings))

    def test_symlink_chain_corpus_is_refused(self):
        deep = "/".join(["b"] * 8 + [".."] * 9)
        corpus = {
            "chain through a link to .": [
                (tar_info("b", tarfile.SYMTYPE, linkname="."), None),
                (tar_info("x", tarfile.SYMTYPE, linkname=deep), None)],
            "link made later where a target passed": [
                (tar_info("x", tarfile.SYMTYPE, linkname="d/.."), None),
                (tar_info("d", tarfile.SYMTYPE, linkname="."), None)],
            "chain in a folder": [
                (tar_info("a/", tarfile.DIRTYPE, mode=0o755), None),
                (tar_info("a/up", tarfile.SYMTYPE, linkname=".."), None),
                (tar_info("a/x", tarfile.SYMTYPE, linkname="up/up/etc"), None)],
            "passwd": [(tar_info("passwd", tarfile.SYMTYPE,
                                 linkname="../" * 12 + "etc/passwd"), None)],
            "users file": [(tar_info("users", tarfile.SYMTYPE,
                                     linkname="../../users.txt"), None)],
        }
        for name, entries in corpus.items():
            with self.subTest(name):
                with self.assertRaisesRegex(ipd.BadRequest, "link"):
                    self.unpack(tar_with(*entries))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zipped:
            for name, target in (("b", "."), ("x", deep)):
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o120777 << 16
                zipped.writestr(info, target)
        with self.assertRaisesRegex(ipd.BadRequest, "link"):
            self.unpack(out.getvalue())

    def test_links_inside_still_work(self):
        self.unpack(tar_with(
            (tar_info("etc/", tarfile.DIRTYPE, mode=0o755), None),
            (tar_info("etc/app.conf", size=2), b"ok"),
            (tar_info("bin/", tarfile.DIRTYPE, mode=0o755), None),
            (tar_info("bin/conf", tarfile.SYMTYPE, linkname="../etc/app.conf"), None),
            (tar_info("current", tarfile.SYMTYPE, linkname="bin"), None),
            (tar_info("alias", tarfile.SYMTYPE, linkname="current"), None)))
        self.assertEqual(read_text(os.path.join(self.dest, "bin", "conf")), "ok")

    def test_header_bombs_are_refused_before_they_are_read(self):
        for kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                     tarfile.XHDTYPE, tarfile.XGLTYPE):
            with self.subTest(kind=kind):
                bomb = header_bomb(kind)
                self.assertLess(len(bomb), 1600)
                # CPU seconds: the work done, which a busy machine does not
                # stretch as it stretches the wall clock
                started = time.process_time()
                with self.assertRaisesRegex(ipd.BadRequest, "MAX_HEADER_SIZE"):
                    self.unpack(bomb)
                self.assertLess(time.process_time() - started, 2)

    def test_long_names_and_link_targets_are_capped(self):
        long = "d/" * 40 + "f"
        with self.assertRaisesRegex(ipd.BadRequest, "MAX_NAME_SIZE"):
            self.unpack(tar_bytes({long: b"x"}, "w"), MAX_NAME_SIZE=64)
        with self.assertRaisesRegex(ipd.BadRequest, "MAX_NAME_SIZE"):
            self.unpack(tar_with((tar_info("l", tarfile.SYMTYPE,
                                           linkname="a" * 100), None)),
                        MAX_NAME_SIZE=64)
        # a pax record over the cap: refused by its header size
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tar_info("f", size=1)
            info.pax_headers = {"comment": "c" * 200000}
            tar.addfile(info, io.BytesIO(b"x"))
        with self.assertRaisesRegex(ipd.BadRequest, "MAX_HEADER_SIZE"):
            self.unpack(out.getvalue())
        self.unpack(tar_bytes({"d/" * 30 + "f": b"x"}, "w"))  # under the default

    def test_zip_link_targets_are_read_in_bounded_pieces(self):
        with self.assertRaisesRegex(ipd.BadRequest, "deflate"):
            self.unpack(zip_link(b"a" * (1 << 20), zipfile.ZIP_BZIP2))
        big = zip_link(b"a" * soak(64 << 20, 8 << 20), zipfile.ZIP_DEFLATED)
        with self.assertRaisesRegex(ipd.BadRequest, "MAX_NAME_SIZE"):
            self.unpack(big)

    def test_entry_count_is_capped(self):
        with self.assertRaisesRegex(ipd.BadRequest, "MAX_MEMBERS"):
            self.unpack(many_members_tar(60), MAX_MEMBERS=50)
        self.unpack(many_members_tar(50), MAX_MEMBERS=50)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zipped:
            for number in range(60):
                zipped.writestr("f%d" % number, "")
        with self.assertRaisesRegex(ipd.BadRequest, "MAX_MEMBERS"):
            self.unpack(out.getvalue(), MAX_MEMBERS=50)
        self.assertEqual(os.listdir(self.dest), [])  # refused before a file
        # a zip whose end record claims 200,000 entries
        data = bytearray(out.getvalue())
        end = data.rfind(b"PK\x05\x06")
        data[end + 8:end + 12] = (0xFFFF).to_bytes(2, "little") * 2
        with self.assertRaisesRegex(ipd.BadRequest, "MAX_MEMBERS"):
            self.unpack(bytes(data))

    def test_bytes_after_the_end_of_a_tar_are_bounded(self):
        tar = tar_bytes({"a": b"x"}, "w")
        bomb = bz2.compress(tar) + bz2_runs(b"\0", 10 << 30)
        self.assertLess(len(bomb), 20000)
        started = time.process_time()  # CPU seconds, as above
        with self.assertRaisesRegex(ipd.BadRequest, "MAX_TRAILING_SIZE"):
            self.unpack(bomb)
        self.assertLess(time.process_time() - started, 3)
        self.unpack(bz2.compress(tar + b"\0" * 100000))  # padding is fine

    def test_modes_are_masked(self):
        self.unpack(tar_with(
            (tar_info("d/", tarfile.DIRTYPE, mode=0o777), None),
            (tar_info("d/w", size=1, mode=0o777), b"x"),
            (tar_info("g", size=1, mode=0o6666), b"x")))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dest, "d")).st_mode),
                         0o755)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dest, "d", "w"))
                                      .st_mode), 0o755)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.dest, "g")).st_mode),
                         0o644)


class PackageBombTests(DaemonTestCase):
    """Issue 14: the 1 KB bombs against the real daemon: 400, and its peak
    memory stays under 64 MiB.  Outside the soak, 4,000 members against a
    MAX_MEMBERS of 1,000, and an 8 MiB link target."""
    settings = {} if SOAK else {"MAX_MEMBERS": "1000"}

    def peak_rss_kib(self):
        with open("/proc/%d/status" % self.daemon.process.pid) as file:
            return int(re.search(r"VmHWM:\s+(\d+)", file.read()).group(1))

    def test_bombs_are_refused_with_flat_memory(self):
        bombs = {
            "GNU long name": header_bomb(tarfile.GNUTYPE_LONGNAME),
            "pax header": header_bomb(tarfile.XHDTYPE),
            "zip bzip2 link": zip_link(b"a" * soak(64 << 20, 1 << 20), zipfile.ZIP_BZIP2),
            "zip deflate link": zip_link(b"a" * soak(64 << 20, 8 << 20),
                                         zipfile.ZIP_DEFLATED),
            "trailing zeros": bz2.compress(tar_bytes({"a": b"x"}, "w"))
            + bz2_runs(b"\0", 10 << 30),
            "{:,} entries".format(soak(200000, 4000)):
                many_members_tar(soak(200000, 4000)),
        }
        for name, bomb in bombs.items():
            with self.subTest(name):
                started = time.monotonic()
                status, _, body = self.daemon.upload("app", bomb)
                self.assertEqual(status, 400, body)
                report("bomb %s (%d bytes): 400 in %.2fs: %s" % (
                    name, len(bomb), time.monotonic() - started, body.strip()))
        peak = self.peak_rss_kib()
        report("peak RSS after the bombs: %.1f MiB" % (peak / 1024))
        self.assertLess(peak, 64 * 1024)
        self.assertEqual(self.daemon.leftovers(), [])


class FileNameTests(DaemonTestCase):
    """File names recorded as browsers and clients mean them."""

    def test_names_as_browsers_send_them(self):
        project_dir = os.path.join(self.daemon.upload_dir, "app")
        os.makedirs(project_dir)
        with open(os.path.join(project_dir, "control.sh"), "w") as file:
            file.write("#!/bin/sh\nexit 1\n")
        os.chmod(os.path.join(project_dir, "control.sh"), 0o755)
        cases = [(b'filename="a%22b.bin"', 'a"b.bin'),
                 (b'filename="a\\b.bin"', "a\\b.bin"),
                 (b'filename="C:\\Users\\x\\a.png"', "a.png"),
                 (b'filename="a"b.bin"', 'a"b.bin'),
                 (b"filename*=UTF-8'en'%C3%A9t%C3%A9.tar; filename=\"ete.tar\"",
                  "\u00e9t\u00e9.tar"),
                 (b"filename=\"fallback.tar\"; filename*=koi8-r''%C1", "fallback.tar"),
                 ("filename=\"\u00e9t\u00e9.bin\"".encode(), "\u00e9t\u00e9.bin"),
                 (b'filename="dir/sub/n.bin"', "n.bin")]
        for disposition, expected in cases:
            with self.subTest(expected):
                body = (b'--b\r\nContent-Disposition: form-data; name="project"\r\n\r\n'
                        b'app\r\n--b\r\nContent-Disposition: form-data; name="image"; '
                        + disposition + b'\r\n\r\nimage bytes\r\n--b\r\n'
                        b'Content-Disposition: form-data; name="force"\r\n\r\n1\r\n'
                        b'--b--\r\n')
                status, _, text = self.daemon.request(
                    "POST", "/upload", body=body,
                    headers={"Content-Type": "multipart/form-data; boundary=b"})
                self.assertEqual(status, 202, text)
                _, record = self.daemon.get_json("/status/app/" + text.strip())
                self.assertEqual(record["files"]["image"]["name"], expected)


###############################################################################
# Processes: who runs the scripts, and what they leave ########################
###############################################################################

class RunAsSettingTests(unittest.TestCase):
    """Issue 14: RUN_AS and SCRIPTS as settings, and the unit's drop-in."""

    def test_run_as_forms(self):
        run_as = ipd.resolve_run_as("64123:64123,64124,64125")
        self.assertEqual((run_as.uid, run_as.gid, run_as.groups),
                         (64123, 64123, (64124, 64125)))
        nobody = ipd.resolve_run_as("nobody")
        self.assertEqual(nobody.uid, ipd.pwd.getpwnam("nobody").pw_uid)
        for bad in ("root", "0:0", "64123:0", "64123", "no-such-user-ipd:1",
                    "64123:no-such-group-ipd", ":1", "64123:"):
            with self.subTest(bad):
                with self.assertRaises(ValueError):
                    ipd.resolve_run_as(bad)
        with self.assertRaisesRegex(ipd.ConfigError, "RUN_AS"):
            ipd.load_settings(os.devnull, {"RUN_AS": "root"})
        with self.assertRaisesRegex(ipd.ConfigError, "SCRIPTS"):
            ipd.load_settings(os.devnull, {"SCRIPTS": "maybe"})

    def daemon_as_another_uid(self, settings, *privileges):
        """A DaemonProcess whose folder belongs to DAEMON_UID, started by
        setpriv as that uid with only privileges (setpriv options)."""
        python = reachable_python()
        if os.geteuid() != 0 or not python or not shutil.which("setpriv"):
            self.skipTest("needs root, setpriv and a Python other users may run")
        tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.addCleanup(kill_processes_in, tmp)
        program = os.path.join(tmp, "ipd.py")
        shutil.copy(IPD, program)
        daemon = DaemonProcess(tmp, settings, program=program)
        os.makedirs(daemon.upload_dir, exist_ok=True)  # ipd makes no folder
        for name in os.listdir(tmp) + [""]:
            os.chown(os.path.join(tmp, name), DAEMON_UID, DAEMON_UID)
        daemon.start_command = ["setpriv", "--reuid=%d" % DAEMON_UID, "--regid=%d"
                                % DAEMON_UID, "--clear-groups"] + list(privileges) \
            + [python]
        return daemon

    def test_unprivileged_daemon_without_capabilities_refuses_run_as(self):
        daemon = self.daemon_as_another_uid(
            {"RUN_AS": "%d:%d" % (SCRIPTS_UID, SCRIPTS_GID)})
        with self.assertRaisesRegex(AssertionError, "RUN_AS needs ipd to run as "
                                    "root or with CAP_SETUID, CAP_SETGID, CAP_KILL"):
            daemon.start()
        self.assertEqual(daemon.stop(), 2)

    def test_scripts_of_a_capable_daemon_without_run_as_get_no_capability(self):
        daemon = self.daemon_as_another_uid(
            {}, "--inh-caps=-all,+setuid,+setgid,+kill",
            "--ambient-caps=-all,+setuid,+setgid,+kill",
            "--bounding-set=-all,+setuid,+setgid,+kill")
        daemon.start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        deployment = daemon.deploy("grep -E '^Cap(Prm|Eff|Amb)' /proc/self/status\n"
                                   "id -u\nexit 1\n")
        self.assertEqual(daemon.wait_state("app", deployment), "ok")
        log = daemon.log("app", deployment)
        self.assertRegex(log, r"CapPrm:\s+0+\nCapEff:\s+0+\nCapAmb:\s+0+\n%d"
                         % DAEMON_UID)

    def test_drop_in_grants_three_capabilities_and_no_docker(self):
        text = read_text(os.path.join(HERE, "ipd-run-as.conf"))
        wanted = {"CAP_SETUID", "CAP_SETGID", "CAP_KILL"}
        for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
            values = re.findall(r"(?m)^%s=(.*)$" % key, text)
            self.assertEqual([set(value.split()) for value in values], [wanted])
        self.assertRegex(text, r"(?m)^SupplementaryGroups=$")
        self.assertIn("ipd-run-as.conf", read_text(os.path.join(HERE, "Makefile")))


class ScriptsUserChecks:
    """A daemon whose scripts run as SCRIPTS_UID (RUN_AS), with another
    project's scripts placed by an administrator, and the attacks on it;
    mixed into the test classes below.  Needs root (CI)."""

    daemon_uid = None  # None: the daemon runs as root

    def setUp(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to switch users")
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        os.chmod(self.tmp, 0o711)
        self.canary = "canary-%s" % uuid.uuid4().hex
        # a step's time limit: short where it is what is tested
        timeout = "3" if self._testMethodName.startswith("test_timeout_") else "20"
        settings = {"RUN_AS": "%d:%d,%d" % (SCRIPTS_UID, SCRIPTS_GID, SCRIPTS_GROUP),
                    "STEP_TIMEOUT": timeout}
        program = IPD
        if self.daemon_uid is not None:
            python = reachable_python()
            if not python or not shutil.which("setpriv"):
                self.skipTest("needs setpriv and a Python other users may run")
            program = os.path.join(self.tmp, "ipd.py")
            shutil.copy(IPD, program)
        self.daemon = DaemonProcess(self.tmp, settings, program=program)
        os.chmod(self.daemon.users_file, 0o600)
        self.other = os.path.join(self.daemon.upload_dir, "other")
        os.makedirs(self.other)
        with open(os.path.join(self.other, "control.sh"), "w") as file:
            file.write("#!/bin/sh\necho admin script of other\nexit 1\n")
        os.chmod(os.path.join(self.other, "control.sh"), 0o755)
        web = os.path.join(self.daemon.upload_dir, "web")
        os.makedirs(web)
        with open(os.path.join(web, "notify.sh"), "w") as file:
            file.write('#!/bin/sh\n{ id -u; grep CapEff /proc/self/status; } '
                       '> "$PROJECT_DIR/notified.tmp"\n'
                       'mv "$PROJECT_DIR/notified.tmp" "$PROJECT_DIR/notified"\n')
        os.chmod(os.path.join(web, "notify.sh"), 0o755)
        if self.daemon_uid is not None:
            for root, folders, files in os.walk(self.tmp):
                for name in [root] + [os.path.join(root, n) for n in folders + files]:
                    if not name.startswith(self.other + os.sep):
                        os.chown(name, self.daemon_uid, self.daemon_uid)
            self.daemon.start_command = [
                "setpriv", "--reuid=%d" % self.daemon_uid,
                "--regid=%d" % self.daemon_uid, "--clear-groups",
                "--inh-caps=-all,+setuid,+setgid,+kill",
                "--ambient-caps=-all,+setuid,+setgid,+kill",
                "--bounding-set=-all,+setuid,+setgid,+kill", python]
        self.daemon.start({"IPD_CANARY": self.canary})
        self.addCleanup(self.daemon.stop, signal.SIGKILL)

    def hostile(self):
        return HOSTILE_SCRIPT.format(
            users=self.daemon.users_file, other=self.other, logs=self.tmp,
            deployments=os.path.join(self.daemon.upload_dir, "web", "deployments"))

    def run_hostile(self):
        """Upload the hostile package as the USER dev; -> {attack: outcome}."""
        audit_before = read_text(os.path.join(self.tmp, "audit.log")) \
            if os.path.exists(os.path.join(self.tmp, "audit.log")) else ""
        status, _, body = self.daemon.upload(
            "web", control_script(self.hostile()), image=b"image bytes", user="dev")
        self.assertEqual(status, 202, body)
        deployment = body.strip()
        self.assertEqual(self.daemon.wait_state("web", deployment), "ok")
        log = self.daemon.log("web", deployment)
        outcome = dict(re.findall(r"(?m)^(\w+)=(reached|refused)$", log))
        for attack in ATTACKS:
            self.assertEqual(outcome.get(attack), "refused", "%s\n%s" % (attack, log))
        for allowed in ("read_package", "read_image", "write_project_dir"):
            self.assertEqual(outcome.get(allowed), "reached", "%s\n%s" % (allowed, log))
        for field in ("CapPrm", "CapEff", "CapAmb"):
            self.assertRegex(log, r"%s:\s+0+\n" % field)
        self.assertIn("ids=%d:%d:%d %d" % (SCRIPTS_UID, SCRIPTS_GID, SCRIPTS_GID,
                                           SCRIPTS_GROUP), log)
        work = os.path.join(self.daemon.upload_dir, "web", "work")
        self.assertIn("project_dir=%s" % work, log)
        self.assertEqual(read_text(os.path.join(work, "mine")), "mine\n")
        notified = os.path.join(work, "notified")  # notify.sh: the same user
        deadline = time.monotonic() + 20
        while not os.path.exists(notified) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertRegex(read_text(notified), r"^%d\nCapEff:\s+0+\n" % SCRIPTS_UID)
        # what it failed to reach is as it was
        self.assertEqual(os.listdir(self.other), ["control.sh"])
        audit_text = read_text(os.path.join(self.tmp, "audit.log"))
        self.assertTrue(audit_text.startswith(audit_before))
        self.assertNotIn("forged", audit_text)
        self.assertIn('"user": "dev"', audit_text)
        self.assertNotIn(self.canary, log)
        deployment = self.daemon.deploy("echo $1; exit 1", project="other")
        self.assertEqual(self.daemon.wait_state("other", deployment), "ok")
        self.assertNotIn("planted", self.daemon.log("other", deployment))
        return log

    def test_hostile_control_sh_reaches_nothing_of_ipd(self):
        report("hostile control.sh under RUN_AS (daemon %s): %d attacks refused"
               % ("root" if self.daemon_uid is None else "uid %d" % self.daemon_uid,
                  len(ATTACKS)))
        self.run_hostile()

    def sleeping_script(self):
        """control.sh that records the pid of a background sleep, then
        sleeps itself; -> (script, the file of pids)."""
        pid_file = os.path.join(self.daemon.upload_dir, "web", "work", "pids")
        return """
            sleep 300 &
            echo $! >> %s
            sleep 300
            """ % pid_file, pid_file

    def test_timeout_stops_the_scripts_processes(self):
        script, pid_file = self.sleeping_script()
        status, _, body = self.daemon.upload("web", control_script(script))
        deployment = body.strip()
        self.assertEqual(self.daemon.wait_state("web", deployment, timeout=60),
                         "timeout")
        pids = read_text(pid_file).split()
        self.assertTrue(pids)
        for pid in pids:
            self.assertFalse(process_running(int(pid)), pid)

    def test_cancel_stops_the_scripts_processes(self):
        # STEP_TIMEOUT 20 here: a busy machine's cancel never comes after it
        script, pid_file = self.sleeping_script()
        status, _, body = self.daemon.upload("web", control_script(script))
        deployment = body.strip()
        wait_until(lambda: os.path.exists(pid_file) and read_text(pid_file).split(),
                   message="the background sleep")
        self.daemon.request("POST", "/cancel/web/" + deployment)
        self.assertEqual(self.daemon.wait_state("web", deployment), "cancelled")
        for pid in read_text(pid_file).split():
            self.assertFalse(process_running(int(pid)), pid)

    def test_kill_9_restart_stops_what_was_left(self):
        pids = os.path.join(self.daemon.upload_dir, "web", "work", "pids")
        script = """
            sleep 300 &
            echo $! >> %s
            (setsid sleep 300 & echo $! >> %s.escaped)
            sleep 300
            """ % (pids, pids)
        status, _, body = self.daemon.upload("web", control_script(script))
        deployment = body.strip()
        self.daemon.wait_state("web", deployment, ("active",))
        step = os.path.join(self.daemon.upload_dir, "web", "deployments",
                            deployment + ".step")
        deadline = time.monotonic() + 20
        while not (os.path.exists(step) and os.path.exists(pids)
                   and read_text(pids).strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(read_text(pids).split()[0])
        self.assertTrue(process_running(child))
        self.daemon.kill()
        self.assertTrue(process_running(child))
        self.daemon.start({"IPD_CANARY": self.canary})
        self.assertEqual(self.daemon.state("web", deployment), "interrupted")
        self.assertFalse(process_running(child))
        escaped = os.path.exists(pids + ".escaped") and \
            int(read_text(pids + ".escaped").split()[0])
        if escaped and process_running(escaped):
            # left its session: out of ipd's reach, as it says (README)
            os.kill(escaped, signal.SIGKILL)


class ScriptsUserTests(ScriptsUserChecks, unittest.TestCase):
    """Issue 14: RUN_AS, ipd itself running as root."""

    def test_project_conf_gives_a_project_its_own_user(self):
        conf = os.path.join(self.other, "project.conf")
        with open(conf, "w") as file:
            file.write("RUN_AS=64125:64125\n")
        deployment = self.daemon.deploy('id -u; echo x > "$PROJECT_DIR/own"; exit 1',
                                        project="other")
        self.assertEqual(self.daemon.wait_state("other", deployment), "ok")
        self.assertIn("64125\n", self.daemon.log("other", deployment))
        other_work = os.path.join(self.other, "work")
        self.assertEqual(os.stat(os.path.join(other_work, "own")).st_uid, 64125)
        deployment = self.daemon.deploy(
            'echo x > %s/planted && echo reached; id -u; exit 1' % other_work,
            project="web")
        self.assertEqual(self.daemon.wait_state("web", deployment), "ok")
        log = self.daemon.log("web", deployment)
        self.assertNotIn("reached", log)
        self.assertIn("%d\n" % SCRIPTS_UID, log)

    def test_start_warns_when_the_users_file_is_within_reach(self):
        self.assertIn("RUN_AS=", self.daemon.daemon_log("RUN_AS="))
        self.assertNotIn("within reach", self.daemon.daemon_log())
        os.chmod(self.daemon.users_file, 0o644)  # the original's: touch
        self.daemon.restart()
        self.assertIn("users.txt was open to others: made it 640\n",
                      self.daemon.daemon_log("open to others"))
        self.assertEqual(stat.S_IMODE(os.stat(self.daemon.users_file).st_mode), 0o640)
        os.chown(self.daemon.users_file, 0, SCRIPTS_GID)
        self.daemon.restart()
        self.assertIn("users.txt is within reach of the scripts' user",
                      self.daemon.daemon_log("within reach"))


class UnprivilegedDaemonTests(ScriptsUserChecks, unittest.TestCase):
    """Issue 14: RUN_AS, ipd running as an unprivileged uid with only
    CAP_SETUID, CAP_SETGID and CAP_KILL, as ipd-run-as.conf sets it up."""
    system = True  # the same on every Python: once per CI run

    daemon_uid = DAEMON_UID

    def test_daemon_keeps_only_its_capabilities(self):
        with open("/proc/%d/status" % self.daemon.process.pid) as file:
            status = file.read()
        self.assertRegex(status, r"Uid:\s+%d\s+%d\s+0\s" % ((DAEMON_UID,) * 2))
        self.assertRegex(status, r"CapEff:\s+0+e0\n")


class RunAsIsolationTests(DaemonTestCase):
    # issue 23, item 4: with a RUN_AS user per project, one project's
    # scripts read nothing of another's deployments.  Needs root (CI).
    users_of = {"web": (64123, 64123), "docs": (64125, 64125)}

    def setUp(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to switch users")
        super().setUp()
        os.chmod(self.tmp, 0o711)
        for project, (uid, gid) in self.users_of.items():
            folder = os.path.join(self.daemon.upload_dir, project)
            os.makedirs(folder)
            with open(os.path.join(folder, "project.conf"), "w") as file:
                file.write("RUN_AS=%d:%d\n" % (uid, gid))
            os.chmod(os.path.join(folder, "project.conf"), 0o644)

    def test_a_project_reads_nothing_of_another_projects_deployments(self):
        own = ('[ "$1" = deploy ] || exit 1\n'
               'cat ./secret.txt > /dev/null && echo own_package=reached\n'
               'cat "$IMAGE" > /dev/null && echo own_image=reached\nexit 1\n')
        package = tar_bytes({"control.sh": (("#!/bin/sh\n" + own).encode(), 0o755),
                             "secret.txt": b"web's package secret"})
        status, _, web = self.daemon.upload("web", package, image=b"web's image")
        self.assertEqual(status, 202, web)
        web = web.strip()
        self.assertEqual(self.daemon.wait_state("web", web), "ok")
        self.assertIn("own_package=reached", self.daemon.log("web", web))
        self.assertIn("own_image=reached", self.daemon.log("web", web))
        folder = os.path.join(self.daemon.upload_dir, "web", "deployments")
        tries = {"read_package": "cat %s/%s/secret.txt" % (folder, web),
                 "list_package": "ls %s/%s" % (folder, web),
                 "read_image": "cat %s/%s.image" % (folder, web)}
        script = '[ "$1" = deploy ] || exit 1\n' + "".join(
            "if %s > /dev/null 2>&1; then echo %s=reached; else echo %s=refused; fi\n"
            % (command, name, name) for name, command in tries.items()) + "exit 1\n"
        docs = self.daemon.deploy(script, project="docs")
        self.assertEqual(self.daemon.wait_state("docs", docs), "ok")
        log = self.daemon.log("docs", docs)
        for name in tries:
            self.assertIn("%s=refused" % name, log)
        info = os.stat(os.path.join(folder, web))
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_gid), (0o750, 64123))
        info = os.stat(os.path.join(folder, web + ".image"))
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_gid), (0o640, 64123))


class ServerScriptsTests(DaemonTestCase):
    """Issue 14: SCRIPTS=server, and project.conf set by an administrator."""

    settings = {"SCRIPTS": "server"}

    def place(self, project, name, text, mode=0o755):
        folder = os.path.join(self.daemon.upload_dir, project)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        with open(path, "w") as file:
            file.write(text)
        os.chmod(path, mode)
        return path

    def test_package_with_control_sh_is_refused(self):
        self.place("app", "control.sh", "#!/bin/sh\necho server script\nexit 1\n")
        status, _, body = self.daemon.upload("app", control_script(OK_SCRIPT))
        self.assertEqual(status, 400)
        self.assertIn("SCRIPTS=server", body)
        self.assertEqual(self.daemon.leftovers(), [])
        self.assertFalse(os.path.exists(os.path.join(self.daemon.upload_dir, "app",
                                                     "deployments")))
        status, _, body = self.daemon.upload("app", tar_bytes({"data.txt": b"x"}))
        self.assertEqual(status, 202, body)
        self.assertEqual(self.daemon.wait_state("app", body.strip()), "ok")
        self.assertIn("server script", self.daemon.log("app", body.strip()))

    def test_project_conf_overrides_for_one_project(self):
        self.place("open", "project.conf", "SCRIPTS=package\n", 0o644)
        deployment = self.daemon.deploy(project="open")
        self.assertEqual(self.daemon.wait_state("open", deployment), "ok")
        status, _, body = self.daemon.upload("app", control_script(OK_SCRIPT))
        self.assertEqual(status, 400)
        # a project.conf others may write is no administrator's: refused
        os.chmod(os.path.join(self.daemon.upload_dir, "open", "project.conf"), 0o666)
        status, _, body = self.daemon.upload("open", control_script(OK_SCRIPT))
        self.assertEqual(status, 500)
        self.assertIn("not an administrator's file", body)
        self.place("bad", "project.conf", "LISTEN=0.0.0.0:1\n", 0o644)
        status, _, body = self.daemon.upload("bad", control_script(OK_SCRIPT))
        self.assertEqual(status, 500)

    def test_start_says_what_package_mode_means(self):
        self.assertNotIn("SCRIPTS=package:", self.daemon.daemon_log())
        self.assertIn("RUN_AS is not set", self.daemon.daemon_log())
        other = DaemonProcess(os.path.join(self.tmp, "second")).start()
        self.addCleanup(other.stop, signal.SIGKILL)
        text = other.daemon_log("SCRIPTS=package")
        self.assertEqual(text.count("SCRIPTS=package: a USER"), 1)


class StepSessionTests(DaemonTestCase):
    # issue 23, item 8: a step ends with all it started in its session, and
    # a script no longer allowed does not run

    def test_a_child_in_a_process_group_of_its_own_ends_with_its_step(self):
        pid_file = os.path.join(self.tmp, "child.pid")
        child = ("import os, time\nos.setpgid(0, 0)\nopen(%r + '.tmp', 'w').write("
                 "str(os.getpid()))\nos.rename(%r + '.tmp', %r)\ntime.sleep(120)\n"
                 % (pid_file, pid_file, pid_file))
        program = os.path.join(self.tmp, "child.py")
        with open(program, "w") as file:
            file.write(child)
        script = ('[ "$1" = deploy ] && { %s %s > /dev/null 2>&1 &\n'
                  'while [ ! -e %s ]; do sleep 0.02; done; }\nexit 1\n'
                  % (sys.executable, program, pid_file))
        deployment = self.daemon.deploy(script)
        self.assertEqual(self.daemon.wait_state("app", deployment), "ok")
        pid = int(read_text(pid_file))
        # gone by the time the state says the step ended
        self.assertFalse(process_running(pid), "the child outlived its step")

    def test_a_waiting_deployment_whose_script_is_no_longer_allowed(self):
        gate = os.path.join(self.tmp, "gate")
        running = self.daemon.deploy(gate_script(gate))
        self.daemon.wait_state("app", running, ("active",))
        waiting = self.daemon.deploy(OK_SCRIPT + "# the package's own\n")
        self.assertEqual(self.daemon.state("app", waiting), "await")
        conf = os.path.join(self.daemon.upload_dir, "app", "project.conf")
        with open(conf, "w") as file:
            file.write("SCRIPTS=server\n")
        os.chmod(conf, 0o644)
        open(gate, "w").close()
        self.assertEqual(self.daemon.wait_state("app", running), "ok")
        self.assertEqual(self.daemon.wait_state("app", waiting), "126")
        log = self.daemon.log("app", waiting)
        self.assertIn("not run", log)
        self.assertIn("SCRIPTS=server", log)
        self.assertNotIn("step check", log)


###############################################################################
# Deployments: the one owner of their state ###################################
###############################################################################

class DeploymentStoreTests(unittest.TestCase):
    """The one owner of deployment state (DeploymentStore: records, queue,
    cancel requests, counters) called directly, with no HTTP and no
    sleep: each race reached by order, not by timing."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        self.audit = AuditRecorder()
        ipd.audit.addHandler(self.audit)
        self.addCleanup(ipd.audit.removeHandler, self.audit)
        self.addCleanup(ipd.audit.setLevel, ipd.audit.level)
        ipd.audit.setLevel(logging.INFO)
        self.store = self.open_store()

    def open_store(self, after_final=None):
        return ipd.DeploymentStore(self.tmp, 10, after_final=after_final)

    def commit(self, project="app", store=None):
        store = store or self.store
        staging = tempfile.mkdtemp(dir=self.tmp, prefix=".upload-")
        record = ipd.Deployment(str(uuid.uuid4()), project, None, "admin",
                                {"image": {"name": "i", "size": 1, "sha256": "ab"}},
                                "/bin/true")
        return store.commit(record, staging, {}, ("upload", {
            "project": project, "deployment": record.id}), received=1)

    def cancel(self, deployment_id, store=None):
        return (store or self.store).cancel(deployment_id, "admin", "127.0.0.1")

    def state_file(self, record):
        return json.loads(read_text(self.store.path(record, ".json")))

    def counts(self, store=None):
        stats = (store or self.store).statistics()
        return {"queue": stats["queue"], "running": stats["running"]}

    def test_an_old_state_file_loads_and_keeps_its_format(self):
        record = self.commit()
        path = self.store.path(record, ".json")
        old = {"id": record.id, "project": "app", "seq": 7, "state": "ok",
               "created": 1.0, "started": 2.0, "ended": 4.5, "user": "bob",
               "files": {}, "control": "/x/control.sh", "steps": [],
               "superseded_by": None, "a_later_field": [1]}  # no version, signer...
        with open(path, "w") as file:
            json.dump(old, file)
        store = self.open_store()
        self.assertEqual(store.load(), 1)
        loaded = store.get(record.id)
        self.assertEqual((loaded.seq, loaded.state, loaded.signer, loaded.pruned,
                          loaded.recipe), (7, "ok", None, False, False))
        self.assertEqual(loaded.to_disk(), dict(old, version=ipd.STATE_FORMAT_VERSION,
                                                signer=None, pruned=False, recipe=False))
        self.assertEqual(loaded.public(), {
            "project": "app", "deployment": record.id, "state": "ok",
            "created": ipd.iso_time(1.0), "started": ipd.iso_time(2.0),
            "ended": ipd.iso_time(4.5), "duration": 2.5, "user": "bob", "files": {},
            "steps": [], "pruned": False, "signer": None})
        self.assertEqual(store.statistics()["states"], {"ok": 1})
        store.update(record.id, pruned=True)
        self.assertEqual(self.state_file(record), dict(
            old, version=ipd.STATE_FORMAT_VERSION, signer=None, pruned=True,
            recipe=False))  # what an older ipd reads back

    def test_a_copy_has_every_field(self):
        record = ipd.Deployment("i", "p")
        containers = {"files": {"image": {"size": 1}}, "steps": [{"step": "check"}],
                      "signer": {"principal": "ci"}}
        for number, key in enumerate(ipd.Deployment.FIELDS):
            setattr(record, key, containers.get(key, number))
        record.others = {"superseded_by": "x"}
        copy = record.copy()
        self.assertEqual([getattr(copy, key) for key in ipd.Deployment.FIELDS],
                         [getattr(record, key) for key in ipd.Deployment.FIELDS])
        self.assertEqual((copy.others, copy.to_disk()), (record.others, record.to_disk()))

    def test_the_store_hands_out_copies(self):
        record = self.commit()
        record.state = "ok"
        record.files["image"]["name"] = "changed by a caller"
        copy = self.store.get(record.id)
        self.assertEqual((copy.state, copy.files["image"]["name"]), ("await", "i"))
        copy.steps.append({"step": "check"})
        self.assertEqual(self.store.get(record.id).steps, [])
        self.assertIsNot(self.store.get(record.id), self.store.get(record.id))

    def test_every_change_is_audited_and_counted_in_order(self):
        record = self.commit()
        self.assertEqual(self.store.claim().id, record.id)
        self.store.update(record.id, steps=[{"step": "check", "code": 1, "seconds": 0.2}])
        self.store.update(record.id, state="ok", ended=time.time())
        self.store.release(record)
        self.assertEqual(self.audit.states(record.id), [
            ("upload", None), ("state", "active"), ("state", "ok")])
        stats = self.store.statistics()
        self.assertEqual((stats["deployments"], stats["states"], stats["durations"]["count"],
                          stats["uploads"], stats["queue"], stats["running"]),
                         (1, {"ok": 1}, 1, 1, 0, 0))
        text = self.store.metrics_text({}, {})
        self.assertIn('ipd_deployments{project="app",state="ok"} 1\n', text)
        self.assertIn('ipd_step_duration_seconds_count{step="check"} 1\n', text)
        store = self.open_store()  # the same figures from disk alone
        store.load()
        self.assertEqual(store.statistics()["states"], stats["states"])

    def test_a_second_cancel_after_the_workers_last_update_is_409(self):
        record = self.commit()
        claimed = self.store.claim()
        self.assertEqual(self.cancel(record.id).state, "active")  # asked
        self.assertTrue(self.store.cancel_requested(record.id).is_set())
        self.store.update(record.id, state="cancelled", ended=time.time())
        with self.assertRaises(ipd.Conflict):  # not yet released: the state says
            self.cancel(record.id)
        self.store.release(claimed)
        with self.assertRaises(ipd.Conflict):
            self.cancel(record.id)
        self.assertEqual(self.counts(), {"queue": 0, "running": 0})

    def test_a_cancel_once_the_end_shows_is_409(self):
        # after_final runs once the end is visible, before the worker lets
        # the deployment go: a cancel then is refused, never answered 200
        answers = []

        def cancel_on_end(record):
            try:
                answers.append(self.cancel(record.id).state)
            except ipd.Conflict as error:
                answers.append(str(error))
        self.store = self.open_store(after_final=cancel_on_end)
        record = self.commit()
        claimed = self.store.claim()
        self.store.update(record.id, state="ok", ended=time.time())
        self.assertEqual(answers, ["deployment %s has ended already: ok" % record.id])
        self.assertFalse(self.store.cancel_requested(record.id).is_set())
        self.store.release(claimed)

    def test_a_cancel_is_announced_before_it_takes_effect(self):
        # Who cancelled (the log line, the audit event) is written before
        # the state it explains can show: a follower of the log, notify.sh
        # and the audit log never see 'cancelled' without it.
        running = self.commit()
        claimed = self.store.claim()
        waiting = self.commit()  # the same project: it waits
        stop = self.store.cancel_requested(running.id)
        log_path = self.store.path(waiting, ".log")
        os.remove(log_path)
        os.mkdir(log_path)  # the log cannot be written: nothing is cancelled
        with self.assertRaises(OSError):
            self.cancel(waiting.id)
        self.assertEqual(self.store.get(waiting.id).state, "await")
        os.rmdir(log_path)
        self.assertEqual(self.cancel(waiting.id).state, "cancelled")
        self.assertEqual(self.audit.states(waiting.id), [
            ("upload", None), ("cancel", None), ("state", "cancelled")])
        self.assertIn("ipd: cancelled by admin from 127.0.0.1", read_text(log_path))
        self.assertEqual(self.cancel(running.id).state, "active")
        self.assertTrue(stop.is_set())
        self.assertIn("ipd: cancelled by admin", read_text(self.store.path(running, ".log")))
        self.store.update(running.id, state="cancelled", ended=time.time())
        for record in (waiting, running):  # ended: refused, not announced
            with self.assertRaises(ipd.Conflict):
                self.cancel(record.id)
        self.assertEqual([event["event"] for event in self.audit.events].count("cancel"), 2)
        self.store.release(claimed)

    def test_a_hanging_notify_sh_holds_up_nothing(self):
        # notify.sh waits for a gate opened only after the final state is
        # written and the project's next deployment claimed: were it run on
        # the writer's thread, the update would not return
        project_dir = self.store.project_dir("app")
        os.makedirs(project_dir)
        gate, started, ended = (os.path.join(self.tmp, name)
                                for name in ("gate", "started", "ended"))
        with open(os.path.join(project_dir, "notify.sh"), "w") as file:
            file.write("#!/bin/sh\ntouch %s\nwhile [ ! -e %s ]; do sleep 0.02; done\n"
                       "touch %s\n" % (started, gate, ended))
        os.chmod(os.path.join(project_dir, "notify.sh"), 0o755)
        settings = ipd.load_settings(os.devnull, environ={
            "UPLOAD_DIR": self.tmp, "LOG_DIR": self.tmp, "NOTIFY_TIMEOUT": "600"})
        notifier = ipd.Notifier(settings, self.store, lambda record, run_as=None: {
            "PATH": os.environ["PATH"]})
        self.store.after_final = notifier.deployment_ended
        record = self.commit()
        claimed = self.store.claim()
        after = self.commit()
        writer = threading.Thread(target=self.store.update, args=(record.id,),
                                  kwargs={"state": "ok", "ended": time.time()})
        writer.start()
        writer.join(30)  # at once, unless it waited for notify.sh's gate
        self.assertFalse(writer.is_alive(), "the final state waited for notify.sh")
        self.store.release(claimed)
        self.assertEqual(self.store.claim().id, after.id)
        wait_until(lambda: os.path.exists(started), 30, message="notify.sh running")
        open(gate, "w").close()
        wait_until(lambda: os.path.exists(ended), 30, message="notify.sh ended")

    def test_a_failing_notifier_stops_nothing(self):
        def failing(record):
            raise RuntimeError("the notifier is broken")
        self.store = self.open_store(after_final=failing)
        first, second = self.commit(), self.commit("other")
        claimed = self.store.claim()
        self.assertEqual(claimed.id, first.id)
        with self.assertLogs(ipd.log, "ERROR") as logged:  # logged, not raised
            self.assertEqual(self.store.update(first.id, state="ok",
                                               ended=time.time()).state, "ok")
        self.assertIn("the notifier is broken", "\n".join(logged.output))
        self.assertEqual(self.state_file(first)["state"], "ok")
        self.store.release(claimed)
        third = self.commit()  # the project's next one runs too
        self.assertEqual({self.store.claim().id, self.store.claim().id},
                         {second.id, third.id})

    def test_figures_are_as_new_as_any_state_the_store_shows(self):
        # a reader that sees a state, then asks for the figures, finds them
        # counting it (or a later one): they change in the same step
        seen, done = [], threading.Event()

        def reader(deployment_id):
            while not done.is_set():
                state = self.store.get(deployment_id).state
                stats = self.store.statistics()
                seen.append((state, stats))
        rounds = soak(50, 10)
        for number in range(rounds):
            record = self.commit()
            done.clear()
            thread = threading.Thread(target=reader, args=(record.id,))
            thread.start()
            claimed = self.store.claim()
            self.store.update(record.id, state="ok", ended=time.time())
            self.store.release(claimed)
            done.set()
            thread.join(30)
            for state, stats in seen:
                if state == "ok":  # counted, and neither waiting nor running
                    self.assertEqual((stats["states"].get("ok"), stats["queue"],
                                      stats["running"]), (number + 1, 0, 0))
                elif state == "active":  # no longer counted as waiting
                    self.assertEqual((stats["states"].get("await", 0), stats["queue"]),
                                     (0, 0))
            del seen[:]

    def test_a_cancel_racing_the_claim_is_one_or_the_other(self):
        # a deployment a worker claims as it is cancelled either never runs
        # (cancelled) or runs with its cancel asked: never both, never lost
        outcomes = set()
        for number in range(soak(100, 20)):
            store = ipd.DeploymentStore(os.path.join(self.tmp, str(number)), 10)
            os.makedirs(os.path.join(self.tmp, str(number)))
            record = self.commit(store=store)
            claimed = []
            worker = threading.Thread(target=lambda: claimed.append(store.claim()))
            worker.start()
            answer = self.cancel(record.id, store).state
            if answer == "cancelled":
                store.stop()
                worker.join(30)
                self.assertEqual(claimed, [None])
            else:
                worker.join(30)
                self.assertEqual((answer, claimed[0].id), ("active", record.id))
                self.assertTrue(store.cancel_requested(record.id).is_set())
                store.stop()
            outcomes.add(answer)
        self.assertTrue(outcomes <= {"cancelled", "active"})

    def test_a_cancelled_waiting_deployment_never_runs(self):
        first, second = self.commit("a"), self.commit("b")
        self.assertEqual(self.cancel(first.id).state, "cancelled")
        self.assertEqual(self.state_file(first)["state"], "cancelled")  # on disk first
        with self.assertRaises(ipd.Conflict):
            self.cancel(first.id)
        self.assertEqual(self.store.claim().id, second.id)
        self.store.stop()
        self.assertIsNone(self.store.claim())

    def test_a_newer_upload_supersedes_the_waiting_one_as_it_shows(self):
        running = self.commit()
        self.store.claim()
        older = self.commit()
        newer = self.commit()  # in the same step: older is 'changed'
        self.assertEqual(self.state_file(older)["superseded_by"], newer.id)
        self.assertEqual(self.store.get(older.id).state, "changed")
        self.assertEqual((self.store.get(newer.id).state, self.store.get(running.id).state),
                         ("await", "active"))
        self.assertEqual(self.counts(), {"queue": 1, "running": 1})
        with self.assertRaisesRegex(ipd.Conflict, "ended already: changed"):
            self.cancel(older.id)
        self.assertEqual(self.audit.states(older.id), [("upload", None),
                                                       ("state", "changed")])
        self.assertEqual(self.cancel(newer.id).state, "cancelled")
        self.assertIsNone(self.store.holding("app", {"image": "ab"}) and
                          self.store.holding("app", {"image": "cd"}))
        self.store.stop()
        self.assertIsNone(self.store.claim())

    def run_to_the_end(self, store, count, project="app"):
        """count deployments of project run to 'ok', those beyond the
        store's keep pruned as retention does; -> their records."""
        records = []
        for _ in range(count):
            record = self.commit(project, store)
            claimed = store.claim()
            for old in store.prunable(project, ending=claimed.replace(state="ok")):
                store.update(old.id, pruned=True)
            store.update(record.id, state="ok", ended=time.time(),
                         steps=[{"step": "deploy", "code": 1, "seconds": 0.3}])
            store.release(claimed)
            records.append(store.get(record.id))
        return records

    def test_old_records_are_figures_read_from_disk_when_asked(self):
        # cold records (finished, pruned, not the latest) are counted, not
        # held: each is read from its state file when asked for
        store = ipd.DeploymentStore(self.tmp, 2)
        records = self.run_to_the_end(store, 6)
        for reloaded in (store, ipd.DeploymentStore(self.tmp, 2)):
            if reloaded is not store:
                self.assertEqual(reloaded.load(), 6)
            self.assertEqual([r.pruned for r in reloaded.deployments_of("app")],
                             [True] * 4 + [False] * 2)
            self.assertEqual(reloaded.find("app", records[0].id).to_disk(),
                             records[0].replace(pruned=True).to_disk())
            self.assertEqual(reloaded.get(records[1].id).state, "ok")
            self.assertEqual((reloaded.find("app").id, reloaded.projects()["app"][1]),
                             (records[-1].id, 6))
            stats = reloaded.statistics()
            self.assertEqual((stats["states"], stats["durations"]["count"]), ({"ok": 6}, 6))
            self.assertIn('ipd_step_duration_seconds_count{step="deploy"} 6\n',
                          reloaded.metrics_text({}, {}))
            self.assertEqual(reloaded.prunable("app"), [])
            self.assertIsNone(reloaded.find("app", "0" * 8 + "-0000-4000-8000-" + "0" * 12))
        more = self.run_to_the_end(reloaded, 1)  # goes on where it was
        self.assertEqual(more[0].seq, records[-1].seq + 1)
        self.assertEqual([r.pruned for r in reloaded.deployments_of("app")],
                         [True] * 5 + [False] * 2)

    def test_a_start_reads_the_index_alone_while_it_vouches_for_the_folder(self):
        store = ipd.DeploymentStore(self.tmp, 1)
        records = self.run_to_the_end(store, 4)
        self.assertEqual(ipd.DeploymentStore(self.tmp, 1).load(), 4)  # writes the index
        path = store.path(records[0], ".json")
        with open(path, "r+") as file:  # in place: the folder's mtime stays
            file.write("not json")
        loaded = ipd.DeploymentStore(self.tmp, 1)
        self.assertEqual(loaded.load(), 4)  # its state file was not read
        self.assertEqual(loaded.statistics()["states"], {"ok": 4})
        self.run_to_the_end(loaded, 1)  # a change: the index no longer vouches
        os.remove(path)  # and a state file it counted is gone: counted anew
        again = ipd.DeploymentStore(self.tmp, 1)
        self.assertEqual(again.load(), 4)
        self.assertEqual(again.statistics()["states"], {"ok": 4})
        self.assertEqual([r.id for r in again.deployments_of("app")][:1], [records[1].id])

    def test_a_cold_deployment_is_409_to_cancel_and_pruned_once(self):
        store = ipd.DeploymentStore(self.tmp, 1)
        records = self.run_to_the_end(store, 3)
        with self.assertRaisesRegex(ipd.Conflict, "has ended already: ok"):
            self.cancel(records[0].id, store)  # cold, read from disk: 409, not 404
        with self.assertRaises(ipd.NotFound):
            self.cancel(str(uuid.uuid4()), store)
        settings = ipd.load_settings(os.devnull, environ={
            "UPLOAD_DIR": self.tmp, "LOG_DIR": self.tmp})
        kept = ipd.DeploymentStore(os.path.join(self.tmp, "kept"), 5)
        os.makedirs(kept.upload_dir)
        retention = ipd.Retention(settings, kept, ipd.SegmentStore(self.tmp, 3600))
        older = self.run_to_the_end(kept, 2)[0]
        self.assertFalse(older.pruned)
        retention.prune(older)  # two retention runs that picked the same one
        retention.prune(older)
        self.assertTrue(kept.find("app", older.id).pruned)
        self.assertFalse(kept.mark_pruned(older.id))

    def test_a_state_file_rewritten_in_place_is_read_again(self):
        # the folder's mtime stays when a file is rewritten in place: each
        # hot record's own stamp (mtime, size, inode) is checked too
        store = ipd.DeploymentStore(self.tmp, 5)
        record = self.run_to_the_end(store, 2)[-1]
        path = store.path(record, ".json")
        for name in os.listdir(os.path.dirname(path)):  # written long ago
            os.utime(os.path.join(os.path.dirname(path), name), (time.time() - 60,) * 2)
        self.assertEqual(ipd.DeploymentStore(self.tmp, 5).load(), 2)  # the index
        edited = dict(self.state_file(record), state="cancelled")
        with open(path, "r+") as file:
            file.write(json.dumps(edited))
            file.truncate()
        loaded = ipd.DeploymentStore(self.tmp, 5)
        loaded.load()
        self.assertEqual(loaded.find("app", record.id).state, "cancelled")

    def test_a_long_history_is_read_as_far_as_asked(self):
        store = ipd.DeploymentStore(self.tmp, 1)
        records = self.run_to_the_end(store, 5)
        self.assertEqual([r.id for r in store.deployments_of("app", 2)],
                         [r.id for r in records[-2:]])
        self.assertEqual(len(store.deployments_of("app")), 5)

    def test_after_a_crash_the_running_one_is_interrupted_and_the_waiting_queued(self):
        running = self.commit()
        self.store.claim()
        older, waiting = self.commit("b"), self.commit("b")
        # as an older ipd killed between two writes left it: both waiting
        both_waiting = dict(self.state_file(older), state="await", ended=None)
        with open(self.store.path(older, ".json"), "w") as file:
            json.dump(both_waiting, file)
        store = self.open_store()
        self.assertEqual(store.load(kill_grace=1), 3)
        self.assertEqual(store.get(running.id).state, "interrupted")
        self.assertEqual((store.get(older.id).state, store.get(waiting.id).state),
                         ("changed", "await"))
        self.assertEqual(self.counts(store), {"queue": 1, "running": 0})
        self.assertEqual(store.claim().id, waiting.id)
        self.assertEqual(store.statistics()["states"],
                         {"active": 1, "changed": 1, "interrupted": 1})


class RestartTests(DaemonTestCase):
    settings = {"MAX_PARALLEL": "1"}

    def test_kill_9_then_restart_keeps_every_state(self):
        gate = os.path.join(self.tmp, "gate")
        runs = os.path.join(self.tmp, "runs")
        pid_file = os.path.join(self.tmp, "pid")
        script = ('echo "$DEPLOY $1" >> %s\n[ "$1" = deploy ] || exit 1\n'
                  'echo $$ > %s.new; mv %s.new %s\n'
                  'while [ ! -e %s ]; do sleep 0.02; done\nexit 1\n'
                  % (runs, pid_file, pid_file, pid_file, gate))
        done = self.daemon.deploy(OK_SCRIPT, project="done")
        self.daemon.wait_state("done", done)
        failed = self.daemon.deploy("exit 9", project="failed")
        self.daemon.wait_state("failed", failed)
        running = self.daemon.deploy(script, project="app")
        self.wait_for_file(pid_file)
        waiting = self.daemon.deploy(OK_SCRIPT, project="other")
        self.assertEqual(self.daemon.state("other", waiting), "await")
        self.daemon.kill()
        orphan = int(read_text(pid_file))
        self.assertTrue(process_running(orphan))
        self.daemon.start()
        self.assertFalse(process_running(orphan), "control.sh outlived the restart")
        self.assertEqual(self.daemon.state("done", done), "ok")
        self.assertEqual(self.daemon.state("failed", failed), "9")
        self.assertEqual(self.daemon.state("app", running), "interrupted")
        self.assertEqual(self.daemon.wait_state("other", waiting), "ok")
        open(gate, "w").close()
        time.sleep(0.2)
        self.assertEqual(read_text(runs).count(running + " deploy"), 1)
        self.daemon.restart()
        self.assertEqual(self.daemon.state("app", running), "interrupted")
        self.assertEqual(self.daemon.state("other", waiting), "ok")

    def test_torn_upload_is_removed_at_start(self):
        torn = os.path.join(self.daemon.upload_dir, ".upload-abc123.tmp")
        with open(torn, "wb") as file:
            file.write(b"half an image")
        self.daemon.kill()
        self.daemon.start()
        self.assertEqual(self.daemon.leftovers(), [])

    def test_sigterm_lets_the_running_step_finish(self):
        gate = os.path.join(self.tmp, "gate")
        running = self.daemon.deploy('[ "$1" = deploy ] || exit 1\n'
                                     'while [ ! -e %s ]; do sleep 0.02; done\n'
                                     'exit 1' % gate)
        self.daemon.wait_state("app", running, ["active"])
        waiting = self.daemon.deploy(OK_SCRIPT, project="next")
        self.daemon.process.send_signal(signal.SIGTERM)
        self.daemon.daemon_log(r"no new connections, running steps get")
        self.assertIsNone(self.daemon.process.poll())
        open(gate, "w").close()
        self.assertEqual(self.daemon.process.wait(20), 0)
        self.daemon.start()
        self.assertEqual(self.daemon.state("app", running), "ok")
        self.assertEqual(self.daemon.wait_state("next", waiting), "ok")

    def test_sigterm_interrupts_a_step_after_the_grace_period(self):
        self.daemon.stop()
        daemon = self.start_daemon({"SHUTDOWN_GRACE": "0.5", "KILL_GRACE": "1"})
        running = daemon.deploy('[ "$1" = deploy ] || exit 1\nsleep 300\nexit 1')
        daemon.wait_state("app", running, ["active"])
        started = time.monotonic()
        self.assertEqual(daemon.stop(), 0)
        self.assertLess(time.monotonic() - started, 10)
        daemon.start()
        self.assertEqual(daemon.state("app", running), "interrupted")


class PromiseStateOnDiskTests(InProcessServerTestCase):
    # issue 23, item 10: a state is visible only once it is on disk; each
    # state file's write is slowed and hooked, and the API asked meanwhile

    def shown_state(self, project, deployment):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3)
        try:
            connection.request("GET", "/deploy/status/%s/%s" % (project, deployment),
                               headers={"Authorization": ADMIN_AUTH})
            response = connection.getresponse()
            text = response.read().decode().strip()
            return text if response.status == 200 else None
        except socket.timeout:
            return "blocked"  # held while it writes: not shown either
        finally:
            connection.close()

    def test_a_state_shows_only_once_it_is_on_disk(self):
        written, real = [], ipd.write_file_atomic
        folder = os.sep + "deployments" + os.sep

        def slowed(path, data, *args, **kwargs):
            if folder in path and path.endswith(".json"):
                record = json.loads(data.decode())
                time.sleep(0.05)  # a slow disk: the write has not happened yet
                written.append((record["state"], self.shown_state(
                    record["project"], record["id"])))
            return real(path, data, *args, **kwargs)
        ipd.write_file_atomic = slowed
        self.addCleanup(setattr, ipd, "write_file_atomic", real)
        answer = raw_exchange(self.port, upload_request(force=True))
        self.assertEqual(answer_status(answer), 202)
        deployment = re.search(rb"\r\n\r\n([0-9a-f-]{36})\n", answer).group(1).decode()
        wait_until(lambda: self.shown_state("app", deployment) == "ok")
        before = None
        for state, shown in written:
            if state != before:  # a change: not shown before its write
                self.assertNotEqual(shown, state, written)
            before = state
        states = [state for state, _ in written]
        self.assertIn("active", states)
        self.assertEqual(states[-1], "ok")


###############################################################################
# The deploy worker ###########################################################
###############################################################################

class FlowTests(DaemonTestCase):
    settings = {"PASS_ENV": "IPD_TEST_PASSED"}

    def setUp(self):
        # a step's time limit: short only where it is what is tested, so
        # that no other step of a busy machine reaches it
        timeout = "2" if self._testMethodName.startswith("test_timeout_") else "20"
        self.settings = dict(self.settings, STEP_TIMEOUT=timeout)
        super().setUp()

    def run_script(self, script, project="app"):
        deployment = self.daemon.deploy(script, project=project)
        return self.daemon.wait_state(project, deployment), \
            self.daemon.log(project, deployment), deployment

    def test_check_ok_skips_prepare(self):
        state, log, _ = self.run_script('echo "$1"; exit 1')
        self.assertEqual((state, log), ("ok", "check\ndeploy\n"))

    def test_check_failing_runs_prepare(self):
        state, log, _ = self.run_script('echo "$1"; [ "$1" = check ] && exit 0; exit 1')
        self.assertEqual((state, log), ("ok", "check\nprepare\ndeploy\n"))

    def test_prepare_failing_ends_with_its_code(self):
        state, log, _ = self.run_script('echo "$1"; case $1 in check) exit 5;; '
                                        'prepare) exit 7;; esac; exit 1')
        self.assertEqual((state, log), ("7", "check\nprepare\n"))

    def test_deploy_failing_ends_with_its_code(self):
        state, log, _ = self.run_script('echo "$1"; [ "$1" = deploy ] && exit 42; exit 1')
        self.assertEqual((state, log), ("42", "check\ndeploy\n"))
        state, _, _ = self.run_script('[ "$1" = deploy ] && exit 0; exit 1')
        self.assertEqual(state, "0")

    def test_environment_of_control_sh(self):
        os.environ["IPD_TEST_PASSED"] = "passed-value"
        self.addCleanup(os.environ.pop, "IPD_TEST_PASSED", None)
        self.daemon.stop()
        self.daemon.start(env={"IPD_TEST_PASSED": "passed-value",
                               "IPD_TEST_SECRET": "must-not-leak"})
        state, log, deployment = self.run_script('[ "$1" = deploy ] && env; exit 1')
        self.assertEqual(state, "ok")
        env = dict(line.split("=", 1) for line in log.splitlines() if "=" in line)
        env.pop("PWD", None)
        env.pop("SHLVL", None)
        env.pop("_", None)
        self.assertEqual(env, {
            "PATH": os.environ["PATH"], "DEPLOY": deployment, "PROJECT": "app",
            "IMAGE": "", "PROJECT_DIR": os.path.join(self.daemon.upload_dir, "app"),
            "IPD_TEST_PASSED": "passed-value"})

    def test_a_script_that_cannot_run(self):
        for script, code, reason in ((b"#!/bin/no-such-shell\nexit 1\n", "127",
                                      "No such file or directory"),
                                     (b"\x7fELF garbage", "126", "Exec format error")):
            with self.subTest(code):
                package = tar_bytes({"control.sh": (script, 0o755)})
                deployment = self.daemon.upload("app", package)[2].strip()
                self.assertEqual(self.daemon.wait_state("app", deployment), code)
                self.assertIn("ipd: cannot run control.sh check: " + reason,
                              self.daemon.log("app", deployment))
        self.assertNotIn("Traceback", self.daemon.daemon_log())

    def test_timeout_stops_the_whole_process_group(self):
        pid_file = os.path.join(self.tmp, "child.pid")
        state, _, _ = self.run_script('sleep 300 & echo $! > %s; wait; exit 1'
                                      % pid_file)
        self.assertEqual(state, "timeout")
        pid = int(read_text(pid_file))
        self.assertFalse(process_running(pid), "the step's child survived")

    def test_children_left_behind_are_stopped(self):
        pid_file = os.path.join(self.tmp, "child.pid")
        state, _, _ = self.run_script('(sleep 300 >/dev/null 2>&1 & echo $! > %s); '
                                      'exit 1' % pid_file)
        self.assertEqual(state, "ok")
        pid = int(read_text(pid_file))
        self.assertFalse(process_running(pid), "the step's child survived")


class SuccessCodeTests(DaemonTestCase):
    settings = {"SUCCESS_CODE": "0"}

    def test_success_code_zero(self):
        deployment = self.daemon.deploy('echo "$1"; exit 0')
        self.assertEqual(self.daemon.wait_state("app", deployment), "ok")
        deployment = self.daemon.deploy('[ "$1" = deploy ] && exit 1; exit 0')
        self.assertEqual(self.daemon.wait_state("app", deployment), "1")


class QueueTests(DaemonTestCase):
    settings = {"MAX_PARALLEL": "2"}

    def gated(self, name, record):
        """A script that records its start and end and waits for gate name."""
        gate = os.path.join(self.tmp, "gate-" + name)
        return ('[ "$1" = deploy ] || exit 1\n'
                'echo "start %s $(date +%%s.%%N)" >> %s\n'
                'while [ ! -e %s ]; do sleep 0.02; done\n'
                'echo "end %s $(date +%%s.%%N)" >> %s\nexit 1\n'
                % (name, record, gate, name, record)), gate

    def test_newer_upload_supersedes_the_waiting_one(self):
        record = os.path.join(self.tmp, "record")
        script1, gate1 = self.gated("one", record)
        first = self.daemon.deploy(script1)
        self.daemon.wait_state("app", first, ["active"])
        second = self.daemon.deploy(self.gated("two", record)[0])
        script3, gate3 = self.gated("three", record)
        third = self.daemon.deploy(script3)
        self.assertEqual(self.daemon.state("app", second), "changed")
        self.assertEqual(self.daemon.state("app", first), "active")
        self.assertEqual(self.daemon.state("app", third), "await")
        open(gate3, "w").close()
        open(gate1, "w").close()
        self.assertEqual(self.daemon.wait_state("app", third), "ok")
        self.assertEqual(self.daemon.state("app", first), "ok")
        lines = [line.split()[:2] for line in read_text(record).splitlines()]
        self.assertEqual(lines, [["start", "one"], ["end", "one"],
                                 ["start", "three"], ["end", "three"]])
        self.assertEqual(self.daemon.log("app", second), "")

    def test_projects_deploy_in_parallel_up_to_the_limit(self):
        record = os.path.join(self.tmp, "record")
        scripts = {name: self.gated(name, record) for name in ("a", "b", "c")}
        ids = {name: self.daemon.deploy(scripts[name][0], project=name)
               for name in ("a", "b", "c")}
        self.daemon.wait_state("a", ids["a"], ["active"])
        self.daemon.wait_state("b", ids["b"], ["active"])
        self.assertEqual(self.daemon.state("c", ids["c"]), "await")
        self.assertEqual(self.daemon.get_json("/stat")[1]["running"], 2)
        self.assertEqual(self.daemon.get_json("/stat")[1]["queue"], 1)
        open(scripts["a"][1], "w").close()
        self.daemon.wait_state("c", ids["c"], ["active"])
        open(scripts["b"][1], "w").close()
        open(scripts["c"][1], "w").close()
        for name in ids:
            self.assertEqual(self.daemon.wait_state(name, ids[name]), "ok")

    def test_worker_starts_at_once(self):
        marker = os.path.join(self.tmp, "started")
        started = time.monotonic()
        self.daemon.deploy('touch %s; exit 1' % marker)
        self.wait_for_file(marker)
        self.assertLess(time.monotonic() - started, 5)


class CancelTests(DaemonTestCase):
    """POST /cancel: a waiting deployment never runs, a running one's
    processes are gone before 'cancelled' shows, an ended one is 409."""
    settings = {"KILL_GRACE": "1"}

    def test_what_ignores_sigterm_is_gone_before_cancelled_shows(self):
        # SIGKILL after KILL_GRACE, and the state only once the kernel has
        # ended every process of the step
        pid_file = os.path.join(self.tmp, "child.pid")
        deployment = self.daemon.deploy(
            "[ \"$1\" = deploy ] || exit 1\ntrap '' TERM\n"
            "sh -c 'while :; do sleep 0.05; done' &\n"
            "echo $! > %s.new; mv %s.new %s\nwhile :; do sleep 0.05; done\n"
            % ((pid_file,) * 3))
        self.wait_for_file(pid_file)
        status, _, body = self.daemon.request("POST", "/cancel/app/" + deployment)
        self.assertEqual((status, body), (200, "cancelled\n"))
        self.assertFalse(process_running(int(read_text(pid_file))),
                         "a process of the step outlived its state")

    def test_cancel_a_waiting_and_a_running_deployment(self):
        gate = os.path.join(self.tmp, "gate")
        pid_file = os.path.join(self.tmp, "child")
        running = self.daemon.deploy(gate_script(
            gate, "sleep 300 & echo $! > %s" % pid_file))
        self.wait_for_file(pid_file)
        waiting = self.daemon.deploy()
        status, _, body = self.daemon.request("POST", "/cancel/app/" + waiting)
        self.assertEqual((status, body), (200, "cancelled\n"))
        status, _, body = self.daemon.request("POST", "/cancel/app/" + running)
        self.assertEqual((status, body), (200, "cancelled\n"))
        self.assertFalse(process_running(int(read_text(pid_file))))
        self.assertRegex(self.daemon.log("app", waiting),  # it never ran (#15)
                         r"\Aipd: cancelled by admin from 127\.0\.0\.1 at \S+\n\Z")
        status, _, body = self.daemon.request("POST", "/cancel/app/" + running)
        self.assertEqual(status, 409)
        self.assertEqual(self.daemon.request("POST", "/cancel/app/" + str(uuid.uuid4()))[0],
                         404)
        self.daemon.restart()
        self.assertEqual(self.daemon.state("app", waiting), "cancelled")
        self.assertEqual(self.daemon.state("app", running), "cancelled")


class VerifyTests(DaemonTestCase):
    """Issue 25: control.sh verify after deploy, 'reverted' and the rollback
    to the project's last ok deployment, with scripted control.sh."""

    settings = {"VERIFY_SECONDS": "1", "MAX_PARALLEL": "1"}

    def setUp(self):
        super().setUp()
        self.runs = os.path.join(self.tmp, "runs")

    def version(self, verify='exit 1', name="v"):
        """A package whose control.sh records each step it runs ($DEPLOY,
        the step, VERIFY_SECONDS) and whose verify runs the shell verify."""
        return control_script('echo "$DEPLOY $1 %s ${VERIFY_SECONDS:-unset}" >> %s\n'
                              'if [ "$1" = verify ]; then %s; fi\nexit 1\n'
                              % (name, self.runs, verify))

    def push(self, package, project="app"):
        status, _, body = self.daemon.upload(project, package)
        self.assertEqual(status, 202, body)
        return body.strip()

    def record(self, deployment, project="app"):
        return self.daemon.get_json("/status/%s/%s" % (project, deployment))[1]

    def history(self, project="app"):
        """The project's deployments, oldest first, from their state files."""
        folder = os.path.join(self.daemon.upload_dir, project, "deployments")
        records = [json.loads(read_text(os.path.join(folder, name)))
                   for name in os.listdir(folder) if name.endswith(".json")]
        return [{"deployment": r["id"], "state": r["state"]}
                for r in sorted(records, key=lambda r: r["seq"])]

    def audit(self, event):
        return [json.loads(line) for line in read_text(os.path.join(
            self.tmp, "audit.log")).splitlines() if '"event": "%s"' % event in line]

    def test_verify_runs_after_deploy_and_a_release_that_holds_is_ok(self):
        first = self.push(self.version())
        self.assertEqual(self.daemon.wait_state("app", first), "ok")
        steps = [step["step"] for step in self.record(first)["steps"]]
        self.assertEqual(steps, ["check", "deploy", "verify"])
        self.assertIn("%s verify v 1" % first, read_text(self.runs))
        self.assertIn("%s deploy v unset" % first, read_text(self.runs))
        self.assertEqual(ipd.parse_setting("window", "0"), 0)
        for bad in ("-1", "1.5", "86401", "x"):
            with self.assertRaises(ValueError):
                ipd.parse_setting("window", bad)

    def test_project_conf_turns_verify_on_for_one_project(self):
        self.daemon.stop()
        daemon = self.daemon = self.start_daemon({"VERIFY_SECONDS": "0"})
        folder = os.path.join(daemon.upload_dir, "watched")
        os.makedirs(folder)
        with open(os.path.join(folder, "project.conf"), "w") as file:
            file.write("VERIFY_SECONDS=2\n")
        # An old control.sh answers an unknown step with an error: no verify
        old = daemon.deploy('[ "$1" = verify ] && exit 2; exit 1', project="plain")
        self.assertEqual(daemon.wait_state("plain", old), "ok")
        watched = self.push(self.version(), project="watched")
        self.assertEqual(daemon.wait_state("watched", watched), "ok")
        self.assertIn("%s verify v 2" % watched, read_text(self.runs))

    def test_failed_verify_reverts_and_rolls_back_to_the_last_ok(self):
        listener = Listener()
        self.addCleanup(listener.close)
        self.daemon.stop()
        self.daemon = self.start_daemon(dict(self.settings, NOTIFY_URL=listener.url))
        project_dir = os.path.join(self.daemon.upload_dir, "app")
        os.makedirs(project_dir)
        calls = os.path.join(self.tmp, "calls")
        with open(os.path.join(project_dir, "notify.sh"), "w") as file:
            file.write('#!/bin/sh\necho "$DEPLOY $STATE ${ROLLBACK:-none}" >> %s\n' % calls)
        os.chmod(os.path.join(project_dir, "notify.sh"), 0o755)
        good = self.push(self.version(name="good"))
        self.assertEqual(self.daemon.wait_state("app", good), "ok")
        plain = self.daemon.deploy(OK_SCRIPT)  # the last ok one: rolled back to
        self.assertEqual(self.daemon.wait_state("app", plain), "ok")
        broken = self.push(self.version('echo "5xx share too high"; exit 7', "bad"))
        self.assertEqual(self.daemon.wait_state("app", broken), "reverted")
        record = self.record(broken)
        rollback = record["rollback"]
        self.assertEqual(record["steps"][-1]["step"], "verify")
        self.assertEqual(record["steps"][-1]["code"], 7)
        self.assertIn("5xx share too high", self.daemon.log("app", broken))
        self.assertIn("ipd: reverted: control.sh verify exited 7; rolled back: "
                      "deployment %s redeploys %s" % (rollback, plain),
                      self.daemon.log("app", broken))
        self.assertEqual(self.daemon.wait_state("app", rollback), "ok")
        again = self.record(rollback)
        self.assertEqual(again["rollback_of"], broken)
        self.assertEqual(again["user"], "ipd")
        self.assertIn("step verify", self.daemon.log("app", rollback))
        events = self.audit("rollback")
        self.assertEqual([(e["deployment"], e["reverted"], e["redeploy_of"]) for e in events],
                         [(rollback, broken, plain)])
        self.assertEqual(events[0]["reason"], "control.sh verify exited 7")
        wait_until(lambda: len(read_text(calls).splitlines()) >= 4, message="notify.sh")
        self.assertIn("%s reverted %s" % (broken, rollback), read_text(calls).splitlines())
        self.assertIn("%s ok none" % rollback, read_text(calls).splitlines())
        wait_until(lambda: len(listener.received) >= 4, message="NOTIFY_URL")
        told = {e["deployment"]: e for e in listener.received}
        self.assertEqual((told[broken]["state"], told[broken]["rollback"]),
                         ("reverted", rollback))
        self.assertEqual(told[rollback]["rollback_of"], broken)
        page = self.daemon.get("/ui/app")[2]
        self.assertIn('<span class="badge reverted">reverted</span>', page)

    def test_a_verify_over_its_time_limit_is_reverted(self):
        self.daemon.stop()
        daemon = self.daemon = self.start_daemon({"VERIFY_SECONDS": "2",
                                                  "STEP_TIMEOUT": "2"})
        # the window and a step's time: 3 s of verify, more than either, is
        # within its limit of 4 s (a second to spare on a busy machine)
        slow = self.push(self.version("sleep 3; exit 1"))
        self.assertEqual(daemon.wait_state("app", slow), "ok")
        hung = self.push(self.version("sleep 60"))
        self.assertEqual(daemon.wait_state("app", hung), "reverted")
        record = self.record(hung)
        self.assertGreaterEqual(record["steps"][-1]["seconds"], 4)
        self.assertLess(record["steps"][-1]["seconds"], 12)
        self.assertIn("control.sh verify ran over its time limit",
                      daemon.log("app", hung))
        self.assertEqual(daemon.wait_state("app", record["rollback"]), "ok")

    def test_with_no_earlier_ok_deployment_nothing_is_rolled_back(self):
        failing = self.daemon.deploy("exit 4", project="app")
        self.assertEqual(self.daemon.wait_state("app", failing), "4")
        first = self.push(self.version("exit 3"))
        self.assertEqual(self.daemon.wait_state("app", first), "reverted")
        self.assertIsNone(self.record(first)["rollback"])
        self.assertIn("nothing to roll back to: no earlier deployment of app that "
                      "ended ok keeps its files", self.daemon.log("app", first))
        self.assertEqual(len(self.history()), 2)
        events = self.audit("rollback")
        self.assertEqual([(e["reverted"], e["deployment"]) for e in events],
                         [(first, None)])

    def test_the_rollback_of_a_rollback_never_happens(self):
        broken = os.path.join(self.tmp, "broken")
        good = self.push(self.version('[ -e %s ] && exit 0' % broken, "good"))
        self.assertEqual(self.daemon.wait_state("app", good), "ok")
        open(broken, "w").close()  # from now on even the good one fails
        bad = self.push(self.version("exit 0", "bad"))
        self.assertEqual(self.daemon.wait_state("app", bad), "reverted")
        rollback = self.record(bad)["rollback"]
        self.assertEqual(self.daemon.wait_state("app", rollback), "reverted")
        self.assertIsNone(self.record(rollback)["rollback"])
        self.assertIn("it is itself the rollback of %s: not rolled back again" % bad,
                      self.daemon.log("app", rollback))
        time.sleep(1)
        self.assertEqual([d["deployment"] for d in self.history()], [good, bad, rollback])

    def gate(self, name):
        path = os.path.join(self.tmp, "gate-" + name)
        return path, "while [ ! -e %s ]; do sleep 0.02; done" % path

    def test_an_upload_waiting_during_verify_wins_over_the_rollback(self):
        good = self.push(self.version())
        self.daemon.wait_state("app", good)
        gate, wait = self.gate("verify")
        bad = self.push(self.version(wait + "; exit 0", "bad"))
        wait_until(lambda: " verify bad" in read_text(self.runs), message="verify")
        newer = self.push(self.version(name="newer"))
        open(gate, "w").close()
        self.assertEqual(self.daemon.wait_state("app", bad), "reverted")
        self.assertIsNone(self.record(bad)["rollback"])
        self.assertIn("no rollback: deployment %s waits: it is newer and runs instead"
                      % newer, self.daemon.log("app", bad))
        self.assertEqual(self.daemon.wait_state("app", newer), "ok")
        self.assertEqual(len(self.history()), 3)

    def test_a_newer_upload_supersedes_the_waiting_rollback(self):
        good = self.push(self.version())
        self.daemon.wait_state("app", good)
        gate, wait = self.gate("verify")
        bad = self.push(self.version(wait + "; exit 0", "bad"))
        wait_until(lambda: " verify bad" in read_text(self.runs), message="verify")
        # MAX_PARALLEL=1: another project's deployment, older than the
        # rollback, runs first and holds the rollback in the queue
        other_gate, other_wait = self.gate("other")
        other = self.daemon.deploy(other_wait + "\nexit 1", project="other")
        open(gate, "w").close()
        self.assertEqual(self.daemon.wait_state("app", bad), "reverted")
        rollback = self.record(bad)["rollback"]
        self.assertEqual(self.daemon.wait_state("other", other, ["active"]), "active")
        self.assertEqual(self.daemon.state("app", rollback), "await")
        newer = self.push(self.version(name="newer"))
        self.assertEqual(self.daemon.state("app", rollback), "changed")
        open(other_gate, "w").close()
        self.assertEqual(self.daemon.wait_state("app", newer), "ok")
        self.assertEqual(self.record(rollback)["state"], "changed")
        self.assertNotIn("%s check" % rollback, read_text(self.runs))

    def test_kill_9_during_verify_then_restart_reverts_and_rolls_back(self):
        calls = os.path.join(self.tmp, "calls")
        project_dir = os.path.join(self.daemon.upload_dir, "app")
        os.makedirs(project_dir)
        with open(os.path.join(project_dir, "notify.sh"), "w") as file:
            file.write('#!/bin/sh\necho "$DEPLOY $STATE ${ROLLBACK:-none}" >> %s\n' % calls)
        os.chmod(os.path.join(project_dir, "notify.sh"), 0o755)
        good = self.push(self.version(name="good"))
        self.daemon.wait_state("app", good)
        pid_file = os.path.join(self.tmp, "verify.pid")
        judged = self.push(self.version("echo $$ > %s; sleep 300" % pid_file, "judged"))
        self.wait_for_file(pid_file)
        wait_until(lambda: read_text(pid_file).strip(), message="pid")
        self.daemon.kill()
        orphan = int(read_text(pid_file))
        self.assertTrue(process_running(orphan))
        self.daemon.start()
        self.assertFalse(process_running(orphan), "verify outlived the restart")
        self.assertEqual(self.daemon.state("app", judged), "reverted")
        rollback = self.record(judged)["rollback"]
        self.assertEqual(self.record(rollback)["rollback_of"], judged)
        self.assertEqual(self.daemon.wait_state("app", rollback), "ok")
        self.assertIn("ipd: reverted: ipd stopped while control.sh verify ran: it was "
                      "never judged; rolled back: deployment %s redeploys %s"
                      % (rollback, good), self.daemon.log("app", judged))
        wait_until(lambda: "%s reverted %s" % (judged, rollback) in read_text(calls),
                   message="notify.sh told of the revert with its rollback")
        self.assertEqual(read_text(calls).count("%s reverted" % judged), 1)
        self.daemon.restart()  # judged once: a second start changes nothing
        self.assertEqual(self.record(judged)["rollback"], rollback)
        self.assertEqual(len(self.history()), 3)

    def test_a_rollback_committed_just_before_a_kill_is_not_queued_twice(self):
        good = self.push(self.version(name="good"))
        self.daemon.wait_state("app", good)
        _, wait = self.gate("never")
        judged = self.push(self.version(wait + "; exit 0", "judged"))
        wait_until(lambda: " verify judged" in read_text(self.runs), message="verify")
        self.daemon.kill()
        path = os.path.join(self.daemon.upload_dir, "app", "deployments", judged + ".json")
        self.assertIn("verify_started", json.loads(read_text(path)))
        self.daemon.start()
        rollback = self.record(judged)["rollback"]
        self.daemon.stop()
        # A kill -9 after the worker committed the rollback and before it
        # wrote 'reverted' leaves both on disk: the judged one as running.
        data = json.loads(read_text(path))
        data.update(state="active", ended=None)
        del data["rollback"]
        with open(path, "w") as file:
            json.dump(data, file)
        os.remove(os.path.join(self.daemon.upload_dir, "app", "deployments", "index.cache"))
        self.daemon.start()
        self.assertEqual(self.daemon.state("app", judged), "reverted")
        self.assertEqual(self.record(judged)["rollback"], rollback)
        self.assertEqual(len(self.history()), 3)

    def test_a_stop_during_verify_reverts_and_the_rollback_runs_after(self):
        self.daemon.stop()
        self.daemon = self.start_daemon({"VERIFY_SECONDS": "1", "SHUTDOWN_GRACE": "0.5"})
        good = self.push(self.version(name="good"))
        self.daemon.wait_state("app", good)
        judged = self.push(self.version("sleep 300", "judged"))
        wait_until(lambda: " verify judged" in read_text(self.runs), message="verify")
        self.assertEqual(self.daemon.stop(), 0)
        path = os.path.join(self.daemon.upload_dir, "app", "deployments", judged)
        record = json.loads(read_text(path + ".json"))
        self.assertEqual(record["state"], "reverted")  # at the stop itself
        self.assertIn("control.sh verify was stopped with ipd", read_text(path + ".log"))
        self.daemon.start()
        self.assertEqual(self.daemon.wait_state("app", record["rollback"]), "ok")

    def test_a_cancel_during_verify_keeps_what_is_live(self):
        good = self.push(self.version())
        self.daemon.wait_state("app", good)
        watched = self.push(self.version("sleep 300", "watched"))
        wait_until(lambda: " verify watched" in read_text(self.runs), message="verify")
        status, _, body = self.daemon.request("POST", "/cancel/app/%s" % watched)
        self.assertEqual((status, body.strip()), (200, "cancelled"))
        self.assertEqual(self.daemon.wait_state("app", watched), "cancelled")
        self.assertNotIn("rollback", self.record(watched))
        time.sleep(0.5)
        self.assertEqual(len(self.history()), 2)

    def test_a_kill_after_verify_held_is_no_revert(self):
        held = self.push(self.version())
        self.assertEqual(self.daemon.wait_state("app", held), "ok")
        self.daemon.stop()
        # A kill -9 after verify held and before 'ok' was written: the
        # release was judged, so the restart makes it 'interrupted' only.
        folder = os.path.join(self.daemon.upload_dir, "app", "deployments")
        data = json.loads(read_text(os.path.join(folder, held + ".json")))
        self.assertTrue(data["verified"])
        data.update(state="active", ended=None)
        with open(os.path.join(folder, held + ".json"), "w") as file:
            json.dump(data, file)
        ipd.remove_quietly(os.path.join(folder, "index.cache"))  # it vouches no more
        self.daemon.start()
        self.assertEqual(self.daemon.state("app", held), "interrupted")
        self.assertEqual(len(self.history()), 1)

    def test_wait_and_push_wait_answer_once_verify_ended(self):
        good = self.push(self.version())
        self.daemon.wait_state("app", good)
        bad = self.push(self.version("sleep 1; exit 0", "bad"))
        started = time.monotonic()
        status, _, body = self.daemon.get("/status/app/%s?wait=30" % bad)
        self.assertEqual((status, body), (200, "reverted\n"))
        self.assertGreaterEqual(time.monotonic() - started, 1)
        package = os.path.join(self.tmp, "bad.tgz")
        with open(package, "wb") as file:
            file.write(self.version("sleep 1; exit 0", "pushed"))
        environ = dict(os.environ, IPD_URL="http://127.0.0.1:%d/deploy" % self.daemon.port,
                       IPD_USER="admin", IPD_PASSWORD="admin-pw", HOME=self.tmp)
        result = subprocess.run(IPD_RUN + ["push", "--project", "app", "--package",
                                           package, "--wait", "--timeout", "60"],
                                env=ipd_environ(environ), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(result.returncode, ipd.EXIT_REVERTED, result.stderr)
        self.assertEqual(ipd.EXIT_REVERTED, 10)
        for text in (" ".join(run_ipd("push", "--help").stdout.split()), " ".join(
                read_text(os.path.join(HERE, "README.md")).replace("`", "").split())):
            self.assertIn("10 the deployment was reverted (its verify failed", text)
        self.assertIn(b": reverted", result.stderr)
        self.assertIn(b"ipd: reverted: control.sh verify exited 0", result.stdout)
        good_again = os.path.join(self.tmp, "good.tgz")
        with open(good_again, "wb") as file:
            file.write(self.version())
        result = subprocess.run(IPD_RUN + ["push", "--project", "app", "--package",
                                           good_again, "--wait"],
                                env=ipd_environ(environ), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)


###############################################################################
# Segments: layers stored once, recipes, resumable uploads ####################
###############################################################################

class LayerPushTests(LayerPushTestCase):
    # issue #16

    def test_second_push_sends_only_the_changed_layer(self):
        for oci in (False, True):
            with self.subTest(oci=oci):
                base, middle = os.urandom(3 << 20), os.urandom(1 << 20)
                project = "oci" if oci else "legacy"
                v1 = layered_image(os.path.join(self.tmp, "v1.tar"),
                                   [base, middle, os.urandom(300000)], oci)
                changed = os.urandom(400000)
                v2 = layered_image(os.path.join(self.tmp, "v2.tar"),
                                   [base, middle, changed], oci)
                first, sent1 = self.push(v1, project)
                self.assertEqual(self.deployed_sha(project, first), sha256_file(v1))
                self.assertGreater(sent1, os.path.getsize(v1))
                second, sent2 = self.push(v2, project)
                self.assertEqual(self.deployed_sha(project, second), sha256_file(v2))
                report("v2 of a %d-byte image with one %d-byte layer changed: %d "
                       "bytes sent (%s)" % (os.path.getsize(v2), len(changed), sent2,
                                            "OCI" if oci else "legacy"))
                self.assertGreaterEqual(sent2, len(changed))
                self.assertLess(sent2, len(changed) + 64 * 1024)
                # the same push again: only the recipe
                again, sent3 = self.push(v2, project)
                self.assertEqual(self.deployed_sha(project, again), sha256_file(v2))
                self.assertLess(sent3, 32 * 1024)
        self.assertEqual(self.daemon.leftovers(), [])

    def test_digests_an_image_declares_wrongly_are_corrected(self):
        # push takes a layer's digest from the image's own metadata (config
        # diff_ids, OCI blob names) and checks it while the missing segments
        # go out: a wrong one, naming a segment the server has or one it
        # lacks, never reaches the recipe, and the right bytes are sent
        base, other = os.urandom(1 << 20), os.urandom(1 << 20)
        v1 = layered_image(os.path.join(self.tmp, "v1.tar"), [base, other])
        first, _ = self.push(v1)
        self.assertEqual(self.deployed_sha("app", first), sha256_file(v1))
        for oci in (False, True):
            for lie in (hashlib.sha256(other).hexdigest(), "ab" * 32):
                with self.subTest(oci=oci, lie=lie[:4]):
                    changed = os.urandom(300000)
                    path = os.path.join(self.tmp, "lying.tar")
                    layered_image(path, [base, changed], oci, declared=[None, lie])
                    deployment, sent = self.push(path)
                    self.assertEqual(self.deployed_sha("app", deployment),
                                     sha256_file(path))
                    self.assertGreaterEqual(sent, len(changed))
                    self.assertLess(sent, len(changed) + 64 * 1024)
        self.assertEqual(self.daemon.leftovers(), [])

    def test_odd_image_metadata_and_twice_named_members_still_split(self):
        # a manifest.json that is not docker's, or a name two members bear
        # (tar -r): push computes those digests, and still sends only the
        # changed member
        base, other = os.urandom(1 << 20), os.urandom(300000)
        cases = {"web manifest": [("manifest.json", b'{"name": "app"}')],
                 "odd layers": [("manifest.json", b'[{"Config": ["x"], "Layers": 7}]')],
                 "not utf-8": [("manifest.json", b"\xff\xfe")],
                 "twice named": [("blobs/sha256/" + hashlib.sha256(other).hexdigest(),
                                  blob) for blob in (os.urandom(200000), other)]}
        for name, extra in cases.items():
            with self.subTest(name):
                members = [("base.bin", base), ("layer.bin", os.urandom(200000))] + extra
                v1 = self.write("v1.tar", plain_tar(members))
                self.deployed_sha("app", self.push(v1)[0])
                changed = [("base.bin", base), ("layer.bin", os.urandom(250000))] + extra
                v2 = self.write("v2.tar", plain_tar(changed))
                deployment, sent = self.push(v2)
                self.assertEqual(self.deployed_sha("app", deployment), sha256_file(v2))
                self.assertLess(sent, len(base))  # the 1 MiB member stayed
        self.assertEqual(self.daemon.leftovers(), [])

    def test_compressed_and_plain_files_are_one_segment_and_package_too(self):
        image = self.write("image.gz", os.urandom(200000))
        deployment, sent = self.push(image)
        self.assertEqual(self.deployed_sha("app", deployment), sha256_file(image))
        self.assertEqual(len(self.segment_files()), 2)  # image and package
        store = os.path.join(self.daemon.upload_dir, ".segments")
        self.assertEqual(stat.S_IMODE(os.stat(store).st_mode), 0o700)
        recipe = os.path.join(self.daemon.upload_dir, "app", "deployments",
                              deployment + ".recipe")
        files = json.loads(read_text(recipe))
        self.assertEqual(set(files), {"image", "package"})
        self.assertEqual([piece["sha256"] for piece in files["image"]["segments"]],
                         [sha256_file(image)])
        record = json.loads(read_text(recipe[:-len(".recipe")] + ".json"))
        self.assertTrue(record["recipe"])
        self.assertEqual(record["files"]["image"]["sha256"], sha256_file(image))

    def test_whole_upload_against_a_server_without_recipes(self):
        seen = []

        class OldServer(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                if self.headers.get("Expect") == "100-continue":
                    self.send_response_only(100)
                    self.end_headers()
                self.rfile.read(length)
                seen.append((self.path, length))
                if self.path.endswith("/upload"):
                    body = b'{"deployment": "0000", "project": "app"}'
                    self.send_response(202)
                else:
                    body = b'{"error": "not found"}'
                    self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = serve_in_thread(self, OldServer)
        image = layered_image(os.path.join(self.tmp, "v1.tar"), [os.urandom(100000)])
        environ = dict(os.environ, IPD_URL="http://127.0.0.1:%d/deploy"
                       % server.server_address[1], IPD_USER="admin",
                       IPD_PASSWORD="admin-pw", HOME=self.tmp)
        result = subprocess.run([sys.executable, IPD, "push", "--project", "app",
                                 "--image", image], env=environ, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), b"0000")
        self.assertEqual([path for path, _ in seen],
                         ["/deploy/segments/missing", "/deploy/upload"])
        self.assertGreater(seen[1][1], os.path.getsize(image))

    def test_bad_recipes_are_400_and_leave_nothing(self):
        data = os.urandom(100000)
        digest = hashlib.sha256(data).hexdigest()
        status, headers, _ = self.raw("POST", "/segments/" + digest, data)
        self.assertEqual(status, 201)
        self.assertEqual(headers["Upload-Offset"], str(len(data)))
        package = control_script(SHA_SCRIPT)

        def recipe(segments, size, sha, **extra):
            return json.dumps(dict({"project": "app", "files": {
                "image": {"name": "i.tar", "size": size, "sha256": sha,
                          "segments": segments},
                "package": {"name": "p.tgz", "size": len(package),
                            "sha256": hashlib.sha256(package).hexdigest(),
                            "segments": [{"data": base64.b64encode(package).decode()}]}}},
                **extra)).encode()
        whole = b"head" + data
        good = [{"data": base64.b64encode(b"head").decode()},
                {"sha256": digest, "size": len(data)}]
        unknown = hashlib.sha256(b"nobody sent this").hexdigest()
        cases = [
            (recipe(good, len(whole), hashlib.sha256(b"other").hexdigest()),
             "SHA-256"),
            (recipe(good, len(whole) + 1, hashlib.sha256(whole).hexdigest()),
             "bytes"),
            (recipe([{"sha256": unknown, "size": 5}], 5, unknown), "does not have"),
            (recipe([{"sha256": digest, "size": 7}], len(data), digest), "bytes"),
            (recipe([{"data": "*not base64*"}], 1, digest), "base64"),
            (b"{not json", "not JSON"),
            (json.dumps({"project": "app", "files": {"other": {}}}).encode(), "unknown"),
        ]
        for body, reason in cases:
            with self.subTest(reason=reason):
                status, _, text = self.raw("POST", "/push", body,
                                           {"Content-Type": "application/json"})
                self.assertEqual(status, 400, text)
                self.assertIn(reason, text)
        self.assertEqual(self.daemon.leftovers(), [])
        self.assertFalse(os.path.exists(os.path.join(self.daemon.upload_dir, "app",
                                                     "deployments")))
        status, _, text = self.raw("POST", "/push", recipe(
            good, len(whole), hashlib.sha256(whole).hexdigest()),
            {"Content-Type": "application/json"})
        self.assertEqual(status, 202, text)
        self.assertEqual(self.deployed_sha("app", text.strip()),
                         hashlib.sha256(whole).hexdigest())

    def test_resumable_segment_upload_with_curl(self):
        if not shutil.which("curl"):
            self.skipTest("needs curl")
        data = os.urandom(300000)
        digest = hashlib.sha256(data).hexdigest()
        first = self.write("first", data[:100000])
        rest = self.write("rest", data[100000:])
        url = "http://127.0.0.1:%d/deploy/segments/%s" % (self.daemon.port, digest)

        def curl(*args):
            result = subprocess.run(["curl", "-sS", "-i", "-u", "admin:admin-pw"]
                                    + list(args) + [url], stdout=subprocess.PIPE,
                                    universal_newlines=True, timeout=30)
            status = int(re.findall(r"(?m)^HTTP/1.1 (\d+)", result.stdout)[-1])
            headers = dict(re.findall(r"(?mi)^(upload-[a-z]+): (\S+)", result.stdout))
            return status, {key.lower(): value for key, value in headers.items()}
        # the README's lines: start with Upload-Complete: ?0, ask, go on
        self.assertEqual(curl("-X", "POST", "-H", "Upload-Complete: ?0",
                              "--data-binary", "@" + first),
                         (204, {"upload-offset": "100000", "upload-complete": "?0"}))
        self.assertEqual(curl("-I")[1], {"upload-offset": "100000",
                                         "upload-complete": "?0"})
        status, headers = curl("-X", "PATCH", "-H", "Upload-Offset: 5", "-H",
                               "Upload-Complete: ?1", "--data-binary", "@" + rest)
        self.assertEqual((status, headers["upload-offset"]), (409, "100000"))
        self.assertEqual(curl("-X", "PATCH", "-H", "Upload-Offset: 100000", "-H",
                              "Upload-Complete: ?1", "--data-binary", "@" + rest),
                         (201, {"upload-offset": "300000", "upload-complete": "?1"}))
        self.assertEqual(curl("-I"), (204, {"upload-offset": "300000",
                                            "upload-complete": "?1"}))
        status, _, text = self.raw("POST", "/segments/missing", json.dumps(
            {"segments": [digest, "0" * 64]}).encode(),
            {"Content-Type": "application/json", "Accept": "application/json"})
        self.assertEqual(json.loads(text), {"missing": ["0" * 64], "partial": {}})
        # bytes that do not hash to the name: 400, nothing kept
        wrong = hashlib.sha256(b"x").hexdigest()
        status, _, text = self.raw("POST", "/segments/" + wrong, b"y")
        self.assertEqual(status, 400, text)
        self.assertEqual(self.raw("HEAD", "/segments/" + wrong)[0], 404)
        self.assertEqual(self.segment_files(), [digest])

    def test_a_killed_push_resumes_mid_segment(self):
        layer = os.urandom(24 << 20)
        image = layered_image(os.path.join(self.tmp, "big.tar"),
                              [os.urandom(100000), layer])
        since = self.log_size()
        process = self.client("push", "--project", "app", "--image", image,
                              "--package", self.package, "--limit-rate", "4M",
                              wait=False)
        self.addCleanup(process.kill)
        partial = os.path.join(self.daemon.upload_dir, ".segments", "partial")

        def partial_size():
            # a smaller segment may finish (and move) between walk and stat
            total = 0
            for folder, _, names in os.walk(partial):
                for name in names:
                    try:
                        total += os.path.getsize(os.path.join(folder, name))
                    except FileNotFoundError:
                        pass
            return total
        wait_until(lambda: partial_size() > 6 << 20, timeout=60,
                   message="half a segment on the server")
        process.kill()
        process.wait()
        wait_until(lambda: "client gone" in self.daemon.daemon_log()[since:]
                   or "connection lost" in self.daemon.daemon_log()[since:],
                   message="the daemon noticing")
        kept = partial_size()
        self.daemon.restart()  # what arrived survives a restart too
        deployment, sent = self.push(image)
        report("a push killed after %d of %d bytes (then the daemon restarted) "
               "sent %d bytes more" % (kept, len(layer), sent))
        self.assertLess(sent, len(layer) - kept + (1 << 20))
        self.assertGreater(sent, len(layer) - kept - 1)
        self.assertEqual(self.deployed_sha("app", deployment), sha256_file(image))
        self.assertEqual(partial_size(), 0)

    def test_signed_layer_push(self):
        if not shutil.which("ssh-keygen"):
            self.skipTest("needs ssh-keygen")
        # the manifest names the rebuilt files' digests: checked as for uploads
        key, public = ssh_key(self.tmp, "alice")
        with open(os.path.join(self.tmp, "signers"), "w") as file:
            file.write("alice@app %s\n" % public)
        self.daemon.stop()
        self.daemon = self.start_daemon(dict(
            self.settings, ALLOWED_SIGNERS=os.path.join(self.tmp, "signers"),
            REQUIRE_SIGNATURE="app"))
        image = layered_image(os.path.join(self.tmp, "v1.tar"), [os.urandom(100000)])
        deployment, _ = self.push(image, "app", "--sign", key)
        self.assertEqual(self.deployed_sha("app", deployment), sha256_file(image))
        status, data = self.daemon.get_json("/status/app/" + deployment)
        self.assertEqual(data["signer"]["principal"], "alice@app")


class LayerScopeTests(LayerPushTestCase):
    # issue #16, item 5: nothing leaks between projects
    users = "USER:alice:%s:a\nUSER:bob:%s:b\n" % (sha256_hex("alice-pw"),
                                                   sha256_hex("bob-pw"))

    def missing(self, digests, user):
        status, _, text = self.raw("POST", "/segments/missing", json.dumps(
            {"segments": digests}).encode(), {"Content-Type": "application/json",
                                              "Accept": "application/json"}, user)
        self.assertEqual(status, 200, text)
        return json.loads(text)["missing"]

    def test_a_user_learns_only_of_its_own_projects_segments(self):
        alice, bob = ("alice", "alice-pw"), ("bob", "bob-pw")
        layer = os.urandom(200000)
        image = layered_image(os.path.join(self.tmp, "a.tar"), [layer])
        digest = hashlib.sha256(layer).hexdigest()
        deployment, _ = self.push(image, "a", user=alice)
        self.assertEqual(self.deployed_sha("a", deployment), sha256_file(image))
        self.assertEqual(self.missing([digest], "alice:alice-pw"), [])
        self.assertEqual(self.missing([digest], "bob:bob-pw"), [digest])
        self.assertEqual(self.missing([digest], "admin"), [])  # every project
        self.assertEqual(self.raw("HEAD", "/segments/" + digest, user="bob:bob-pw")[0],
                         404)
        # a recipe naming it is refused as if the server had nothing
        recipe = json.dumps({"project": "b", "files": {"image": {
            "size": len(layer), "sha256": digest,
            "segments": [{"sha256": digest, "size": len(layer)}]}}}).encode()
        status, _, text = self.raw("POST", "/push", recipe,
                                   {"Content-Type": "application/json"}, "bob:bob-pw")
        self.assertEqual(status, 400)
        self.assertIn("does not have", text)
        # bob may not push to a at all: refused before any body
        status, _, _ = self.raw("POST", "/segments/missing", b"{}", {
            "Content-Type": "application/json", "X-Ipd-Project": "a"}, "bob:bob-pw")
        self.assertEqual(status, 403)
        # bob sends the bytes himself: stored once, present for him then
        since = self.log_size()
        other = layered_image(os.path.join(self.tmp, "b.tar"), [layer],
                              tag="b/app:1")
        deployment, sent = self.push(other, "b", user=bob)
        self.assertGreater(sent, len(layer))
        self.assertEqual(self.deployed_sha("b", deployment), sha256_file(other))
        self.assertEqual(self.segment_files().count(digest), 1)
        self.assertEqual(self.missing([digest], "bob:bob-pw"), [])
        self.assertIn("/segments/" + digest, self.daemon.daemon_log()[since:])


class LayerDiskTests(LayerPushTestCase):
    # issue #16, item 4: kept recipes, rebuilt files dropped, segments collected
    settings = {"KEEP_DEPLOYMENTS": "2", "SEGMENT_EXPIRY": "1"}

    def files_of(self, deployment):
        folder = os.path.join(self.daemon.upload_dir, "app", "deployments")
        return sorted(name[len(deployment):] for name in os.listdir(folder)
                      if name.startswith(deployment + "."))

    def test_layers_held_once_rebuilt_on_redeploy_and_collected(self):
        shared = os.urandom(2 << 20)
        tops = [os.urandom(200000) for _ in range(3)]
        images = [layered_image(os.path.join(self.tmp, "v%d.tar" % number),
                                [shared, top]) for number, top in enumerate(tops)]
        first, _ = self.push(images[0])
        self.deployed_sha("app", first)
        self.assertNotIn(".image", self.files_of(first))  # dropped before 'ok'
        self.assertIn(".recipe", self.files_of(first))
        self.assertNotIn(".package", self.files_of(first))
        second, _ = self.push(images[1])
        self.deployed_sha("app", second)
        status, stats = self.daemon.get_json("/stat")
        self.assertEqual(stats["segments"], 4)  # shared, two tops, the package
        self.assertGreater(stats["saved_bytes"], len(shared))
        self.assertGreaterEqual(stats["stored_bytes"], stats["unique_bytes"])
        metrics = parse_prometheus(self.daemon.get("/metrics")[2])[0]
        self.assertEqual(metrics[("ipd_unique_bytes", ())], stats["unique_bytes"])
        self.assertEqual(metrics[("ipd_saved_bytes", ())], stats["saved_bytes"])
        # a redeploy rebuilds the dropped image from its segments
        status, _, text = self.daemon.request("POST", "/redeploy/app/" + first)
        self.assertEqual(status, 202, text)
        self.assertEqual(self.deployed_sha("app", text.strip()), sha256_file(images[0]))
        # v0's own top layer: referred to by the redeploy; once pruned and
        # SEGMENT_EXPIRY passed, it goes
        top0 = hashlib.sha256(tops[0]).hexdigest()
        self.assertIn(top0, self.segment_files())
        time.sleep(1.2)
        third, _ = self.push(images[2])
        self.deployed_sha("app", third)
        time.sleep(1.2)
        fourth, _ = self.push(images[2], "app", "--whole")
        self.deployed_sha("app", fourth)
        self.assertNotIn(top0, self.segment_files())  # collected before 'ok'
        self.assertIn(hashlib.sha256(shared).hexdigest(), self.segment_files())
        self.assertEqual(self.daemon.leftovers(), [])


class LayerFuzzTests(LayerPushTestCase):
    # issue #16: odd input to the new endpoints is a 4xx, never a 5xx
    settings = {"MAX_UPLOAD_SIZE": "1M", "READ_TIMEOUT": "5"}

    def test_fuzz_segment_and_recipe_endpoints(self):
        rng = random.Random(16)
        data = b"segment bytes"
        digest = hashlib.sha256(data).hexdigest()
        self.assertEqual(self.raw("POST", "/segments/" + digest, data)[0], 201)
        pieces = [{"sha256": digest, "size": len(data)}, {"sha256": digest},
                  {"data": "aGVsbG8="}, {"data": 5}, {"sha256": "0" * 64, "size": -1},
                  [], "x", None, {"sha256": digest.upper(), "size": 13}]
        values = ["?1", "?0", "?2", "", "1", "-5", "99999999999999999999", "0", "13",
                  "application/json", "100-continue"]
        statuses = {}
        for _ in range(300):
            method = rng.choice(["POST", "PATCH", "HEAD", "GET", "PUT"])
            name = rng.choice([digest, "missing", "0" * 64, "x", digest.upper(), ""])
            path = rng.choice(["/deploy/segments/" + name, "/deploy/push",
                               "/deploy/segments/missing"])
            body = rng.choice([
                b"", os.urandom(rng.randrange(100)), b"{}", b"[]", b"null",
                json.dumps({"segments": rng.sample(pieces, 2)}).encode(),
                json.dumps({"segments": [digest, 5]}).encode(),
                json.dumps({"project": rng.choice(["app", "..", 5, None]),
                            "force": rng.choice([True, "x", 2]), "files": {
                                rng.choice(["image", "package", "x"]): {
                                    "size": rng.choice([13, -1, "13", 2 ** 70]),
                                    "sha256": rng.choice([digest, "zz", 5]),
                                    "segments": rng.sample(pieces, 3)}}}).encode()])
            fields = {"Host": "127.0.0.1", "Authorization": ADMIN_AUTH}
            for header in rng.sample(["Upload-Offset", "Upload-Complete",
                                      "Content-Type", "Expect", "X-Ipd-Project"],
                                     rng.randrange(3)):
                fields[header] = rng.choice(values)
            answer = raw_exchange(self.daemon.port, raw_request(method, path, body,
                                                                fields), timeout=15)
            status = answer_status(answer)
            statuses[status] = statuses.get(status, 0) + 1
        self.assertNotIn(None, statuses)
        self.assertEqual([status for status in statuses if status >= 500], [], statuses)
        self.assertNotIn("Traceback", self.daemon.daemon_log())
        self.assertEqual(self.daemon.leftovers(), [])


class LayerPushBoundsTests(LayerPushTestCase):
    # issue 23, items 1, 2, 6 and 7: what a hostile body can make the
    # daemon remember, write and answer on the layer-push endpoints

    def post_json(self, path, body, user="admin", headers=None):
        return self.raw("POST", path, body, dict({"Content-Type": "application/json"},
                                                 **(headers or {})), user)

    def test_json_of_any_shape_is_400_with_a_reason(self):
        deep = b"[" * 20000 + b"]" * 20000
        nested = b'{"a":' * 5000 + b"1" + b"}" * 5000
        many = b'{"segments": [' + b",".join([b"{}"] * 500000) + b"]}"
        bodies = {"deep array": (deep, "nested"), "deep object": (nested, "nested"),
                  "array": (b"[1]", "object"), "null": (b"null", "object"),
                  "string": (b'"x"', "object"), "number": (b"5", "object"),
                  "too many values": (many, "values"),
                  "long number": (b'{"segments": 1' + b"0" * 5000 + b"}", "digits"),
                  "not utf-8": (b'{"segments": ["\xff"]}', "not JSON")}
        for path in ("/push", "/segments/missing"):
            for name, (body, reason) in bodies.items():
                with self.subTest(path=path, body=name):
                    status, _, text = self.post_json(path, body)
                    self.assertEqual(status, 400, text)
                    self.assertIn(reason, text)
        # a signed push's manifest, in a multipart upload
        package = control_script(OK_SCRIPT)
        manifests = {"deep array": b"[" * 2000 + b"]" * 2000,
                     "deep object": b'{"a":' * 600 + b"1" + b"}" * 600,
                     "array": b"[1]", "null": b"null", "string": b'"x"'}
        for name, body in manifests.items():
            with self.subTest(manifest=name):
                content_type, data = multipart([
                    ("project", "app"), ("manifest", body),
                    ("signature", "x"), ("package", ("p.tgz", package))])
                status, _, text = self.raw("POST", "/upload", data,
                                           {"Content-Type": content_type})
                self.assertEqual(status, 400, text)
        self.assertNotIn("Traceback", self.daemon.daemon_log())
        self.assertEqual(self.daemon.leftovers(), [])

    def test_probes_leave_the_daemon_small(self):
        # made-up digests are not remembered, a body of millions of {} is
        # refused as it arrives, and an oversized list is refused unread
        before = daemon_rss(self.daemon)
        made_up = [hashlib.sha256(b"%d" % number).hexdigest()
                   for number in range(ipd.MISSING_MAX_SEGMENTS)]
        for round_number in range(20):  # 400,000 digests: 60 MiB if kept
            body = json.dumps({"segments": made_up}).encode()
            status, _, text = self.post_json("/segments/missing", body,
                                             headers={"Accept": "application/json"})
            self.assertEqual(status, 200, text[:200])
            self.assertEqual(len(json.loads(text)["missing"]), len(made_up))
            made_up = [hashlib.sha256(digest.encode()).hexdigest()
                       for digest in made_up]
        pieces = (made_up * 2)[:ipd.RECIPE_MAX_PIECES]
        for round_number in range(4):  # the largest recipes, all made up
            recipe = json.dumps({"project": "app", "files": {field: {
                "size": 5 * len(pieces), "sha256": "0" * 64,
                "segments": [{"sha256": digest[:-1] + str(len(field)), "size": 5}
                             for digest in pieces]} for field in ("image", "package")}})
            status, _, text = self.post_json("/push", recipe.encode())
            self.assertEqual((status, "does not have" in text), (400, True), text)
            pieces = [hashlib.sha256(digest.encode()).hexdigest() for digest in pieces]
        flood = b"{" + b'"x":[' + b"{}," * (21 << 20) + b"{}]}"
        status, _ = send_body(self.daemon.port, json_head("/deploy/push", len(flood)),
                              flood)
        self.assertEqual(status, 400)
        big = b'{"segments": [' + b'"' + b"a" * 64 + b'",' * (1 << 20)
        status, _ = send_body(self.daemon.port,
                              json_head("/deploy/segments/missing", 64 << 20), big)
        self.assertEqual(status, 413)
        after, peak = daemon_rss(self.daemon), daemon_rss(self.daemon, "VmHWM")
        report("daemon RSS %.1f MiB before the probes, %.1f MiB after (peak %.1f MiB)"
               % (before / 2 ** 20, after / 2 ** 20, peak / 2 ** 20))
        self.assertLess(after, 64 << 20)
        self.assertLess(after - before, 32 << 20)
        self.assertLess(peak, 64 << 20)
        self.assertEqual(self.daemon.leftovers(), [])

    def segment(self, size=1 << 20):
        data = os.urandom(size)
        digest = hashlib.sha256(data).hexdigest()
        self.assertEqual(self.raw("POST", "/segments/" + digest, data)[0], 201)
        return data, digest

    def recipe(self, digest, size, count, declared=None, sha=None):
        return json.dumps({"project": "app", "files": {"image": {
            "size": size * count if declared is None else declared,
            "sha256": sha or "0" * 64,
            "segments": [{"sha256": digest, "size": size}] * count}}}).encode()

    def test_a_recipe_must_add_up_and_fit_before_a_byte_is_copied(self):
        free = shutil.disk_usage(self.daemon.upload_dir).free
        count = ipd.RECIPE_MAX_PIECES
        data, digest = self.segment(min(64 << 20, free // count + (1 << 20)))
        cases = [(self.recipe(digest, len(data), count, declared=len(data)),
                  400, "add up")]
        if count * len(data) > free:  # never a real copy of it all
            cases.append((self.recipe(digest, len(data), count), 507, "free"))
        for body, expected, reason in cases:
            with self.subTest(reason=reason):
                started = time.monotonic()
                status, _, text = self.post_json("/push", body)
                self.assertEqual(status, expected, text)
                self.assertIn(reason, text)
                self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(self.daemon.leftovers(), [])
        self.assertNotIn("Traceback", self.daemon.daemon_log())

    def test_a_rebuild_stops_when_its_client_leaves(self):
        data, digest = self.segment()
        free = shutil.disk_usage(self.daemon.upload_dir).free
        count = ipd.RECIPE_MAX_PIECES  # 10 GiB, which would take a while
        if free < (count + 1024) * len(data):
            self.skipTest("needs %d GiB free" % (count // 1024 + 1))
        body = self.recipe(digest, len(data), count)
        sock = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=30)
        try:
            sock.sendall(json_head("/deploy/push", len(body)) + body)
            wait_until(lambda: self.sizes_of_leftovers() > 64 << 20,
                       message="the rebuild under way")
        finally:
            sock.close()
        at_close = self.sizes_of_leftovers()
        wait_until(lambda: not self.daemon.leftovers(), timeout=20,
                   message="the rebuild's file removed")
        self.assertIn("client gone", self.daemon.daemon_log("client gone"))
        report("a rebuild of %.1f GiB whose client left after %d MiB stopped"
               % (count / 1024.0, at_close >> 20))

    def sizes_of_leftovers(self):
        total = 0
        for name in self.daemon.leftovers():
            try:
                total += os.path.getsize(os.path.join(self.daemon.upload_dir, name))
            except OSError:
                pass
        return total


class LayerMissingTimingTests(LayerPushTestCase):
    # issue 23, item 7: what another project holds does not show in time
    alone = True  # measures time: runs while no other test does

    def post_json(self, path, body, user="admin", headers=None):
        return self.raw("POST", path, body, dict({"Content-Type": "application/json"},
                                                 **(headers or {})), user)

    def test_missing_does_the_same_work_whatever_another_project_holds(self):
        # a digest another project holds costs what a made-up one costs:
        # duplicates are removed first (issue 23, item 7)
        held = os.urandom(100000)
        digest = hashlib.sha256(held).hexdigest()
        self.assertEqual(self.raw("POST", "/segments/" + digest, held)[0], 201)
        with open(self.daemon.users_file, "a") as file:
            file.write("USER:eve:%s:other\n" % sha256_hex("eve-pw"))
        timings = {"held": [], "made up": []}
        for _ in range(7):  # taken in turns, the fastest of each
            for name, named in (("held", digest), ("made up", "ab" * 32)):
                body = json.dumps({"segments": [named] * ipd.MISSING_MAX_SEGMENTS})
                started = time.perf_counter()
                status, _, text = self.post_json("/segments/missing", body.encode(),
                                                 "eve:eve-pw",
                                                 {"Accept": "application/json"})
                timings[name].append(time.perf_counter() - started)
                self.assertEqual(json.loads(text)["missing"], [named])
        timings = {name: min(runs) for name, runs in timings.items()}
        report("/segments/missing of %d copies: held by another %.1f ms, made up "
               "%.1f ms" % (ipd.MISSING_MAX_SEGMENTS, 1000 * timings["held"],
                            1000 * timings["made up"]))
        self.assertLess(abs(timings["held"] - timings["made up"]),
                        0.25 * timings["made up"] + 0.01, timings)


class LayerPushSizeLimitTests(LayerPushTestCase):
    # issue 23, item 2: MAX_UPLOAD_SIZE holds for a recipe's files too
    settings = {"MAX_UPLOAD_SIZE": "4M"}

    def test_a_recipe_larger_than_max_upload_size_is_413(self):
        data = os.urandom(1 << 20)
        digest = hashlib.sha256(data).hexdigest()
        self.assertEqual(self.raw("POST", "/segments/" + digest, data)[0], 201)
        for count, expected in ((ipd.RECIPE_MAX_PIECES, 413), (5, 413), (4, 400)):
            with self.subTest(count=count):
                body = json.dumps({"project": "app", "files": {"image": {
                    "size": count << 20, "sha256": "0" * 64,
                    "segments": [{"sha256": digest, "size": 1 << 20}] * count}}})
                status, _, text = self.raw("POST", "/push", body.encode(),
                                           {"Content-Type": "application/json"})
                self.assertEqual(status, expected, text)
                if expected == 413:
                    self.assertIn("MAX_UPLOAD_SIZE", text)
                else:
                    self.assertIn("SHA-256", text)  # exactly 4M: copied, checked
        self.assertEqual(self.daemon.leftovers(), [])


class LayerJsonFuzzTests(LayerPushTestCase):
    # issue 23, item 6: nested, non-object and huge JSON to every endpoint
    # that decodes JSON: never a 5xx (make soak: 20,000 requests)
    settings = {"MAX_UPLOAD_SIZE": "1M", "READ_TIMEOUT": "5"}
    requests = int(os.environ.get("IPD_FUZZ_REQUESTS", soak(20000, 400)))

    def test_fuzz_json_bodies(self):
        rng = random.Random(23)
        data = b"segment bytes"
        digest = hashlib.sha256(data).hexdigest()
        self.assertEqual(self.raw("POST", "/segments/" + digest, data)[0], 201)
        statuses = {}
        started = time.monotonic()
        for _ in range(self.requests):
            body = hostile_json(rng, digest)
            path = rng.choice(["/deploy/push", "/deploy/segments/missing", "manifest"])
            fields = {"Host": "127.0.0.1", "Authorization": ADMIN_AUTH,
                      "Content-Type": "application/json"}
            if path == "manifest":  # a signed upload's manifest field
                content_type, body = multipart([
                    ("project", "app"), ("manifest", body[:4096]), ("signature", "x"),
                    ("package", ("p.tgz", b"x"))])
                path, fields["Content-Type"] = "/deploy/upload", content_type
            if rng.random() < 0.2:
                fields["Expect"] = "100-continue"
            answer = raw_exchange(self.daemon.port, raw_request(
                "POST", path, body, fields), timeout=30)
            status = answer_status(answer)
            statuses[status] = statuses.get(status, 0) + 1
        report("%d hostile JSON bodies to /push, /segments/missing and a manifest in "
               "%.0f s: %s" % (self.requests, time.monotonic() - started,
                               ", ".join("%s: %d" % item for item in
                                         sorted(statuses.items(), key=str))))
        self.assertNotIn(None, statuses)
        self.assertEqual([status for status in statuses if status >= 500], [], statuses)
        self.assertNotIn("Traceback", self.daemon.daemon_log())
        self.assertEqual(self.daemon.leftovers(), [])
        self.assertLess(daemon_rss(self.daemon), 64 << 20)


class SegmentTakeoverTests(LayerPushTestCase):
    # issue 23, item 9: a retry right after a cut resumes

    def client_via(self, port, *args):
        environ = ipd_environ(dict(os.environ, IPD_URL="http://127.0.0.1:%d/deploy" % port,
                                   IPD_USER="admin", IPD_PASSWORD="admin-pw",
                                   HOME=self.tmp))
        return subprocess.run(IPD_RUN + list(args), env=environ, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              timeout=180)

    def test_a_push_right_after_a_cut_resumes(self):
        layer = os.urandom(soak(64, 24) << 20)
        image = layered_image(os.path.join(self.tmp, "big.tar"),
                              [os.urandom(100000), layer])
        size = os.path.getsize(image)
        relay = CuttingRelay(self, self.daemon.port, size // 2)
        args = ("push", "--project", "app", "--image", image, "--package", self.package)
        first = self.client_via(relay.port, *args)
        self.assertNotEqual(first.returncode, 0, first.stderr)
        with relay.lock:
            relay.down, before = False, relay.sent
        second = self.client_via(relay.port, *args)
        self.assertEqual(second.returncode, 0, second.stderr)
        sent = relay.sent - before
        report("a push cut after %d of %d bytes, pushed again at once: %d bytes "
               "(%.0f %%)" % (before, size, sent, 100.0 * sent / size))
        self.assertLess(sent, 0.55 * size)
        deployment = second.stdout.decode().strip()
        self.assertEqual(self.deployed_sha("app", deployment), sha256_file(image))

    def test_a_retry_of_a_stored_segment_sends_nothing(self):
        data = os.urandom(100000)
        digest = hashlib.sha256(data).hexdigest()
        self.assertEqual(self.raw("POST", "/segments/" + digest, data)[0], 201)
        for method, offset in (("POST", 0), ("PATCH", len(data))):
            with self.subTest(method):
                head = raw_request(method, "/deploy/segments/" + digest, b"", {
                    "Content-Length": str(len(data) - offset),
                    "Upload-Offset": str(offset), "Expect": "100-continue"})
                line = first_answer_line(self.daemon.port, head)
                self.assertEqual(line, "HTTP/1.1 200 OK")

    def test_a_writer_still_receiving_is_not_taken_over(self):
        # a live upload (a byte each 0.5 s) goes on; a second request for
        # it waits TAKEOVER_WAIT, gets 409, and the first one completes
        data = os.urandom(300000)
        digest = hashlib.sha256(data).hexdigest()
        sock = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=60)
        self.addCleanup(sock.close)
        sock.sendall(raw_request("POST", "/deploy/segments/" + digest, b"", {
            "Content-Length": str(len(data))}) + data[:1000])
        wait_until(lambda: os.path.isdir(os.path.join(
            self.daemon.upload_dir, ".segments", "partial")))
        sent, stop = [1000], threading.Event()

        def trickle():
            while not stop.is_set():
                sock.sendall(data[sent[0]:sent[0] + 1])
                sent[0] += 1
                time.sleep(0.5)
        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        status, headers, text = self.raw("PATCH", "/segments/" + digest,
                                         data[1000:2000], {"Upload-Offset": "1000"})
        stop.set()
        thread.join()
        self.assertEqual(status, 409, text)
        self.assertIn("another request", text)
        sock.sendall(data[sent[0]:])
        answer = b""
        while b"\r\n\r\n" not in answer:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        self.assertEqual(answer_status(answer), 201)


class SegmentQuotaTests(LayerPushTestCase):
    # issue 23, item 3: per-user bounds on what is not yet deployed
    settings = {"SEGMENT_QUOTA": "1M", "SEGMENT_UPLOADS": "1"}
    users = "USER:alice:%s:a\n" % sha256_hex("alice-pw")

    def post(self, data, user="admin", complete=True):
        digest = hashlib.sha256(data).hexdigest()
        return self.raw("POST", "/segments/" + digest, data,
                        {"Upload-Complete": "?1" if complete else "?0"}, user)

    def test_segment_bytes_not_in_a_deployment_are_bounded_per_user(self):
        first, second = os.urandom(600000), os.urandom(600000)
        self.assertEqual(self.post(first)[0], 201)
        self.assertEqual(self.post(os.urandom(300000), complete=False)[0], 204)
        status, _, text = self.post(second)
        self.assertEqual(status, 507, text)
        self.assertIn("SEGMENT_QUOTA", text)
        self.assertEqual(self.post(second, "alice:alice-pw")[0], 201)  # her own
        # once a deployment refers to the first, it no longer counts
        image = self.write("image.bin", first)
        deployment, _ = self.push(image)
        self.assertEqual(self.deployed_sha("app", deployment), sha256_file(image))
        self.assertEqual(self.post(second)[0], 201)
        left = (1 << 20) - 900000  # at its boundary: one byte more is refused
        self.assertEqual(self.post(os.urandom(left + 1))[0], 507)
        self.assertEqual(self.post(os.urandom(left))[0], 201)

    def test_concurrent_uploads_are_bounded_per_user(self):
        data = os.urandom(100000)
        sock = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=30)
        self.addCleanup(sock.close)
        sock.sendall(raw_request("POST", "/deploy/segments/"
                                 + hashlib.sha256(data).hexdigest(), b"",
                                 {"Content-Length": str(len(data))}) + data[:10])
        partial = os.path.join(self.daemon.upload_dir, ".segments", "partial")
        wait_until(lambda: os.path.isdir(partial) and any(
            files for _, _, files in os.walk(partial)), message="the first upload")
        status, headers, text = self.post(os.urandom(1000))
        self.assertEqual(status, 429, text)
        self.assertIn("SEGMENT_UPLOADS", text)
        self.assertEqual(self.post(os.urandom(1000), "alice:alice-pw")[0], 201)
        sock.sendall(data[10:])
        self.assertEqual(answer_status(sock.recv(65536)), 201)
        self.assertEqual(self.post(os.urandom(1000))[0], 201)


###############################################################################
# Retention: what the disk keeps ##############################################
###############################################################################

class PruneTests(DaemonTestCase):
    settings = {"KEEP_DEPLOYMENTS": "2"}

    def test_old_deployments_lose_files_but_keep_state_and_log(self):
        ids = []
        for number in range(4):
            deployment = self.daemon.deploy('echo "run %d"; exit 1' % number)
            self.daemon.wait_state("app", deployment)
            ids.append(deployment)
        folder = os.path.join(self.daemon.upload_dir, "app", "deployments")
        for number, deployment in enumerate(ids):
            kept = number >= 2
            self.assertEqual(os.path.exists(os.path.join(folder, deployment)), kept)
            self.assertEqual(os.path.exists(os.path.join(folder, deployment + ".package")),
                             kept)
            self.assertEqual(self.daemon.state("app", deployment), "ok")
            self.assertIn("run %d" % number, self.daemon.log("app", deployment))
        self.assertTrue(self.daemon.get_json("/status/app/" + ids[0])[1]["pruned"])


@unittest.skipUnless(os.geteuid() == 0 and shutil.which("mount"),
                     "needs root to mount a small filesystem")
class DiskFullTests(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        self.small = os.path.join(self.tmp, "small")
        os.mkdir(self.small)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs",
                                 self.small], stderr=subprocess.PIPE)
        if result.returncode:
            self.skipTest("cannot mount tmpfs: %s" % result.stderr.decode().strip())
        self.addCleanup(subprocess.run, ["umount", "-l", self.small])
        self.daemon = DaemonProcess(self.tmp, {"UPLOAD_DIR": self.small}).start()
        self.daemon.upload_dir = self.small
        self.addCleanup(self.daemon.stop, signal.SIGKILL)

    def test_disk_full_is_507_and_leaves_nothing(self):
        earlier = self.daemon.deploy()
        self.assertEqual(self.daemon.wait_state("app", earlier), "ok")
        before = sorted(os.listdir(os.path.join(self.small, "app", "deployments")))
        status, _, body = self.daemon.upload("app", control_script(OK_SCRIPT),
                                             image=os.urandom(3 << 20))
        self.assertEqual(status, 507, body)
        self.assertIn("disk full", body)
        self.assertEqual(self.daemon.leftovers(), [])
        self.assertEqual(sorted(os.listdir(os.path.join(self.small, "app",
                                                        "deployments"))), before)
        self.assertEqual(self.daemon.state("app", earlier), "ok")
        self.assertEqual(self.daemon.state("app"), "ok")
        again = self.daemon.deploy()
        self.assertEqual(self.daemon.wait_state("app", again), "ok")


class LayerFreeSpaceTests(LayerPushTestCase):
    # issue #16, item 4: below MIN_FREE_SPACE the oldest prunable go first
    settings = {"MIN_FREE_SPACE": "1000000T"}

    def test_below_the_floor_all_but_the_latest_ok_are_pruned(self):
        ids = []
        for _ in range(3):
            ids.append(self.daemon.deploy())
            self.daemon.wait_state("app", ids[-1])
        failing = self.daemon.deploy('[ "$1" = deploy ] && exit 7; exit 1\n')
        self.assertEqual(self.daemon.wait_state("app", failing), "7")

        def pruned():
            return [self.daemon.get_json("/status/app/" + deployment)[1]["pruned"]
                    for deployment in ids + [failing]]
        self.assertEqual(pruned(), [True, True, False, True])  # before the end shows


class FloorOwnProjectTests(LayerPushTestCase):
    """Issue 23: below MIN_FREE_SPACE a deployment's end prunes only its own
    project's files: no project pays for another's use of the disk."""

    def run_deployments(self, project, count):
        ids = []
        for _ in range(count):  # one after another: not "the same files again"
            ids.append(self.daemon.deploy(project=project))
            self.assertEqual(self.daemon.wait_state(project, ids[-1]), "ok")
        return ids

    def pruned(self, project, ids):
        return [self.daemon.get_json("/status/%s/%s" % (project, deployment))[1]["pruned"]
                for deployment in ids]

    def test_below_the_floor_an_ending_deployment_prunes_only_its_own_project(self):
        docs = self.run_deployments("docs", 2)  # above the floor: both kept
        self.daemon.stop()
        self.daemon.start(env={"MIN_FREE_SPACE": "1000000T"})  # now below it
        web = self.run_deployments("web", 2)
        self.assertEqual(self.pruned("web", web), [True, False])
        self.assertEqual(self.pruned("docs", docs), [False, False])  # not web's to take
        docs += self.run_deployments("docs", 1)
        self.assertEqual(self.pruned("docs", docs), [True, True, False])


class SegmentFloorTests(LayerPushTestCase):
    # issue 23, item 3: below MIN_FREE_SPACE a layer push is refused (507)
    # and prunes nothing of another project

    def test_a_push_below_the_floor_is_507_and_prunes_no_other_project(self):
        docs = []
        for number in range(2):  # one after the other: a waiting one is 'changed'
            docs.append(self.daemon.deploy(OK_SCRIPT + "# %d\n" % number, project="docs"))
            self.assertEqual(self.daemon.wait_state("docs", docs[-1]), "ok")
        self.daemon.stop()
        self.daemon = self.start_daemon({"MIN_FREE_SPACE": "1000000T"})
        data = os.urandom(100000)
        digest = hashlib.sha256(data).hexdigest()
        status, _, text = self.raw("POST", "/segments/" + digest, data)
        self.assertEqual(status, 507, text)
        self.assertIn("MIN_FREE_SPACE", text)
        recipe = json.dumps({"project": "web", "files": {"package": {
            "size": 5, "sha256": hashlib.sha256(b"hello").hexdigest(),
            "segments": [{"data": base64.b64encode(b"hello").decode()}]}}}).encode()
        status, _, text = self.raw("POST", "/push", recipe,
                                   {"Content-Type": "application/json"})
        self.assertEqual(status, 507, text)
        _, record = self.daemon.get_json("/status/docs/" + docs[0])
        self.assertFalse(record["pruned"])
        self.assertEqual(self.raw("POST", "/redeploy/docs/" + docs[0])[0], 202)


###############################################################################
# Registry: the OCI Distribution push and pull protocol #######################
###############################################################################

class RegistryTests(RegistryTestCase):
    """The push and pull protocol, driven by hand as clients drive it."""

    def test_base_challenges_then_admits(self):
        status, headers, body = self.call("GET", "/v2/", user=None)
        self.assertEqual(status, 401)
        self.assertTrue(headers["WWW-Authenticate"].startswith('Basic realm="ipd"'))
        self.assertEqual(json.loads(body)["errors"][0]["code"], "UNAUTHORIZED")
        status, headers, body = self.call("GET", "/v2/")
        self.assertEqual((status, headers["Docker-Distribution-API-Version"]),
                         (200, "registry/2.0"))
        self.assertError(self.call("GET", "/v2/", user="admin:wrong"), 401, "UNAUTHORIZED")

    def test_chunked_upload_ranges_status_resume_and_put_with_last_bytes(self):
        blob = os.urandom(3000)
        status, headers, _ = self.call("POST", "/v2/web/blobs/uploads/")
        self.assertEqual((status, headers["Range"]), (202, "0-0"))
        location, uuid_ = headers["Location"], headers["Docker-Upload-UUID"]
        self.assertTrue(location.startswith("/v2/web/blobs/uploads/"))
        self.assertIn(uuid_, location)
        status, headers, _ = self.call("PATCH", location, blob[:1000], {
            "Content-Range": "0-999", "Content-Type": "application/octet-stream"})
        self.assertEqual((status, headers["Range"]), (202, "0-999"))
        # a chunk that does not follow on: 416 with where the upload is
        answer = self.call("PATCH", location, blob[1500:2000], {"Content-Range": "1500-1999"})
        self.assertError(answer, 416, "BLOB_UPLOAD_INVALID")
        self.assertEqual(answer[1]["Range"], "0-999")
        status, headers, _ = self.call("GET", location)  # the resume's question
        self.assertEqual((status, headers["Range"]), (204, "0-999"))
        status, headers, _ = self.call("PATCH", headers["Location"], iter([blob[1000:2000]]))
        self.assertEqual((status, headers["Range"]), (202, "0-1999"))
        status, headers, _ = self.call("PUT", location + "?digest=" + digest_of(blob),
                                       blob[2000:])
        self.assertEqual(status, 201)
        self.assertEqual(headers["Docker-Content-Digest"], digest_of(blob))
        self.assertEqual(headers["Location"], "/v2/web/blobs/" + digest_of(blob))
        status, headers, body = self.call("HEAD", "/v2/web/blobs/" + digest_of(blob))
        self.assertEqual((status, headers["Content-Length"], body), (200, "3000", b""))
        status, headers, body = self.call("GET", "/v2/web/blobs/" + digest_of(blob))
        self.assertEqual((status, body), (200, blob))
        self.assertError(self.call("GET", location), 404, "BLOB_UPLOAD_UNKNOWN")
        self.assertEqual(self.partial_files(), [])

    def test_monolithic_mount_and_abandon(self):
        blob = b"monolithic blob"
        status, headers, _ = self.call(
            "POST", "/v2/web/blobs/uploads/?digest=" + digest_of(blob), blob)
        self.assertEqual((status, headers["Docker-Content-Digest"]), (201, digest_of(blob)))
        # mounted into another project of the user's: no bytes sent
        status, headers, _ = self.call("POST", "/v2/api/blobs/uploads/?mount=%s&from=web"
                                       % digest_of(blob))
        self.assertEqual(status, 201)
        self.assertEqual(self.call("HEAD", "/v2/api/blobs/" + digest_of(blob))[0], 200)
        # an unknown blob to mount: a plain upload instead, abandoned
        status, headers, _ = self.call("POST", "/v2/api/blobs/uploads/?mount=%s&from=web"
                                       % digest_of(b"absent"))
        self.assertEqual(status, 202)
        self.assertEqual(self.call("DELETE", headers["Location"])[0], 204)
        self.assertError(self.call("GET", headers["Location"]), 404, "BLOB_UPLOAD_UNKNOWN")
        self.assertEqual(self.partial_files(), [])

    def test_wrong_digest_is_digest_invalid_and_nothing_stored(self):
        status, headers, _ = self.call("POST", "/v2/web/blobs/uploads/")
        location = headers["Location"]
        self.call("PATCH", location, b"some bytes")
        message = self.assertError(self.call("PUT", location + "?digest=" + digest_of(b"x")),
                                   400, "DIGEST_INVALID")
        self.assertIn(digest_of(b"some bytes"), message)
        for data in (b"x", b"some bytes"):
            self.assertError(self.call("HEAD", "/v2/web/blobs/" + digest_of(data)), 404,
                             "BLOB_UNKNOWN")
        self.assertEqual(self.partial_files(), [])

    def test_tag_push_deploys_a_docker_load_tar_with_image_ref_and_digest(self):
        layers = [gzip_layer({"bin/app": b"v1"}), gzip_layer({"www/index.html": b"v1\n"})]
        answer, manifest = self.push_image("v1", layers)
        digest = answer[1]["Docker-Content-Digest"]
        self.assertEqual(digest, digest_of(manifest))
        self.assertEqual(answer[1]["Location"], "/v2/web/manifests/" + digest)
        deployment = self.deployed(answer)
        log = self.daemon.log("web", deployment)
        self.assertIn("IMAGE_REF=127.0.0.1:%d/web:v1\n" % self.daemon.port, log)
        self.assertIn("IMAGE_DIGEST=%s\n" % digest, log)
        image = os.path.join(self.daemon.upload_dir, "web", "image-%s.tar" % deployment)
        with tarfile.open(image) as tar:
            loaded = json.loads(tar.extractfile("manifest.json").read())
            self.assertEqual(loaded[0]["RepoTags"], ["127.0.0.1:%d/web:v1" % self.daemon.port])
            self.assertEqual([tar.extractfile(name).read() for name in loaded[0]["Layers"]],
                             layers)
            config = json.loads(tar.extractfile(loaded[0]["Config"]).read())
            self.assertEqual(config["architecture"], "amd64")
        # pull: byte for byte, by tag and by digest, with its type
        for reference in ("v1", digest):
            status, headers, body = self.call("GET", "/v2/web/manifests/" + reference)
            self.assertEqual((status, body, headers["Content-Type"],
                              headers["Docker-Content-Digest"]),
                             (200, manifest, DOCKER_MANIFEST, digest))
        self.assertEqual(json.loads(self.call("GET", "/v2/web/tags/list")[2]),
                         {"name": "web", "tags": ["v1"]})
        event = audit_events(self.tmp, "upload")[-1]
        self.assertEqual((event["deployment"], event["image_ref"]),
                         (deployment, "127.0.0.1:%d/web:v1" % self.daemon.port))
        status, data = self.daemon.get_json("/stat")
        self.assertEqual(data["uploads"], 1)
        # a redeploy (the rollback) of a pushed image: the same IMAGE_REF
        status, _, again = self.daemon.request("POST", "/redeploy/web/" + deployment)
        self.assertEqual(status, 202, again)
        self.assertEqual(self.daemon.wait_state("web", again.strip()), "ok")
        self.assertIn("IMAGE_REF=127.0.0.1:%d/web:v1\n" % self.daemon.port,
                      self.daemon.log("web", again.strip()))

    def test_oci_index_by_digest_stores_and_by_tag_deploys_this_platform(self):
        amd64 = [gzip_layer({"arch": b"amd64"})]
        arm64 = [gzip_layer({"arch": b"arm64"})]
        children = []
        for layers, architecture in ((arm64, "arm64"), (amd64, "amd64")):
            config, manifest = image_manifest(layers, architecture,
                                              "application/vnd.oci.image.manifest.v1+json")
            for blob in layers + [config]:
                self.push_blob(blob)
            status, headers, _ = self.call(
                "PUT", "/v2/web/manifests/" + digest_of(manifest), manifest,
                {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
            self.assertEqual(status, 201)
            self.assertNotIn("Ipd-Deployment", headers)  # by digest: stored only
            children.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                             "digest": digest_of(manifest), "size": len(manifest),
                             "platform": {"os": "linux", "architecture": architecture}})
        self.assertEqual(self.daemon.get("/status/web")[0], 404)  # nothing deployed
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                            "manifests": children}).encode()
        answer = self.call("PUT", "/v2/web/manifests/multi", index,
                           {"Content-Type": OCI_INDEX})
        deployment = self.deployed(answer)
        self.assertIn("IMAGE_DIGEST=%s\n" % digest_of(index),
                      self.daemon.log("web", deployment))
        image = os.path.join(self.daemon.upload_dir, "web", "image-%s.tar" % deployment)
        with tarfile.open(image) as tar:
            loaded = json.loads(tar.extractfile("manifest.json").read())
            self.assertEqual(tar.extractfile(loaded[0]["Layers"][0]).read(), amd64[0])
        self.assertEqual(self.call("GET", "/v2/web/manifests/multi")[2], index)

    def test_a_repeated_push_is_not_queued_twice(self):
        open(os.path.join(self.daemon.upload_dir, "web", "hold"), "w").close()
        layers = [gzip_layer({"a": b"1"})]
        first, _ = self.push_image("v1", layers)
        self.daemon.wait_state("web", first[1]["Ipd-Deployment"], ["active"])
        again, _ = self.push_image("v1", layers)
        self.assertEqual(again[1]["Ipd-Deployment"], first[1]["Ipd-Deployment"])
        open(os.path.join(self.daemon.upload_dir, "web", "gate"), "w").close()
        self.deployed(first)
        self.assertEqual(len(audit_events(self.tmp, "upload")), 1)

    def test_pull_is_for_users_of_the_project_only(self):
        layers = [gzip_layer({"secret": b"web only"})]
        answer, manifest = self.push_image("v1", layers)
        self.deployed(answer)
        digest = digest_of(manifest)
        paths = ["/v2/web/manifests/v1", "/v2/web/manifests/" + digest,
                 "/v2/web/blobs/" + digest_of(layers[0]), "/v2/web/tags/list"]
        for path in paths:
            self.assertEqual(self.call("GET", path, user="dev")[0], 200, path)
            self.assertError(self.call("GET", path, user="other:other-pw"), 403, "DENIED")
            self.assertError(self.call("GET", path, user=None), 401, "UNAUTHORIZED")
        # the same bytes are not in another repository, nor leaked from it
        self.assertError(self.call("GET", "/v2/api/blobs/" + digest_of(layers[0]),
                                   user="other:other-pw"), 404, "BLOB_UNKNOWN")
        self.assertError(self.call("GET", "/v2/api/manifests/v1", user="other:other-pw"),
                         404, "MANIFEST_UNKNOWN")

    def test_tags_and_blobs_outlive_a_restart(self):
        layers = [gzip_layer({"kept": b"across a restart"})]
        answer, manifest = self.push_image("v1", layers)
        self.deployed(answer)
        self.daemon.restart()
        self.assertEqual(self.call("GET", "/v2/web/manifests/v1")[2], manifest)
        self.assertEqual(self.call("GET", "/v2/web/blobs/" + digest_of(layers[0]))[2],
                         layers[0])
        self.assertEqual(self.call("GET", "/v2/web/tags/list", user="dev")[0], 200)
        self.assertNotIn(".registry", self.daemon.get("/list")[2])

    def test_a_deploy_token_pushes_to_its_project_only(self):
        done = subprocess.run([sys.executable, IPD, "--config", self.daemon.config, "token",
                               "create", "--project", "web", "--expires", "1h"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        login = "ci:" + done.stdout.decode().strip()  # docker login -u ci -p ipd_...
        answer, _ = self.push_image("v1", [gzip_layer({"t": b"1"})], user=login)
        deployment = self.deployed(answer)
        self.assertTrue(self.daemon.get_json("/status/web/" + deployment)[1]["user"]
                        .startswith("token:"))
        self.assertError(self.call("POST", "/v2/api/blobs/uploads/", user=login), 403,
                         "DENIED")
        self.assertError(self.call("GET", "/v2/web/manifests/v1", user="ci:ipd_0_wrong"),
                         401, "UNAUTHORIZED")

    def test_a_project_that_takes_signed_releases_refuses_a_push(self):
        daemon = DaemonProcess(os.path.join(self.tmp, "signed"),
                               {"REQUIRE_SIGNATURE": "web"}).start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        for method, path in (("POST", "/v2/web/blobs/uploads/"),
                             ("PUT", "/v2/web/manifests/v1")):
            message = self.assertError(self.call(method, path, b"{}", daemon=daemon),
                                       403, "DENIED")
            self.assertIn("ipd.py push --sign", message)
        self.assertEqual(self.call("POST", "/v2/api/blobs/uploads/", daemon=daemon)[0], 202)


class RegistryRetentionTests(RegistryTestCase):
    """Sessions and blobs expire after SEGMENT_EXPIRY, unless a kept
    deployment refers to them."""
    settings = {"SEGMENT_EXPIRY": "1", "KEEP_DEPLOYMENTS": "1"}

    def test_a_pruned_deployments_blobs_go_the_kept_ones_stay(self):
        old_layer, new_layer = gzip_layer({"v": b"1"}), gzip_layer({"v": b"2"})
        first, _ = self.push_image("v1", [old_layer])
        self.deployed(first)
        second, manifest = self.push_image("v2", [new_layer])
        self.deployed(second)  # KEEP_DEPLOYMENTS=1: the first is pruned
        folder = os.path.join(self.daemon.upload_dir, "web", "deployments")
        wait_until(lambda: not os.path.exists(os.path.join(
            folder, first[1]["Ipd-Deployment"] + ".recipe")))
        time.sleep(1.5)
        self.call("POST", "/v2/web/blobs/uploads/?digest=" + digest_of(b"n"), b"n")
        self.assertError(self.call("GET", "/v2/web/blobs/" + digest_of(old_layer)), 404,
                         "BLOB_UNKNOWN")
        self.assertError(self.call("GET", "/v2/web/manifests/v1"), 404, "MANIFEST_UNKNOWN")
        self.assertEqual(self.call("GET", "/v2/web/blobs/" + digest_of(new_layer))[2],
                         new_layer)
        self.assertEqual(self.call("GET", "/v2/web/manifests/v2")[2], manifest)

    def test_unfinished_sessions_and_unreferenced_blobs_go_deployed_ones_stay(self):
        layers = [gzip_layer({"kept": b"1"})]
        answer, manifest = self.push_image("v1", layers)
        self.deployed(answer)
        loose = self.push_blob(b"named by no manifest")
        status, headers, _ = self.call("POST", "/v2/web/blobs/uploads/")
        self.call("PATCH", headers["Location"], b"half")
        time.sleep(1.5)
        self.call("POST", "/v2/web/blobs/uploads/?digest=" + digest_of(b"n"), b"n")
        time.sleep(1.5)
        self.call("POST", "/v2/web/blobs/uploads/?digest=" + digest_of(b"m"), b"m")
        self.assertError(self.call("GET", headers["Location"]), 404, "BLOB_UPLOAD_UNKNOWN")
        self.assertError(self.call("HEAD", "/v2/web/blobs/" + loose), 404, "BLOB_UNKNOWN")
        for digest in [digest_of(layers[0]), digest_of(manifest)]:
            self.assertEqual(self.call("HEAD", "/v2/web/blobs/" + digest)[0], 200)
        self.assertEqual(self.call("GET", "/v2/web/manifests/v1")[2], manifest)
        self.assertEqual(self.partial_files(), [])


class RegistryMemoryTests(RegistryTestCase):
    """A large layer streams through a PATCH and into $IMAGE in flat memory."""

    def test_a_large_layer_push_does_not_grow_memory(self):
        self.deployed(self.push_image("small", [gzip_layer({"a": b"1"})])[0])
        before = MemoryTests.peak_rss_kib(self)
        size, block, digest = soak(1 << 30, 64 << 20), os.urandom(1 << 20), hashlib.sha256()

        def body():
            for _ in range(size // len(block)):
                digest.update(block)
                yield block
        location = self.call("POST", "/v2/web/blobs/uploads/")[1]["Location"]
        status, headers, _ = self.call("PATCH", location, body())
        self.assertEqual((status, headers["Range"]), (202, "0-%d" % (size - 1)))
        layer = "sha256:" + digest.hexdigest()
        self.assertEqual(self.call("PUT", location + "?digest=" + layer)[0], 201)
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
            "type": "layers", "diff_ids": [layer]}}).encode()
        self.push_blob(config)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": digest_of(config), "size": len(config)}, "layers": [{
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": layer, "size": size}]}).encode()
        answer = self.call("PUT", "/v2/web/manifests/large", manifest,
                           {"Content-Type": DOCKER_MANIFEST})
        deployment = self.deployed(answer)
        after = MemoryTests.peak_rss_kib(self)
        report("registry push of a %d MiB layer: ipd's peak RSS %d KiB (was %d)"
               % (size >> 20, after, before))
        self.assertLess(after - before, 16 * 1024)
        self.assertLess(after, 64 * 1024)
        image = os.path.join(self.daemon.upload_dir, "web", "image-%s.tar" % deployment)
        self.assertGreater(os.path.getsize(image), size)


class RegistryLaterImageTests(RegistryTestCase):
    """A tag push is answered once its manifest is kept and its deployment
    waits; the worker builds $IMAGE from the blobs before the first step
    (so the push takes no longer than a registry's)."""

    def hold_first(self):
        """A first deployment held in its deploy step: the next one waits."""
        folder = os.path.join(self.daemon.upload_dir, "web")
        open(os.path.join(folder, "hold"), "w").close()
        first = self.push_image("v1", [gzip_layer({"v": b"1"})])[0][1]["Ipd-Deployment"]
        wait_until(lambda: self.daemon.state("web", first) == "active")
        return first, os.path.join(folder, "gate")

    def blob_path(self, blob):
        """Where the segment store keeps a pushed blob."""
        return os.path.join(self.daemon.upload_dir, ".segments", "sha256",
                            digest_of(blob)[7:9], digest_of(blob)[7:])

    def record_of(self, deployment):
        return json.loads(read_text(os.path.join(
            self.daemon.upload_dir, "web", "deployments", deployment + ".json")))

    def test_the_waiting_push_has_no_image_yet_and_the_worker_builds_it(self):
        first, gate = self.hold_first()
        layers = [gzip_layer({"www/index.html": b"v2\n"})]
        answer, manifest = self.push_image("v2", layers)
        second = answer[1]["Ipd-Deployment"]
        self.assertEqual(self.daemon.state("web", second), "await")
        folder = os.path.join(self.daemon.upload_dir, "web", "deployments")
        self.assertFalse(os.path.exists(os.path.join(folder, second + ".image")))
        meta = self.record_of(second)["files"]["image"]
        self.assertNotIn("sha256", meta)
        # the same manifest pushed again while it waits: the same deployment
        again = self.call("PUT", "/v2/web/manifests/v2", manifest,
                          {"Content-Type": DOCKER_MANIFEST})
        self.assertEqual((again[0], again[1]["Ipd-Deployment"]), (201, second))
        open(gate, "w").close()
        self.assertEqual(self.daemon.wait_state("web", first), "ok")
        self.deployed(answer)
        image = os.path.join(self.daemon.upload_dir, "web", "image-%s.tar" % second)
        built = self.record_of(second)["files"]["image"]
        self.assertEqual((built["size"], built["sha256"]),
                         (meta["size"], sha256_file(image)))
        with tarfile.open(image) as tar:
            loaded = json.loads(tar.extractfile("manifest.json").read())
            self.assertEqual([tar.extractfile(name).read() for name in loaded[0]["Layers"]],
                             layers)

    def test_a_waiting_push_without_a_sha256_shows_everywhere(self):
        first, gate = self.hold_first()
        second = self.push_image("v2", [gzip_layer({"v": b"2"})])[0][1]["Ipd-Deployment"]
        status, data = self.daemon.get_json("/status/web/" + second)
        self.assertEqual((status, data["state"], sorted(data["files"]["image"])),
                         (200, "await", ["name", "size"]))
        for path in ("/info", "/stat", "/metrics", "/ui/web", "/ui/web/" + second,
                     "/audit?project=web"):
            for accept in ("application/json", "text/html"):
                status, _, text = self.daemon.get(path, headers={"Accept": accept})
                self.assertEqual(status, 200, (path, text[:300]))
        open(gate, "w").close()

    def test_a_newer_push_supersedes_a_waiting_one_which_a_redeploy_builds(self):
        first, gate = self.hold_first()
        older = self.push_image("v2", [gzip_layer({"v": b"2"})])[0][1]["Ipd-Deployment"]
        newer = self.push_image("v3", [gzip_layer({"v": b"3"})])[0]
        self.assertEqual(self.daemon.state("web", older), "changed")
        open(gate, "w").close()
        self.deployed(newer)
        folder = os.path.join(self.daemon.upload_dir, "web", "deployments")
        self.assertFalse(os.path.exists(os.path.join(folder, older + ".image")))
        self.assertNotIn("sha256", self.record_of(older)["files"]["image"])
        status, _, again = self.daemon.request("POST", "/redeploy/web/" + older)
        self.assertEqual(status, 202, again)
        self.assertEqual(self.daemon.wait_state("web", again.strip()), "ok")
        self.assertIn("IMAGE_REF=127.0.0.1:%d/web:v2\n" % self.daemon.port,
                      self.daemon.log("web", again.strip()))
        self.assertEqual(self.daemon.leftovers(), [])

    def test_a_blob_lost_before_the_build_ends_it_interrupted_with_the_reason(self):
        first, gate = self.hold_first()
        layer = gzip_layer({"lost": os.urandom(5000)})
        answer, _ = self.push_image("v2", [layer])
        os.unlink(self.blob_path(layer))
        open(gate, "w").close()
        second = self.deployed(answer, "interrupted")
        log = self.daemon.log("web", second)
        self.assertEqual(log,  # a docker push's words: what to do
                         "ipd: the deployment's files cannot be built from the pushed "
                         "blobs: blob %s is gone: push the image again\n" % digest_of(layer))
        self.assertNotIn("IMAGE_REF=", log)  # no step ran
        self.assertEqual(self.partial_files(), [])

    def test_notify_sh_gets_no_image_of_a_push_never_built(self):
        folder = os.path.join(self.daemon.upload_dir, "web")
        with open(os.path.join(folder, "notify.sh"), "w") as file:
            file.write('#!/bin/sh\necho "[$IMAGE]" > "$PROJECT_DIR/notified-$DEPLOY.tmp"\n'
                       'mv "$PROJECT_DIR/notified-$DEPLOY.tmp" '
                       '"$PROJECT_DIR/notified-$DEPLOY"\n')
        os.chmod(os.path.join(folder, "notify.sh"), 0o755)
        first, gate = self.hold_first()
        superseded = self.push_image("v2", [gzip_layer({"v": b"2"})])[0][1]["Ipd-Deployment"]
        newest = self.push_image("v3", [gzip_layer({"v": b"3"})])[0]
        self.assertEqual(self.daemon.wait_state("web", superseded), "changed")
        open(gate, "w").close()
        built = self.deployed(newest)
        notified = os.path.join(folder, "notified-%s")
        wait_until(lambda: os.path.exists(notified % superseded) and
                   os.path.exists(notified % built))
        self.assertEqual(read_text(notified % superseded), "[]\n")
        self.assertEqual(read_text(notified % built), "[%s]\n" % os.path.join(
            folder, "deployments", built + ".image"))

    def test_a_waiting_push_outlives_a_kill_and_is_built_after_the_restart(self):
        first, gate = self.hold_first()
        layers = [gzip_layer({"after": b"restart"})]
        answer, _ = self.push_image("v2", layers)
        self.daemon.kill()
        os.unlink(os.path.join(self.daemon.upload_dir, "web", "hold"))
        self.daemon.start()
        self.assertEqual(self.daemon.wait_state("web", first), "interrupted")
        second = self.deployed(answer)
        image = os.path.join(self.daemon.upload_dir, "web", "image-%s.tar" % second)
        self.assertEqual(self.record_of(second)["files"]["image"]["sha256"],
                         sha256_file(image))

    def test_under_run_as_the_script_reads_the_built_image(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to switch users")
        os.chmod(self.tmp, 0o711)
        self.daemon.stop()  # again, the scripts run as another user
        self.daemon = self.start_daemon({"RUN_AS": "%d:%d" % (SCRIPTS_UID, SCRIPTS_GID)})
        deployment = self.deployed(self.push_image("v1", [gzip_layer({"v": b"1"})])[0])
        copy = os.path.join(self.daemon.upload_dir, "web", "work",
                            "image-%s.tar" % deployment)  # $PROJECT_DIR/image-$DEPLOY.tar
        self.assertEqual(sha256_file(copy),
                         self.record_of(deployment)["files"]["image"]["sha256"])

    def held_build(self):
        """A first deployment held, a second push waiting whose layer's
        stored blob is a FIFO, then the first let go: -> (the second's ID,
        a Feeder, the blob's path, the layer) once the worker's build of
        the second reads the FIFO."""
        first, gate = self.hold_first()
        layer = gzip_layer({"fed": b"through a FIFO"})
        answer, _ = self.push_image("v2", [layer])
        blob = self.blob_path(layer)
        os.unlink(blob)
        os.mkfifo(blob)
        open(gate, "w").close()
        self.assertEqual(self.daemon.wait_state("web", first), "ok")
        feeder = Feeder(blob)
        self.addCleanup(feeder.stop)
        return answer[1]["Ipd-Deployment"], feeder, blob, layer

    def test_a_stop_during_the_build_ends_it_interrupted_and_leaves_nothing(self):
        self.daemon.stop()  # again with a short grace: the build outlasts it
        self.daemon = self.start_daemon({"SHUTDOWN_GRACE": "1"})
        second, feeder, _, _ = self.held_build()
        feeder.start()  # endless bytes: the build never ends by itself
        self.assertEqual(self.daemon.stop(), 0)
        feeder.stop()
        self.assertEqual(self.daemon.leftovers(), [])  # before any restart
        self.assertEqual(self.record_of(second)["state"], "interrupted")
        self.assertIn("ipd: the deployment's files cannot be built from the pushed "
                      "blobs: ipd stopped", read_text(os.path.join(
                          self.daemon.upload_dir, "web", "deployments", second + ".log")))

    def test_a_cancel_during_the_build_stops_it_and_leaves_nothing(self):
        second, feeder, _, _ = self.held_build()
        feeder.start()
        status, _, text = self.daemon.request("POST", "/cancel/web/" + second)
        self.assertEqual((status, text), (200, "cancelled\n"))
        self.assertIn("ipd: cancelled by admin", self.daemon.log("web", second))
        self.assertEqual(self.daemon.leftovers(), [])

    def test_a_kill_during_the_build_ends_it_interrupted_and_a_redeploy_builds_it(self):
        second, feeder, blob, layer = self.held_build()
        feeder.start()
        self.daemon.kill()
        feeder.stop()
        os.unlink(blob)  # the blob as it was pushed, for the redeploy
        with open(blob, "wb") as file:
            file.write(layer)
        self.daemon.start()
        self.assertEqual(self.daemon.wait_state("web", second), "interrupted")
        self.assertEqual(self.daemon.leftovers(), [])
        status, _, again = self.daemon.request("POST", "/redeploy/web/" + second)
        self.assertEqual(status, 202, again)
        self.assertEqual(self.daemon.wait_state("web", again.strip()), "ok")
        image = os.path.join(self.daemon.upload_dir, "web", "image-%s.tar" % again.strip())
        with tarfile.open(image) as tar:
            loaded = json.loads(tar.extractfile("manifest.json").read())
            self.assertEqual(tar.extractfile(loaded[0]["Layers"][0]).read(), layer)

    def test_a_build_that_cannot_be_moved_in_leaves_no_half_built_file(self):
        first, gate = self.hold_first()
        answer, _ = self.push_image("v2", [gzip_layer({"v": b"2"})])
        second = answer[1]["Ipd-Deployment"]
        # where the image goes, a folder that is not empty: the move fails
        blocked = os.path.join(self.daemon.upload_dir, "web", "deployments",
                               second + ".image")
        os.makedirs(os.path.join(blocked, "in-the-way"))
        open(gate, "w").close()
        self.deployed(answer, "interrupted")
        self.assertIn("ipd: the deployment's files cannot be built from the pushed "
                      "blobs: ", self.daemon.log("web", second))
        self.assertEqual(self.daemon.leftovers(), [])

    def test_a_build_that_would_go_below_min_free_space_is_not_made(self):
        first, gate = self.hold_first()
        answer, _ = self.push_image("v2", [gzip_layer({"v": b"2"})])  # room then
        self.daemon.kill()
        os.unlink(os.path.join(self.daemon.upload_dir, "web", "hold"))
        self.daemon.start(env={"MIN_FREE_SPACE": "1000000T"})  # below it now
        second = self.deployed(answer, "interrupted")
        self.assertRegex(self.daemon.log("web", second), "^ipd: the deployment's files "
                         "cannot be built from the pushed blobs: .*MIN_FREE_SPACE")
        self.assertFalse(os.path.exists(os.path.join(
            self.daemon.upload_dir, "web", "deployments", second + ".image")))
        self.assertEqual(self.daemon.leftovers(), [])


class Feeder:
    """Writes 1 MiB blocks into a FIFO, 10 a second, from a thread, until
    stopped or its reader goes; the FIFO is opened once a reader has it."""

    def __init__(self, path):
        self.fd = wait_until(lambda: self.open_writer(path), message="a reader of the FIFO")
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.feed, daemon=True)

    @staticmethod
    def open_writer(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as error:
            if error.errno != errno.ENXIO:  # no reader yet
                raise
            return None
        os.set_blocking(fd, True)
        return fd

    def start(self):
        self.thread.start()

    def feed(self):
        block = bytes(1 << 20)
        try:
            while not self.stopped.wait(0.1):
                os.write(self.fd, block)
        except OSError:  # the reader went
            pass

    def stop(self):
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RegistryHostileTests(RegistryTestCase):
    """Malformed and hostile registry requests: each a 4xx with the spec's
    error JSON, never a 5xx, nothing left behind."""
    settings = {"READ_TIMEOUT": "5", "HEADER_TIMEOUT": "5", "MAX_UPLOAD_SIZE": "1M"}

    def assertNothingLeft(self):
        self.assertEqual(self.partial_files(), [])
        self.assertEqual(self.daemon.leftovers(), [])
        self.assertEqual(self.daemon.get("/status/web")[0], 404)  # no deployment
        self.assertNotIn("Traceback", self.daemon.daemon_log())

    def session(self, user="admin"):
        status, headers, _ = self.call("POST", "/v2/web/blobs/uploads/", user=user)
        self.assertEqual(status, 202)
        return headers["Location"]

    def test_bad_names_references_and_digests(self):
        hexes = "0" * 64
        cases = [
            ("HEAD", "/v2/web/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
            ("GET", "/v2/web/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", 400,
             "DIGEST_INVALID"),
            ("GET", "/v2/web/blobs/SHA256:" + hexes, 400, "DIGEST_INVALID"),
            ("GET", "/v2/web/manifests/..%2F..%2Fetc%2Fpasswd", 400, "MANIFEST_INVALID"),
            ("GET", "/v2/web/manifests/-dash", 400, "MANIFEST_INVALID"),
            ("GET", "/v2/web/manifests/" + "t" * 129, 400, "MANIFEST_INVALID"),
            ("GET", "/v2/../../etc/passwd", 404, "NAME_UNKNOWN"),
            ("GET", "/v2/..%2Fsecret/manifests/v1", 400, "NAME_INVALID"),
            ("GET", "/v2/team/web/manifests/v1", 400, "NAME_INVALID"),
            ("GET", "/v2/Web/manifests/v1", 400, "NAME_INVALID"),
            ("GET", "/v2/.segments/blobs/sha256:" + hexes, 400, "NAME_INVALID"),
            ("GET", "/v2/web%00/manifests/v1", 400, "NAME_INVALID"),
            ("GET", "/v2/web/blobs/uploads/..%2F..%2Fx", 404, "BLOB_UPLOAD_UNKNOWN"),
            ("PATCH", "/v2/web/blobs/uploads/" + "a" * 32, 404, "BLOB_UPLOAD_UNKNOWN"),
            ("PUT", "/v2/web/blobs/uploads/%s?digest=sha256:%s" % ("a" * 32, hexes), 404,
             "BLOB_UPLOAD_UNKNOWN"),
            ("DELETE", "/v2/web/manifests/v1", 405, "UNSUPPORTED"),
            ("POST", "/v2/web/blobs/uploads/?digest=sha256:nothex", 400, "DIGEST_INVALID"),
        ]
        for method, path, status, code in cases:
            with self.subTest(path=path):
                self.assertError(self.call(method, path), status, code)
        message = self.assertError(self.call("GET", "/v2/team/web/manifests/v1"), 400,
                                   "NAME_INVALID")
        self.assertIn("push to HOST/web", message)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "secret")))
        self.assertNothingLeft()

    def test_lying_content_ranges(self):
        location = self.session()
        self.call("PATCH", location, b"a" * 100, {"Content-Range": "0-99"})
        # Content-Length and Content-Range disagree: refused before the body
        answer = self.call("PATCH", location, b"b" * 50, {"Content-Range": "100-199"})
        self.assertError(answer, 400, "BLOB_UPLOAD_INVALID")
        # a chunked body shorter than its range: none of it kept
        answer = self.call("PATCH", location, iter([b"b" * 50]), {"Content-Range": "100-199"})
        self.assertError(answer, 416, "BLOB_UPLOAD_INVALID")
        self.assertEqual(answer[1]["Range"], "0-99")
        for bad in ("bytes=a-b", "100-50", "-", "99999999999999999999-1"):
            self.assertError(self.call("PATCH", location, b"c", {"Content-Range": bad}),
                             416, "BLOB_UPLOAD_INVALID")
        self.assertEqual(self.call("GET", location)[1]["Range"], "0-99")
        self.call("PATCH", location, b"d" * 10, {"Content-Range": "100-109"})
        status, headers, _ = self.call(
            "PUT", location + "?digest=" + digest_of(b"a" * 100 + b"d" * 10))
        self.assertEqual(status, 201)
        self.assertError(self.call("PUT", self.session()), 400, "DIGEST_INVALID")

    def test_manifests_that_name_absent_or_wrong_blobs_keep_nothing(self):
        layer = gzip_layer({"x": b"1"})
        config, manifest = image_manifest([layer])
        self.push_blob(config)
        answer = self.call("PUT", "/v2/web/manifests/v1", manifest,
                           {"Content-Type": DOCKER_MANIFEST})
        self.assertIn(digest_of(layer), self.assertError(answer, 400,
                                                         "MANIFEST_BLOB_UNKNOWN"))
        self.push_blob(layer)
        parsed = json.loads(manifest)
        parsed["layers"][0]["size"] += 1
        wrong_size = json.dumps(parsed).encode()
        too_many = json.loads(manifest)
        too_many["layers"] = too_many["layers"] * 300
        artifact = json.loads(manifest)
        artifact["config"]["mediaType"] = "application/vnd.cncf.helm.config.v1+json"
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest_of(b"absent"), "size": 6,
            "platform": {"os": "linux", "architecture": "amd64"}}]}
        cases = [
            ("v1", wrong_size, DOCKER_MANIFEST, "MANIFEST_INVALID"),
            ("v1", json.dumps(too_many).encode(), DOCKER_MANIFEST, "MANIFEST_INVALID"),
            ("v1", json.dumps(artifact).encode(), DOCKER_MANIFEST, "MANIFEST_INVALID"),
            ("v1", b"not json", DOCKER_MANIFEST, "MANIFEST_INVALID"),
            ("v1", b'{"schemaVersion": 1, "fsLayers": []}', DOCKER_MANIFEST,
             "MANIFEST_INVALID"),
            ("v1", manifest, OCI_INDEX, "MANIFEST_INVALID"),
            ("v1", json.dumps(index).encode(), OCI_INDEX, "MANIFEST_BLOB_UNKNOWN"),
            (digest_of(b"other"), manifest, DOCKER_MANIFEST, "DIGEST_INVALID"),
        ]
        for reference, body, content_type, code in cases:
            with self.subTest(code=code, body=body[:60]):
                self.assertError(self.call("PUT", "/v2/web/manifests/" + reference, body,
                                           {"Content-Type": content_type}), 400, code)
        self.assertError(self.call("GET", "/v2/web/manifests/v1"), 404, "MANIFEST_UNKNOWN")
        for body in (wrong_size, json.dumps(artifact).encode()):
            self.assertError(self.call("GET", "/v2/web/manifests/" + digest_of(body)),
                             404, "MANIFEST_UNKNOWN")
        # a blob is not a manifest
        self.assertError(self.call("GET", "/v2/web/manifests/" + digest_of(layer)), 404,
                         "MANIFEST_UNKNOWN")
        self.assertNothingLeft()

    def test_a_project_without_a_control_script_refuses_a_tag_push(self):
        answer, manifest = self.push_image("v1", [gzip_layer({"a": b"1"})], project="api")
        self.assertIn("no control.sh", self.assertError(answer, 400, "UNSUPPORTED"))
        self.assertError(self.call("GET", "/v2/api/manifests/v1"), 404, "MANIFEST_UNKNOWN")
        self.assertEqual(self.daemon.get("/status/api")[0], 404)
        self.assertEqual(self.daemon.leftovers(), [])

    def test_oversize_manifests_are_refused_before_or_while_read(self):
        head = raw_request("PUT", "/v2/web/manifests/v1", headers={
            "Content-Type": DOCKER_MANIFEST, "Content-Length": str(5 << 20)})
        answer = raw_exchange(self.daemon.port, head)
        self.assertEqual(answer_status(answer), 413)
        self.assertIn(b'"SIZE_INVALID"', answer)
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        answer = raw_exchange(self.daemon.port, raw_request(
            "PUT", "/v2/web/manifests/v1", chunk * 5 + b"0\r\n\r\n",
            {"Transfer-Encoding": "chunked", "Content-Type": DOCKER_MANIFEST}))
        self.assertEqual(answer_status(answer), 413)
        self.assertIn(b'"SIZE_INVALID"', answer)
        # a blob over MAX_UPLOAD_SIZE (1M here), and an image's tar over it
        answer = self.call("PATCH", self.session(), b"x" * ((1 << 20) + 1))
        self.assertError(answer, 413, "SIZE_INVALID")
        layers = [gzip_layer({"a": os.urandom(600 << 10)}),
                  gzip_layer({"b": os.urandom(600 << 10)})]
        answer, _ = self.push_image("big", layers)
        self.assertIn("MAX_UPLOAD_SIZE", self.assertError(answer, 413, "SIZE_INVALID"))
        self.assertEqual(self.daemon.get("/status/web")[0], 404)
        self.assertEqual(self.daemon.leftovers(), [])

    def test_unauthenticated_requests_of_every_kind_get_the_challenge(self):
        paths = ["/v2/", "/v2/web/blobs/sha256:" + "0" * 64, "/v2/web/blobs/uploads/",
                 "/v2/web/blobs/uploads/" + "a" * 32, "/v2/web/manifests/v1",
                 "/v2/web/tags/list", "/v2/nope", "/v2/../x", "/v2/Team/Web/manifests/x"]
        for path in paths:
            for method in ("HEAD", "GET", "POST", "PATCH", "PUT", "DELETE"):
                # a wrong password too, on HEADs (more would be throttled)
                for user in (None, "admin:wrong") if method == "HEAD" else (None,):
                    with self.subTest(method=method, path=path, user=user):
                        status, headers, body = self.call(method, path, b"x", user=user)
                        self.assertEqual(status, 401)
                        self.assertTrue(headers["WWW-Authenticate"].startswith(
                            'Basic realm="ipd"'))
                        if method != "HEAD":
                            self.assertEqual(json.loads(body)["errors"][0]["code"],
                                             "UNAUTHORIZED")
        self.assertNothingLeft()

    def test_concurrent_patches_are_refused_and_a_cut_chunk_resumes(self):
        location = self.session()
        sock = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(raw_request("PATCH", location, b"a" * 600,
                                 {"Content-Length": "1000"}))
        wait_until(lambda: self.call("GET", location)[1]["Range"] == "0-599")
        answer = self.call("PATCH", location, b"b" * 10)
        self.assertError(answer, 409, "BLOB_UPLOAD_INVALID")
        sock.close()  # cut mid-body: what came stays
        # an empty PATCH adds nothing: 409 while the cut one still holds
        # the session, 202 once it has ended
        wait_until(lambda: self.call("PATCH", location, b"")[0] != 409,
                   message="the cut PATCH ended")
        self.assertEqual(self.call("GET", location)[1]["Range"], "0-599")
        status, headers, _ = self.call("PATCH", location, b"c" * 400,
                                       {"Content-Range": "600-999"})
        self.assertEqual((status, headers["Range"]), (202, "0-999"))
        blob = b"a" * 600 + b"c" * 400
        self.assertEqual(self.call("PUT", location + "?digest=" + digest_of(blob))[0], 201)
        self.assertEqual(self.call("GET", "/v2/web/blobs/" + digest_of(blob))[2], blob)
        self.assertNothingLeft()

    def test_sessions_are_bounded_and_their_own(self):
        location = self.session()
        self.assertError(self.call("GET", location, user="dev"), 404, "BLOB_UPLOAD_UNKNOWN")
        self.assertError(self.call("PATCH", location, b"x", user="dev"), 404,
                         "BLOB_UPLOAD_UNKNOWN")
        self.assertError(self.call("PATCH", location.replace("/web/", "/api/"), b"x"), 404,
                         "BLOB_UPLOAD_UNKNOWN")
        others = [self.session() for _ in range(ipd.REGISTRY_MAX_USER_SESSIONS - 1)]
        self.call("PATCH", others[0], b"x")  # used since: the first is the oldest
        self.assertEqual(self.call("POST", "/v2/web/blobs/uploads/", user="dev")[0], 202)
        # one more of the user's: the least recently used goes, the rest stay
        self.assertEqual(self.call("POST", "/v2/web/blobs/uploads/")[0], 202)
        self.assertError(self.call("GET", location), 404, "BLOB_UPLOAD_UNKNOWN")
        self.assertEqual(self.call("GET", others[0])[1]["Range"], "0-0")
        self.assertEqual(len(self.partial_files()), ipd.REGISTRY_MAX_USER_SESSIONS + 1)

    def test_seeded_fuzz_of_the_registry(self):
        layer = gzip_layer({"a": b"1"})
        _, valid = self.push_image("v1", [layer])
        rng = random.Random(24)
        count = soak(5000, 300)
        location = self.session()
        words = ["web", "api", "Web", "..", "%2e%2e", "%00", "a" * 300, "team/web",
                 "sha256:" + "0" * 64, "sha256:zz", "md5:00", "v1", "-x", "%2F",
                 digest_of(layer), digest_of(valid),
                 location.rsplit("/", 1)[-1], "a" * 32, "\u00e9"]
        kinds = ["blobs", "blobs/uploads", "manifests", "tags/list", "tags", "x", ""]
        params = ["digest", "mount", "from", "n", "last"]
        headers = ["Content-Range", "Content-Type", "Range", "Accept", "Expect",
                   "Transfer-Encoding"]  # (bad logins: throttled, see the 401 test)
        values = ["0-9", "5-1", "bytes=0-1", "x", DOCKER_MANIFEST, OCI_INDEX,
                  "100-continue", "chunked", "a" * 3000, "0-0", "bytes=5-", "bytes=-3",
                  "bytes=0-1,4-", "bytes=99-"]
        statuses = {}
        for _ in range(count):
            path = "/v2/%s/%s" % (urllib.parse.quote(rng.choice(words), safe="%/"),
                                  rng.choice(kinds))
            if rng.random() < 0.6:
                path += "/" + urllib.parse.quote(rng.choice(words), safe="%/:")
            real = rng.random() < 0.1  # a real blob: its Range GETs, HEADs, PUTs...
            if real:
                path = "/v2/web/blobs/" + rng.choice([digest_of(layer), digest_of(valid)])
            query = "&".join("%s=%s" % (rng.choice(params), urllib.parse.quote(
                rng.choice(words), safe="%:")) for _ in range(rng.randrange(3)))
            fields = {"Authorization": ADMIN_AUTH if rng.random() < 0.8 else ""}
            for _ in range(rng.randrange(3)):
                fields[rng.choice(headers)] = rng.choice(values)
            if real and rng.random() < 0.7:
                fields["Range"] = rng.choice(values[-6:]) if rng.random() < 0.7 else \
                    "bytes=%d-%d" % (rng.randrange(-5, 400), rng.randrange(-5, 400))
            if fields.get("Transfer-Encoding") == "chunked":
                del fields["Transfer-Encoding"]  # raw_request frames by length
            method = rng.choice(["GET", "HEAD", "POST", "PATCH", "PUT", "DELETE"])
            body = os.urandom(rng.randrange(0, 300)) if rng.random() < 0.5 else b""
            if rng.random() < 0.3:  # a pushed manifest, mutated
                body = bytearray(valid)
                for _ in range(rng.randrange(1, 6)):
                    body[rng.randrange(len(body))] = rng.randrange(256)
                body = bytes(body)
            answer = raw_exchange(self.daemon.port, raw_request(
                method, path + ("?" + query if query else ""), body, fields), timeout=15)
            status = answer_status(answer)
            statuses[status] = statuses.get(status, 0) + 1
            if status and status >= 400 and method != "HEAD":
                head, _, rest = re.sub(rb"\AHTTP/1\.1 100 Continue\r\n\r\n", b"",
                                       answer).partition(b"\r\n\r\n")
                self.assertIn(b'"errors"', rest, (method, path, head, rest))
        report("fuzz of the registry: %d requests; answers %s" % (count, ", ".join(
            "%s: %d" % item for item in sorted(statuses.items(), key=lambda i: str(i[0])))))
        self.assertNotIn(None, statuses)
        self.assertFalse([status for status in statuses if status >= 500], statuses)
        self.assertNotIn("Traceback", self.daemon.daemon_log())
        self.assertEqual(self.daemon.leftovers(), [])


class RegistryEarlyRefusalTests(RegistryTestCase):
    """What the login, the project, the size or the range already refuse
    is answered before the body (RFC 9110 10.1.1: no 100 Continue, not a
    byte read), at the endpoints that take one."""
    settings = {"MAX_UPLOAD_SIZE": "1M"}

    def refused_before_the_body(self, method, path, user, fields=None):
        """-> the status of a request that says it would send 10 MiB
        (Expect: 100-continue) but sends none; its answer is no 100."""
        fields = dict({"Expect": "100-continue", "Content-Length": str(10 << 20),
                       "Content-Type": "application/octet-stream"}, **(fields or {}))
        fields["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode() \
            if user else ""
        answer = raw_exchange(self.daemon.port, raw_request(method, path, b"", fields))
        self.assertIsNotNone(answer, "no answer: the daemon waited for the body")
        self.assertFalse(answer.startswith(b"HTTP/1.1 100"), answer[:200])
        self.assertIn(b'"errors"', answer)
        return answer_status(answer)

    def test_refusals_come_before_the_body(self):
        location = self.call("POST", "/v2/web/blobs/uploads/")[1]["Location"]
        digest = "?digest=sha256:" + "0" * 64
        admin, other = "admin:" + USERS["admin"][1], "other:other-pw"
        cases = [
            ("PATCH", location, None, {}, 401),
            ("PATCH", location, other, {}, 403),
            ("PUT", location + digest, other, {}, 403),
            ("POST", "/v2/web/blobs/uploads/" + digest, other, {}, 403),
            ("PUT", "/v2/web/manifests/v1", other, {}, 403),
            ("PATCH", location, admin, {}, 413),  # over MAX_UPLOAD_SIZE
            ("PATCH", location, admin, {"Content-Range": "5-%d" % ((10 << 20) + 4)}, 416),
            ("PUT", location + "?digest=sha256:nothex", admin, {}, 400),
            ("PATCH", "/v2/web/blobs/uploads/" + "b" * 32, admin, {}, 404),
        ]
        for method, path, user, fields, status in cases:
            with self.subTest(method=method, path=path, user=user, fields=fields):
                self.assertEqual(self.refused_before_the_body(method, path, user, fields),
                                 status)
        self.assertEqual(self.call("GET", location)[1]["Range"], "0-0")  # untouched
        self.assertEqual(self.daemon.leftovers(), [])
        self.assertNotIn("Traceback", self.daemon.daemon_log())


class RegistryWritebackTests(unittest.TestCase):
    """A blob upload has the disk write its bytes while more come (a
    background fdatasync each REGISTRY_WRITEBACK bytes), so that its PUT's
    fsync finds little left; a write the disk refused drops the upload."""

    class Body:
        """A request body of pieces (as RequestBody.pieces gives them)."""

        def __init__(self, pieces, before_last=None):
            self.list, self.before_last = pieces, before_last

        def pieces(self):
            for number, piece in enumerate(self.list):
                if number == len(self.list) - 1 and self.before_last:
                    self.before_last()
                yield bytearray(piece), len(piece)

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(setattr, ipd, "REGISTRY_WRITEBACK", ipd.REGISTRY_WRITEBACK)
        self.addCleanup(setattr, os, "fdatasync", os.fdatasync)
        ipd.REGISTRY_WRITEBACK = 1000
        self.path = os.path.join(self.tmp, "partial")
        open(self.path, "wb").close()
        self.upload = ipd.BlobUpload("a" * 32, "web", "admin", self.path)
        self.synced = []
        real = os.fdatasync

        def counted(fd):
            self.synced.append(os.fstat(fd).st_size)
            real(fd)
        os.fdatasync = counted

    def test_a_long_upload_is_written_back_while_it_comes(self):
        pieces = [os.urandom(600) for _ in range(10)]
        body = self.Body(pieces, lambda: wait_until(  # the disk writes as bytes come
            lambda: self.synced, message="a write-back before the body's end"))
        self.assertEqual(self.upload.receive(body), 6000)
        self.assertLess(self.synced[0], 6000)
        with open(self.path, "rb") as file:
            data = file.read()
        self.assertEqual(data, b"".join(pieces))
        self.assertEqual(self.upload.sha256.hexdigest(), hashlib.sha256(data).hexdigest())
        self.synced, chunked = [], ipd.BlobUpload("b" * 32, "web", "admin", self.path)
        os.truncate(self.path, 0)
        chunked.receive(self.Body([b"x" * 500]))  # under the step: none
        self.assertEqual(self.synced, [])
        chunked.receive(self.Body([b"y" * 500]))  # chunks add up to one
        self.assertEqual(self.synced, [1000])

    def test_a_write_the_disk_refused_drops_the_upload(self):
        self.upload.receive(self.Body([b"a" * 700]))

        def refused(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fdatasync = refused
        with self.assertRaises(ipd.DiskFull):
            self.upload.receive(self.Body([b"b" * 600] * 5))
        self.assertEqual((self.upload.offset, os.path.getsize(self.path)), (0, 0))
        self.assertEqual(self.upload.headers()["Range"], "0-0")  # the client restarts
        os.fdatasync = lambda fd: None
        self.assertEqual(self.upload.receive(self.Body([b"c" * 1500])), 1500)
        self.assertEqual(self.upload.sha256.hexdigest(),
                         hashlib.sha256(b"c" * 1500).hexdigest())


class RegistryRangeTests(RegistryTestCase):
    """Range GETs of blobs (RFC 9110 14): a part of a blob is 206 with its
    Content-Range, a Range that cannot be served 416 with bytes */SIZE."""

    def setUp(self):
        super().setUp()
        self.blob = os.urandom(1000)
        self.path = "/v2/web/blobs/" + self.push_blob(self.blob)

    def test_a_range_is_206_with_its_bytes_and_content_range(self):
        cases = [("bytes=0-0", 0, 0), ("bytes=10-19", 10, 19), ("bytes=990-", 990, 999),
                 ("bytes=0-", 0, 999), ("bytes=500-99999", 500, 999),
                 ("bytes=-10", 990, 999), ("bytes=-5000", 0, 999),
                 ("bytes=999-999", 999, 999), ("Bytes=1-2", 1, 2)]  # a unit of any case
        for text, first, last in cases:
            with self.subTest(range=text):
                status, headers, body = self.call("GET", self.path, headers={"Range": text})
                self.assertEqual(status, 206)
                self.assertEqual(body, self.blob[first:last + 1])
                self.assertEqual(headers["Content-Range"], "bytes %d-%d/1000" % (first, last))
                self.assertEqual(headers["Content-Length"], str(last - first + 1))
                self.assertEqual(headers["Accept-Ranges"], "bytes")
                self.assertEqual(headers["Docker-Content-Digest"], digest_of(self.blob))
        status, headers, body = self.call("HEAD", self.path, headers={"Range": "bytes=100-"})
        self.assertEqual((status, headers["Content-Length"], headers["Content-Range"], body),
                         (206, "900", "bytes 100-999/1000", b""))

    def test_whole_blob_answers_say_they_take_ranges(self):
        for method in ("GET", "HEAD"):
            status, headers, body = self.call(method, self.path)
            self.assertEqual((status, headers["Accept-Ranges"]), (200, "bytes"))
            self.assertNotIn("Content-Range", headers)
            self.assertEqual(body, self.blob if method == "GET" else b"")
        # several ranges: the whole blob (RFC 9110 14.2 lets a server)
        status, headers, body = self.call("GET", self.path,
                                          headers={"Range": "bytes=0-1,5-6"})
        self.assertEqual((status, body), (200, self.blob))

    def test_bad_and_unsatisfiable_ranges_are_416_with_the_size(self):
        for text in ("bytes=1000-", "bytes=5000-6000", "bytes=-0", "bytes=20-10",
                     "bytes=-", "bytes=x-y", "bytes 0-5", "items=0-5", "bytes=0-5/10",
                     "bytes=" + "9" * 30 + "-"):
            with self.subTest(range=text):
                answer = self.call("GET", self.path, headers={"Range": text})
                self.assertIn(text[:20], self.assertError(answer, 416, "RANGE_INVALID"))
                self.assertEqual(answer[1]["Content-Range"], "bytes */1000")
        answer = self.call("HEAD", self.path, headers={"Range": "bytes=2000-"})
        self.assertEqual((answer[0], answer[1]["Content-Range"], answer[2]),
                         (416, "bytes */1000", b""))
        empty = "/v2/web/blobs/" + self.push_blob(b"")  # no byte to serve
        answer = self.call("GET", empty, headers={"Range": "bytes=0-"})
        self.assertError(answer, 416, "RANGE_INVALID")
        self.assertEqual(answer[1]["Content-Range"], "bytes */0")
        self.assertEqual(self.call("GET", empty)[:3:2], (200, b""))
        self.assertNotIn("Traceback", self.daemon.daemon_log())

    def test_a_range_of_a_blob_of_another_project_is_refused_as_the_blob_is(self):
        answer = self.call("GET", self.path, headers={"Range": "bytes=0-9"}, user="other:other-pw")
        self.assertError(answer, 403, "DENIED")
        answer = self.call("GET", self.path.replace("/web/", "/api/"),
                           headers={"Range": "bytes=0-9"}, user="other:other-pw")
        self.assertError(answer, 404, "BLOB_UNKNOWN")
        self.assertNotIn("Content-Range", answer[1])


###############################################################################
# The service: uploads, redeploys, cancels, the audit #########################
###############################################################################

class UploadTests(DaemonTestCase):

    def test_chunked_upload(self):
        content_type, body = multipart([("project", "app"),
                                        ("package", ("p", control_script(OK_SCRIPT)))])
        connection = self.daemon.connection()
        token = base64.b64encode(b"admin:admin-pw").decode()
        pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
        connection.request("POST", "/deploy/upload", body=iter(pieces),
                           headers={"Authorization": "Basic " + token,
                                    "Content-Type": content_type},
                           encode_chunked=True)
        response = connection.getresponse()
        deployment = response.read().decode().strip()
        connection.close()
        self.assertEqual(response.status, 202, deployment)
        self.assertEqual(self.daemon.wait_state("app", deployment), "ok")

    def test_expect_100_continue(self):
        content_type, body = multipart([("project", "app"),
                                        ("package", ("p", control_script(OK_SCRIPT)))])
        sock = socket.create_connection(("127.0.0.1", self.daemon.port))
        token = base64.b64encode(b"admin:admin-pw").decode()
        sock.sendall(("POST /deploy/upload HTTP/1.1\r\nHost: x\r\nAuthorization: "
                      "Basic %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                      "Expect: 100-continue\r\n\r\n"
                      % (token, content_type, len(body))).encode())
        self.assertEqual(sock.recv(4096), b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        self.assertIn(b" 202 ", sock.recv(4096))
        sock.close()
        # refused before the body: no 100, the error at once
        sock = socket.create_connection(("127.0.0.1", self.daemon.port))
        sock.sendall(("POST /deploy/upload HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\n"
                      "Content-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                      % (content_type, len(body))).encode())
        self.assertRegex(sock.recv(4096), rb"\AHTTP/1.1 401")
        sock.close()

    def test_image_and_package_land_in_the_deployment(self):
        image = os.urandom(100000)
        script = """
        echo "cwd=$(pwd)"
        ls
        cmp "$IMAGE" image.copy && echo "image ok"
        exit 1
        """
        package = tar_bytes({"control.sh": (("#!/bin/sh\n" + textwrap.dedent(script))
                                            .encode(), 0o755),
                             "image.copy": image})
        status, _, body = self.daemon.upload("app", package, image=image)
        deployment = body.strip()
        self.assertEqual(self.daemon.wait_state("app", deployment), "ok")
        log = self.daemon.log("app", deployment)
        self.assertIn("image ok", log)
        folder = os.path.join(self.daemon.upload_dir, "app", "deployments", deployment)
        self.assertIn("cwd=" + os.path.realpath(folder), log)
        status, data = self.daemon.get_json("/status/app/" + deployment)
        self.assertEqual(data["files"]["image"],
                         {"name": "image.tar", "size": len(image),
                          "sha256": hashlib.sha256(image).hexdigest()})

    def test_file_part_without_a_filename(self):
        content_type, body = multipart([("project", "app"),
                                        ("package", control_script(OK_SCRIPT))])
        status, _, text = self.daemon.request("POST", "/upload", body=body,
                                              headers={"Content-Type": content_type})
        self.assertEqual(status, 202, text)
        self.assertEqual(self.daemon.wait_state("app", text.strip()), "ok")

    def test_log_as_json(self):
        deployment = self.daemon.deploy()
        self.daemon.wait_state("app", deployment)
        status, data = self.daemon.get_json("/log/app/" + deployment)
        self.assertEqual((status, data["state"], data["log"]),
                         (200, "ok", "step check\nstep deploy\n"))

    def test_control_sh_from_the_project_folder(self):
        project_dir = os.path.join(self.daemon.upload_dir, "app")
        os.makedirs(project_dir)
        with open(os.path.join(project_dir, "control.sh"), "w") as file:
            file.write("#!/bin/sh\necho \"admin script $1 $(wc -c < $IMAGE)\"\nexit 1\n")
        os.chmod(os.path.join(project_dir, "control.sh"), 0o755)
        status, _, body = self.daemon.upload("app", image=b"12345")
        self.assertEqual(status, 202, body)
        deployment = body.strip()
        self.assertEqual(self.daemon.wait_state("app", deployment), "ok")
        self.assertIn("admin script deploy 5", self.daemon.log("app", deployment))
        os.chmod(os.path.join(project_dir, "control.sh"), 0o644)
        status, _, body = self.daemon.upload("app", image=b"12345")
        self.assertEqual(status, 400)
        self.assertIn("not an executable", body)


class UploadErrorTests(DaemonTestCase):
    settings = {"MAX_UPLOAD_SIZE": "1M"}

    def assert_refused(self, status, answer, reason=None):
        self.assertEqual(answer[0], status, answer[2])
        self.assertEqual(len(answer[2].strip().splitlines()), 1, answer[2])
        if reason:
            self.assertIn(reason, answer[2])
        self.assertEqual(self.daemon.leftovers(), [])
        self.assertFalse(os.path.exists(os.path.join(self.daemon.upload_dir, "app",
                                                     "deployments"))
                         and os.listdir(os.path.join(self.daemon.upload_dir, "app",
                                                     "deployments")))
        # and the daemon keeps serving
        self.assertEqual(self.daemon.get("/stat")[0], 200)

    def post(self, body, content_type="multipart/form-data; boundary=testboundary1234",
             headers=None):
        headers = dict(headers or {})
        if content_type:
            headers["Content-Type"] = content_type
        return self.daemon.request("POST", "/upload", body=body, headers=headers)

    def test_not_multipart(self):
        self.assert_refused(400, self.post(b"project=app", "application/x-www-form-urlencoded"),
                            "multipart")
        self.assert_refused(400, self.post(b"x", "multipart/form-data"), "boundary")

    def test_malformed_and_truncated(self):
        _, body = multipart([("project", "app"),
                             ("package", ("p", control_script(OK_SCRIPT)))])
        self.assert_refused(400, self.post(body[:-30]), "final boundary")
        self.assert_refused(400, self.post(b"garbage with no boundary at all"))
        self.assert_refused(400, self.post(body.replace(b"Content-Disposition", b"X", 1)))

    def test_missing_and_unknown_fields(self):
        package = ("p", control_script(OK_SCRIPT))
        self.assert_refused(400, self.post(multipart([("package", package)])[1]),
                            "project")
        self.assert_refused(400, self.post(multipart([("project", "app")])[1]))
        self.assert_refused(400, self.post(multipart([("project", "app"), ("colour", "x"),
                                                      ("package", package)])[1]),
                            "colour")
        self.assert_refused(400, self.post(multipart([("project", "app"), ("project", "b"),
                                                      ("package", package)])[1]))

    def test_bad_project_names(self):
        for name in ("", ".hidden", "-dash", "a/b", "..", "a" * 65, "caf\u00e9",
                     "a b", "x\0y", "\uff41pp"):
            with self.subTest(name=name):
                self.assert_refused(400, self.daemon.upload(
                    name, control_script(OK_SCRIPT)), "project name")
        self.assertEqual(sorted(set(os.listdir(self.daemon.upload_dir))
                                - {ipd.LOCK_FILE}), [])

    def test_good_project_names(self):
        for name in ("a", "A_b-c.d", "9" * 64, "_x"):
            with self.subTest(name=name):
                status, _, body = self.daemon.upload(name, control_script(OK_SCRIPT))
                self.assertEqual(status, 202, body)

    def test_too_large(self):
        big = control_script(OK_SCRIPT) + b"\0" * (2 << 20)
        self.assert_refused(413, self.daemon.upload("app", image=big,
                                                    package=control_script(OK_SCRIPT)))

    def test_an_early_refusal_reaches_a_client_still_sending(self):
        # ipd answers 413 from the head, before any body byte, and then
        # reads and drops what the client still sends before it closes: a
        # client that reads only once it has sent everything (as
        # http.client does) gets the answer, not a connection reset.
        size = 8 << 20
        head = raw_request("POST", "/deploy/upload", headers={
            "Content-Type": "multipart/form-data; boundary=b",
            "Content-Length": str(size)})
        with socket.create_connection(("127.0.0.1", self.daemon.port), timeout=30) as sock:
            sock.sendall(head)
            self.assertEqual(sock.recv(12, socket.MSG_WAITALL), b"HTTP/1.1 413")  # at once
            sock.sendall(b"\0" * size)  # without the drain: EPIPE or a reset
            answer = sock.makefile("rb").read()
        self.assertIn(b"\r\nConnection: close\r\n", answer)
        self.assertTrue(answer.endswith(b"upload larger than MAX_UPLOAD_SIZE "
                                        b"(1048576 bytes)\n"), answer)

    def test_too_large_chunked(self):
        _, body = multipart([("project", "app"),
                             ("image", ("i", b"\0" * (2 << 20)))])
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                          for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
        # ipd may answer 413 before the last chunk is sent, and close: a
        # client then reads that answer (raw_exchange does, as curl does).
        answer = raw_exchange(self.daemon.port, raw_request(
            "POST", "/deploy/upload", chunks, {
                "Content-Type": "multipart/form-data; boundary=testboundary1234",
                "Transfer-Encoding": "chunked"}))
        self.assertEqual(answer_status(answer), 413, answer[:300])
        self.assert_refused(413, (413, None, "x\n"))

    def test_lying_or_missing_content_length(self):
        _, body = multipart([("project", "app"),
                             ("package", ("p", control_script(OK_SCRIPT)))])
        self.assert_refused(400, self.post(body, headers={"Content-Length": "-5"}))
        for length in (len(body) + 10, len(body) // 2):
            sock = socket.create_connection(("127.0.0.1", self.daemon.port))
            token = base64.b64encode(b"admin:admin-pw").decode()
            sock.sendall(("POST /deploy/upload HTTP/1.1\r\nHost: x\r\n"
                          "Authorization: Basic %s\r\nContent-Type: multipart/form-data;"
                          " boundary=testboundary1234\r\nContent-Length: %d\r\n\r\n"
                          % (token, length)).encode() + body)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            sock.close()
            self.assertRegex(answer, rb"\AHTTP/1.[01] 4\d\d" if length < len(body)
                             else rb"\A(HTTP/1.[01] 4\d\d|)")
        self.assert_refused(400, (400, None, "x\n"))

    def raw(self, data):
        """Send raw bytes; return the whole answer."""
        sock = socket.create_connection(("127.0.0.1", self.daemon.port))
        sock.sendall(data)
        answer = b""
        while True:
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        sock.close()
        return answer

    def test_broken_requests_get_a_one_line_answer(self):
        for request in (b"NONSENSE\r\n\r\n",
                        b"GET /deploy/stat HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
                        b"GET /deploy/stat HTTP/1.1\r\n"
                        + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n",
                        b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):
            with self.subTest(request[:20]):
                answer = self.raw(request)
                head, _, body = answer.partition(b"\r\n\r\n")
                self.assertRegex(head, rb"\AHTTP/1.[01] 4\d\d ")
                self.assertEqual(body.count(b"\n"), 1, body)
                self.assertNotIn(b"<", body)
        self.assertEqual(self.daemon.get("/stat")[0], 200)

    def test_no_length(self):
        sock = socket.create_connection(("127.0.0.1", self.daemon.port))
        token = base64.b64encode(b"admin:admin-pw").decode()
        sock.sendall(("POST /deploy/upload HTTP/1.1\r\nHost: x\r\nAuthorization: "
                      "Basic %s\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      "Connection: close\r\n\r\n" % token).encode())
        self.assertRegex(sock.recv(4096), rb"\AHTTP/1.[01] 411")
        sock.close()

    def test_no_control_script(self):
        self.assert_refused(400, self.daemon.upload("app", tar_bytes({"readme": b"x"})),
                            "control.sh")
        self.assert_refused(400, self.daemon.upload("app", image=b"image only"),
                            "control.sh")
        self.assert_refused(400, self.daemon.upload(
            "app", tar_bytes({"control.sh": (b"#!/bin/sh\nexit 1\n", 0o644)})),
            "not an executable")

    def test_package_that_is_not_an_archive(self):
        self.assert_refused(400, self.daemon.upload("app", b"just some text"),
                            "archive")

    def test_package_traversal_leaves_nothing(self):
        evil = tar_with((tar_info("control.sh", size=10, mode=0o755), b"#!/bin/sh\n"),
                        (tar_info("../../escaped", size=1), b"x"))
        self.assert_refused(400, self.daemon.upload("app", evil), "..")
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "escaped")))
        self.assertFalse(os.path.exists(os.path.join(self.daemon.upload_dir,
                                                     "escaped")))

    def test_unknown_path_and_wrong_method(self):
        self.assertEqual(self.daemon.get("/nothing")[0], 404)
        self.assertEqual(self.daemon.get("/deploy", root="")[0], 200)
        self.assertEqual(self.daemon.get("/elsewhere", root="")[0], 404)
        status, headers, body = self.daemon.request("GET", "/upload")
        self.assertEqual(status, 405)
        self.assertEqual(headers["Allow"], "POST")
        self.assertEqual(self.daemon.request("DELETE", "/status/app")[0], 405)
        self.assertEqual(self.daemon.request("POST", "/list")[0], 405)
        status, data = self.daemon.get_json("/nothing")
        self.assertEqual(status, 404)
        self.assertIn("error", data)

    def test_client_that_disconnects_mid_upload_leaves_nothing(self):
        _, body = multipart([("project", "app"),
                             ("package", ("p", control_script(OK_SCRIPT))),
                             ("image", ("i", os.urandom(200000)))])
        sock = socket.create_connection(("127.0.0.1", self.daemon.port))
        token = base64.b64encode(b"admin:admin-pw").decode()
        sock.sendall(("POST /deploy/upload HTTP/1.1\r\nHost: x\r\nAuthorization: "
                      "Basic %s\r\nContent-Type: multipart/form-data; "
                      "boundary=testboundary1234\r\nContent-Length: %d\r\n\r\n"
                      % (token, len(body))).encode() + body[:150000])
        wait_until(self.daemon.leftovers, message="the upload being written")
        sock.close()
        deadline = time.monotonic() + 30
        while self.daemon.leftovers() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assert_refused(400, (400, None, "x\n"))
        self.assertEqual(self.daemon.state("app"), "no")


class DeploymentApiTests(DaemonTestCase):
    settings = {"KEEP_DEPLOYMENTS": "2", "KILL_GRACE": "1"}

    def test_status_wait_answers_as_soon_as_it_ends(self):
        deployment = self.daemon.deploy('[ "$1" = deploy ] && sleep 0.5; exit 1')
        started = time.monotonic()
        status, _, body = self.daemon.get("/status/app/%s?wait=20" % deployment)
        elapsed = time.monotonic() - started
        self.assertEqual((status, body), (200, "ok\n"))
        self.assertLess(elapsed, 15)  # at its end, not at the 20 s of ?wait=20
        gate = os.path.join(self.tmp, "gate")
        slow = self.daemon.deploy(gate_script(gate))
        started = time.monotonic()
        self.assertEqual(self.daemon.get("/status/app/%s?wait=0.5" % slow)[2], "active\n")
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        open(gate, "w").close()
        self.assertEqual(self.daemon.get("/status/app?wait=20")[2], "ok\n")
        self.assertEqual(self.daemon.get("/status/app?wait=x")[0], 400)

    def test_follow_streams_lines_before_the_script_ends(self):
        gate = os.path.join(self.tmp, "gate")
        deployment = self.daemon.deploy(gate_script(gate, 'echo "first line"',
                                                    'echo "last line"'))
        connection = self.daemon.connection()
        connection.request("GET", "/deploy/log/app/%s?follow=1" % deployment,
                           headers={"Authorization": "Basic " + base64.b64encode(
                               b"admin:admin-pw").decode()})
        response = connection.getresponse()
        self.assertEqual(response.getheader("Transfer-Encoding"), "chunked")
        self.assertEqual(response.readline(), b"first line\n")
        self.assertEqual(self.daemon.state("app", deployment), "active")
        followers = [self.daemon.connection() for _ in range(5)]
        for other in followers:
            other.request("GET", "/deploy/log/app/%s?follow=1" % deployment,
                          headers={"Authorization": "Basic " + base64.b64encode(
                              b"admin:admin-pw").decode()})
        open(gate, "w").close()
        self.assertEqual(response.read(), b"last line\nipd: state: ok\n")
        for other in followers:
            self.assertEqual(other.getresponse().read(),
                             b"first line\nlast line\nipd: state: ok\n")
            other.close()
        connection.close()

    def test_redeploy_runs_the_files_again_and_410_once_pruned(self):
        first = self.daemon.deploy('[ "$1" = deploy ] && cat version.txt; exit 1')
        self.daemon.wait_state("app", first)
        package = tar_bytes({"control.sh": (b"#!/bin/sh\n[ \"$1\" = deploy ] && "
                                            b"cat version.txt; exit 1\n", 0o755),
                             "version.txt": b"v1\n"})
        v1 = self.daemon.upload("app", package, image=b"image one")[2].strip()
        self.daemon.wait_state("app", v1)
        v2 = self.daemon.deploy("exit 1")
        self.daemon.wait_state("app", v2)
        status, headers, body = self.daemon.request("POST", "/redeploy/app/" + v1)
        self.assertEqual(status, 202, body)
        again = body.strip()
        self.assertEqual(self.daemon.wait_state("app", again), "ok")
        self.assertEqual(self.daemon.log("app", again), "v1\n")
        data = self.daemon.get_json("/status/app/" + again)[1]
        self.assertEqual(data["files"]["image"]["sha256"],
                         hashlib.sha256(b"image one").hexdigest())
        self.assertEqual(self.daemon.state("app", first), "ok")
        status, _, body = self.daemon.request("POST", "/redeploy/app/" + first)
        self.assertEqual(status, 410, body)
        self.assertEqual(self.daemon.leftovers(), [])

    def test_digests_checked_and_recorded(self):
        package = control_script(OK_SCRIPT)
        good = hashlib.sha256(package).hexdigest()
        status, _, body = self.daemon.upload("app", package, extra=[
            ("package_sha256", good.upper())])
        self.assertEqual(status, 202, body)
        for extra, reason in (([("package_sha256", "0" * 64)], "does not match"),
                              ([("package_sha256", "nothex")], "64 hex"),
                              ([("image_sha256", good)], "without an image")):
            status, _, body = self.daemon.upload("app", package, extra=extra)
            self.assertEqual(status, 400)
            self.assertIn(reason, body)
        self.assertEqual(self.daemon.leftovers(), [])
        info = self.daemon.get_json("/status/app/" + self.daemon.get(
            "/status/app")[2].strip() if False else "/status/app")[1]
        self.assertEqual(info["files"]["package"]["sha256"], good)
        self.assertEqual(info["user"], "admin")

    def test_metrics_in_prometheus_text_format(self):
        self.daemon.wait_state("app", self.daemon.deploy())
        self.daemon.wait_state("app", self.daemon.deploy("exit 4"))
        status, headers, body = self.daemon.get("/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/plain; version=0.0.4"))
        samples, types = parse_prometheus(body)
        self.assertEqual(samples[("ipd_deployments", (("project", "app"), ("state", "ok")))], 1)
        self.assertEqual(samples[("ipd_deployments", (("project", "app"), ("state", "4")))], 1)
        self.assertEqual(samples[("ipd_step_duration_seconds_count", (("step", "check"),))], 2)
        self.assertEqual(samples[("ipd_step_duration_seconds_bucket",
                                  (("le", "+Inf"), ("step", "deploy")))], 1)
        self.assertEqual(samples[("ipd_uploads_total", ())], 2)
        self.assertEqual(samples[("ipd_queue_length", ())], 0)
        self.assertIn(("ipd_last_success_timestamp_seconds", (("project", "app"),)), samples)
        self.assertEqual(types["ipd_step_duration_seconds"], "histogram")
        self.assertEqual(self.daemon.get("/metrics", user="dev")[0], 403)
        with open(self.daemon.users_file, "a") as file:
            file.write("METRICS:scraper:%s\n" % sha256_hex("scrape-pw"))
        self.assertEqual(self.daemon.get("/metrics", user="scraper:scrape-pw")[0], 200)
        self.assertEqual(self.daemon.get("/status/app", user="scraper:scrape-pw")[0], 403)


class MemoryTests(DaemonTestCase):

    def upload_streaming(self, size):
        """Stream an upload of size bytes from a generator; return the id."""
        head = ('--b\r\nContent-Disposition: form-data; name="project"\r\n\r\napp\r\n'
                '--b\r\nContent-Disposition: form-data; name="package"; '
                'filename="p"\r\n\r\n').encode() + control_script(OK_SCRIPT) + \
            b'\r\n--b\r\nContent-Disposition: form-data; name="image"; ' \
            b'filename="big"\r\n\r\n'
        tail = b"\r\n--b--\r\n"
        block = os.urandom(1 << 20)
        digest = hashlib.sha256()

        def body():
            yield head
            sent = 0
            while sent < size:
                piece = block[:size - sent]
                digest.update(piece)
                yield piece
                sent += len(piece)
            yield tail
        connection = self.daemon.connection()
        token = base64.b64encode(b"admin:admin-pw").decode()
        connection.request("POST", "/deploy/upload", body=body(), headers={
            "Authorization": "Basic " + token,
            "Content-Type": "multipart/form-data; boundary=b",
            "Content-Length": str(len(head) + size + len(tail))})
        response = connection.getresponse()
        deployment = response.read().decode().strip()
        connection.close()
        self.assertEqual(response.status, 202, deployment)
        return deployment, digest.hexdigest()

    def peak_rss_kib(self):
        with open("/proc/%d/status" % self.daemon.process.pid) as file:
            return int(re.search(r"VmHWM:\s+(\d+)", file.read()).group(1))

    def test_large_upload_does_not_grow_memory(self):
        small, _ = self.upload_streaming(1 << 20)
        self.daemon.wait_state("app", small)
        before = self.peak_rss_kib()
        large, digest = self.upload_streaming(soak(300 << 20, 64 << 20))
        self.assertEqual(self.daemon.wait_state("app", large), "ok")
        after = self.peak_rss_kib()
        self.assertLess(after - before, 16 * 1024,
                        "peak RSS grew from %d to %d KiB" % (before, after))
        self.assertLess(after, 64 * 1024)
        status, data = self.daemon.get_json("/status/app/" + large)
        self.assertEqual(data["files"]["image"]["sha256"], digest)
        self.assertEqual(data["files"]["image"]["size"], soak(300 << 20, 64 << 20))


class PromiseTests(DaemonTestCase):
    # issue 23, item 10: a test for each promise no test held, each failing
    # on the small bug that would break it
    settings = {"MAX_UPLOAD_SIZE": "300000", "STEP_TIMEOUT": "2"}
    extra_users = "USER:alice:%s:a\nUSER:bob:%s:b\n" % (sha256_hex("alice-pw"),
                                                        sha256_hex("bob-pw"))

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        self.daemon = self.start_daemon(self.settings, extra_users=self.extra_users)

    def send(self, data, timeout=30):
        return answer_status(raw_exchange(self.daemon.port, data, timeout=timeout))

    def test_an_upload_of_exactly_max_upload_size_is_taken(self):
        limit = 300000
        for size, expected in ((limit, 202), (limit + 1, 413)):
            for framing, project in (("Content-Length", "app"), ("chunked", "other")):
                content_type, body = padded_upload(size, project)
                self.assertEqual(len(body), size)
                headers = {"Content-Type": content_type}
                if framing == "chunked":
                    body, headers["Transfer-Encoding"] = chunked(body), "chunked"
                with self.subTest(size=size, framing=framing):
                    self.assertEqual(self.send(raw_request(
                        "POST", "/deploy/upload", body, headers)), expected)
        self.assertEqual(self.daemon.leftovers(), [])

    def test_a_project_name_with_a_trailing_newline_is_refused(self):
        content_type, body = multipart([("project", "app\n"), (
            "package", ("p.tgz", control_script(OK_SCRIPT)))])
        status, _, text = self.daemon.request("POST", "/upload", body=body,
                                              headers={"Content-Type": content_type})
        self.assertEqual(status, 400, text)
        status, _, text = self.daemon.request("POST", "/upload?project=app%0A",
                                              body=body,
                                              headers={"Content-Type": content_type})
        self.assertEqual(status, 400, text)
        self.assertEqual([name for name in os.listdir(self.daemon.upload_dir)
                          if "\n" in name], [])

    def test_a_step_ends_at_step_timeout_not_later(self):
        # KILL_GRACE is 2 s here: a step that ends on its own at 3.5 s is
        # past STEP_TIMEOUT (2 s), so it timed out, whatever it says
        deployment = self.daemon.deploy('[ "$1" = deploy ] && sleep 3.5\nexit 1\n')
        self.assertEqual(self.daemon.wait_state("app", deployment), "timeout")

    def test_the_follow_streams_state_line_is_a_line_of_its_own(self):
        deployment = self.daemon.deploy(
            '[ "$1" = deploy ] && { sleep 1; printf "no newline at the end"; }\nexit 1\n')
        status, _, text = self.daemon.get("/log/app/%s?follow=1" % deployment)
        self.assertEqual(status, 200)
        self.assertIn("no newline at the end\nipd: state: ok\n", text)
        self.assertEqual(text.splitlines()[-1], "ipd: state: ok")

    def test_a_segment_completed_by_patch_is_verified(self):
        data = os.urandom(200000)
        digest = hashlib.sha256(data).hexdigest()
        status, _, _ = self.daemon.request("POST", "/segments/" + digest, body=data[:1000],
                                           headers={"Upload-Complete": "?0"})
        self.assertEqual(status, 204)
        status, _, text = self.daemon.request(
            "PATCH", "/segments/" + digest, body=os.urandom(len(data) - 1000),
            headers={"Upload-Offset": "1000", "Upload-Complete": "?1"})
        self.assertEqual(status, 400, text)
        self.assertIn("SHA-256", text)
        self.assertEqual(self.daemon.request("HEAD", "/segments/" + digest)[0], 404)
        # another user's true bytes of it are stored, and they are the bytes
        status, _, _ = self.daemon.request("POST", "/segments/" + digest, "bob:bob-pw",
                                           body=data)
        self.assertEqual(status, 201)
        stored = os.path.join(self.daemon.upload_dir, ".segments", "sha256",
                              digest[:2], digest)
        self.assertEqual(sha256_file(stored), digest)
        self.assertEqual(self.daemon.request("HEAD", "/segments/" + digest)[0], 404)

    def test_100_continue_comes_only_after_the_checks(self):
        # a refused request's client is told before it sends a byte
        alice = "Basic " + base64.b64encode(b"alice:alice-pw").decode()
        nobody = "Basic " + base64.b64encode(b"admin:wrong").decode()
        multi = "multipart/form-data; boundary=testboundary1234"
        cases = {
            "too large": ("/deploy/upload", 300001, multi, ADMIN_AUTH, 413),
            "no boundary": ("/deploy/upload", 1000, "multipart/form-data", ADMIN_AUTH,
                            400),
            "forbidden project": ("/deploy/upload?project=b", 1000, multi, alice, 403),
            "wrong password": ("/deploy/upload", 1000, multi, nobody, 401),
            "bad project": ("/deploy/upload?project=..", 1000, multi, ADMIN_AUTH, 400),
            "push too large": ("/deploy/push", ipd.RECIPE_LIMIT + 1, "application/json",
                               ADMIN_AUTH, 413),
            "push forbidden": ("/deploy/push?project=b", 1000, "application/json",
                               alice, 403),
            "missing forbidden": ("/deploy/segments/missing?project=b", 100,
                                  "application/json", alice, 403),
            "segment too large": ("/deploy/segments/" + "a" * 64, 300001,
                                  "application/octet-stream", ADMIN_AUTH, 413),
        }
        for name, (path, length, content_type, authorization, expected) in cases.items():
            with self.subTest(name):
                head = ("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: %s\r\n"
                        "Content-Type: %s\r\nContent-Length: %d\r\nExpect: 100-continue"
                        "\r\n\r\n" % (path, authorization, content_type, length)).encode()
                line = first_answer_line(self.daemon.port, head)
                self.assertIsNotNone(line, "no answer before the body")
                self.assertEqual(line.split()[1], str(expected), line)

    def test_an_unsigned_extra_file_beside_a_signed_manifest_is_refused(self):
        if not shutil.which("ssh-keygen"):
            self.skipTest("needs ssh-keygen (Debian: openssh-client)")
        key, public = ssh_key(self.tmp, "ci")
        signers = os.path.join(self.tmp, "allowed_signers")
        with open(signers, "w") as file:
            file.write('ci@app namespaces="ipd" %s\n' % public)
        self.daemon.stop()
        self.daemon = self.start_daemon(dict(self.settings, ALLOWED_SIGNERS=signers,
                                             MAX_UPLOAD_SIZE="0"))
        package = control_script(OK_SCRIPT)

        def signed(manifest, *files):
            content_type, body = multipart([
                ("project", "app"), ("manifest", manifest.decode()),
                ("signature", ipd.sign_manifest(key, manifest))] + list(files))
            return self.daemon.request("POST", "/upload", body=body,
                                       headers={"Content-Type": content_type})
        manifest = ipd.make_manifest("app", {"package": (
            hashlib.sha256(package).hexdigest(), len(package))})
        status, _, text = signed(manifest, ("image", ("image.tar", b"not signed")),
                                 ("package", ("p.tgz", package)))
        self.assertEqual(status, 403, text)
        self.assertIn("signed manifest", text)
        # dated ahead: a year, or past what a clock can print
        for name, created in (("a year ahead", time.time() + 366 * 86400),
                              ("2**62", 2 ** 62)):
            with self.subTest(name):
                ahead = ipd.make_manifest("app", {"package": (
                    hashlib.sha256(package).hexdigest(), len(package))}, created)
                status, _, text = signed(ahead, ("package", ("p.tgz", package)))
                self.assertEqual(status, 403, text)
                self.assertIn("ahead", text)
        # and neither blocks the release signed now
        status, _, text = signed(manifest, ("package", ("p.tgz", package)))
        self.assertEqual(status, 202, text)
        self.assertEqual(self.daemon.wait_state("app", text.strip()), "ok")
        self.assertNotIn("Traceback", self.daemon.daemon_log())


class AuditAndNotifyTests(DaemonTestCase):
    settings = {"KEEP_DEPLOYMENTS": "2", "MAX_UPLOAD_SIZE": "50M",
                "NOTIFY_TIMEOUT": "1"}

    def setUp(self):
        self.listener = Listener()
        self.addCleanup(self.listener.close)
        self.settings = dict(self.settings, NOTIFY_URL=self.listener.url)
        super().setUp()

    def access_line(self, status):
        # a layer push (#16) is refused at its first request: segments/...
        return self.daemon.daemon_log(r'"POST /deploy/(upload|segments/\w+)" %d'
                                      % status)

    def test_refused_push_sends_no_file_bytes(self):
        image = os.path.join(self.tmp, "big.img")
        with open(image, "wb") as file:
            file.truncate(40 << 20)
        package = os.path.join(self.tmp, "p.tgz")
        with open(package, "wb") as file:
            file.write(control_script(OK_SCRIPT))
        with open(self.daemon.users_file, "a") as file:
            file.write("USER:web-ci:%s:web\n" % sha256_hex("ci-pw"))
        # Through a relay that counts what the client sends: a client that
        # missed the early answer would send the file after its 3 s wait.
        relay = CountingRelay(self, self.daemon.port)
        environ = dict(os.environ, IPD_URL="http://127.0.0.1:%d/deploy" % relay.port)
        cases = (({"IPD_USER": "web-ci", "IPD_PASSWORD": "ci-pw"}, "api", 5, 403),
                 ({"IPD_USER": "web-ci", "IPD_PASSWORD": "wrong"}, "web", 4, 401))
        for env, project, code, status in cases:
            result = subprocess.run([sys.executable, IPD, "push", "--project", project,
                                     "--image", image, "--package", package],
                                    env=dict(environ, **env), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, timeout=60)
            self.assertEqual(result.returncode, code, result.stderr)
            self.assertLess(relay.sent, 64 << 10)  # heads only, not 40 MiB
            self.assertRegex(self.access_line(status),
                             r'"POST /deploy/(upload|segments/\w+)" %d user=\S+ in=0 '
                             % status)
        big = os.path.join(self.tmp, "huge.img")
        with open(big, "wb") as file:
            file.truncate(60 << 20)
        result = subprocess.run([sys.executable, IPD, "push", "--project", "web",
                                 "--image", big], env=dict(
                                     environ, IPD_USER="web-ci", IPD_PASSWORD="ci-pw"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(result.returncode, 6, result.stderr)
        self.assertLess(relay.sent, 64 << 10)
        self.assertRegex(self.access_line(413),
                         r'"POST /deploy/(upload|segments/\w+)" 413 user=web-ci in=0 ')
        report("refused pushes (403, 401, 413) read 0 bytes of the body")
        self.assertEqual(self.daemon.leftovers(), [])

    def test_project_in_the_header_and_query(self):
        package = control_script(OK_SCRIPT)
        content_type, body = multipart([("package", ("p", package))])
        for headers, path in (({"X-Ipd-Project": "hdr"}, "/upload"),
                              ({}, "/upload?project=qry")):
            status, _, text = self.daemon.request(
                "POST", path, body=body, headers=dict(headers, **{
                    "Content-Type": content_type}))
            self.assertEqual(status, 202, text)
        content_type, body = multipart([("project", "other"), ("package", ("p", package))])
        status, _, text = self.daemon.request("POST", "/upload", body=body, headers={
            "Content-Type": content_type, "X-Ipd-Project": "hdr"})
        self.assertEqual(status, 400)
        self.assertIn("differs", text)
        status, _, text = self.daemon.request("POST", "/upload?project=../x", body=body,
                                              headers={"Content-Type": content_type})
        self.assertEqual(status, 400)

    def test_audit_log_events_and_no_secrets(self):
        first = self.daemon.deploy(OK_SCRIPT)
        self.daemon.wait_state("app", first)
        gate = os.path.join(self.tmp, "gate")
        running = self.daemon.deploy(gate_script(gate))
        self.daemon.wait_state("app", running, ["active"])
        self.daemon.request("POST", "/cancel/app/" + running)
        redo = self.daemon.request("POST", "/redeploy/app/" + first)[2].strip()
        self.daemon.wait_state("app", redo)
        self.daemon.get("/stat", user="admin:a-wrong-secret")
        pruned = self.daemon.deploy(OK_SCRIPT)
        self.daemon.wait_state("app", pruned)
        self.assertTrue(self.daemon.get_json("/status/app/" + first)[1]["pruned"])
        text = read_text(os.path.join(self.tmp, "audit.log"))
        self.assertNotIn("a-wrong-secret", text)
        self.assertNotIn("admin-pw", text)
        events = [json.loads(line) for line in text.splitlines()]
        kinds = [(e["event"], e.get("deployment")) for e in events]
        self.assertIn(("upload", first), kinds)
        self.assertIn(("cancel", running), kinds)
        self.assertIn(("redeploy", redo), kinds)
        self.assertIn(("login_refused", None), kinds)
        states = [(e["deployment"], e["state"]) for e in events if e["event"] == "state"]
        self.assertEqual([s for d, s in states if d == first], ["active", "ok"])
        self.assertEqual([s for d, s in states if d == running], ["active", "cancelled"])
        self.assertLess(kinds.index(("cancel", running)),  # who, then the state
                        [(e["event"], e.get("deployment"), e.get("state")) for e in events
                         ].index(("state", running, "cancelled")))
        for deployment, event in ((first, "upload"), (redo, "redeploy")):
            self.assertEqual([e["event"] for e in events if e.get("deployment") == deployment],
                             [event, "state", "state"])  # created, then its states
        self.assertEqual(states[-1], (pruned, "ok"))  # in the log before it shows
        upload = next(e for e in events if e["event"] == "upload")
        self.assertEqual((upload["user"], upload["address"], upload["project"]),
                         ("admin", "127.0.0.1", "app"))
        self.assertEqual(len(upload["files"]["package"]["sha256"]), 64)
        # read back, filtered
        status, data = self.daemon.get_json("/audit?project=app")
        self.assertEqual(status, 200)
        self.assertTrue(all(e["project"] == "app" for e in data["events"]))
        self.assertIn(first, [e.get("deployment") for e in data["events"]])
        later = events[-1]["ts"]
        status, data = self.daemon.get_json("/audit?since=%f" % later)
        self.assertTrue(all(e["ts"] >= later for e in data["events"]))
        status, _, body = self.daemon.get("/audit?since=2000-01-01T00:00:00Z")
        self.assertEqual(len(body.splitlines()), len(events))
        self.assertEqual(self.daemon.get("/audit", user="dev")[0], 403)
        self.assertEqual(self.daemon.get("/audit?since=yesterday")[0], 400)

    def test_notify_script_and_url_once_per_final_state(self):
        project_dir = os.path.join(self.daemon.upload_dir, "app")
        os.makedirs(project_dir)
        calls = os.path.join(self.tmp, "calls")
        with open(os.path.join(project_dir, "notify.sh"), "w") as file:
            file.write('#!/bin/sh\necho "$PROJECT $DEPLOY $STATE" >> %s\n'
                       '[ "$STATE" = 7 ] && sleep 30\nexit 0\n' % calls)
        os.chmod(os.path.join(project_dir, "notify.sh"), 0o755)
        ok = self.daemon.deploy(OK_SCRIPT)
        self.daemon.wait_state("app", ok)
        failed = self.daemon.deploy("exit 7")  # its notify.sh hangs
        self.daemon.wait_state("app", failed)
        after = self.daemon.deploy(OK_SCRIPT)  # not held up: DeploymentQueueTests
        self.assertEqual(self.daemon.wait_state("app", after), "ok")
        deadline = time.monotonic() + 15
        while (len(self.listener.received) < 3 or len(read_text(calls).splitlines()) < 3) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = sorted(read_text(calls).splitlines())
        self.assertEqual(lines, sorted(["app %s ok" % ok, "app %s 7" % failed,
                                        "app %s ok" % after]))
        posted = {(e["deployment"], e["state"]) for e in self.listener.received}
        self.assertEqual(posted, {(ok, "ok"), (failed, "7"), (after, "ok")})
        self.assertEqual(len(self.listener.received), 3)
        sample = self.listener.received[0]
        self.assertEqual((sample["project"], sample["event"]), ("app", "deployment_ended"))
        self.assertIn("NOTIFY_TIMEOUT", self.daemon.daemon_log("NOTIFY_TIMEOUT"))

    def test_failing_notify_url_is_logged_not_fatal(self):
        self.daemon.stop()
        with open(self.daemon.config, "a") as file:
            file.write("NOTIFY_URL=http://127.0.0.1:1/nothing\n")
        self.daemon.start()
        deployment = self.daemon.deploy(OK_SCRIPT)
        self.assertEqual(self.daemon.wait_state("app", deployment), "ok")
        self.assertIn("NOTIFY_URL failed 3 times", self.daemon.daemon_log(
            "NOTIFY_URL failed", timeout=20))
        self.assertEqual(self.daemon.wait_state("app", self.daemon.deploy()), "ok")

    def test_a_repeated_push_answers_the_same_deployment(self):
        gate = os.path.join(self.tmp, "gate")
        blocker = self.daemon.deploy(gate_script(gate))
        self.daemon.wait_state("app", blocker, ["active"])
        package = control_script(OK_SCRIPT)
        first = self.daemon.upload("app", package, image=b"IMG")
        again = self.daemon.upload("app", package, image=b"IMG")
        self.assertEqual(first[0], 202)
        self.assertEqual((again[0], again[2]), (200, first[2]))
        blocker_again = self.daemon.upload("app", control_script(gate_script(gate)))
        same_bytes = blocker_again[2] == blocker + "\n"  # gzip's clock: a second
        self.assertEqual(blocker_again[0], 200 if same_bytes else 202)
        other = self.daemon.upload("app", package, image=b"OTHER")
        self.assertEqual(other[0], 202)  # other files: a new one
        forced = self.daemon.upload("app", package, image=b"IMG", extra=[("force", "1")])
        self.assertEqual(forced[0], 202)
        self.assertNotEqual(forced[2], first[2])
        open(gate, "w").close()
        self.assertEqual(self.daemon.wait_state("app", forced[2].strip()), "ok")
        self.assertEqual(self.daemon.upload("app", package, image=b"IMG")[0], 202)


class AuditSyslogTests(DaemonTestCase):
    """Issue 14: audit events also to syslog (a datagram socket here)."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        self.socket_path = os.path.join(self.tmp, "log.sock")
        self.syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.syslog.bind(self.socket_path)
        self.syslog.settimeout(10)
        self.addCleanup(self.syslog.close)
        self.daemon = self.start_daemon({"AUDIT_SYSLOG": self.socket_path})

    def test_each_audit_event_goes_to_syslog(self):
        deployment = self.daemon.deploy()
        self.daemon.wait_state("app", deployment)
        messages = []
        while not any('"state": "ok"' in text for text in messages):
            messages.append(self.syslog.recv(65536).decode())
        upload = [text for text in messages if '"event": "upload"' in text]
        self.assertTrue(upload, messages)
        self.assertTrue(upload[0].startswith("<%d>ipd-audit: {" % (10 * 8 + 6)))
        self.assertIn(deployment, upload[0])

    def test_unreachable_syslog_stops_start_up(self):
        daemon = DaemonProcess(os.path.join(self.tmp, "second"),
                               {"AUDIT_SYSLOG": os.path.join(self.tmp, "none")})
        with self.assertRaisesRegex(AssertionError, "AUDIT_SYSLOG"):
            daemon.start()
        daemon.stop()


###############################################################################
# Status pages for people #####################################################
###############################################################################

class StatusPageRenderTests(unittest.TestCase):
    """Issue #12: the status pages are functions from data to HTML, called
    here without a handler or a socket."""

    def deployment(self, **fields):
        record = ipd.Deployment("0123abcd-0000-4000-8000-000000000000", "a<b", 3,
                                "eve\"<x>", {"image": {"name": "<i>", "size": 2,
                                                       "sha256": "ab"}}, "/c")
        return record.replace(**fields)

    def test_every_value_is_escaped_and_each_link_quoted(self):
        record = self.deployment(state="active", started=1.0)
        text = "".join(ipd.render_project("/deploy", [record]))
        self.assertNotIn("<i>", text)
        self.assertNotIn("eve\"<x>", text)
        self.assertIn("eve&quot;&lt;x&gt;", text)
        self.assertIn('href="/deploy/ui/a%%3Cb/%s"' % record.id, text)
        self.assertIn('action="/deploy/ui/a%%3Cb/%s/cancel"' % record.id, text)
        page = ipd.render_deployment("/deploy", record, 5, b"</pre><script>")
        self.assertIn("&lt;/pre&gt;&lt;script&gt;", page)
        self.assertIn("The first 5 bytes of the log are left out", page)

    def test_the_buttons_follow_the_state(self):
        self.assertIn(">cancel<", ipd.buttons("/d", self.deployment()))
        ended = self.deployment(state="ok", pruned=True)
        self.assertEqual(ipd.buttons("/d", ended), "")
        self.assertEqual(ipd.render_projects("/d", []), "<p>No deployments yet.</p>")
        rows = "".join(ipd.render_projects("/d", [("a<b", ended, 7)]))
        self.assertIn('<td data-label="deployments">7</td>', rows)

    def test_a_page_carries_its_nonce_and_nothing_else_runs(self):
        page = "".join(ipd.render_page("/d", "t<", "<p>x</p>", "N1", "go()", True))
        self.assertIn('<style nonce="N1">', page)
        self.assertIn('<script nonce="N1">go()</script>', page)
        self.assertIn("<title>t&lt; - ipd</title>", page)
        self.assertIn("'nonce-N1'", ipd.page_headers("N1")["Content-Security-Policy"])


class StatusPageTests(DaemonTestCase):
    HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}

    def page(self, path, user="admin", root="/deploy"):
        status, headers, body = self.daemon.get(path, user, headers=self.HTML, root=root)
        return status, headers, body

    def assert_strict_page(self, headers, body):
        self.assertTrue(headers["Content-Type"].startswith("text/html"))
        policy = headers["Content-Security-Policy"]
        self.assertIn("default-src 'none'", policy)
        nonce = re.search(r"'nonce-([^']+)'", policy).group(1)
        for tag in re.findall(r"<(?:script|style)\b[^>]*>", body):
            self.assertIn('nonce="%s"' % nonce, tag)
        # nothing from elsewhere: no absolute URL in any src or href
        self.assertEqual(re.findall(r'(?:src|href)="(?:https?:)?//', body), [])

    def test_browser_at_the_root_gets_the_projects_after_login(self):
        ok = self.daemon.deploy(OK_SCRIPT, project="web")
        self.daemon.wait_state("web", ok)
        failed = self.daemon.deploy("exit 3", project="api")
        self.daemon.wait_state("api", failed)
        self.assertEqual(self.page("/", user=None)[0], 401)
        status, headers, body = self.page("/")
        self.assertEqual(status, 200)
        self.assert_strict_page(headers, body)
        self.assertIn('<a href="/deploy/ui/web">web</a>', body)
        self.assertIn('<span class="badge ok">ok</span>', body)
        self.assertIn('<span class="badge failed">prepare failed: 3</span>', body)
        without_nonce = lambda page: re.sub(r'nonce="[^"]+"', "", page)
        self.assertEqual(without_nonce(self.page("/ui/")[2]), without_nonce(body))
        # curl answers stay as they are
        self.assertEqual(self.daemon.get("/", user=None)[2],
                         "ipd %s: Image Push and Deploy\n" % ipd.__version__)

    def test_hostile_file_names_and_log_lines_stay_text(self):
        script = '#!/bin/sh\necho "<script>alert(1)</script> & <b>"\nexit 1\n'
        package = tar_bytes({"control.sh": (script.encode(), 0o755)})
        content_type, body = multipart([
            ("project", "web"), ("package", ('<img src=x onerror=alert(1)>.tgz', package))])
        deployment = self.daemon.request("POST", "/upload", body=body, headers={
            "Content-Type": content_type})[2].strip()
        self.daemon.wait_state("web", deployment)
        status, headers, page = self.page("/ui/web")
        self.assert_strict_page(headers, page)
        self.assertNotIn("<img", page)
        self.assertIn("&lt;img src=x onerror=alert(1)&gt;.tgz", page)
        self.assertIn(hashlib.sha256(package).hexdigest(), page)
        status, headers, page = self.page("/ui/web/" + deployment)
        self.assertEqual(status, 200)
        self.assertNotIn("<script>alert", page)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &lt;b&gt;", page)
        self.assertNotIn("<script", page)  # ended: no live script either

    def test_running_deployment_page_follows_its_log(self):
        gate = os.path.join(self.tmp, "gate")
        deployment = self.daemon.deploy(gate_script(gate, "echo started"))
        self.daemon.wait_state("app", deployment, ["active"])
        deadline = time.monotonic() + 30
        while "started" not in self.daemon.log("app", deployment):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        status, headers, page = self.page("/ui/app/" + deployment)
        self.assert_strict_page(headers, page)
        self.assertIn('<span class="badge active">active</span>', page)
        follow = html.unescape(re.search(r'data-follow="([^"]+)"', page).group(1))
        self.assertEqual(follow, "/deploy/log/app/%s?follow=1&offset=8" % deployment)
        self.assertIn("<script nonce=", page)
        self.assertIn('<meta http-equiv="refresh" content="3">', page)  # no script
        self.assertIn(">cancel</button>", page)
        open(gate, "w").close()
        self.daemon.wait_state("app", deployment)
        # the script's stream, from where the page stopped
        self.assertEqual(self.daemon.get(follow, root="")[2], "ipd: state: ok\n")

    def test_buttons_need_the_same_origin(self):
        gate = os.path.join(self.tmp, "gate")
        deployment = self.daemon.deploy(gate_script(gate))
        self.daemon.wait_state("app", deployment, ["active"])
        path = "/ui/app/%s/cancel" % deployment
        origin = "http://127.0.0.1:%d" % self.daemon.port
        host = "127.0.0.1:%d" % self.daemon.port
        for headers in ({"Origin": "https://evil.example"}, {},
                        {"Sec-Fetch-Site": "cross-site"},
                        {"Referer": "https://evil.example/page"}):
            with self.subTest(headers=headers):
                status, _, body = self.daemon.request("POST", path, headers=dict(
                    headers, Host=host))
                self.assertEqual(status, 403, body)
        self.assertEqual(self.daemon.state("app", deployment), "active")
        status, headers, _ = self.daemon.request("POST", path, headers={
            "Origin": origin, "Host": host})
        self.assertEqual(status, 303)
        self.assertEqual(headers["Location"], "/deploy/ui/app/" + deployment)
        self.assertEqual(self.daemon.wait_state("app", deployment), "cancelled")
        status, headers, _ = self.daemon.request(
            "POST", "/ui/app/%s/redeploy" % deployment,
            headers={"Sec-Fetch-Site": "same-origin", "Host": host})
        self.assertEqual(status, 303)
        again = headers["Location"].rsplit("/", 1)[1]
        self.assertNotEqual(again, deployment)
        self.assertEqual(self.daemon.wait_state("app", again, ["active"]), "active")
        open(gate, "w").close()
        self.assertEqual(self.daemon.wait_state("app", again), "ok")

    def test_a_badge_for_each_state_and_hostile_names_in_urls(self):
        expected = {"await": "await", "active": "active", "ok": "ok", "3": "failed",
                    "126": "failed", "changed": "changed", "cancelled": "cancelled",
                    "timeout": "timeout", "interrupted": "interrupted",
                    "<b>": "failed"}  # each its own since issue #27
        for state, kind in expected.items():
            self.assertEqual(ipd.state_badge(state), '<span class="badge %s">%s</span>'
                             % (kind, html.escape(state)))
        gate = os.path.join(self.tmp, "gate")
        running = self.daemon.deploy(gate_script(gate))
        self.daemon.wait_state("app", running, ["active"])
        waiting = self.daemon.deploy(OK_SCRIPT)
        superseding = self.daemon.deploy(OK_SCRIPT + "\n")
        page = self.page("/ui/app")[2]
        for state in ("active", "changed", "await"):
            self.assertIn('badge %s">%s<' % (expected[state], state), page)
        self.assertEqual(self.daemon.state("app", waiting), "changed")
        open(gate, "w").close()
        self.daemon.wait_state("app", superseding)
        for path in ("/ui/%3Cscript%3E", "/ui/app/%3Cscript%3E", "/ui/..%2F..%2Fetc"):
            status, headers, body = self.page(path)
            self.assertEqual(status, 404)
            self.assertNotIn("<", body)
            self.assertTrue(headers["Content-Type"].startswith("text/plain"))

    def test_roles_and_project_lists_apply(self):
        with open(self.daemon.users_file, "a") as file:
            file.write("USER:web-ci:%s:web\n" % sha256_hex("ci-pw"))
        for project in ("web", "api"):
            self.daemon.wait_state(project, self.daemon.deploy(project=project))
        status, _, page = self.page("/ui/", user="web-ci:ci-pw")
        self.assertIn(">web</a>", page)
        self.assertNotIn(">api</a>", page)
        self.assertEqual(self.page("/ui/api", user="web-ci:ci-pw")[0], 403)
        self.assertEqual(self.page("/ui/web", user="web-ci:ci-pw")[0], 200)
        self.assertEqual(self.page("/ui/nothing")[0], 404)
        with open(self.daemon.users_file, "a") as file:
            file.write("METRICS:scraper:%s\n" % sha256_hex("s-pw"))
        self.assertEqual(self.page("/ui/", user="scraper:s-pw")[0], 403)


class StatusPageLayoutTests(unittest.TestCase):
    """Issue #27: the status pages as people read them, checked on the
    rendered HTML's elements: relative times with the full time on hover,
    durations, the live deployment apart from the newest, a badge a state,
    a failure naming its step, only the buttons that apply, short digests,
    labels on a narrow screen, projects by last activity."""

    def project_page(self):
        return parse_page(ipd.render_project("/deploy", layout_records(), PAGE_NOW))

    def rows(self, page):
        return [row for row in page.find_all("tr") if "head" not in row.classes()]

    def test_times_are_relative_with_the_full_time_on_hover(self):
        rows = self.rows(self.project_page())
        when = {row.find_all("td")[1].text(): row.find_all("time")[0] for row in rows}
        self.assertEqual(when["ok"].text(), "ended 1 h ago")
        self.assertEqual(when["deploy failed: 5"].text(), "ended 10 min ago")
        self.assertEqual(when["await"].text(), "uploaded 5 s ago")
        self.assertEqual(when["active"].text(), "started 12 s ago")
        self.assertEqual(when["deploy failed: 5"].attrs["title"],
                         "uploaded 2027-01-15 07:48:20 UTC; started 2027-01-15 "
                         "07:49:00 UTC; ended 2027-01-15 07:50:00 UTC")
        self.assertEqual(when["await"].attrs["datetime"], ipd.iso_time(PAGE_NOW - 5))
        took = {row.find_all("td")[1].text(): row.find_all("td")[3].text()
                for row in rows}
        self.assertEqual(took["deploy failed: 5"], "1 min 0 s")
        self.assertEqual(took["timeout"], "6 min 30 s")
        self.assertEqual(took["active"], "12 s so far")
        self.assertEqual(took["await"], "-")
        self.assertEqual([ipd.human_duration(s) for s in (0.44, 12.5, 185, 7500)],
                         ["0.4 s", "12 s", "3 min 5 s", "2 h 5 min"])
        self.assertEqual([ipd.time_ago(s) for s in (-3, 59, 60, 3599, 7200, 86400 * 3)],
                         ["0 s ago", "59 s ago", "1 min ago", "59 min ago", "2 h ago",
                          "3 d ago"])
        deployment = parse_page(ipd.render_deployment(
            "/deploy", layout_records()[2], 0, b"log", PAGE_NOW))
        times = deployment.find_all("time")
        self.assertEqual([t.text() for t in times],
                         ["11 min ago", "11 min ago", "10 min ago"])
        self.assertEqual(times[2].attrs["title"], "2027-01-15 07:50:00 UTC")

    def test_the_live_deployment_is_marked_apart_from_the_newest(self):
        rows = self.rows(self.project_page())
        marked = {mark.text(): row.find_all("code")[0].text() for row in rows
                  for mark in row.find_all("span", "mark")}
        self.assertEqual(marked, {"live": "00000001", "newest": "00000008"})
        self.assertEqual([row.find_all("code")[0].text() for row in rows
                          if "live" in row.classes()], ["00000001"])
        self.assertEqual(rows[0].find_all("code")[0].text(), "00000008")  # newest first
        live = parse_page(ipd.render_deployment("/deploy", layout_records()[1], 0,
                                                b"", PAGE_NOW, live=True))
        self.assertEqual([m.text() for m in live.find_all("span", "mark")], ["live"])
        other = parse_page(ipd.render_deployment("/deploy", layout_records()[0], 0,
                                                 b"", PAGE_NOW))
        self.assertEqual(other.find_all("span", "mark"), [])

    def test_one_badge_a_state_and_a_failure_names_its_step(self):
        badges = [row.find_all("span", "badge")[0] for row in self.rows(self.project_page())]
        seen = {badge.text(): badge.classes()[1] for badge in badges}
        self.assertEqual(seen, {"await": "await", "active": "active", "ok": "ok",
                                "deploy failed: 5": "failed", "timeout": "timeout",
                                "cancelled": "cancelled", "interrupted": "interrupted",
                                "changed": "changed"})
        for kind in seen.values():  # each its own colour
            self.assertIn(".%s{background:" % kind, ipd.PAGE_STYLE)
        colours = re.findall(r"\.(await|active|ok|failed|timeout|cancelled|"
                             r"interrupted|changed)\{background:(#[0-9a-f]+)\}",
                             ipd.PAGE_STYLE)
        self.assertEqual(len(set(colour for _, colour in colours)), 8)
        failed = layout_records()[2]
        self.assertEqual(ipd.state_words(failed.replace(steps=[])), "failed: 5")
        page = parse_page(ipd.render_deployment("/deploy", failed, 0, b"", PAGE_NOW))
        self.assertEqual(page.find_all("span", "badge")[0].text(), "deploy failed: 5")

    def test_only_the_buttons_that_apply(self):
        for row in self.rows(self.project_page()):
            state = row.find_all("span", "badge")[0].classes()[1]
            buttons = [button.text() for button in row.find_all("button")]
            with self.subTest(state=state):
                self.assertEqual(buttons, ["cancel"] if state in ("await", "active")
                                 else ["redeploy"])
        pruned = layout_records()[0].replace(pruned=True)
        self.assertEqual(ipd.buttons("/deploy", pruned), "")

    def test_digests_are_short_with_the_whole_value_on_hover(self):
        record = layout_records()[0]
        digest = record.files["image"]["sha256"]
        codes = [code for code in self.rows(self.project_page())[-1].find_all("code")
                 if code.attrs.get("title")]
        self.assertEqual([(code.text(), code.attrs["title"]) for code in codes],
                         [(digest[:12] + "\u2026", digest)])
        self.assertIn("123,456,789 bytes", self.rows(self.project_page())[-1].text())
        signed = record.replace(signer={"principal": "ci@web", "fingerprint":
                                        "SHA256:" + "A" * 43})
        code = parse_page(ipd.signed_by(signed)).find_all("code")[0]
        self.assertEqual((code.text(), code.attrs["title"]),
                         ("SHA256:" + "A" * 12 + "\u2026", "SHA256:" + "A" * 43))

    def test_every_value_keeps_its_label_on_a_narrow_screen(self):
        page = self.project_page()
        labels = [th.text() for th in page.find_all("th")]
        for row in self.rows(page):
            self.assertEqual([td.attrs.get("data-label") for td in row.find_all("td")],
                             labels)
        self.assertIn("head", page.find_all("tr")[0].classes())
        narrow = ipd.PAGE_STYLE[ipd.PAGE_STYLE.index("@media(max-width:40em)"):]
        self.assertIn("tr.head{display:none}", narrow)
        self.assertIn("td[data-label]::before{content:attr(data-label)", narrow)

    def test_projects_by_last_activity_with_their_live_deployment(self):
        records = {name: layout_records(name) for name in ("quiet", "busy", "middle")}
        latest = {"quiet": records["quiet"][0], "busy": records["busy"][-1],
                  "middle": records["middle"][2]}
        page = parse_page(ipd.render_projects(
            "/deploy", [(name, latest[name], 3) for name in ("busy", "middle", "quiet")
                        ][::-1], {"busy": records["busy"][1], "middle": None}, PAGE_NOW))
        rows = self.rows(page)
        self.assertEqual([row.find_all("a")[0].text() for row in rows],
                         ["busy", "middle", "quiet"])
        cells = {td.attrs["data-label"]: td for td in rows[0].find_all("td")}
        self.assertEqual(cells["newest"].text(), "await")
        self.assertEqual(cells["live"].text(), "00000001 1 h ago")
        self.assertEqual(cells["when"].text(), "uploaded 5 s ago")
        self.assertEqual(self.rows(page)[1].find_all("td")[5].text(), "-")

    def test_the_policy_is_unchanged_and_no_script_is_added(self):
        self.assertEqual(ipd.page_headers("N")["Content-Security-Policy"],
                         "default-src 'none'; style-src 'nonce-N'; script-src "
                         "'nonce-N'; connect-src 'self'; form-action 'self'; "
                         "frame-ancestors 'none'; base-uri 'none'")
        page = "".join(ipd.render_page("/deploy", "web", ipd.render_project(
            "/deploy", layout_records(), PAGE_NOW), "N"))
        self.assertNotIn("<script", page)
        self.assertNotIn(" style=", page)  # the policy admits no style attribute


class StatusPageLiveTests(DaemonTestCase):
    """Issue #27: the live deployment (a project's last ok) is found and
    marked on the pages, also when later failures pruned its files."""
    settings = {"KEEP_DEPLOYMENTS": "1"}

    def test_the_last_ok_stays_live_behind_failures(self):
        ok = self.daemon.deploy()
        self.assertEqual(self.daemon.wait_state("app", ok), "ok")
        for _ in range(3):
            self.daemon.wait_state("app", self.daemon.deploy(
                '[ "$1" = deploy ] && exit 5; exit 1'))
        html_headers = {"Accept": "text/html"}
        projects = parse_page(self.daemon.get("/ui/", headers=html_headers)[2])
        live = [td for td in projects.find_all("td") if td.attrs.get("data-label") == "live"]
        self.assertEqual(live[0].find_all("code")[0].text(), ok[:8])
        page = parse_page(self.daemon.get("/ui/app/" + ok, headers=html_headers)[2])
        self.assertEqual([m.text() for m in page.find_all("span", "mark")], ["live"])
        self.assertIn("(pruned)", self.daemon.get("/ui/app", headers=html_headers)[2])


class BrowserTests(DaemonTestCase):
    """The status pages in a real headless Chromium.  Skipped where there is
    none; IPD_TEST_BROWSER=required (as in CI) makes that a failure."""
    system = True  # the same on every Python: once per CI run

    @classmethod
    def setUpClass(cls):
        if shutil.which("chromium") and shutil.which("chromedriver"):
            return
        if os.environ.get("IPD_TEST_BROWSER") == "required":
            raise AssertionError("IPD_TEST_BROWSER=required but no chromium")
        raise unittest.SkipTest("needs Debian's chromium and chromium-driver")

    def setUp(self):
        super().setUp()
        self.browser = WebDriver(self.tmp)
        self.addCleanup(self.browser.quit)
        self.browser.cdp("Network.enable", {})
        self.browser.cdp("Network.setExtraHTTPHeaders", {"headers": {
            "Authorization": "Basic " + base64.b64encode(b"admin:admin-pw").decode()}})
        self.base = "http://127.0.0.1:%d/deploy" % self.daemon.port

    def test_live_log_cancel_and_screenshots(self):
        self.daemon.wait_state("web", self.daemon.deploy(project="web"))
        self.browser.open(self.base + "/")
        self.assertIn("web", self.browser.wait_text("table", "ok"))
        first = self.browser.screenshot(os.path.join(self.tmp, "projects.png"))
        self.assertGreater(png_colours(first), 10)
        gates = [os.path.join(self.tmp, "gate%d" % n) for n in (1, 2)]
        deployment = self.daemon.deploy(
            '[ "$1" = deploy ] || exit 1\necho "line one"\n'
            'while [ ! -e %s ]; do sleep 0.05; done\necho "line two <b>not bold</b>"\n'
            'while [ ! -e %s ]; do sleep 0.05; done\nexit 1\n' % tuple(gates))
        deadline = time.monotonic() + 30
        while "line one" not in self.daemon.log("app", deployment):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        self.browser.open("%s/ui/app/%s" % (self.base, deployment))
        self.assertIn("line one", self.browser.wait_text("#log", "line one"))
        open(gates[0], "w").close()  # its next line appears without a reload
        log = self.browser.wait_text("#log", "line two")
        self.assertIn("line two <b>not bold</b>", log)
        shot = self.browser.screenshot(os.path.join(self.tmp, "deployment.png"))
        self.assertGreater(png_colours(shot), 10)
        self.browser.click("form button")  # cancel, the running one's first button
        self.browser.wait_text("p", "cancelled")
        self.assertEqual(self.daemon.state("app", deployment), "cancelled")
        self.browser.screenshot(os.path.join(self.tmp, "cancelled.png"))
        report("Chromium: projects page, live log (a line appeared without a reload), "
               "cancel by click; screenshots not blank")


class StatusPageBrowserTests(DaemonTestCase):
    """Issue #27: the status pages in headless Chromium at 1280 and 400 px
    wide, screenshots kept in build/artefacts/, the elements checked in the
    browser's own layout."""
    system = True
    setUpClass = BrowserTests.__dict__["setUpClass"]

    def setUp(self):
        super().setUp()
        self.browser = browser_logged_in(self)
        self.base = "http://127.0.0.1:%d/deploy" % self.daemon.port
        os.makedirs(ARTEFACTS, exist_ok=True)

    def script(self, body, *args):
        return self.browser.session_call("POST", "/execute/sync",
                                         {"script": body, "args": list(args)})

    def width(self, pixels):
        self.browser.cdp("Emulation.setDeviceMetricsOverride", {
            "width": pixels, "height": 900, "deviceScaleFactor": 1,
            "mobile": pixels < 600})

    def shoot(self, name):
        data = self.browser.screenshot(os.path.join(ARTEFACTS, name))
        self.assertGreater(png_colours(data), 10)

    def deployments(self):
        """A live ok, a failed deploy, a running one and a waiting one."""
        ok = self.daemon.deploy()
        self.daemon.wait_state("app", ok)
        failed = self.daemon.deploy('[ "$1" = deploy ] && exit 5; exit 1')
        self.daemon.wait_state("app", failed)
        gate = os.path.join(self.tmp, "gate")
        running = self.daemon.deploy(gate_script(gate))
        self.daemon.wait_state("app", running, ("active",))
        waiting = self.daemon.deploy()
        self.addCleanup(lambda: open(gate, "w").close())
        self.daemon.wait_state("web", self.daemon.deploy(project="web"))
        return ok, failed, running, waiting

    def rows(self):
        """{deployment id: {label: (text, title of its time or code)}}."""
        return self.script(
            "var rows={};document.querySelectorAll('tr:not(.head)').forEach("
            "function(tr){var cells={};tr.querySelectorAll('td').forEach("
            "function(td){var t=td.querySelector('time,code[title]');cells["
            "td.getAttribute('data-label')]=[td.innerText.trim(),t?t.title:'',"
            "getComputedStyle(td,'::before').content];});rows[tr.querySelector("
            "'a').getAttribute('href').split('/').pop()]=cells;});return rows;")

    def test_the_project_page_at_1280_and_400_px(self):
        ok, failed, running, waiting = self.deployments()
        self.browser.open(self.base + "/ui/app")
        for pixels in (1280, 400):
            with self.subTest(width=pixels):
                self.width(pixels)
                self.browser.open(self.base + "/ui/app")
                self.shoot("project-%d.png" % pixels)
                rows = self.rows()
                self.assertEqual(rows[failed]["state"][0], "deploy failed: 5")
                self.assertRegex(rows[ok]["deployment"][0], r"\A%s\s*live\Z" % ok[:8])
                self.assertRegex(rows[waiting]["deployment"][0], r"newest\Z")
                self.assertRegex(rows[ok]["when"][0], r"\Aended \d+ s ago\Z")
                self.assertRegex(rows[ok]["when"][1], r"ended 20\d\d-\d\d-\d\d "
                                 r"\d\d:\d\d:\d\d UTC\Z")
                self.assertRegex(rows[running]["took"][0], r"so far\Z")
                shown, digest = rows[running]["files (SHA-256)"][:2]
                self.assertRegex(digest, r"\A[0-9a-f]{64}\Z")
                self.assertIn(digest[:12] + "\u2026", shown)
                self.assertNotIn(digest, shown)
                self.assertEqual(rows[running][""][0], "cancel")
                self.assertEqual(rows[waiting][""][0], "cancel")
                self.assertEqual(rows[failed][""][0], "redeploy")
                colours = self.script(
                    "return Array.from(document.querySelectorAll('tr:not(.head) .badge'))"
                    ".map(function(b){return getComputedStyle(b).backgroundColor})")
                self.assertEqual(len(set(colours)), 4, colours)  # 4 states, 4 colours
                labels_shown = [cell[2] for cell in rows[ok].values()]
                head = self.script("return getComputedStyle(document.querySelector("
                                   "'tr.head')).display")
                wide = self.script("return document.documentElement.scrollWidth")
                if pixels == 400:  # a label before each value, no table head
                    self.assertEqual(head, "none")
                    self.assertIn('"when"', labels_shown)
                    self.assertLessEqual(wide, 400)
                else:
                    self.assertNotEqual(head, "none")
                    self.assertEqual(set(labels_shown), {"none"})
                    lines = self.script("return document.querySelector('tr:not(.head)"
                                        " time').getClientRects().length")
                    self.assertEqual(lines, 1)  # a time never wraps
        self.browser.open(self.base + "/ui/")
        names = self.script("return Array.from(document.querySelectorAll("
                            "'tr:not(.head) td:first-child a')).map(function(a)"
                            "{return a.textContent})")
        self.assertEqual(names, ["web", "app"])  # by last activity
        self.shoot("projects-400.png")
        self.width(1280)
        self.browser.open(self.base + "/ui/")
        self.shoot("projects-1280.png")
        self.browser.open("%s/ui/app/%s" % (self.base, failed))
        self.assertEqual(self.browser.text("p .badge"), "deploy failed: 5")
        self.shoot("deployment-1280.png")
        report("Chromium at 1280 and 400 px: relative times, live and newest marked, "
               "a failure naming its step, labels on a phone; screenshots in "
               "build/artefacts/")


###############################################################################
# HTTP: routes, the connection's edge, the server #############################
###############################################################################

class EndpointTests(DaemonTestCase):

    def test_welcome_needs_no_login(self):
        status, _, body = self.daemon.get("/", user=None)
        self.assertEqual(status, 200)
        self.assertIn(ipd.__version__, body)
        self.assertEqual(self.daemon.get("", user=None)[0], 200)
        status, data = self.daemon.get_json("/", user=None)
        self.assertEqual(data["version"], ipd.__version__)

    def test_upload_then_await_active_ok(self):
        gate = os.path.join(self.tmp, "gate")
        blocker = self.daemon.deploy("while [ ! -e %s ]; do sleep 0.02; done; exit 1"
                                     % gate, project="app")
        self.assertEqual(self.daemon.wait_state("app", blocker, ["active"]), "active")
        package = control_script(OK_SCRIPT)
        deployment = self.daemon.upload("app", package)[2].strip()
        self.assertTrue(ipd.DEPLOYMENT_ID.match(deployment), deployment)
        self.assertEqual(self.daemon.state("app", deployment), "await")
        self.assertEqual(self.daemon.state("app"), "await")  # latest
        open(gate, "w").close()
        self.assertEqual(self.daemon.wait_state("app", deployment), "ok")
        self.assertEqual(self.daemon.state("app", blocker), "ok")
        self.assertEqual(self.daemon.log("app", deployment),
                         "step check\nstep deploy\n")
        status, data = self.daemon.get_json("/status/app/" + deployment)
        self.assertEqual((status, data["state"], data["deployment"], data["user"]),
                         (200, "ok", deployment, "admin"))
        self.assertEqual([step["step"] for step in data["steps"]], ["check", "deploy"])
        self.assertEqual(data["files"]["package"],
                         {"name": "package.tar.gz", "size": len(package),
                          "sha256": hashlib.sha256(package).hexdigest()})

    def test_plain_text_upload_answer_is_the_bare_id(self):
        status, headers, body = self.daemon.upload("app", control_script(OK_SCRIPT))
        self.assertEqual(status, 202)
        self.assertRegex(body, r"\A[0-9a-f-]{36}\n\Z")
        self.assertEqual(headers["Location"],
                         "/deploy/status/app/" + body.strip())

    def test_upload_json_answer(self):
        content_type, body = multipart([("project", "app"),
                                        ("package", ("p.tgz",
                                                     control_script(OK_SCRIPT)))])
        status, _, text = self.daemon.request(
            "POST", "/upload", body=body, headers={"Content-Type": content_type,
                                                   "Accept": "application/json"})
        data = json.loads(text)
        self.assertEqual(status, 202)
        self.assertEqual(data["project"], "app")
        self.assertEqual(self.daemon.wait_state("app", data["deployment"]), "ok")

    def test_unknown_deployment_or_project_is_no(self):
        self.daemon.wait_state("app", self.daemon.deploy())
        for path in ("/status/other", "/status/app/" + str(uuid.uuid4()),
                     "/status/other/" + str(uuid.uuid4()), "/status/app/nonsense",
                     "/status/..", "/status/%2e%2e/x", "/log/app/" + str(uuid.uuid4())):
            with self.subTest(path):
                status, _, body = self.daemon.get(path)
                self.assertEqual((status, body), (404, "no\n"))
        status, data = self.daemon.get_json("/status/other")
        self.assertEqual((status, data["state"]), (404, "no"))

    def test_list_info_stat(self):
        first = self.daemon.deploy(project="web")
        self.daemon.wait_state("web", first)
        second = self.daemon.deploy("exit 3", project="api")
        self.assertEqual(self.daemon.wait_state("api", second), "3")
        os.makedirs(os.path.join(self.daemon.upload_dir, "db"))
        with open(os.path.join(self.daemon.upload_dir, "db", "control.sh"), "w") as f:
            f.write("#!/bin/sh\nexit 1\n")
        self.assertEqual(self.daemon.get("/list")[2], "api\ndb\nweb\n")
        self.assertEqual(self.daemon.get_json("/list")[1]["projects"],
                         ["api", "db", "web"])
        status, _, body = self.daemon.get("/info")
        self.assertEqual(status, 200)
        self.assertRegex(body, r"api %s 3 started=\S+Z ended=\S+Z deployments=1" % second)
        rows = {row["project"]: row for row in self.daemon.get_json("/info")[1]["projects"]}
        self.assertEqual(rows["web"]["deployment"], first)
        self.assertEqual(rows["web"]["state"], "ok")
        self.assertEqual(rows["web"]["deployments"], 1)
        self.assertTrue(rows["web"]["started"] and rows["web"]["ended"])
        status, _, body = self.daemon.get("/stat")
        self.assertIn("uploads 2\n", body)
        self.assertIn("state.ok 1\n", body)
        self.assertIn("state.3 1\n", body)
        stats = self.daemon.get_json("/stat")[1]
        self.assertEqual(stats["uploads"], 2)
        self.assertGreater(stats["bytes_received"], 200)
        self.assertEqual(stats["queue"], 0)
        self.assertEqual(stats["running"], 0)
        self.assertEqual(stats["durations"]["count"], 2)
        self.assertGreaterEqual(stats["uptime"], 0)

    def test_log_is_readable_while_it_runs(self):
        gate = os.path.join(self.tmp, "gate")
        deployment = self.daemon.deploy(
            'echo "first line"; echo "to stderr" >&2\n'
            'while [ ! -e %s ]; do sleep 0.02; done; echo last; exit 1' % gate)
        deadline = time.monotonic() + 20
        while "to stderr" not in self.daemon.log("app", deployment):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        self.assertEqual(self.daemon.log("app", deployment),
                         "first line\nto stderr\n")
        self.assertEqual(self.daemon.state("app", deployment), "active")
        open(gate, "w").close()
        self.assertEqual(self.daemon.wait_state("app", deployment), "ok")
        self.assertTrue(self.daemon.log("app", deployment).endswith("last\n"))

    def test_head_and_keep_alive(self):
        connection = self.daemon.connection()
        token = base64.b64encode(b"admin:admin-pw").decode()
        for _ in range(3):
            connection.request("GET", "/deploy/stat",
                               headers={"Authorization": "Basic " + token})
            response = connection.getresponse()
            self.assertEqual(response.status, 200)
            response.read()
        connection.request("HEAD", "/deploy/list",
                           headers={"Authorization": "Basic " + token})
        response = connection.getresponse()
        self.assertEqual((response.status, response.read()), (200, b""))
        connection.close()

    def test_request_log_lines(self):
        self.daemon.get("/stat", headers={"X-Real-IP": "203.0.113.9"})
        self.daemon.get("/stat", user="admin:wrong-password")
        text = self.daemon.daemon_log(r'"GET /deploy/stat" 401')
        self.assertRegex(text, r'203\.0\.113\.9 "GET /deploy/stat" 200 user=admin '
                               r'in=0 out=\d+ \d+\.\d+s')
        self.assertRegex(text, r'"GET /deploy/stat" 401 user=-')
        self.assertNotIn("wrong-password", text)
        self.assertNotIn("admin-pw", text)

    def test_log_file_reopened_after_rotation(self):
        log_path = os.path.join(self.tmp, "ipd.log")
        os.rename(log_path, log_path + ".1")
        self.daemon.get("/stat")
        self.assertIn('"GET /deploy/stat" 200', self.daemon.daemon_log('"GET /deploy/stat" 200'))
        self.assertTrue(os.path.exists(log_path + ".1"))


class InProcessServerTests(InProcessServerTestCase):
    """Requests on one connection, answered by the Server of this process."""

    def test_three_requests_on_one_connection(self):
        hidden = raw_request("GET", "/deploy/stat", headers={"X-Real-IP": "6.6.6.6"})
        refused = raw_request("POST", "/deploy/upload?project=../x", hidden, {
            "Content-Type": "multipart/form-data; boundary=b"})
        answer = raw_exchange(self.port, upload_request(force=True) + refused
                              + raw_request("GET", "/deploy/stat"))
        statuses = [int(code) for code in re.findall(rb"(?m)^HTTP/1\.1 (\d{3}) ", answer)]
        self.assertEqual(statuses, [202, 400])
        deployment = re.search(rb"\r\n\r\n([0-9a-f-]{36})\n", answer).group(1).decode()
        record = self.daemon.store.wait_final(deployment, 20)
        self.assertEqual(record.state, "ok")
        self.assertEqual(self.daemon.statistics()["uploads"], 1)  # not the refused one

    def test_a_pushed_deployments_segments_are_referred_before_it_shows(self):
        # a collection between the commit and the reference would take the
        # segments only this deployment names: referred to first, and
        # forgotten again when the commit fails
        daemon, upload_dir = self.daemon, self.daemon.settings.UPLOAD_DIR
        os.makedirs(os.path.join(upload_dir, "app"))
        with open(os.path.join(upload_dir, "app", "control.sh"), "w") as file:
            file.write("#!/bin/sh\nexit 1\n")
        os.chmod(os.path.join(upload_dir, "app", "control.sh"), 0o755)
        data = b"the bytes of one segment"
        digest = hashlib.sha256(data).hexdigest()

        def pushed():
            upload = ipd.Upload()
            upload.fields["force"] = "1"  # not "the same files again"
            sink = upload.files["image"] = ipd.FileSink(upload_dir, "image", "i.tar")
            sink.write(data)
            sink.close()
            upload.recipe = ipd.RecipeFile(ipd.encode_recipe({"image": {
                "name": "i.tar", "size": len(data), "sha256": digest,
                "segments": [{"sha256": digest, "size": len(data)}]}}), upload_dir)
            return upload
        seen, commit = [], daemon.store.commit

        def watching_commit(record, *args, **kwargs):
            seen.append(daemon.segments.refs.get(record.id))
            if len(seen) == 2:
                raise OSError(errno.ENOSPC, "no space left on device")
            return commit(record, *args, **kwargs)
        daemon.store.commit = watching_commit
        admin = ipd.User("admin", "ADMIN", "")
        record, created = daemon.create_deployment("app", pushed(), admin, "::1", 1)
        self.assertEqual(seen, [("app", frozenset({digest}))])
        with self.assertRaises(ipd.DiskFull):
            daemon.create_deployment("app", pushed(), admin, "::1", 1)
        self.assertEqual(list(daemon.segments.refs), [record.id])  # the failed one's gone
        self.assertEqual(daemon.store.wait_final(record.id, 20).state, "ok")

    def test_an_upload_is_counted_before_it_shows(self):
        # the upload's counters change in the step that shows it: a reader
        # that sees the deployment finds /stat counting it
        heard, done = [], threading.Event()

        def reader():  # until it has seen the deployment, and the answer came
            while not (done.is_set() and heard):
                if self.daemon.store.projects():
                    stats = self.daemon.statistics()
                    heard.append((stats["uploads"], stats["bytes_received"] > 0))
        thread = threading.Thread(target=reader)
        thread.start()
        answer = raw_exchange(self.port, upload_request())
        done.set()
        thread.join(30)
        self.assertEqual(answer_status(answer), 202)
        deployment = re.search(rb"\r\n\r\n([0-9a-f-]{36})\n", answer).group(1).decode()
        self.assertEqual(set(heard), {(1, True)})
        self.assertEqual(self.daemon.store.wait_final(deployment, 20).state, "ok")


class HttpFramingTests(DaemonTestCase):
    """One request at a time on a connection, framed as RFC 9112 says."""

    def smuggling_requests(self):
        hidden = raw_request("GET", "/deploy/stat", headers={"X-Real-IP": "6.6.6.6"})
        refused = raw_request("POST", "/deploy/upload?project=../x", hidden * 3, {
            "Content-Type": "multipart/form-data; boundary=b"})
        status = raw_request("GET", "/deploy/status/app")
        return upload_request(force=True), refused, status

    def test_a_refused_body_is_never_taken_for_a_request(self):
        good, refused, status = self.smuggling_requests()
        for pipelined in (False, True):
            with self.subTest(pipelined=pipelined):
                sock = socket.create_connection(("127.0.0.1", self.daemon.port),
                                                timeout=20)
                self.addCleanup(sock.close)
                file = sock.makefile("rb")
                self.addCleanup(file.close)
                answers = []
                if pipelined:
                    sock.sendall(good + refused + status)
                else:
                    for data in (good, refused):
                        sock.sendall(data)
                        answers.append(read_answer(file))
                    try:
                        sock.sendall(status)
                    except OSError:
                        pass  # closed already: as it should be
                while True:
                    try:
                        answer = read_answer(file)
                    except ConnectionResetError:
                        answer = None
                    if answer is None:
                        break
                    answers.append(answer)
                self.assertEqual([a[0] for a in answers if a], [202, 400])
                self.assertEqual(answers[1][1].get("connection"), "close")
        self.assertEqual(self.daemon.get("/status/app")[0], 200)
        log = self.daemon.daemon_log(r'"GET /deploy/status/app" 200')
        self.assertNotIn("6.6.6.6", log)
        self.assertEqual(len(re.findall(r'"GET /deploy/stat"', log)), 0, log)

    def test_keep_alive_still_serves_requests_read_whole(self):
        gate = os.path.join(self.tmp, "gate")
        self.addCleanup(lambda: open(gate, "w").close())
        package = control_script(gate_script(gate))
        sock = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=20)
        self.addCleanup(sock.close)
        file = sock.makefile("rb")
        self.addCleanup(file.close)
        sock.sendall(upload_request(package=package) + raw_request("GET", "/deploy/stat")
                     + upload_request(package=package,
                                      headers={"Expect": "100-continue"})
                     + raw_request("GET", "/deploy/status/app"))
        statuses = [read_answer(file)[0] for _ in range(4)]
        self.assertEqual(statuses, [202, 200, 200, 200])  # the same files: 200

    def test_ambiguous_framing_is_refused_and_closed(self):
        content_type, body = multipart([("project", "app"), ("package", (
            "p.tgz", control_script(OK_SCRIPT)))])
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        cases = {
            "length and chunked": raw_request("POST", "/deploy/upload", chunked, {
                "Content-Type": content_type, "Transfer-Encoding": "chunked",
                "Content-Length": str(len(chunked))}),
            "chunked on HTTP/1.0": raw_request("POST", "/deploy/upload", chunked, {
                "Content-Type": content_type, "Transfer-Encoding": "chunked"},
                version="HTTP/1.0"),
            "gzip coding": raw_request("POST", "/deploy/upload", chunked, {
                "Content-Type": content_type, "Transfer-Encoding": "gzip, chunked"}),
            "two lengths": raw_request("POST", "/deploy/upload", body, {
                "Content-Type": content_type, "Content-Length": "%d, %d" % (
                    len(body), len(body) + 1)}),
        }
        for name, data in cases.items():
            with self.subTest(name):
                answer = raw_exchange(self.daemon.port, data + raw_request(
                    "GET", "/deploy/stat"))
                self.assertEqual(answer_status(answer), 400, answer[:300])
                self.assertIn(b"Connection: close", answer.split(b"\r\n\r\n")[0])
                self.assertEqual(len(re.findall(rb"(?m)^HTTP/1\.[01] \d{3} ", answer)),
                                 1, answer)
        self.assertEqual(self.daemon.get("/status/app")[0], 404)  # nothing queued

    def test_an_http_1_0_keep_alive_client_is_told_and_answered(self):
        # ApacheBench's -k: HTTP/1.0 with Connection: Keep-Alive reuses the
        # connection only when the answer says keep-alive; each answer
        # comes whole, with its length, and the next request is served
        sock = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=20)
        self.addCleanup(sock.close)
        file = sock.makefile("rb")
        self.addCleanup(file.close)
        for _ in range(5):
            sock.sendall(b"GET /deploy/ HTTP/1.0\r\nHost: x\r\n"
                         b"Connection: Keep-Alive\r\n\r\n")
            status, headers, body = read_answer(file)
            self.assertEqual((status, headers.get("connection")), (200, "keep-alive"))
            self.assertEqual(int(headers["content-length"]), len(body))
        sock.sendall(b"GET /deploy/ HTTP/1.0\r\nHost: x\r\n\r\n")  # no keep-alive
        status, headers, body = read_answer(file)
        self.assertEqual((status, headers.get("connection")), (200, "close"))
        self.assertIsNone(read_answer(file))  # and closed


class CrossOriginTests(DaemonTestCase):
    """Every state-changing request of a browser must come from this origin."""

    def test_cross_origin_writes_are_refused_before_anything(self):
        gate = os.path.join(self.tmp, "gate")
        running = self.daemon.deploy(gate_script(gate))
        self.daemon.wait_state("app", running, ["active"])
        port = self.daemon.port
        host = "127.0.0.1:%d" % port
        foreign = [{"Origin": "https://evil.example"}, {"Origin": "null"},
                   {"Origin": "http://127.0.0.1:%d" % (port + 1)},  # another port
                   {"Origin": "https://127.0.0.1:%d" % port},  # another scheme
                   {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                   {"Sec-Fetch-Site": "same-site", "Origin": "http://" + host}]
        for headers in foreign:
            headers = dict(headers, Host=host)
            with self.subTest(headers=headers):
                for path in ("/upload", "/cancel/app/" + running,
                             "/redeploy/app/" + running,
                             "/ui/app/%s/cancel" % running):
                    if path == "/upload":
                        content_type, body = multipart([("project", "app"), (
                            "package", ("p.tgz", control_script(OK_SCRIPT)))])
                        headers["Content-Type"] = content_type
                    else:
                        body = None
                    status, _, text = self.daemon.request("POST", path, body=body,
                                                          headers=headers)
                    self.assertEqual(status, 403, (path, text))
                    self.assertIn("cross-origin", text)
        self.assertEqual(self.daemon.state("app", running), "active")
        deployments = os.listdir(os.path.join(self.daemon.upload_dir, "app",
                                              "deployments"))
        self.assertEqual(sorted(name for name in deployments if name.endswith(".json")),
                         [running + ".json"])
        # This server's own origin, and no browser at all, pass.
        for headers in ({"Origin": "http://" + host, "Sec-Fetch-Site": "same-origin"},
                        {"Origin": "HTTP://127.0.0.1:%d" % port}, {}):
            status, _, text = self.daemon.upload("app", control_script(OK_SCRIPT),
                                                 extra=[("force", "1")]) \
                if not headers else self.post_upload(dict(headers, Host=host))
            self.assertEqual(status, 202, text)
        open(gate, "w").close()

    def post_upload(self, headers):
        content_type, body = multipart([("project", "app"), ("force", "1"), (
            "package", ("p.tgz", control_script(OK_SCRIPT)))])
        return self.daemon.request("POST", "/upload", body=body, headers=dict(
            headers, **{"Content-Type": content_type}))

    def test_refused_origin_reads_no_body(self):
        big = b"\0" * (20 << 20)
        content_type, body = multipart([("project", "app"), ("image", ("i", big)),
                                        ("package", ("p", control_script(OK_SCRIPT)))])
        connection = self.daemon.connection()
        self.addCleanup(connection.close)
        connection.putrequest("POST", "/deploy/upload")
        for name, value in (("Authorization", ADMIN_AUTH), ("Content-Type", content_type),
                            ("Content-Length", str(len(body))),
                            ("Expect", "100-continue"), ("Origin", "https://evil.example")):
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        self.assertEqual(response.status, 403)
        self.daemon.daemon_log(r'"POST /deploy/upload" 403')
        self.assertRegex(self.daemon.daemon_log(), r'"POST /deploy/upload" 403 '
                         r'user=- in=0 ')


class PublicOriginTests(DaemonTestCase):
    settings = {"PUBLIC_ORIGIN": "https://deploy.example.com"}

    def test_public_origin_is_the_only_one(self):
        content_type, body = multipart([("project", "app"), ("force", "1"), (
            "package", ("p.tgz", control_script(OK_SCRIPT)))])
        for origin, expected in (("https://deploy.example.com", 202),
                                 ("https://deploy.example.com:443", 202),
                                 ("http://127.0.0.1:%d" % self.daemon.port, 403),
                                 ("http://deploy.example.com", 403)):
            with self.subTest(origin):
                status, _, text = self.daemon.request("POST", "/upload", body=body, headers={
                    "Content-Type": content_type, "Origin": origin,
                    "Host": "127.0.0.1:%d" % self.daemon.port})
                self.assertEqual(status, expected, text)


class CrossOriginBrowserTests(DaemonTestCase):
    """A page of another origin, in a real Chromium logged in to ipd, tries
    to deploy, cancel and redeploy: each is answered 403, nothing changes."""
    system = True  # the same on every Python: once per CI run

    @classmethod
    def setUpClass(cls):
        BrowserTests.setUpClass()

    def test_a_foreign_page_cannot_deploy_cancel_or_redeploy(self):
        gate = os.path.join(self.tmp, "gate")
        self.addCleanup(lambda: open(gate, "w").close())
        running = self.daemon.deploy(gate_script(gate))
        self.daemon.wait_state("app", running, ["active"])
        ipd_root = "http://127.0.0.1:%d/deploy" % self.daemon.port
        page = (ATTACK_PAGE % {"ipd": ipd_root, "running": running, "package":
                               base64.b64encode(control_script(OK_SCRIPT)).decode()})

        class AttackPage(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                data = page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass
        attacker = serve_in_thread(self, AttackPage)
        browser = WebDriver(self.tmp)
        self.addCleanup(browser.quit)
        # Log in as a person would: the browser keeps the credentials.
        browser.open("http://admin:admin-pw@127.0.0.1:%d/deploy/ui/" % self.daemon.port)
        self.assertIn("app", browser.wait_text("table", "active"))
        browser.open("http://127.0.0.1:%d/" % attacker.server_address[1])
        log = self.daemon.daemon_log(r'"POST /deploy/upload" 403', timeout=30)
        for path in ("/deploy/upload", "/deploy/cancel/app/" + running,
                     "/deploy/redeploy/app/" + running):
            with self.subTest(path):
                self.assertRegex(log, r'"POST %s" 403 user=- in=0 ' % re.escape(path))
        self.assertIn("cross-origin", browser.text("body"))
        self.assertEqual(self.daemon.state("app", running), "active")
        records = [name for name in os.listdir(os.path.join(
            self.daemon.upload_dir, "app", "deployments")) if name.endswith(".json")]
        self.assertEqual(records, [running + ".json"])
        report("Chromium, logged in, on a page of another origin: its form upload "
               "and fetch() cancel and redeploy each answered 403, nothing changed")


class ConnectionSlotTests(DaemonTestCase):
    settings = {"MAX_CONNECTIONS": "20", "MAX_CONNECTIONS_PER_ADDRESS": "20"}

    def test_abandoned_waits_and_follows_give_their_slots_back(self):
        gate = os.path.join(self.tmp, "gate")
        running = self.daemon.deploy(gate_script(gate))
        self.daemon.wait_state("app", running, ["active"])
        paths = ["/deploy/status/app/%s?wait=3600" % running] * 10 + \
            ["/deploy/log/app/%s?follow=1" % running] * 10
        clients = []
        for path in paths:
            sock = socket.create_connection(("127.0.0.1", self.daemon.port))
            sock.sendall(raw_request("GET", path))
            clients.append(sock)
        wait_until(lambda: self.daemon.get("/stat")[0] == 503, 30,
                   message="every slot held")
        given_up = time.monotonic()
        for sock in clients:
            sock.close()

        def every_slot_back():
            held = [socket.create_connection(("127.0.0.1", self.daemon.port))
                    for _ in range(19)]
            try:
                return self.daemon.get("/stat")[0] == 200
            finally:
                for sock in held:
                    sock.close()
        wait_until(every_slot_back, 30, 0.2, message="all 20 slots given back")
        report("20 abandoned ?wait=3600 and log follows: every slot back after %.1f s"
               % (time.monotonic() - given_up))
        open(gate, "w").close()


class PerAddressLimitTests(DaemonTestCase):
    settings = {"MAX_CONNECTIONS": "40", "MAX_CONNECTIONS_PER_ADDRESS": "10",
                "HEADER_TIMEOUT": "30"}

    def connect_from(self, address):
        sock = socket.socket()
        sock.bind((address, 0))
        sock.connect(("127.0.0.1", self.daemon.port))
        self.addCleanup(sock.close)
        return sock

    def test_one_address_cannot_take_every_connection(self):
        hog = [self.connect_from("127.0.0.2") for _ in range(30)]
        refused, silent = 0, list(hog)  # until each of 20 has its answer
        deadline = time.monotonic() + 30
        while refused < 20 and time.monotonic() < deadline:
            for sock in select.select(silent, [], [], 0.2)[0]:
                refused += sock.recv(100).startswith(b"HTTP/1.1 503")
                silent.remove(sock)
        self.assertEqual(refused, 20)
        self.assertEqual(select.select(silent, [], [], 0.2)[0], [])  # 10 let in
        probe = self.connect_from("127.0.0.3")
        probe.sendall(raw_request("GET", "/deploy/stat"))
        with probe.makefile("rb") as file:
            self.assertEqual(read_answer(file)[0], 200)

    def test_a_proxied_client_counts_as_the_address_its_proxy_names(self):
        held = []
        for _ in range(12):
            sock = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10)
            self.addCleanup(sock.close)
            sock.sendall(raw_request("GET", "/deploy/stat",
                                     headers={"X-Real-IP": "203.0.113.9"}))
            file = sock.makefile("rb")
            self.addCleanup(file.close)
            held.append(read_answer(file)[0])
        self.assertEqual(held, [200] * 10 + [503] * 2)
        self.assertEqual(self.daemon.get("/stat", headers={
            "X-Real-IP": "203.0.113.10"})[0], 200)


class LargeAnswerTests(DaemonTestCase):
    """Answers that grow with stored data are streamed in bounded memory."""

    def peak_rss_kib(self):
        with open("/proc/%d/status" % self.daemon.process.pid) as file:
            return int(re.search(r"VmHWM:\s+(\d+)", file.read()).group(1))

    def test_a_large_log_to_three_clients_at_once(self):
        size = int(os.environ.get("IPD_TEST_LOG_MB", soak(300, 120))) << 20
        deployment = self.daemon.deploy(
            '[ "$1" = deploy ] || exit 1\nyes "a line of the log <b>&amp;</b> é" '
            '| head -c %d\nexit 1\n' % size)
        self.assertEqual(self.daemon.wait_state("app", deployment, timeout=60), "ok")
        before = self.peak_rss_kib()
        results = {}

        def fetch(name, path, accept):
            connection = self.daemon.connection()
            connection.request("GET", "/deploy" + path, headers={
                "Authorization": ADMIN_AUTH, "Accept": accept})
            response = connection.getresponse()
            total, head, tail = 0, b"", b""
            while True:
                data = response.read(1 << 20)
                if not data:
                    break
                total += len(data)
                head = head or data[:200]
                tail = (tail + data)[-300:]
            connection.close()
            results[name] = (response.status, total, head, tail)
        log_path = "/log/app/" + deployment
        threads = [threading.Thread(target=fetch, args=args) for args in (
            ("text", log_path, "text/plain"), ("json", log_path, "application/json"),
            ("page", "/ui/app/" + deployment, "text/html"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        peak = self.peak_rss_kib()
        report("a %d MiB log to three clients at once (text, JSON, page): daemon "
               "peak RSS %d -> %d KiB" % (size >> 20, before, peak))
        self.assertLess(peak, 64 * 1024)
        self.assertEqual(results["text"][0], 200)
        self.assertGreaterEqual(results["text"][1], size)
        self.assertEqual(results["json"][0], 200)
        self.assertTrue(results["json"][2].startswith(b'{"project": "app"'))
        self.assertTrue(results["json"][3].endswith(b'"}\n'))
        self.assertGreater(results["json"][1], size)
        status, total, head, tail = results["page"]
        self.assertEqual(status, 200)
        self.assertLess(total, 4 << 20)  # the log's end, and a link to the rest
        self.assertTrue(tail.endswith(b"</html>\n"))

    def test_the_page_links_the_whole_log_and_follows_from_its_end(self):
        deployment = self.daemon.deploy(
            '[ "$1" = deploy ] || exit 1\nseq 1 200000\nexit 1\n')
        self.daemon.wait_state("app", deployment)
        status, _, page = self.daemon.get("/ui/app/" + deployment,
                                          headers={"Accept": "text/html"})
        self.assertEqual(status, 200)
        self.assertIn('href="/deploy/log/app/%s"' % deployment, page)
        self.assertIn("\n199999\n200000", page)
        self.assertNotIn("\n5\n", page)


class BadInputTests(DaemonTestCase):
    """No input gets a 5xx: every decoding and package layout is a 400."""

    def post(self, body, content_type="multipart/form-data; boundary=b"):
        return self.daemon.request("POST", "/upload", body=body,
                                   headers={"Content-Type": content_type})

    def part_upload(self, disposition, extra_headers=b"", data=b"x"):
        return (b'--b\r\nContent-Disposition: form-data; name="project"\r\n\r\napp\r\n'
                b'--b\r\nContent-Disposition: ' + disposition + b'\r\n' + extra_headers
                + b'\r\n' + data + b'\r\n--b--\r\n')

    def test_odd_headers_and_parameters_are_400(self):
        cases = {
            "idna filename*": self.part_upload(
                b"form-data; name=\"image\"; filename*=idna''%C3%A9.bin"),
            "base64 part": self.part_upload(b'form-data; name="image"; filename="i"',
                                            b"Content-Transfer-Encoding: base64\r\n",
                                            b"aGVsbG8="),
            "header name with a space": self.part_upload(
                b'form-data; name="image"; filename="i"', b"X Bad: 1\r\n"),
            "header name with NUL": self.part_upload(
                b'form-data; name="image"; filename="i"', b"X\0: 1\r\n"),
            "header not UTF-8": self.part_upload(
                b'form-data; name="image"; filename="\xff\xfe.bin"'),
        }
        for name, body in cases.items():
            with self.subTest(name):
                status, _, text = self.post(body)
                self.assertEqual(status, 400, text)
                self.assertEqual(text.count("\n"), 1)
        status, _, text = self.post(b"--b--\r\n", "multipart/form-data; "
                                    "boundary*=punycode''abc")
        self.assertEqual(status, 400, text)
        self.assertEqual(self.daemon.leftovers(), [])

    def test_package_layouts_no_folder_takes_are_400(self):
        packages = {
            "file then folder": tar_with((tar_info("a"), b""),
                                         (tar_info("a/", tarfile.DIRTYPE), b""),
                                         (tar_info("control.sh"), b"")),
            "file then file inside it": tar_with((tar_info("a"), b""),
                                                 (tar_info("a/b"), b"")),
            "300-character name": tar_with((tar_info("n" * 300), b"")),
            "path over 4 KB": tar_with((tar_info("/".join(["d" * 100] * 45)), b"")),
        }
        for name, package in packages.items():
            with self.subTest(name):
                status, _, text = self.daemon.upload("app", package)
                self.assertEqual(status, 400, text)
        self.assertEqual(self.daemon.leftovers(), [])

    def test_odd_paths_and_queries(self):
        deployment = self.daemon.deploy()
        self.daemon.wait_state("app", deployment)
        for path, expected in (
                ("/log/app/%s?follow=1&offset=%%C2%%B2" % deployment, 400),
                ("/log/app/%s?follow=1&offset=-1" % deployment, 400),
                ("/status/app/%s?wait=nan" % deployment, 400),
                ("/audit?since=%ff", 400),
                ("/status/" + "a" * 5000, 404),
                ("/" + "%" * 5000, 404),
                ("/status/%ff%fe/%00", 404)):
            with self.subTest(path[:60]):
                status, _, text = self.daemon.get(path)
                self.assertEqual(status, expected, text[:200])
                self.assertLess(len(text), 400)
        for target in (b"http://[", b"http://[::1"):  # no URL at all: 400, not 500
            with self.subTest(target):
                answer = raw_exchange(self.daemon.port, b"GET " + target +
                                      b" HTTP/1.1\r\nHost: x\r\n\r\n")
                self.assertEqual(answer_status(answer), 400, answer[:200])
        self.assertNotIn("Traceback", self.daemon.daemon_log())


class RequestFuzzTests(DaemonTestCase):
    """Seeded random requests to every endpoint, header and parameter."""
    settings = {"READ_TIMEOUT": "5", "HEADER_TIMEOUT": "5", "MAX_UPLOAD_SIZE": "1M"}
    requests = int(os.environ.get("IPD_FUZZ_REQUESTS", soak(20000, 600))) // 5

    def test_fuzz_every_endpoint(self):
        deployment = self.daemon.deploy()
        self.daemon.wait_state("app", deployment)
        rng = random.Random(13)
        words = ["", "app", deployment, "..", "%00", "%ff", "a" * 300, "%C2%B2", "ui",
                 "\u00e9", "-1", "nan", "1e999", "x/y", "%2f", "cancel", "redeploy"]
        endpoints = ["", "list", "upload", "info", "stat", "status", "log", "cancel",
                     "redeploy", "metrics", "audit", "ui", "nope"]
        params = ["wait", "follow", "offset", "project", "since", "force"]
        headers = ["Accept", "Origin", "Sec-Fetch-Site", "X-Real-IP", "X-Forwarded-For",
                   "X-Forwarded-Proto", "Content-Type", "Expect", "X-Ipd-Project",
                   "Authorization", "Host", "Referer", "Range", "Connection"]
        values = ["application/json", "text/html", "null", "http://127.0.0.1:1",
                  "same-origin", "cross-site", "1.2.3.4", "::1, 9.9.9.9", "https",
                  "multipart/form-data; boundary*=utf-8''%ff", "100-continue", "app",
                  "Basic " + base64.b64encode(b"admin:admin-pw").decode(),
                  "Basic !!", "Bearer x", "\u00e9".encode().decode("latin-1"),
                  "a" * 3000, "close", "keep-alive", "bytes=0-1"]
        statuses = {}
        for _ in range(self.requests):
            segments = [rng.choice(endpoints)] + [urllib.parse.quote(
                rng.choice(words), safe="%/") for _ in range(rng.randrange(4))]
            query = "&".join("%s=%s" % (rng.choice(params), urllib.parse.quote(
                rng.choice(words), safe="%")) for _ in range(rng.randrange(3)))
            path = "/deploy/" + "/".join(segments) + ("?" + query if query else "")
            fields = {"Host": "127.0.0.1"}
            if rng.random() < 0.8:
                fields["Authorization"] = ADMIN_AUTH
            for _ in range(rng.randrange(4)):
                fields[rng.choice(headers)] = rng.choice(values)
            method = rng.choice(["GET", "GET", "POST", "HEAD", "PUT", "OPTIONS"])
            body = b""
            if method == "POST" and rng.random() < 0.5:
                body = os.urandom(rng.randrange(0, 500))
            data = raw_request(method, path, body, fields)
            answer = raw_exchange(self.daemon.port, data, timeout=15)
            status = answer_status(answer)
            statuses[status] = statuses.get(status, 0) + 1
        errors = sum(n for status, n in statuses.items() if status and status >= 500
                     and status != 503)
        report("fuzz of every endpoint: %d requests, %d answered 5xx; answers %s" % (
            self.requests, errors, ", ".join("%s: %d" % item for item in sorted(
                statuses.items(), key=lambda i: str(i[0])))))
        self.assertEqual(errors, 0)
        self.assertNotIn(None, statuses)
        self.assertNotIn("Traceback", self.daemon.daemon_log())


class LogLineTests(DaemonTestCase):
    """Logs say what happened, and only that."""

    def test_no_forged_lines_and_long_paths_cut(self):
        forged = "x.bin%0D%0A2026-01-01 00:00:00,000 INFO deployment 1 of app " \
            "uploaded by admin"
        body = (b'--b\r\nContent-Disposition: form-data; name="project"\r\n\r\napp\r\n'
                b'--b\r\nContent-Disposition: form-data; name="package"; filename="'
                + forged.encode() + b'"\r\n\r\n' + control_script(OK_SCRIPT)
                + b"\r\n--b--\r\n")
        status, _, deployment = self.daemon.request(
            "POST", "/upload", body=body,
            headers={"Content-Type": "multipart/form-data; boundary=b"})
        self.assertEqual(status, 202)
        self.daemon.request("GET", "/" + "p" * 20000, user="nobody\nINFO:x")
        log = self.daemon.daemon_log(r"p{150}\.\.\.\(20008 bytes\)")
        self.assertRegex(log, r"p{150}\.\.\.\(20008 bytes\)")
        lines = log.splitlines()
        self.assertFalse([line for line in lines if line.startswith("2026-01-01")], log)
        self.assertTrue(any("\\x0d\\x0a2026-01-01" in line for line in lines), log)
        self.assertFalse([line for line in lines if len(line) > 1200])
        _, record = self.daemon.get_json("/status/app/" + deployment.strip())
        self.assertTrue(record["files"]["package"]["name"].startswith("x.bin\r\n2026"))


class ClientAddressTests(DaemonTestCase):
    settings = {"TRUSTED_PROXIES": ""}

    def test_forwarded_addresses_only_from_trusted_proxies(self):
        self.daemon.get("/stat", user="admin:wrong", headers={"X-Real-IP": "198.51.100.7"})
        self.daemon.get("/stat", headers={"X-Forwarded-For": "198.51.100.8"})
        log = self.daemon.daemon_log(r'"GET /deploy/stat" 200')
        self.assertNotIn("198.51.100", log)
        audit = read_text(os.path.join(self.tmp, "audit.log"))
        self.assertIn('"address": "127.0.0.1"', audit)
        self.assertNotIn("198.51.100", audit)

    def test_a_trusted_proxy_names_the_client(self):
        self.daemon.stop()
        self.daemon = self.start_daemon({"TRUSTED_PROXIES": "127.0.0.1"})
        self.daemon.get("/stat", headers={"X-Real-IP": "198.51.100.9"})
        self.daemon.get("/stat", headers={"X-Real-IP": "not an address"})
        log = self.daemon.daemon_log(r'"GET /deploy/stat" 200 .*\n.*"GET /deploy/stat" 200')
        self.assertIn('198.51.100.9 "GET /deploy/stat" 200', log)
        self.assertIn('127.0.0.1 "GET /deploy/stat" 200', log)


class ContractAuditTests(DaemonTestCase):
    # Read as a test writer reads the original README and the issues, and
    # tried as an attacker: each test is a defect found, failing before
    # its fix.  "Bad input never gets a 5xx" (Guarantees), and RFC 9112's
    # MUSTs on a request's head.

    def exchange(self, data):
        """-> (status, headers {lower name: value}, body bytes) of one raw
        request on its own connection."""
        answer = raw_exchange(self.daemon.port, data)
        self.assertIsNotNone(answer, "no answer: %r" % data[:80])
        return read_answer(io.BytesIO(answer))

    def test_an_unknown_method_is_405_with_allow_never_501(self):
        for method in ("TRACE", "CONNECT", "PROPFIND", "get"):
            for path, allow in (("/deploy/status/app", "GET"),
                                ("/deploy/upload", "POST")):
                with self.subTest(method=method, path=path):
                    status, headers, body = self.exchange(raw_request(method, path))
                    self.assertEqual(status, 405, body)
                    self.assertEqual(headers.get("allow"), allow)
                    self.assertIn(b"not allowed", body)
            with self.subTest(method=method, path="/nowhere"):
                self.assertEqual(self.exchange(raw_request(method, "/nowhere"))[0], 404)
            with self.subTest(method=method, path="/v2/"):
                status, headers, body = self.exchange(raw_request(method, "/v2/"))
                self.assertEqual(status, 405, body)
                self.assertEqual(json.loads(body)["errors"][0]["code"], "UNSUPPORTED")
        self.assertEqual(self.daemon.get("/status/app")[0], 404)  # still serving

    def test_an_http_version_it_does_not_speak_is_400(self):
        for version in ("HTTP/2.0", "HTTP/3.0"):
            with self.subTest(version=version):
                status, _, body = self.exchange(raw_request("GET", "/deploy/", version=version))
                self.assertEqual(status, 400, body)
                self.assertIn(b"HTTP version", body)

    def test_a_header_line_that_is_not_name_colon_value_is_400_and_closed(self):
        # RFC 9112 5.1: whitespace before the colon MUST be 400 (it hides a
        # Content-Length from one parser and not from another: smuggling);
        # a line without a colon made http.server drop every header after
        # it, the Connection and the login among them
        hidden = raw_request("GET", "/deploy/stat", headers={"X-Real-IP": "6.6.6.6"})
        cases = {
            "space before colon": b"Content-Length : %d\r\n" % len(hidden),
            "tab before colon": b"Content-Length\t: %d\r\n" % len(hidden),
            "no colon": b"garbage\r\nContent-Length: %d\r\n" % len(hidden),
        }
        for name, line in cases.items():
            with self.subTest(name):
                data = (b"POST /deploy/cancel/app/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        + line + b"Authorization: " + ADMIN_AUTH.encode()
                        + b"\r\n\r\n" + hidden)
                answer = raw_exchange(self.daemon.port, data)
                self.assertEqual(answer_status(answer), 400, answer)
                self.assertIn(b"header", answer.partition(b"\r\n\r\n")[2])
                self.assertEqual(len(re.findall(rb"\AHTTP/1|\r\n\r\nHTTP/1|\nHTTP/1\.1 ",
                                                answer)), 1, answer)
        log = self.daemon.daemon_log()
        self.assertNotIn('"GET /deploy/stat"', log)

    def test_a_request_with_two_hosts_is_400(self):
        # RFC 9112 3.2: a request with two Host lines MUST be 400 (the
        # origin check reads the first; a proxy may have routed by another)
        two = (b"POST /deploy/cancel/app/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Host: evil.example\r\nOrigin: http://127.0.0.1\r\n\r\n")
        status, headers, body = self.exchange(two)
        self.assertEqual(status, 400, body)
        self.assertIn(b"more than one Host header", body)
        for data in (b"GET /deploy/ HTTP/1.0\r\n\r\n", b"GET /deploy/ HTTP/1.1\r\n\r\n",
                     raw_request("GET", "/deploy/")):
            self.assertEqual(self.exchange(data)[0], 200)  # none, or one: served

    def test_head_answers_as_get_on_every_registry_read_and_405_names_allow(self):
        # RFC 9110 9.3.2: HEAD is GET without the body; 405 MUST send Allow
        # (the README: "405 wrong method (with Allow)"; under /v2/ "the same
        # statuses")
        auth = {"Authorization": ADMIN_AUTH}
        for path in ("/v2/", "/v2/app/tags/list"):
            with self.subTest(path=path):
                get = self.exchange(raw_request("GET", path, headers=auth))
                head = raw_exchange(self.daemon.port, raw_request("HEAD", path, headers=auth))
                self.assertEqual(get[0], 200, get)
                self.assertEqual(answer_status(head), 200, head)
                self.assertTrue(head.endswith(b"\r\n\r\n"), head)  # no body
        status, headers, _ = self.exchange(raw_request("POST", "/v2/app/blobs/uploads/",
                                                       headers=auth))
        self.assertEqual(status, 202)
        get = self.exchange(raw_request("GET", headers["location"], headers=auth))
        head = self.exchange(raw_request("HEAD", headers["location"], headers=auth))
        self.assertEqual((get[0], get[1]["range"]), (204, "0-0"))
        self.assertEqual((head[0], head[1]["range"]), (204, "0-0"))  # the resume offset
        for method, path, allow in (("DELETE", "/v2/app/tags/list", "GET, HEAD"),
                                    ("POST", "/v2/", "GET, HEAD"),
                                    ("POST", "/v2/app/manifests/v1", "GET, HEAD, PUT"),
                                    ("POST", headers["location"], "DELETE, GET, HEAD, PATCH, PUT")):
            with self.subTest(method=method, path=path):
                status, headers, body = self.exchange(raw_request(method, path, headers=auth))
                self.assertEqual(status, 405, body)
                self.assertEqual(headers.get("allow"), allow)
                self.assertEqual(json.loads(body)["errors"][0]["code"], "UNSUPPORTED")

    def test_a_users_file_saved_with_a_byte_order_mark_and_crlf_logs_in(self):
        # The original README's ROLE:username:sha256 lines, as Windows'
        # Notepad saves them: a UTF-8 BOM before the first ROLE, CRLF ends
        with open(self.daemon.users_file, "w", encoding="utf-8-sig", newline="\r\n") as file:
            file.write("ADMIN:admin:%s\nUSER:dev:%s\n" % (sha256_hex("admin-pw"),
                                                         sha256_hex("dev-pw")))
        wait_until(lambda: self.daemon.get("/status/app", user="dev")[0] == 404,
                   timeout=10, message="dev logs in")
        self.assertEqual(self.daemon.get("/list")[0], 200)  # the first line's user
        self.assertNotIn("unknown role", self.daemon.daemon_log())

    def test_status_of_a_reverted_deployment_exits_10_as_the_table_says(self):
        # "exit status of the client commands: ... 10 the deployment was
        # reverted": push --wait and logs -f gave 10, status gave 1; the
        # README's docker push recipe checks with `ipd.py status --wait`
        folder = os.path.join(self.daemon.upload_dir, "app")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "project.conf"), "w") as file:
            file.write("VERIFY_SECONDS=1\n")
        deployment = self.daemon.deploy('[ "$1" = verify ] && exit 0\nexit 1\n')
        self.assertEqual(self.daemon.wait_state("app", deployment), "reverted")
        environ = dict(os.environ, IPD_URL="http://127.0.0.1:%d/deploy" % self.daemon.port,
                       IPD_USER="admin", IPD_PASSWORD="admin-pw", HOME=self.tmp)
        for command in (["status", "app", deployment], ["status", "app", deployment,
                                                          "--wait", "5"],
                        ["logs", "app", deployment, "-f"]):
            with self.subTest(command=command):
                result = subprocess.run(IPD_RUN + command, env=ipd_environ(environ),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, timeout=60)
                self.assertEqual(result.returncode, ipd.EXIT_REVERTED, result.stderr)

    def test_the_registry_challenge_is_exactly_basic_realm_ipd(self):
        # Issue 24 and the README's registry table: "401 with
        # WWW-Authenticate: Basic realm="ipd"", on every path, HEAD too
        for method, path in (("GET", "/v2/"), ("HEAD", "/v2/"),
                             ("HEAD", "/v2/app/blobs/sha256:" + "a" * 64),
                             ("POST", "/v2/app/blobs/uploads/")):
            with self.subTest(method=method, path=path):
                answer = raw_exchange(self.daemon.port, raw_request(
                    method, path, headers={"Authorization": ""}))
                status, headers, _ = read_answer(io.BytesIO(answer))
                self.assertEqual(status, 401)
                self.assertEqual(headers["www-authenticate"], 'Basic realm="ipd"')
        status, headers, _ = self.daemon.get("/status/app", user=None)
        self.assertEqual(status, 401)  # the API's keeps its charset (RFC 7617)
        self.assertEqual(headers["WWW-Authenticate"], 'Basic realm="ipd", charset="UTF-8"')

    def test_a_post_whose_only_sign_of_a_browser_is_a_foreign_referer_is_403(self):
        # "cross-origin POSTs with or without Origin": a browser that sends
        # no Origin and no Sec-Fetch-Site (Firefox before 70) still sends
        # Referer; the page that made it is another site's
        deployment = self.daemon.deploy()
        self.daemon.wait_state("app", deployment)
        for referer in ("http://evil.example/x.html", "http://127.0.0.1.evil.example/",
                        "garbage"):
            with self.subTest(referer=referer):
                status, _, body = self.daemon.request(
                    "POST", "/redeploy/app/" + deployment, headers={"Referer": referer})
                self.assertEqual(status, 403, body)
                self.assertIn("Referer", body)
        self.assertEqual(self.daemon.get_json("/info")[1]["projects"][0]["deployments"], 1)
        own = "http://127.0.0.1:%d/deploy/ui/app" % self.daemon.port
        status, _, body = self.daemon.request(
            "POST", "/redeploy/app/" + deployment,
            headers={"Referer": own, "Host": "127.0.0.1:%d" % self.daemon.port})
        self.assertEqual(status, 202, body)  # its own page
        status, _, _ = self.daemon.request("POST", "/redeploy/app/" + deployment)
        self.assertEqual(status, 202)  # curl: no Referer

    def test_credentials_that_are_not_ascii_are_401_never_500(self):
        # A header's bytes are read as Latin-1: base64 of non-ASCII text
        # raised a ValueError that no except caught (500)
        for credentials in (b"Basic \xff\xfe", b"Basic \xe9t\xe9==", b"Bearer \xff\xfe",
                            b"Bearer ipd_\xe9\xe9", b"Bearer eyJ\xe9.eyJ.x", b"basic \xc3\xa9"):
            for path in (b"/deploy/list", b"/v2/"):
                with self.subTest(credentials=credentials, path=path):
                    answer = raw_exchange(self.daemon.port, b"GET " + path + b" HTTP/1.1\r\n"
                                          b"Host: 127.0.0.1\r\nAuthorization: " + credentials
                                          + b"\r\n\r\n")
                    # 429 once the login throttle counts them
                    self.assertIn(answer_status(answer), (401, 429), answer)
        self.assertNotIn("internal error", self.daemon.daemon_log())

    def test_a_bad_value_in_project_conf_names_its_file_line_and_setting(self):
        # Issue 27: "messages that say what to do"; an unknown name in
        # project.conf said file:line and name, a bad value said only
        # "project settings: must be a whole number of seconds from 0 to 86400"
        folder = os.path.join(self.daemon.upload_dir, "app")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "project.conf")
        with open(path, "w") as file:
            file.write("# verify for a day\nVERIFY_SECONDS=86401\n")
        status, _, body = self.daemon.upload("app", control_script(OK_SCRIPT))
        self.assertIn("%s:2: VERIFY_SECONDS: must be a whole number of seconds from 0 to "
                      "86400" % path, body)
        self.assertEqual(self.daemon.get("/status/app")[2], "no\n")  # nothing queued

    def test_bad_oidc_trust_lines_are_warned_at_start_as_the_users_files_are(self):
        # Issue 26: "Bad lines: one warning each with the line number, as for
        # the users file", whose warnings are on the terminal at start too
        trust = os.path.join(self.tmp, "trust.txt")
        with open(trust, "w") as file:
            file.write("# ISSUER AUDIENCE PROJECTS CLAIM=GLOB\n"
                       "http://insecure.example.com ipd web repository=acme/web\n"
                       "https://token.actions.githubusercontent.com ipd web\n")
        self.daemon.stop()
        self.daemon = self.start_daemon({"OIDC_TRUST": trust})
        stderr = read_text(self.daemon.stderr_path)
        self.assertIn("ipd: warning: %s, line 2: the issuer must be an https:// URL" % trust,
                      stderr)
        self.assertIn("%s, line 3: " % trust, stderr)
        self.assertIn("%s, line 2: " % trust, self.daemon.daemon_log())

    def test_a_control_sh_without_a_shebang_is_named_with_its_fix(self):
        # As the CRLF #! line and the exec bit (issue 27): a script that a
        # shell runs but exec refuses ended 126 with a bare 'Exec format
        # error'; it still ends 126 (the Guarantees: "one that cannot run
        # ends 126/127 with the reason in its log"), now with the fix
        for script, hint in ((b"echo hi\nexit 1\n", "it has no #! line: make its "
                              "first line #!/bin/sh"),
                             (b"\xef\xbb\xbf#!/bin/sh\nexit 1\n", "it starts with a "
                              "byte order mark, which hides its #! line")):
            with self.subTest(script=script):
                package = tar_bytes({"control.sh": (script, 0o755)})
                deployment = self.daemon.upload("app", package)[2].strip()
                self.assertEqual(self.daemon.wait_state("app", deployment), "126")
                self.assertIn("ipd: cannot run control.sh check: Exec format error; " + hint,
                              self.daemon.log("app", deployment))


###############################################################################
# Running the daemon ##########################################################
###############################################################################

class BytecodeStartTests(unittest.TestCase):
    """`python3 ipd.py serve` starts again, as the same process, as
    `python3 -m ipd` from the bytecode cache (the compiled source would
    stay in its memory), in the folder it was started in."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        self.app, self.work = os.path.join(self.tmp, "app"), os.path.join(self.tmp, "work")
        for folder in (self.app, self.work, os.path.join(self.work, "uploads")):
            os.makedirs(folder)
        shutil.copy(IPD, self.app)
        with open(os.path.join(self.work, "users.txt"), "w") as file:
            file.write("ADMIN:admin:%s\n" % sha256_hex("admin-pw"))
        with open(os.path.join(self.work, "ipd.conf"), "w") as file:
            file.write("LISTEN=127.0.0.1:0\nUPLOAD_DIR=%s/uploads\nLOG_DIR=%s\n"
                       "AUTH_DB=%s/users.txt\n" % ((self.work,) * 3))

    def start(self):
        """ipd.py of app run as a script from work, with a relative --config."""
        environ = {key: value for key, value in os.environ.items()
                   if key not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
        stderr = open(os.path.join(self.tmp, "stderr.txt"), "w+")
        self.addCleanup(stderr.close)
        process = subprocess.Popen(
            [sys.executable, os.path.join(self.app, "ipd.py"), "--config", "ipd.conf",
             "serve"], cwd=self.work, env=environ, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=stderr)
        self.addCleanup(process.wait, 30)
        self.addCleanup(process.terminate)
        wait_until(lambda: "listening on" in read_text(stderr.name) or
                   process.poll() is not None, timeout=30)
        port = int(re.search(r"127\.0\.0\.1:(\d+)/", read_text(stderr.name)).group(1))
        return process, port

    def cmdline(self, pid):
        with open("/proc/%d/cmdline" % pid, "rb") as file:
            return file.read().decode().split("\0")[:-1]

    def test_it_runs_from_bytecode_as_the_same_process_in_its_folder(self):
        process, port = self.start()
        self.assertEqual(self.cmdline(process.pid)[-5:],
                         ["-m", "ipd", "--config", "ipd.conf", "serve"])
        self.assertEqual(os.readlink("/proc/%d/cwd" % process.pid), self.work)
        self.assertTrue(os.path.exists(importlib.util.cache_from_source(
            os.path.join(self.app, "ipd.py"))))
        content_type, body = multipart([("project", "app"), ("package", (
            "package.tar.gz", control_script('env; pwd; exit 1\n')))])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/deploy/upload", body, {
            "Content-Type": content_type, "Authorization": "Basic " +
            base64.b64encode(b"admin:admin-pw").decode()})
        response = connection.getresponse()
        self.assertEqual(response.status, 202)
        deployment = response.read().decode().strip()
        log = os.path.join(self.work, "uploads", "app", "deployments", deployment + ".log")
        wait_until(lambda: read_text(log).count("PROJECT=app") == 2, timeout=30)  # check, deploy
        self.assertNotIn("IPD_START_DIR", read_text(log))
        process.terminate()
        self.assertEqual(process.wait(30), 0)

    def test_a_package_named_as_it_beside_it_keeps_it_a_script(self):
        os.makedirs(os.path.join(self.app, "ipd"))  # `-m ipd` would find this
        open(os.path.join(self.app, "ipd", "__init__.py"), "w").close()
        process, port = self.start()
        self.assertEqual(self.cmdline(process.pid)[1:3],
                         [os.path.join(self.app, "ipd.py"), "--config"])
        self.assertEqual(urllib.request.urlopen(
            "http://127.0.0.1:%d/deploy/" % port, timeout=30).status, 200)


class StartupCheckTests(unittest.TestCase):
    """Issue #15: every start-up mistake is one line on stderr and in
    ipd.log, naming the setting and its value."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        self.uploads = os.path.join(self.tmp, "uploads")
        self.logs = os.path.join(self.tmp, "logs")
        os.makedirs(self.uploads)
        os.makedirs(self.logs)
        self.users = os.path.join(self.tmp, "users.txt")
        with open(self.users, "w") as file:
            file.write("ADMIN:admin:%s\n" % sha256_hex("admin-pw"))
        os.chmod(self.users, 0o640)

    def serve(self, **settings):
        env = {"LISTEN": "127.0.0.1:0", "UPLOAD_DIR": self.uploads,
               "LOG_DIR": self.logs, "AUTH_DB": self.users}
        env.update(settings)
        return run_ipd("--config", os.devnull, "serve", env=env)

    def assert_refused(self, result, line):
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stderr.splitlines(), ["ipd: " + line])

    def test_missing_upload_dir_is_refused_and_not_made(self):
        missing = os.path.join(self.tmp, "typo")
        result = self.serve(UPLOAD_DIR=missing)
        self.assert_refused(result, "UPLOAD_DIR=%s: no such folder: create it for "
                            "the user ipd runs as" % missing)
        self.assertFalse(os.path.exists(missing))
        self.assertIn("ERROR not started: UPLOAD_DIR=%s: no such folder" % missing,
                      read_text(os.path.join(self.logs, "ipd.log")))

    def test_a_file_as_a_folder(self):
        result = self.serve(UPLOAD_DIR=self.users)
        self.assert_refused(result, "UPLOAD_DIR=%s: not a folder" % self.users)

    def test_missing_log_dir(self):
        missing = os.path.join(self.tmp, "nologs")
        result = self.serve(LOG_DIR=missing)
        self.assert_refused(result, "LOG_DIR=%s: no such folder: create it for the "
                            "user ipd runs as" % missing)
        self.assertFalse(os.path.exists(missing))
        self.assertEqual(os.listdir(self.uploads), [])

    def test_read_only_upload_dir(self):
        if os.geteuid() == 0:  # root writes anywhere but on a read-only mount
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m",
                                      "tmpfs", self.uploads], stderr=subprocess.PIPE)
            if mounted.returncode:
                self.skipTest("cannot mount tmpfs: %s" % mounted.stderr.decode())
            self.addCleanup(subprocess.run, ["umount", "-l", self.uploads])
        else:
            os.chmod(self.uploads, 0o555)
        result = self.serve()
        self.assert_refused(result, "UPLOAD_DIR=%s: not writable by the user ipd "
                            "runs as (uid %d): chown or chmod it"
                            % (self.uploads, os.geteuid()))

    def test_listen_in_use_changes_nothing(self):
        # a deployment left active by a killed daemon, its control.sh still running
        daemon = DaemonProcess(os.path.join(self.tmp, "run"))
        daemon.start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        marker = os.path.join(self.tmp, "running")
        deployment = daemon.deploy(gate_script(os.path.join(self.tmp, "gate"),
                                               "echo $$ > %s" % marker))
        deadline = time.monotonic() + 30
        while not os.path.exists(marker):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        daemon.kill()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = self.serve(UPLOAD_DIR=daemon.upload_dir,
                                LISTEN="127.0.0.1:%d" % port)
        self.assert_refused(result, "LISTEN=127.0.0.1:%d: cannot listen: address "
                            "already in use (another ipd, or another program, "
                            "listens there): stop it or set another LISTEN" % port)
        state_file = os.path.join(daemon.upload_dir, "app", "deployments",
                                  deployment + ".json")
        self.assertEqual(json.loads(read_text(state_file))["state"], "active")
        self.assertTrue(process_running(int(read_text(marker))))
        daemon.start()  # a daemon that may listen does the clean-up
        self.assertEqual(daemon.state("app", deployment), "interrupted")

    def test_listen_on_an_address_of_another_host(self):
        result = self.serve(LISTEN="192.0.2.1:9955")
        self.assert_refused(result, "LISTEN=192.0.2.1:9955: cannot listen: no such "
                            "address on this host")

    def start_with_users_file(self, text, mode=0o640):
        if text is not None:
            with open(self.users, "w") as file:
                file.write(text)
            os.chmod(self.users, mode)
        else:
            os.unlink(self.users)
        daemon = DaemonProcess(os.path.join(self.tmp, "run"),
                               {"AUTH_DB": self.users})
        daemon.start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        warnings = [line for line in read_text(daemon.stderr_path).splitlines()
                    if line.startswith("ipd: warning:")]
        logged = daemon.daemon_log()
        for warning in warnings:
            self.assertIn("WARNING " + warning[len("ipd: warning: "):], logged)
        return daemon, warnings

    def test_missing_users_file_is_said_on_the_terminal(self):
        daemon, warnings = self.start_with_users_file(None)
        self.assertEqual(warnings, [
            "ipd: warning: AUTH_DB=%s does not exist: every login is refused (401); "
            "add one with 'ipd passwd ADMIN NAME'" % self.users])
        self.assertEqual(daemon.get("/list")[0], 401)

    def test_users_file_lines_named_with_their_number(self):
        daemon, warnings = self.start_with_users_file(
            "# team\nADMIN:admin:%s\nADMN:eve:%s\nUSER:bob\nMETRICS:prom:%s:web\n"
            % (sha256_hex("admin-pw"), sha256_hex("x"), sha256_hex("y")), 0o644)
        where = "ipd: warning: AUTH_DB=%s" % self.users
        self.assertEqual(warnings, [
            "ipd: warning: AUTH_DB: %s was open to others: made it 640" % self.users,
            "%s, line 3: unknown role 'ADMN' (ADMIN, USER or METRICS); line ignored"
            % where,
            "%s, line 4: expected ROLE:username:hash[:projects], found 2 fields; "
            "line ignored" % where,
            "%s, line 5: a project list is for USER lines only; ignored for METRICS"
            % where])
        self.assertNotIn(sha256_hex("x"), "\n".join(warnings))
        self.assertEqual(daemon.get("/list")[0], 200)

    def test_unreadable_and_empty_users_file(self):
        os.unlink(self.users)
        os.mkdir(self.users)  # unreadable, even for root
        daemon = DaemonProcess(os.path.join(self.tmp, "run"), {"AUTH_DB": self.users})
        daemon.start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        self.assertIn("ipd: warning: AUTH_DB=%s cannot be read (Is a directory): "
                      "every login is refused (401)" % self.users,
                      read_text(daemon.stderr_path))
        daemon.stop()
        os.rmdir(self.users)
        _, warnings = self.start_with_users_file("# nobody yet\n")
        self.assertEqual(warnings, [
            "ipd: warning: AUTH_DB=%s has no users: every login is refused (401); "
            "add one with 'ipd passwd ADMIN NAME'" % self.users])

    def test_one_deployment_on_disk_in_the_singular(self):
        daemon = DaemonProcess(os.path.join(self.tmp, "run"))
        daemon.start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        daemon.wait_state("app", daemon.deploy())
        daemon.restart()
        self.assertIn("(1 deployment on disk)", daemon.daemon_log())
        self.assertIn("(0 deployments on disk)", daemon.daemon_log())


class SingleDaemonTests(DaemonTestCase):
    """Issue #15: a second ipd on the same UPLOAD_DIR damages nothing."""

    def test_second_daemon_exits_and_the_first_deployment_ends_ok(self):
        gate = os.path.join(self.tmp, "gate")
        marker = os.path.join(self.tmp, "running")
        deployment = self.daemon.deploy(gate_script(gate, "echo $$ > %s" % marker))
        self.wait_for_file(marker)
        self.assertEqual(self.daemon.state("app", deployment), "active")
        before = sorted(os.listdir(self.daemon.upload_dir))
        started = time.monotonic()
        # the same command again, as by mistake (port 0: only the lock stops it)
        result = run_ipd("--config", self.daemon.config, "serve")
        self.assertLess(time.monotonic() - started, 20)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stderr.splitlines(), [
            "ipd: UPLOAD_DIR=%s is in use by another ipd (PID %d): stop it first, "
            "or give this one its own UPLOAD_DIR"
            % (self.daemon.upload_dir, self.daemon.process.pid)])
        # nothing changed: control.sh runs on, the disk still says active
        self.assertTrue(process_running(int(read_text(marker))))
        self.assertEqual(sorted(os.listdir(self.daemon.upload_dir)), before)
        state_file = os.path.join(self.daemon.upload_dir, "app", "deployments",
                                  deployment + ".json")
        self.assertEqual(json.loads(read_text(state_file))["state"], "active")
        self.assertIn("not started: UPLOAD_DIR=", self.daemon.daemon_log())
        open(gate, "w").close()
        self.assertEqual(self.daemon.wait_state("app", deployment), "ok")
        self.assertEqual(json.loads(read_text(state_file))["state"], "ok")

    def test_the_lock_dies_with_its_holder(self):
        gate = os.path.join(self.tmp, "gate")
        deployment = self.daemon.deploy(gate_script(gate))
        self.daemon.wait_state("app", deployment, ["active"])
        lock = os.path.join(self.daemon.upload_dir, ipd.LOCK_FILE)
        self.assertEqual(read_text(lock), "%d\n" % self.daemon.process.pid)
        self.daemon.kill()  # kill -9: no clean-up of its own
        self.daemon.start()  # at once: the kernel released the lock
        self.assertEqual(self.daemon.state("app", deployment), "interrupted")
        self.assertEqual(read_text(lock), "%d\n" % self.daemon.process.pid)

    def test_passwd_and_client_commands_beside_a_running_daemon(self):
        result = run_ipd("passwd", "USER", "carol", "--config", self.daemon.config,
                         stdin_text="carol-pw\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.daemon.get("/status/app", user="carol:carol-pw")[0], 404)
        deployment = self.daemon.deploy()
        self.daemon.wait_state("app", deployment)
        result = run_ipd("status", "app", deployment, env={
            "IPD_URL": "http://127.0.0.1:%d/deploy" % self.daemon.port,
            "IPD_USER": "carol", "IPD_PASSWORD": "carol-pw"})
        self.assertEqual((result.returncode, result.stdout), (0, "ok\n"), result.stderr)

    @unittest.skipUnless(shutil.which("curl"), "needs curl")
    def test_a_second_demo_says_one_line(self):
        demo = os.path.join(self.tmp, "demo")
        os.makedirs(demo)
        first = start_demo(self, demo)
        result = run_ipd("demo", "--listen", "127.0.0.1:0", cwd=demo)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("--dir %s is in use by another ipd (PID %d)"  # its option
                      % (os.path.join(demo, "ipd-demo"), first.pid),  # (issue #27)
                      result.stderr)


class UpgradeTests(DaemonTestCase):
    system = True  # the same on every Python: once per CI run
    settings = {"SHUTDOWN_GRACE": "10"}

    def test_upgrade_to_a_new_wheel_loses_nothing(self):
        gate = os.path.join(self.tmp, "gate")
        running = self.daemon.deploy(gate_script(gate), project="web")
        self.daemon.wait_state("web", running, ["active"])
        waiting = self.daemon.deploy(OK_SCRIPT, project="web")
        other = self.daemon.deploy(OK_SCRIPT, project="api")
        self.daemon.wait_state("api", other)
        # a state file as an older ipd wrote it: fewer fields, version 1
        old_id = str(uuid.uuid4())
        folder = os.path.join(self.daemon.upload_dir, "old", "deployments")
        os.makedirs(os.path.join(folder, old_id))
        with open(os.path.join(folder, old_id + ".json"), "w") as file:
            json.dump({"version": 1, "id": old_id, "project": "old", "seq": 0,
                       "state": "ok", "created": 1.0e9, "started": 1.0e9,
                       "ended": 1.0e9 + 5}, file)
        # build the new version while the old one runs, then stop it
        wheel = build("wheel", os.path.join(self.tmp, "dist"))
        bin_dir = make_venv(os.path.join(self.tmp, "venv"))
        pip_install(bin_dir, wheel)
        self.daemon.process.send_signal(signal.SIGTERM)
        self.daemon.daemon_log(r"no new connections, running steps get")
        open(gate, "w").close()  # the running step finishes within the grace
        self.assertEqual(self.daemon.process.wait(30), 0)
        self.daemon.program = os.path.join(bin_dir, "ipd")
        self.daemon.start()
        self.assertEqual(self.daemon.state("web", running), "ok")
        self.assertEqual(self.daemon.wait_state("web", waiting), "ok")
        self.assertEqual(self.daemon.state("api", other), "ok")
        self.assertEqual(self.daemon.state("old", old_id), "ok")
        self.assertEqual(self.daemon.get_json("/status/old/" + old_id)[1]["duration"], 5)
        # a state file from a newer ipd is skipped, not misread
        newer = str(uuid.uuid4())
        with open(os.path.join(folder, newer + ".json"), "w") as file:
            json.dump({"version": 99, "id": newer, "project": "old", "seq": 1,
                       "state": "ok"}, file)
        self.daemon.restart()
        self.assertEqual(self.daemon.state("old", newer), "no")
        self.assertIn("written by a newer ipd", self.daemon.daemon_log("newer ipd"))


class NginxReloadUnitTests(unittest.TestCase):
    """ipd.service as systemd computes it, and the root path unit that
    reloads nginx for the Docker examples instead of sudo (issue #17)."""
    system = True  # the same on every Python: once per CI run

    # systemd.exec(5): with User= set, each of these implies NoNewPrivileges=yes.
    IMPLY_NO_NEW_PRIVILEGES = (
        "SystemCallFilter", "SystemCallArchitectures", "RestrictAddressFamilies",
        "RestrictNamespaces", "PrivateDevices", "ProtectKernelTunables",
        "ProtectKernelModules", "ProtectKernelLogs", "ProtectClock",
        "MemoryDenyWriteExecute", "RestrictRealtime", "RestrictSUIDSGID",
        "DynamicUser", "LockPersonality")

    def unit(self, name):
        """{key: last value} of a unit file in this folder."""
        settings = {}
        for line in read_text(os.path.join(HERE, name)).splitlines():
            if "=" in line and not line.startswith(("#", ";")):
                key, value = line.rstrip("\n").split("=", 1)
                settings[key.strip()] = value.strip()
        return settings

    def test_the_sandbox_implies_no_new_privileges_so_the_readme_uses_no_sudo(self):
        service = self.unit("ipd.service")
        self.assertIn("User", service)
        implying = [key for key in self.IMPLY_NO_NEW_PRIVILEGES
                    if service.get(key, "").lower() not in ("", "no", "false", "0")]
        # so a drop-in with NoNewPrivileges=no would change nothing
        self.assertGreaterEqual(len(implying), 5, implying)
        for name in DOC_FILES:  # the README and the files it links to
            readme = read_text(os.path.join(HERE, name))
            self.assertNotIn("NoNewPrivileges=no\n", readme)
            self.assertNotIn("/etc/sudoers.d/ipd", readme)

    def test_the_path_unit_watches_the_folder_the_examples_write(self):
        path = self.unit("ipd-nginx.path")
        service = self.unit("ipd-nginx.service")
        self.assertEqual(path["Unit"], "ipd-nginx.service")
        self.assertNotIn("User", service)  # root: it signals nginx's master
        self.assertEqual(service["RuntimeDirectory"], "ipd-nginx")
        for script in ("examples/docker/control.sh", "examples/swarm/control.sh"):
            text = read_text(os.path.join(HERE, script))
            self.assertIn("RELOAD_DIR=%s\n" % path["PathChanged"], text)
            self.assertIn("NGINX_STATUS=/run/ipd-nginx/status", text)

    @unittest.skipUnless(shutil.which("systemd-analyze"), "needs systemd-analyze")
    def test_systemd_analyze_verify(self):
        folder = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, folder, True)
        # ExecStart must name programs that exist here.
        programs = {"ipd.service": "%s %s serve" % (sys.executable, IPD),
                    "ipd-nginx.service": os.path.join(HERE, "tools", "nginx-reload")}
        for name in ("ipd.service", "ipd-nginx.path", "ipd-nginx.service"):
            text = read_text(os.path.join(HERE, name))
            if name in programs:
                text = re.sub(r"(?m)^ExecStart=.*$", "ExecStart=" + programs[name], text)
            with open(os.path.join(folder, name), "w") as file:
                file.write(text)
        result = subprocess.run(["systemd-analyze", "verify", "ipd.service",
                                 "ipd-nginx.path", "ipd-nginx.service"], cwd=folder,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True)
        self.assertEqual(result.returncode, 0, result.stdout)
        ours = [line for line in result.stdout.splitlines() if "ipd" in line]
        self.assertEqual(ours, [])

    def test_the_reload_command_reports_for_control_sh(self):
        folder = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, folder, True)
        fake = os.path.join(folder, "nginx")
        status = os.path.join(folder, "status")
        for config_test, expect in (("exit 0", "0 reloaded"),
                                    ("echo 'nginx: [emerg] unknown directive \"x\"' >&2; "
                                     "exit 1", '1 nginx: [emerg] unknown directive "x"')):
            with open(fake, "w") as file:
                file.write('#!/bin/sh\nif [ "$1" = -t ]; then %s; fi\n' % config_test)
            os.chmod(fake, 0o755)
            before = time.time_ns()
            result = subprocess.run([os.path.join(HERE, "tools", "nginx-reload")],
                                    env=dict(os.environ, NGINX_COMMAND=fake, STATUS=status),
                                    stderr=subprocess.DEVNULL)
            self.assertEqual(result.returncode, 0 if expect[0] == "0" else 1)
            started, text = read_text(status).rstrip("\n").split(" ", 1)
            self.assertEqual(text, expect)
            self.assertGreaterEqual(int(started), before)

    @unittest.skipUnless(shutil.which("make") and shutil.which("dpkg-deb"),
                         "needs make and dpkg-deb")
    def test_shipped_by_make_install_and_the_deb(self):
        stage = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, stage, True)
        subprocess.run(["make", "-s", "install", "DESTDIR=" + stage, "PREFIX=/usr"],
                       cwd=HERE, check=True, stdout=subprocess.DEVNULL)
        unit = read_text(os.path.join(stage, "etc/systemd/system/ipd-nginx.service"))
        self.assertIn("ExecStart=/usr/lib/ipd/nginx-reload\n", unit)
        self.assertTrue(os.access(os.path.join(stage, "usr/lib/ipd/nginx-reload"), os.X_OK))
        self.assertTrue(os.path.isdir(os.path.join(stage, "var/lib/ipd/nginx")))
        self.assertIn("PathChanged=/var/lib/ipd/nginx\n",
                      read_text(os.path.join(stage, "etc/systemd/system/ipd-nginx.path")))
        subprocess.run(["make", "-s", "deb", "DIST=" + stage], cwd=HERE, check=True,
                       stdout=subprocess.DEVNULL)
        deb = os.path.join(stage, "ipd_%s_all.deb" % ipd.__version__)
        contents = subprocess.run(["dpkg-deb", "-c", deb], stdout=subprocess.PIPE,
                                  check=True).stdout.decode()
        for path in ("./lib/systemd/system/ipd-nginx.path",
                     "./lib/systemd/system/ipd-nginx.service", "./usr/lib/ipd/nginx-reload"):
            self.assertIn(path, contents)


###############################################################################
# The client ##################################################################
###############################################################################

class ClientTests(DaemonTestCase):
    """python3 ipd.py push / status / logs / ..., as a CI job runs them."""

    def client(self, *args, env=None, stderr=subprocess.PIPE, timeout=120):
        environ = dict(os.environ, IPD_URL="http://127.0.0.1:%d/deploy" % self.daemon.port,
                       IPD_USER="admin", IPD_PASSWORD="admin-pw", HOME=self.tmp)
        return subprocess.run(IPD_RUN + list(args), env=ipd_environ(environ, env),
                              stdout=subprocess.PIPE, stderr=stderr,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def write(self, name, data):
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as file:
            file.write(data)
        return path

    def test_push_and_wait_ok_and_failing(self):
        package = self.write("ok.tgz", control_script('echo "deploying $1"; exit 1'))
        result = self.client("push", "--project", "app", "--package", package,
                             "--image", self.write("img", b"IMAGE"), "--wait")
        self.assertEqual(result.returncode, 0, result.stderr)
        deployment, *log = result.stdout.decode().splitlines()
        self.assertEqual(log, ["deploying check", "deploying deploy"])
        self.assertIn("%s of app: ok" % deployment, result.stderr.decode())
        self.assertEqual(self.daemon.state("app", deployment), "ok")
        failing = self.write("bad.tgz", control_script('[ "$1" = deploy ] && exit 9; exit 1'))
        result = self.client("push", "--project", "app", "--package", failing, "--wait")
        self.assertEqual(result.returncode, 1)
        self.assertIn(": 9", result.stderr.decode())

    def test_push_a_directory(self):
        folder = os.path.join(self.tmp, "site")
        os.makedirs(os.path.join(folder, "www"))
        with open(os.path.join(folder, "control.sh"), "w") as file:
            file.write('#!/bin/sh\n[ "$1" = deploy ] && cat www/index.html; exit 1\n')
        os.chmod(os.path.join(folder, "control.sh"), 0o755)
        with open(os.path.join(folder, "www", "index.html"), "w") as file:
            file.write("hello from a folder\n")
        result = self.client("push", "--project", "site", "--package", folder, "--wait")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"hello from a folder", result.stdout)

    def test_errors_are_one_line_with_distinct_exit_codes(self):
        package = self.write("p.tgz", control_script(OK_SCRIPT))
        cases = [
            ({"IPD_PASSWORD": "wrong"}, 4, "HTTP 401"),
            ({"IPD_USER": "dev", "IPD_PASSWORD": "dev-pw"}, 0, None),
            ({"IPD_URL": "http://127.0.0.1:1/deploy"}, 3, "cannot reach"),
            ({"IPD_URL": "ftp://x"}, 2, "IPD_URL"),
        ]
        for env, code, text in cases:
            with self.subTest(env=env):
                result = self.client("push", "--project", "app", "--package", package,
                                     env=env)
                self.assertEqual(result.returncode, code, result.stderr)
                if text:
                    stderr = result.stderr.decode()
                    self.assertIn(text, stderr)
                    self.assertEqual(len(stderr.strip().splitlines()), 1, stderr)
                    self.assertNotIn("Traceback", stderr)
        # Following a log gives up on a server that cannot be reached, after
        # a bounded number of tries (no --timeout needed).
        result = self.client("logs", "-f", "app", "x", env={
            "IPD_URL": "http://127.0.0.1:1/deploy"})
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertIn("cannot reach", result.stderr.decode())
        result = self.client("list", env={"IPD_USER": "dev", "IPD_PASSWORD": "dev-pw"})
        self.assertEqual(result.returncode, 5)
        result = self.client("push", "--project", "a/b", "--package", package)
        self.assertEqual(result.returncode, 8)
        self.assertIn("HTTP 400: bad project name", result.stderr.decode())

    def test_netrc_and_no_password_on_the_command_line(self):
        with open(os.path.join(self.tmp, ".netrc"), "w") as file:
            file.write("machine 127.0.0.1 login admin password admin-pw\n")
        os.chmod(os.path.join(self.tmp, ".netrc"), 0o600)
        result = self.client("list", env={"IPD_USER": "", "IPD_PASSWORD": ""})
        self.assertEqual((result.returncode, result.stdout), (0, b""))  # empty: unset
        os.unlink(os.path.join(self.tmp, ".netrc"))
        result = self.client("list", env={"IPD_PASSWORD": ""})
        self.assertEqual(result.returncode, 2)
        self.assertIn(b"set IPD_PASSWORD or a ~/.netrc entry", result.stderr)
        with open(os.path.join(self.tmp, ".netrc"), "w") as file:
            file.write("machine 127.0.0.1 login admin password admin-pw\n")
        os.chmod(os.path.join(self.tmp, ".netrc"), 0o600)
        environ = {k: v for k, v in os.environ.items() if k not in ("IPD_USER",
                                                                    "IPD_PASSWORD")}
        environ.update(IPD_URL="http://127.0.0.1:%d/deploy" % self.daemon.port,
                       HOME=self.tmp)
        result = subprocess.run([sys.executable, IPD, "list"], env=environ,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stderr)
        result = subprocess.run([sys.executable, IPD, "push", "--password", "x"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(result.returncode, 2)  # there is no such option

    def test_status_logs_info_cancel_redeploy_commands(self):
        gate = os.path.join(self.tmp, "gate")
        package = self.write("p.tgz", control_script(gate_script(gate, "echo start")))
        first = self.client("push", "--project", "app", "--package", package
                            ).stdout.decode().strip()
        self.daemon.wait_state("app", first, ["active"])
        result = self.client("status", "app", first, "--wait", "0.2")
        self.assertEqual((result.returncode, result.stdout), (0, b"active\n"))
        result = self.client("cancel", "app", first)
        self.assertEqual(result.stdout, b"cancelled\n")
        result = self.client("logs", "app", first)
        self.assertRegex(result.stdout, b"^start\nipd: cancelled by admin from ")
        result = self.client("status", "app", first)
        self.assertEqual((result.returncode, result.stdout), (1, b"cancelled\n"))
        open(gate, "w").close()
        result = self.client("redeploy", "app", first, "--wait")
        self.assertEqual(result.returncode, 0, result.stderr)
        again = result.stdout.decode().splitlines()[0]
        self.assertEqual(self.daemon.state("app", again), "ok")
        self.assertIn(b"app " + again.encode() + b" ok", self.client("info").stdout)
        self.assertEqual(self.client("list").stdout, b"app\n")
        result = self.client("logs", "-f", "app", again)
        self.assertEqual(result.stdout, b"start\n")
        self.assertEqual(result.returncode, 0)

    def test_progress_bar_only_on_a_terminal(self):
        import pty
        image = self.write("img", os.urandom(8 << 20))
        package = self.write("p.tgz", control_script(OK_SCRIPT))
        result = self.client("push", "--project", "app", "--image", image,
                             "--package", package)
        self.assertEqual(result.stderr, b"")
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        result = self.client("push", "--project", "app", "--image", image,
                             "--package", package, stderr=slave)
        os.close(slave)
        shown = b""
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            shown += data
        self.assertEqual(result.returncode, 0)
        self.assertIn(b"100%", shown)
        self.assertIn(b"MiB/s", shown)
        self.assertIn(b"left", shown)

    def test_push_of_1_gib_in_flat_client_memory(self):
        """The client's peak memory does not grow with the file: a 1 GiB push
        (96 MiB outside make soak) peaks where a 1 MiB one does."""
        package = self.write("p.tgz", control_script(OK_SCRIPT))
        size = soak(1 << 30, 96 << 20)
        small, small_id = self.push_peak_kib(1 << 20, package)
        large, large_id = self.push_peak_kib(size, package)
        report("push of %d MiB: client peak RSS %d KiB (%d KiB for 1 MiB)"
               % (size >> 20, large, small))
        self.assertLess(large - small, 16 * 1024)
        data = self.daemon.get_json("/status/app/" + large_id)[1]
        self.assertEqual(data["files"]["image"]["size"], size)

    def push_peak_kib(self, size, package):
        """Push a sparse image of size bytes with --wait; -> (the client's
        peak RSS in KiB, the deployment's id)."""
        image = os.path.join(self.tmp, "image-%d.img" % size)
        with open(image, "wb") as file:
            file.truncate(size)  # sparse: zeros, no disk
        code = ("import resource, sys; sys.argv[0] = %r; sys.path.insert(0, %r);"
                "import ipd; status = ipd.main(sys.argv[1:]);"
                "sys.stderr.write('maxrss %%d\\n' %% resource.getrusage("
                "resource.RUSAGE_SELF).ru_maxrss); sys.exit(status)" % (IPD, HERE))
        environ = dict(os.environ, IPD_URL="http://127.0.0.1:%d/deploy" % self.daemon.port,
                       IPD_USER="admin", IPD_PASSWORD="admin-pw")
        result = subprocess.run([sys.executable, "-c", code, "push", "--project", "app",
                                 "--image", image, "--package", package, "--wait"],
                                env=environ, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr[-500:])
        peak = int(re.search(rb"maxrss (\d+)", result.stderr).group(1))
        return peak, result.stdout.decode().splitlines()[0]


class ClientTimeoutTests(DaemonTestCase):
    """Issue #27: --timeout bounds a client's whole wait (push --wait, logs
    -f, status --wait), whatever the server keeps sending."""

    client = ClientTests.client
    write = ClientTests.write
    # deploy prints a line every 0.2 s for 60 s: a stream that never stalls
    CHATTY = ('[ "$1" = deploy ] || exit 1\n'
              'n=0; while [ $n -lt 300 ]; do echo "line $n"; sleep 0.2; '
              'n=$((n+1)); done\nexit 1\n')

    def assert_timed_out(self, result, started, limit):
        elapsed = time.monotonic() - started
        self.assertEqual(result.returncode, 9, result.stderr)
        self.assertIn(b"timed out waiting for deployment", result.stderr)
        self.assertLess(elapsed, limit + 8)  # the start of python, the upload

    def test_push_wait_ends_at_the_timeout_of_a_chatty_script(self):
        package = self.write("chatty.tgz", control_script(self.CHATTY))
        started = time.monotonic()
        result = self.client("push", "--project", "app", "--package", package,
                             "--wait", "--timeout", "2")
        self.assert_timed_out(result, started, 2)
        self.assertIn(b"line 1\n", result.stdout)  # it did follow the log

    def test_logs_follow_and_status_wait_end_at_the_timeout(self):
        deployment = self.daemon.deploy(self.CHATTY)
        self.daemon.wait_state("app", deployment, ("active",))
        started = time.monotonic()
        result = self.client("logs", "app", deployment, "-f", "--timeout", "2")
        self.assert_timed_out(result, started, 2)
        started = time.monotonic()
        result = self.client("status", "app", deployment, "--wait", "60",
                             "--timeout", "2")
        self.assert_timed_out(result, started, 2)
        self.assertEqual(self.daemon.state("app", deployment), "active")


class MistakeMessageTests(DaemonTestCase):
    """Issue #27: each mistake a new operator makes first is answered with
    what to do: a missing tokens folder, no tokens yet, a directory given
    as an image, control.sh without its exec bit or with Windows line
    ends, a wrong password."""

    client = ClientTests.client
    write = ClientTests.write

    def test_tokens_folder_missing_and_no_tokens_yet(self):
        config = self.write("ipd.conf", ("AUTH_DB=%s/opt/ipd/users.txt\n"
                                         % self.tmp).encode())
        tokens = os.path.join(self.tmp, "opt", "ipd", "tokens.txt")
        result = run_ipd("--config", config, "token", "create", "--project", "web")
        self.assertEqual((result.returncode, result.stdout), (2, ""))
        self.assertEqual(result.stderr, "ipd: cannot write the tokens file %s: its "
                         "folder %s does not exist (create it, or give --tokens-db "
                         "FILE or set TOKENS_DB)\n" % (tokens, os.path.dirname(tokens)))
        result = run_ipd("--config", config, "token", "list")
        self.assertEqual((result.returncode, result.stdout), (0, ""))
        self.assertEqual(result.stderr, "ipd: no tokens yet in %s: create one with "
                         "'ipd token create --project PROJECT'\n" % tokens)
        os.makedirs(os.path.dirname(tokens))
        result = run_ipd("--config", config, "token", "create", "--project", "web")
        self.assertEqual(result.returncode, 0, result.stderr)
        result = run_ipd("--config", config, "token", "list")
        self.assertEqual(result.returncode, 0)
        self.assertIn("projects=web", result.stdout)
        self.assertEqual(result.stderr, "")

    def test_a_directory_given_as_an_image(self):
        folder = os.path.join(self.tmp, "build")
        os.makedirs(folder)
        result = self.client("push", "--project", "app", "--image", folder)
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.decode(), "ipd: --image %s is a directory: give "
                         "the image's file, e.g. from docker save -o web.tar IMAGE "
                         "(a directory is packed for --package only)\n" % folder)

    def test_control_sh_without_exec_bit_or_with_crlf_is_refused_at_upload(self):
        for script, mode, reason in (
                (b"#!/bin/sh\nexit 1\n", 0o644,
                 "control.sh of the package is not an executable file: "
                 "chmod +x control.sh"),
                (b"#!/bin/sh\r\nexit 1\r\n", 0o755,
                 "control.sh of the package cannot run: its #! line ends in CR "
                 "(Windows line ends): convert it with dos2unix control.sh or "
                 "sed -i 's/\\r$//' control.sh")):
            with self.subTest(reason=reason):
                status, _, body = self.daemon.upload(
                    "app", tar_bytes({"control.sh": (script, mode)}))
                self.assertEqual((status, body.strip()), (400, reason))
        self.assertEqual(self.daemon.leftovers(), [])

    def test_the_step_log_names_the_fix(self):
        gate = os.path.join(self.tmp, "gate")
        first = self.daemon.deploy(gate_script(gate))
        self.daemon.wait_state("app", first, ("active",))
        waiting = self.daemon.deploy()
        self.assertEqual(self.daemon.state("app", waiting), "await")
        control = os.path.join(self.daemon.upload_dir, "app", "deployments",
                               waiting, "control.sh")
        os.chmod(control, 0o644)  # as if changed on the server after the upload
        open(gate, "w").close()
        self.assertEqual(self.daemon.wait_state("app", waiting), "126")
        self.assertIn("ipd: cannot run control.sh check: Permission denied; it is "
                      "not executable: chmod +x control.sh",
                      self.daemon.log("app", waiting))
        os.unlink(gate)
        first = self.daemon.deploy(gate_script(gate))
        self.daemon.wait_state("app", first, ("active",))
        crlf = self.daemon.deploy()
        control = os.path.join(self.daemon.upload_dir, "app", "deployments", crlf,
                               "control.sh")
        with open(control, "wb") as file:
            file.write(b"#!/bin/sh\r\nexit 1\r\n")
        open(gate, "w").close()
        self.assertEqual(self.daemon.wait_state("app", crlf), "127")
        self.assertIn("ipd: cannot run control.sh check: No such file or directory; "
                      "its #! line ends in CR (Windows line ends): convert it with "
                      "dos2unix control.sh", self.daemon.log("app", crlf))

    def test_a_wrong_password_is_answered_as_one(self):
        package = self.write("p.tgz", control_script(OK_SCRIPT))
        for env in ({"IPD_PASSWORD": "wrong"},
                    {"IPD_USER": "nobody", "IPD_PASSWORD": "admin-pw"}):
            with self.subTest(env=env):
                result = self.client("push", "--project", "app", "--package",
                                     package, env=env)
                self.assertEqual(result.returncode, 4)
                self.assertEqual(result.stderr, b"ipd: HTTP 401: wrong user name or "
                                 b"password\n")
        result = self.client("push", "--project", "app", "--package", package,
                             env={"IPD_PASSWORD": "ipd_0123456789ab_nothing"})
        self.assertEqual(result.stderr, b"ipd: HTTP 401: deploy token refused: "
                         b"unknown, expired or revoked\n")
        status, _, body = self.daemon.get("/stat", user=None)
        self.assertEqual((status, body.strip()), (401, "authentication required"))


###############################################################################
# Command line ################################################################
###############################################################################

class CommandLineTests(unittest.TestCase):

    def test_version(self):
        result = subprocess.run([sys.executable, IPD, "version"], stdout=subprocess.PIPE,
                                universal_newlines=True)
        self.assertEqual(result.stdout.strip(), "ipd " + ipd.__version__)

    def test_main_returns_a_status(self):
        self.assertEqual(ipd.main(["version"]), 0)
        self.assertEqual(ipd.main(["--config", "/nonexistent/ipd.conf", "serve"]), 2)

    def test_import_opens_nothing(self):
        result = subprocess.run([sys.executable, "-c", "import ipd, threading; "
                                 "print(threading.active_count())"], cwd=HERE,
                                stdout=subprocess.PIPE, universal_newlines=True)
        self.assertEqual(result.stdout.strip(), "1")

    def test_demo_command_serves_the_readme_curl_line(self):
        tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.addCleanup(kill_processes_in, tmp)
        stderr_path = os.path.join(tmp, "stderr")
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen([sys.executable, IPD, "demo", "--listen",
                                        "127.0.0.1:0"], cwd=tmp, stderr=stderr,
                                       stdout=subprocess.DEVNULL)
        self.addCleanup(process.kill)
        deadline = time.monotonic() + 20
        while "try:" not in read_text(stderr_path):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        port = int(re.search(r":(\d+)/deploy/", read_text(stderr_path)).group(1))
        content_type, body = multipart([("project", "hello"),
                                        ("image", ("ipd.py", read_bytes(IPD)))])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.addCleanup(connection.close)
        token = base64.b64encode(b"demo:demo").decode()
        connection.request("POST", "/deploy/upload", body=body, headers={
            "Authorization": "Basic " + token, "Content-Type": content_type})
        response = connection.getresponse()
        deployment = response.read().decode().strip()
        self.assertEqual(response.status, 202)
        deadline = time.monotonic() + 20
        while True:
            connection.request("GET", "/deploy/status/hello/" + deployment,
                               headers={"Authorization": "Basic " + token})
            state = connection.getresponse().read().decode().strip()
            if state not in ("await", "active"):
                break
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        self.assertEqual(state, "ok")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(20), 0)


class CommandLineOptionTests(unittest.TestCase):
    """Issue #15: --config anywhere, --version, passwd's checks, help for
    every command and option, the exit statuses in --help."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)

    def test_config_before_or_after_the_command(self):
        config = os.path.join(self.tmp, "ipd.conf")
        missing = os.path.join(self.tmp, "from-the-config")
        with open(config, "w") as file:
            file.write("UPLOAD_DIR=%s\nLOG_DIR=%s\nLISTEN=127.0.0.1:0\n"
                       % (missing, self.tmp))
        for args in (["--config", config, "serve"], ["serve", "--config", config]):
            with self.subTest(args=args):
                result = run_ipd(*args)
                self.assertEqual(result.returncode, 2)
                self.assertIn("UPLOAD_DIR=%s: no such folder" % missing, result.stderr)
        parser = ipd.build_parser()
        for args in (["passwd", "USER", "x", "--config", "f"],
                     ["--config", "f", "passwd", "USER", "x"]):
            self.assertEqual(parser.parse_args(args).config, "f")
        self.assertIsNone(parser.parse_args(["passwd", "USER", "x"]).config)

    def test_version_option(self):
        result = run_ipd("--version")
        self.assertEqual((result.returncode, result.stdout),
                         (0, "ipd %s\n" % ipd.__version__))

    def test_passwd_projects_only_for_user(self):
        users = os.path.join(self.tmp, "users.txt")
        for role in ("ADMIN", "METRICS"):
            with self.subTest(role=role):
                result = run_ipd("--config", os.devnull, "passwd", role, "x",
                                 "--projects", "web", "--auth-db", users,
                                 stdin_text="pw\n")
                self.assertEqual(result.returncode, 2)
                self.assertEqual(result.stderr, "ipd: --projects is for USER only: an "
                                 "ADMIN may use every project, a METRICS user reads "
                                 "only /metrics\n")
                self.assertFalse(os.path.exists(users))
        result = run_ipd("--config", os.devnull, "passwd", "USER", "ci", "--projects",
                         "web", "--auth-db", users, stdin_text="pw\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(read_text(users), r"\AUSER:ci:pbkdf2_sha256\$[^:]+:web\n\Z")

    def test_passwd_file_modes_and_a_missing_folder(self):
        users = os.path.join(self.tmp, "users.txt")
        old_umask = os.umask(0o022)
        self.addCleanup(os.umask, old_umask)
        result = run_ipd("--config", os.devnull, "passwd", "ADMIN", "a", "--auth-db",
                         users, stdin_text="pw\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(stat.S_IMODE(os.stat(users).st_mode), 0o640)
        os.chmod(users, 0o644)  # as `touch` under umask 022 makes it
        result = run_ipd("--config", os.devnull, "passwd", "ADMIN", "b", "--auth-db",
                         users, stdin_text="pw\n")
        self.assertEqual(stat.S_IMODE(os.stat(users).st_mode), 0o640)
        self.assertIn("ipd: %s was readable by others (mode 0644), now 0640" % users,
                      result.stderr)
        nowhere = os.path.join(self.tmp, "no", "users.txt")
        result = run_ipd("--config", os.devnull, "passwd", "ADMIN", "a", "--auth-db",
                         nowhere, stdin_text="pw\n")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr, "ipd: cannot write the users file %s: its "
                         "folder %s does not exist (create it, or give --auth-db "
                         "FILE)\n" % (nowhere, os.path.dirname(nowhere)))

    def test_every_command_and_option_has_help(self):
        parser = ipd.build_parser()
        commands = next(action for action in parser._actions
                        if isinstance(action, argparse._SubParsersAction))
        self.assertEqual(sorted(commands.choices), sorted(
            ["serve", "demo", "passwd", "token", "version", "settings", "push", "status",
             "logs", "list", "info", "cancel", "redeploy"]))
        for name, command in [("ipd", parser)] + sorted(commands.choices.items()):
            with self.subTest(command=name):
                self.assertTrue(command.description)
                for action in command._actions:
                    if not isinstance(action, (argparse._HelpAction,
                                               argparse._SubParsersAction)):
                        self.assertTrue(action.help, "%s %s" % (name, action.dest))
        for choice in commands._choices_actions:
            self.assertTrue(choice.help, choice.dest)

    def test_help_lists_the_exit_statuses(self):
        readme = " ".join(read_text(os.path.join(HERE, "README.md"))
                          .replace("`", "").split())
        for args in (["--help"], ["push", "--help"]):
            with self.subTest(args=args):
                text = " ".join(run_ipd(*args).stdout.split())
                for status, meaning in ((0, "ok"), (3, "network error"),
                                        (4, "wrong login (401)"), (7, "disk full (507)"),
                                        (9, "--timeout passed")):
                    self.assertIn("%d %s" % (status, meaning), text)
                    self.assertTrue("%d %s" % (status, meaning) in readme, meaning)
        self.assertEqual(ipd.EXIT_FOR_STATUS, {401: 4, 403: 5, 413: 6, 507: 7})
        self.assertEqual((ipd.EXIT_NETWORK, ipd.EXIT_TIMEOUT), (3, 9))


###############################################################################
# Installation and packages ###################################################
###############################################################################

class InstallTests(unittest.TestCase):

    def test_each_setting_is_described_once_in_the_settings_table(self):
        # README's table and ipd.conf.example are what ipd.py settings makes
        readme = read_text(os.path.join(HERE, "README.md"))
        table = readme.split("python3 ipd.py settings --markdown -->\n", 1)[1]
        self.assertEqual(table.split("<!-- end of the table -->", 1)[0],
                         ipd.settings_markdown())
        self.assertEqual(read_text(os.path.join(HERE, "ipd.conf.example")),
                         ipd.settings_conf())
        printed = subprocess.run([sys.executable, IPD, "settings"], check=True,
                                 stdout=subprocess.PIPE, universal_newlines=True)
        self.assertEqual(printed.stdout, ipd.settings_conf())
        for key, entry in ipd.SETTINGS.items():  # every default parses
            with self.subTest(key):
                ipd.parse_setting(entry.kind, entry.default)
                self.assertTrue(entry.text)

    def test_every_setting_is_documented(self):
        example = read_text(os.path.join(HERE, "ipd.conf.example"))
        readme = read_text(os.path.join(HERE, "README.md"))
        for key in ipd.SETTINGS:
            with self.subTest(key):
                self.assertRegex(example, r"(?m)^%s=" % key)
                self.assertIn("| `%s` |" % key, readme)
        settings = ipd.load_settings(os.path.join(HERE, "ipd.conf.example"),
                                     environ={})
        self.assertEqual(settings.LISTEN, ("127.0.0.1", 9955))

    @unittest.skipUnless(shutil.which("make"), "needs make")
    def test_make_install_into_destdir_then_run_the_installed_copy(self):
        stage = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, stage, True)
        result = subprocess.run(["make", "-s", "install", "DESTDIR=" + stage,
                                 "PREFIX=/usr"], cwd=HERE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True)
        self.assertEqual(result.returncode, 0, result.stdout)
        unit = read_text(os.path.join(stage, "etc/systemd/system/ipd.service"))
        self.assertIn("ExecStart=/usr/bin/python3 /usr/lib/ipd/ipd.py serve", unit)
        self.assertIn("EnvironmentFile=-/etc/ipd.conf", unit)
        self.assertIn("SupplementaryGroups=docker", unit)
        for path in ("etc/ipd.conf", "opt/ipd/users.txt", "srv/upload", "var/log/ipd"):
            self.assertTrue(os.path.exists(os.path.join(stage, path)), path)
        # the installed program with the installed config, paths moved
        # into the stage by the environment, which wins over the file
        with open(os.path.join(stage, "opt/ipd/users.txt"), "a") as file:
            file.write("ADMIN:admin:%s\n" % sha256_hex("admin-pw"))
        env = {"UPLOAD_DIR": stage + "/srv/upload", "LOG_DIR": stage + "/var/log/ipd",
               "AUTH_DB": stage + "/opt/ipd/users.txt", "LISTEN": "127.0.0.1:0"}
        daemon = DaemonProcess(stage, program=os.path.join(stage, "usr/lib/ipd/ipd.py"))
        daemon.config = os.path.join(stage, "etc/ipd.conf")
        daemon.upload_dir = env["UPLOAD_DIR"]
        daemon.start(env)
        self.addCleanup(daemon.stop, signal.SIGKILL)
        deployment = daemon.deploy()
        self.assertEqual(daemon.wait_state("app", deployment), "ok")
        # again: config and users file are kept; uninstall keeps the data
        with open(os.path.join(stage, "etc/ipd.conf"), "a") as file:
            file.write("# mine\n")
        subprocess.run(["make", "-s", "install", "DESTDIR=" + stage, "PREFIX=/usr"],
                       cwd=HERE, check=True, stdout=subprocess.DEVNULL)
        self.assertIn("# mine", read_text(os.path.join(stage, "etc/ipd.conf")))
        self.assertIn("ADMIN:admin:", read_text(os.path.join(stage, "opt/ipd/users.txt")))
        subprocess.run(["make", "-s", "uninstall", "DESTDIR=" + stage, "PREFIX=/usr"],
                       cwd=HERE, check=True, stdout=subprocess.DEVNULL)
        self.assertFalse(os.path.exists(os.path.join(stage, "usr/lib/ipd")))
        self.assertFalse(os.path.exists(os.path.join(stage, "etc/systemd/system/ipd.service")))
        self.assertTrue(os.path.exists(os.path.join(stage, "srv/upload/app/deployments",
                                                    deployment + ".json")))


class InstallCommandTests(unittest.TestCase):
    """Issue #27: `make install` puts `ipd` on PATH, as the .deb does."""

    @unittest.skipUnless(shutil.which("make"), "needs make")
    def test_make_install_links_ipd_into_prefix_bin(self):
        stage = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, stage, True)
        make = ["make", "-s", "DESTDIR=" + stage, "PREFIX=/usr"]
        subprocess.run(make + ["install"], cwd=HERE, check=True,
                       stdout=subprocess.DEVNULL)
        command = os.path.join(stage, "usr/bin/ipd")
        self.assertEqual(os.readlink(command), "../lib/ipd/ipd.py")
        result = subprocess.run([command, "--version"], stdout=subprocess.PIPE,
                                universal_newlines=True)
        self.assertEqual(result.stdout, "ipd %s\n" % ipd.__version__)
        subprocess.run(make + ["uninstall"], cwd=HERE, check=True,
                       stdout=subprocess.DEVNULL)
        self.assertFalse(os.path.lexists(command))
        os.symlink("/opt/other/ipd", command)  # another's ipd: left alone
        subprocess.run(make + ["uninstall"], cwd=HERE, check=True,
                       stdout=subprocess.DEVNULL)
        self.assertEqual(os.readlink(command), "/opt/other/ipd")


class WheelTests(unittest.TestCase):
    system = True  # the same on every Python: once per CI run

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)

    def test_wheel_in_a_fresh_virtualenv_deploys(self):
        wheel = build("wheel", os.path.join(self.tmp, "dist"))
        self.assertEqual(os.path.basename(wheel),
                         "ipd-%s-py3-none-any.whl" % ipd.__version__)
        with zipfile.ZipFile(wheel) as zipped:
            names = sorted(zipped.namelist())
            self.assertIn("ipd.py", names)
            self.assertEqual([n for n in names if not n.startswith("ipd-")], ["ipd.py"])
            record = zipped.read("ipd-%s.dist-info/RECORD" % ipd.__version__).decode()
            self.assertIn("ipd.py,sha256=", record)
            self.assertEqual(zipped.read("ipd.py"), read_bytes(IPD))
        bin_dir = make_venv(os.path.join(self.tmp, "venv"))
        pip_install(bin_dir, wheel)
        result = subprocess.run([os.path.join(bin_dir, "ipd"), "version"],
                                stdout=subprocess.PIPE)
        self.assertEqual(result.stdout.decode().strip(), "ipd " + ipd.__version__)
        daemon = DaemonProcess(os.path.join(self.tmp, "run"),
                               program=os.path.join(bin_dir, "ipd"))
        daemon.start()
        self.addCleanup(daemon.stop, signal.SIGKILL)
        self.assertEqual(daemon.wait_state("app", daemon.deploy()), "ok")

    def test_editable_install_and_sdist(self):
        bin_dir = make_venv(os.path.join(self.tmp, "venv"))
        pip_install(bin_dir, "-e", HERE)
        result = subprocess.run([os.path.join(bin_dir, "python"), "-c",
                                 "import ipd; print(ipd.__file__)"],
                                stdout=subprocess.PIPE, cwd=self.tmp)
        self.assertEqual(os.path.realpath(result.stdout.decode().strip()),
                         os.path.realpath(IPD))
        sdist = build("sdist", os.path.join(self.tmp, "dist"))
        with tarfile.open(sdist) as tar:
            names = tar.getnames()
        base = "ipd-%s/" % ipd.__version__
        for name in ("ipd.py", "pyproject.toml", "tools/wheel_backend.py", "PKG-INFO"):
            self.assertIn(base + name, names)

    def test_pyproject_names_what_the_backend_builds(self):
        text = read_text(os.path.join(HERE, "pyproject.toml"))
        self.assertIn('build-backend = "wheel_backend"', text)
        self.assertIn('ipd = "ipd:main"', text)
        self.assertIn('dynamic = ["version"]', text)
        self.assertNotIn("__version__", text.split("dynamic")[0])


@unittest.skipUnless(shutil.which("dpkg-deb"), "needs dpkg-deb (Debian)")
class DebTests(unittest.TestCase):
    system = True  # the same on every Python: once per CI run

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        result = subprocess.run(["make", "-s", "deb", "DIST=" + self.tmp], cwd=HERE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.assertEqual(result.returncode, 0, result.stdout)
        self.deb = os.path.join(self.tmp, "ipd_%s_all.deb" % ipd.__version__)

    def dpkg_deb(self, *args):
        return subprocess.run(["dpkg-deb"] + list(args), stdout=subprocess.PIPE,
                              check=True).stdout.decode()

    def test_contents_and_maintainer_scripts(self):
        info = self.dpkg_deb("-I", self.deb)
        for line in ("Package: ipd", "Version: " + ipd.__version__,
                     "Architecture: all", "Depends: python3 (>= 3.8)"):
            self.assertIn(line, info)
        self.assertEqual(self.dpkg_deb("-f", self.deb, "Package").strip(), "ipd")
        contents = self.dpkg_deb("-c", self.deb)
        for path in ("./usr/lib/ipd/ipd.py", "./usr/bin/ipd -> ../lib/ipd/ipd.py",
                     "./lib/systemd/system/ipd.service", "./etc/ipd.conf"):
            self.assertIn(path, contents)
        control = os.path.join(self.tmp, "control")
        self.dpkg_deb("-e", self.deb, control)
        self.assertEqual(read_text(os.path.join(control, "conffiles")), "/etc/ipd.conf\n")
        for script in ("postinst", "prerm", "postrm"):
            path = os.path.join(control, script)
            self.assertTrue(os.access(path, os.X_OK))
            subprocess.run(["sh", "-n", path], check=True)
        postinst = read_text(os.path.join(control, "postinst"))
        self.assertIn("useradd --system", postinst)
        self.assertIn("usermod -a -G docker ipd", postinst)
        self.assertIn("systemctl enable ipd.service", postinst)

    def test_install_into_a_scratch_root_and_run(self):
        root = os.path.join(self.tmp, "root")
        self.dpkg_deb("-x", self.deb, root)
        control = os.path.join(self.tmp, "control")
        self.dpkg_deb("-e", self.deb, control)
        environ = dict(os.environ, DPKG_ROOT=root)
        subprocess.run([os.path.join(control, "postinst"), "configure"], env=environ,
                       check=True)
        for path in ("srv/upload", "var/log/ipd", "opt/ipd/users.txt"):
            self.assertTrue(os.path.exists(os.path.join(root, path)), path)
        unit = read_text(os.path.join(root, "lib/systemd/system/ipd.service"))
        self.assertIn("ExecStart=/usr/bin/ipd serve", unit)
        self.assertIn("Type=notify", unit)
        self.assertEqual(os.path.realpath(os.path.join(root, "usr/bin/ipd")),
                         os.path.join(os.path.realpath(root), "usr/lib/ipd/ipd.py"))
        with open(os.path.join(root, "opt/ipd/users.txt"), "a") as file:
            file.write("ADMIN:admin:%s\n" % sha256_hex("admin-pw"))
        daemon = DaemonProcess(self.tmp, program=os.path.join(root, "usr/bin/ipd"))
        daemon.config = os.path.join(root, "etc/ipd.conf")
        daemon.upload_dir = os.path.join(root, "srv/upload")
        daemon.start(env={"UPLOAD_DIR": daemon.upload_dir, "LISTEN": "127.0.0.1:0",
                          "LOG_DIR": os.path.join(root, "var/log/ipd"),
                          "AUTH_DB": os.path.join(root, "opt/ipd/users.txt")})
        self.addCleanup(daemon.stop, signal.SIGKILL)
        deployment = daemon.deploy()
        self.assertEqual(daemon.wait_state("app", deployment), "ok")
        daemon.stop()
        subprocess.run([os.path.join(control, "postrm"), "remove"], env=environ, check=True)
        self.assertTrue(os.path.exists(os.path.join(root, "srv/upload/app")))
        subprocess.run([os.path.join(control, "postrm"), "purge"], env=environ, check=True)
        self.assertFalse(os.path.exists(os.path.join(root, "srv/upload")))
        self.assertFalse(os.path.exists(os.path.join(root, "opt/ipd/users.txt")))


class DebExamplesTests(unittest.TestCase):
    """Issue #27: the .deb ships examples/, which the README tells to copy."""
    system = True  # the same on every Python: once per CI run

    @unittest.skipUnless(shutil.which("dpkg-deb"), "needs dpkg-deb")
    def test_the_deb_has_the_examples_with_their_modes(self):
        tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, tmp, True)
        result = subprocess.run(["make", "-s", "deb", "DIST=" + tmp], cwd=HERE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.assertEqual(result.returncode, 0, result.stdout)
        root = os.path.join(tmp, "root")
        subprocess.run(["dpkg-deb", "-x", os.path.join(
            tmp, "ipd_%s_all.deb" % ipd.__version__), root], check=True)
        examples = os.path.join(root, "usr/share/doc/ipd/examples")
        for name in ("docker/control.sh", "swarm/control.sh", "docker/app/Dockerfile",
                     "docker/app/app.py"):
            with self.subTest(name=name):
                self.assertEqual(read_bytes(os.path.join(examples, name)),
                                 read_bytes(os.path.join(HERE, "examples", name)))
        for name in ("docker/control.sh", "swarm/control.sh"):
            self.assertTrue(os.access(os.path.join(examples, name), os.X_OK))
        self.assertIn("/usr/share/doc/ipd/examples/docker/control.sh",
                      read_text(os.path.join(HERE, "README.md")))
        for name in DOC_FILES[1:4]:  # docs/, which the README links to, beside it
            self.assertEqual(read_bytes(os.path.join(root, "usr/share/doc/ipd", name)),
                             read_bytes(os.path.join(HERE, name)))


###############################################################################
# The examples: Docker and Swarm ##############################################
###############################################################################

class ExampleAppTests(unittest.TestCase):

    def test_example_app_answers_version_and_health(self):
        process = subprocess.Popen([sys.executable, os.path.join(
            HERE, "examples/docker/app/app.py")], env=dict(os.environ, PORT="0",
                                                           VERSION="v7"),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True)
        self.addCleanup(process.stdout.close)
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        port = int(process.stdout.readline().split()[-1])
        for path, body in (("/", "hello from v7\n"), ("/health", "ok\n")):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", path)
            response = connection.getresponse()
            self.assertEqual((response.status, response.read().decode()), (200, body))
            connection.close()


class ExampleSettingsTests(unittest.TestCase):
    """Issue #27: both examples' prepare fill in every setting a deploy.env
    lacks with its default and keep the ones it has.  control.sh runs for
    real; `docker` is a script that answers yes to every question (only
    deploy.env is under test here: the Docker test classes deploy)."""

    SCRIPTS = ("examples/docker/control.sh", "examples/swarm/control.sh")

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        tools = os.path.join(self.tmp, "bin")
        os.makedirs(tools)
        with open(os.path.join(tools, "docker"), "w") as file:
            file.write("#!/bin/sh\nexit 0\n")
        os.chmod(os.path.join(tools, "docker"), 0o755)
        self.path = tools + os.pathsep + os.environ.get("PATH", os.defpath)

    def run_step(self, script, step, project_dir):
        return subprocess.run(
            ["sh", os.path.join(HERE, script), step], cwd=self.tmp,
            env={"PATH": self.path, "PROJECT": "web", "DEPLOY": "d1", "IMAGE": "",
                 "PROJECT_DIR": project_dir}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)

    def settings(self, path):
        """{name: value} of a deploy.env, each name counted once."""
        names = re.findall(r"(?m)^([A-Z_][A-Z0-9_]*)=(.*)$", read_text(path))
        self.assertEqual(len(names), len(dict(names)), names)
        return dict(names)

    def test_prepare_fills_in_every_missing_setting(self):
        for script in self.SCRIPTS:
            with self.subTest(script=script):
                fresh = os.path.join(self.tmp, script.split("/")[1], "fresh")
                os.makedirs(fresh)
                self.assertEqual(self.run_step(script, "prepare", fresh).returncode, 1)
                defaults = self.settings(os.path.join(fresh, "deploy.env"))
                given = os.path.join(self.tmp, script.split("/")[1], "given")
                os.makedirs(given)
                env = os.path.join(given, "deploy.env")
                with open(env, "w") as file:  # no last newline; the last default given
                    file.write("# mine\nNGINX_LISTEN=8081\nRELOAD_TIMEOUT=30\n"
                               "NGINX_SERVER_NAME=web.example")
                check = self.run_step(script, "check", given)
                self.assertEqual(check.returncode, 0, check.stdout)
                self.assertIn("APP_PORT", check.stdout)
                result = self.run_step(script, "prepare", given)
                self.assertEqual(result.returncode, 1, result.stdout)
                self.assertIn("added to %s: APP_PORT" % env, result.stdout)
                settings = self.settings(env)
                self.assertEqual(sorted(settings), sorted(defaults))
                self.assertEqual((settings["NGINX_LISTEN"], settings["NGINX_SERVER_NAME"]),
                                 ("8081", "web.example"))
                self.assertTrue(read_text(env).startswith("# mine\n"))
                self.assertRegex(settings["PORT_BASE"], r"\A2\d{4}\Z")
                for name, value in settings.items():
                    if name not in ("PORT_BASE", "NGINX_LISTEN", "NGINX_SERVER_NAME",
                                    "NGINX_CONF"):
                        self.assertEqual(value, defaults[name], name)
                self.assertEqual(settings["NGINX_CONF"],
                                 defaults["NGINX_CONF"].replace(fresh, given))
                self.assertEqual(self.run_step(script, "check", given).returncode, 1)
                again = self.run_step(script, "prepare", given)  # nothing more to add
                self.assertNotIn("added to", again.stdout)
                self.assertEqual(self.settings(env), settings)
        swarm = self.settings(os.path.join(self.tmp, "swarm", "given", "deploy.env"))
        self.assertNotIn("unknown setting", check.stdout)
        for name in ("APP_PORT", "REPLICAS", "REGISTRY", "SERVICE_OPTS"):
            self.assertIn(name, swarm)
        readme = read_text(os.path.join(HERE, "examples", "docker", "README.md"))
        docker = self.settings(os.path.join(self.tmp, "docker", "given", "deploy.env"))
        table = readme[readme.index("Settings in `$PROJECT_DIR/deploy.env`"):]
        table = table[:table.index("Exit codes")]
        self.assertEqual(sorted(re.findall(r"(?m)^\| `([A-Z_]+)` \|", table)),
                         sorted(docker))

    def test_a_name_no_setting_has_is_a_warning(self):
        for script in self.SCRIPTS:
            with self.subTest(script=script):
                project_dir = os.path.join(self.tmp, script.split("/")[1])
                os.makedirs(project_dir)
                env = os.path.join(project_dir, "deploy.env")
                with open(env, "w") as file:
                    file.write("NGINX_LISTN=8081\nexport APP_PORT=8000\nMY_OWN=1\n")
                result = self.run_step(script, "prepare", project_dir)
                self.assertEqual(result.returncode, 1, result.stdout)
                check = self.run_step(script, "check", project_dir)
                self.assertEqual(check.returncode, 1, check.stdout)
                self.assertEqual(check.stdout.splitlines()[0], "[web] warning: %s: unknown "
                                 "setting NGINX_LISTN (did you mean NGINX_LISTEN?)" % env)
                self.assertEqual(check.stdout.splitlines()[1], "[web] warning: %s: unknown "
                                 "setting MY_OWN (see the README)" % env)
                self.assertNotIn("APP_PORT", check.stdout)
                self.assertEqual(read_text(env).count("APP_PORT="), 1)


class DockerExampleTests(DockerTestCase):
    script = "examples/docker/control.sh"

    def setUp(self):
        super().setUp()
        self.addCleanup(self.remove_containers)
        self.write_settings(DOCKER_EXAMPLE_SETTINGS)

    def remove_containers(self):
        ids = docker("ps", "-aq", "--filter", "label=ipd.project=" + self.project).split()
        if ids:
            docker("rm", "-f", *ids, check=False)
        docker("network", "rm", "ipd-" + self.project, check=False)
        images = docker("image", "ls", "-q", "ipd-" + self.project).split()
        if images:
            docker("rmi", "-f", *set(images), check=False)

    def test_v1_then_v2_without_a_failed_request_then_broken_v3(self):
        v1, v2, v3 = self.image("v1"), self.image("v2"), self.image("v3", healthy=False)
        log = self.deploy(v1)
        self.assertIn("prepared", log)
        self.assertEqual(self.app(), (200, "v1"))

        answers, failures = [], []
        stop = threading.Event()

        def client():
            while not stop.is_set():
                try:
                    answers.append((time.monotonic(), self.app()))
                except OSError as error:
                    failures.append(repr(error))
        thread = threading.Thread(target=client)
        thread.start()
        try:
            log = self.deploy(v2)
            deployed = time.monotonic()
            time.sleep(1.5)
        finally:
            stop.set()
            thread.join()
        self.assertNotIn("prepared", log)  # check passed: no prepare
        counts = {}
        for _, answer in answers:
            counts[answer] = counts.get(answer, 0) + 1
        self.assertEqual(failures[:3], [])
        self.assertEqual(set(counts), {(200, "v1"), (200, "v2")}, counts)
        self.assertGreater(len(answers), 50)
        after = {answer for when, answer in answers if when > deployed}
        self.assertEqual(after, {(200, "v2")})
        containers = docker("ps", "-q", "--filter", "label=ipd.project=" + self.project)
        self.assertEqual(len(containers.split()), 1)

        log = self.deploy(v3, expect="10")
        self.assertIn("not healthy", log)
        self.assertIn("previous version keeps serving", log)
        self.assertEqual(self.app(), (200, "v2"))
        tags = docker("image", "ls", "--format", "{{.Tag}}", "ipd-" + self.project).split()
        self.assertIn("current", tags)
        self.assertIn("previous", tags)


class DockerExampleScriptsUserTests(DockerExampleTests, ScriptsUserDocker):
    """Issue 14: examples/docker/control.sh deploys v1, v2, refuses v3,
    running as its own user in the docker group."""


class DockerOperatorTests(DockerExampleTests):
    """examples/docker/control.sh over weeks: crashes and restarts, many
    builds, the disk (issue #17)."""

    test_v1_then_v2_without_a_failed_request_then_broken_v3 = None  # run once, above

    def settings(self, keep=2):
        # busybox httpd as PID 1 ignores SIGTERM: no need to wait for it.
        self.write_settings("""
            APP_PORT=8080
            HEALTH_PATH=/health
            HEALTH_TIMEOUT=8
            DRAIN_SECONDS=1
            STOP_TIMEOUT=0
            KEEP_IMAGES=%d
            DOCKER_RUN_OPTS=
            """ % keep)

    def proxy_config(self):
        with open(os.path.join(self.daemon.upload_dir, self.project, "nginx.conf")) as file:
            return file.read()

    def test_ten_builds_switch_without_a_failed_request_and_leave_two_images(self):
        self.settings(keep=2)
        builds = [self.image("build-%d" % number) for number in range(10)]
        broken = self.image("broken", healthy=False)
        self.deploy(builds[0])
        with RequestLoop(self.app) as loop:
            for number, build in enumerate(builds[1:], 1):
                if number == 5:
                    self.assertIn("not healthy", self.deploy(broken, expect="10"))
                self.deploy(build)
            done = time.monotonic()
            time.sleep(0.5)
        self.assertEqual(loop.failures(), [])
        self.assertGreater(len(loop.answers), 100)
        self.assertEqual({answer for when, answer in loop.answers if when > done},
                         {(200, "build-9")})
        # Of the eleven images uploaded, the last two builds are left, under
        # the project's names only; no stopped container.
        left = [path for path in builds + [broken] if image_exists(image_id(path))]
        self.assertEqual(left, builds[-2:])
        self.assertEqual(docker("image", "ls", "-q", "ipd-test-" + self.project), "")
        tags = docker("image", "ls", "--format", "{{.Tag}}", "ipd-" + self.project).split()
        self.assertEqual(sorted(tags), sorted(["current", "previous"] + self.deployments[-2:]))
        containers = docker("ps", "-aq", "--filter", "label=ipd.project=" + self.project)
        self.assertEqual(len(containers.split()), 1)

    def test_a_crash_and_a_restart_are_served_again_without_a_deploy(self):
        self.settings()
        self.deploy(self.image("v1"))
        config = self.proxy_config()
        container = docker("ps", "-q", "--filter", "label=ipd.project=" + self.project).strip()
        port = docker("port", container, "8080/tcp")
        with RequestLoop(self.app) as loop:
            loop.wait_for((200, "v1"), 0)
            crashed = time.monotonic()
            crash(container)  # the restart policy brings it back
            back = loop.wait_for((200, "v1"), crashed + 0.2)
            restarts = docker("inspect", "-f", "{{.RestartCount}}", container).strip()
            restarted = time.monotonic()
            docker("restart", "-t", "0", container)  # stop and start by the engine
            back_again = loop.wait_for((200, "v1"), restarted + 0.2)
            time.sleep(1)
        self.assertLess(back - crashed, 5)
        self.assertLess(back_again - restarted, 5)
        late = [failure for failure in loop.failures()
                if not crashed <= failure[0] <= back and not restarted <= failure[0] <= back_again]
        self.assertEqual(late, [])
        self.assertEqual(restarts, "1")  # the same container, by its restart policy
        self.assertEqual(docker("port", container, "8080/tcp"), port)
        self.assertTrue(port.startswith("127.0.0.1:"), port)
        self.assertEqual(self.proxy_config(), config)
        self.assertEqual(len(self.deployments), 1)


class DockerVerifyTests(DockerExampleTests):
    """Issue 25: examples/docker/control.sh verify behind a real nginx, and
    ipd's rollback: a release that breaks after the switch undoes itself."""

    test_v1_then_v2_without_a_failed_request_then_broken_v3 = None  # run once, above

    WINDOW = 20  # VERIFY_SECONDS
    HEALTH_TIMEOUT = 8  # the example's health-check time (DockerExampleTests)

    def verify_on(self):
        """VERIFY_SECONDS for this project only, as an administrator sets it."""
        path = os.path.join(self.daemon.upload_dir, self.project, "project.conf")
        with open(path, "w") as file:
            file.write("VERIFY_SECONDS=%d\n" % self.WINDOW)
        os.chmod(path, 0o644)

    def record(self, deployment):
        return self.daemon.get_json("/status/%s/%s" % (self.project, deployment))[1]

    def crashing_image(self, version):
        """Healthy at first; its server exits 5 s after the start (the
        restart policy brings it back: a crash loop)."""
        return busybox_image("ipd-test-%s:%s" % (self.project, version), self.tmp,
                             version, command=("/bin/sh", "-c", "/bin/busybox httpd -p "
                                               "8080 -h /www; sleep 5; exit 1"))

    def failing_image(self, version):
        """The health path answers 200, / a 500 (a CGI, served from a
        folder of its own: no index.html)."""
        cgi = (b'#!/bin/sh\nprintf "HTTP/1.0 500 Internal Server Error\\r\\n'
               b'Content-Type: text/plain\\r\\n\\r\\nbroken\\n"\n')
        return busybox_image("ipd-test-%s:%s" % (self.project, version), self.tmp,
                             version, extra=[("broken/cgi-bin/index.cgi", cgi, 0o755),
                                             ("broken/health", b"ok\n", 0o644)],
                             command=("/bin/busybox", "httpd", "-f", "-p", "8080",
                                      "-h", "/broken"))

    def test_a_crash_loop_and_5xx_after_the_switch_are_rolled_back(self):
        v1, v2 = self.image("v1"), self.crashing_image("v2")
        v3, v4 = self.image("v3"), self.failing_image("v4")
        self.deploy(v1)  # before VERIFY_SECONDS: ok at once
        self.verify_on()
        with RequestLoop(self.app) as loop:
            log = self.deploy(v2, expect="reverted")
            self.assertIn("restarted or stopped", log)
            reverted = self.deployments[-1]
            rollback = self.record(reverted)["rollback"]
            self.assertIn("rolled back: deployment %s redeploys %s"
                          % (rollback, self.deployments[0]), log)
            # v1 serves again, and the test asked nothing of ipd for it
            v2_served = loop.wait_for((200, "v2"), 0)
            wait_until(loop.failures, message="v2's crash seen through nginx")
            loop.wait_for((200, "v1"), loop.failures()[0][0], timeout=60)
            time.sleep(1)
        # the switch back: where the answers became v1 and stayed so
        back = [when for when, answer in loop.answers if answer != (200, "v1")][-1]
        switched = min(when for when, answer in loop.answers if when > back)
        failures = loop.failures()
        first, last = failures[0][0], failures[-1][0]
        report("verify: v2 crashed and failed requests through nginx for %.1f s "
               "(%d failed) until the rollback's switch to v1 (window %d s + "
               "health check %d s)" % (switched - first, len(failures), self.WINDOW,
                                       self.HEALTH_TIMEOUT))
        self.assertGreater(first, v2_served)  # none while v2 was switched in
        self.assertLess(last, switched)       # none after v1 was back
        self.assertLess(switched - first, self.WINDOW + self.HEALTH_TIMEOUT)
        self.assertEqual(self.daemon.wait_state(self.project, rollback, timeout=120), "ok")
        self.assertEqual(self.record(rollback)["rollback_of"], reverted)

        self.deploy(v3)  # healthy: ok once the window passed
        verify = self.record(self.deployments[-1])["steps"][-1]
        self.assertEqual(verify["step"], "verify")
        self.assertGreaterEqual(verify["seconds"], self.WINDOW)  # the whole window
        self.assertEqual(self.app(), (200, "v3"))

        with RequestLoop(self.app) as loop:
            started = time.monotonic()
            log = self.deploy(v4, expect="reverted")
            self.assertIn("answers were 5xx", log)
            rollback = self.record(self.deployments[-1])["rollback"]
            back = loop.wait_for((200, "v3"), started + 1, timeout=60)
        self.assertLess(back - started, self.WINDOW + self.HEALTH_TIMEOUT + 10)
        self.assertEqual(self.daemon.wait_state(self.project, rollback, timeout=120), "ok")
        self.assertEqual(self.app(), (200, "v3"))


class DockerReadmeNonRootTests(DockerTestCase):
    """The README's Docker steps, literally, with ipd as a user of its own
    (not root, in the socket's group, no new privileges: as ipd.service
    runs it) and nginx reloaded by ipd-nginx.path (issue #17)."""

    script = "examples/docker/control.sh"

    def setUp(self):
        super().setUp()
        socket_path = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        python = self.python_for_others()
        if not socket_path.startswith("unix://") or not shutil.which("setpriv") \
                or not python or os.getuid() != 0:
            self.skipTest("needs root, setpriv, a Python others may run and a unix "
                          "Docker socket")
        self.addCleanup(self.remove_containers)
        # The README: `include /var/lib/ipd/nginx/*.conf;` in http { }.
        readme = read_text(os.path.join(HERE, "README.md"))
        include = re.search(r"(?m)^ *include (/var/lib/ipd/nginx/\*\.conf);$", readme).group(1)
        self.nginx_dir = os.path.join(self.tmp, "var-lib-ipd-nginx")
        os.makedirs(os.path.join(self.tmp, "run"))
        os.makedirs(self.nginx_dir)
        self.daemon.stop()
        self.nginx.stop()
        self.nginx = Nginx(self.tmp, 0, include.replace("/var/lib/ipd/nginx", self.nginx_dir))
        # ipd as nobody, in the Docker socket's group, with NoNewPrivileges
        group = os.stat(socket_path[len("unix://"):]).st_gid
        wrapper = os.path.join(self.tmp, "ipd-as-nobody")
        shutil.copy(IPD, os.path.join(self.tmp, "ipd.py"))
        with open(wrapper, "w") as file:
            file.write("#!/bin/sh\nHOME=%s exec setpriv --reuid=65534 --regid=65534 "
                       "--groups=%d --no-new-privs --inh-caps=-all --bounding-set=-all "
                       "%s %s/ipd.py \"$@\"\n" % (self.tmp, group, python, self.tmp))
        os.chmod(wrapper, 0o755)
        with open(self.daemon.config, "a") as file:
            file.write("PASS_ENV=DOCKER_HOST HOME\n")
        for folder, _, files in os.walk(self.tmp):
            for name in [folder] + [os.path.join(folder, name) for name in files]:
                os.lchown(name, 65534, 65534)
        os.chmod(self.tmp, 0o755)
        self.daemon.program = wrapper
        self.daemon.start()
        self.nginx = Nginx(self.tmp, self.daemon.port,
                           include.replace("/var/lib/ipd/nginx", self.nginx_dir)).start()
        self.status = os.path.join(self.tmp, "run", "status")
        self.path_unit = PathUnit(self.nginx_dir, self.nginx, self.status).start()
        self.addCleanup(self.path_unit.stop)

    @staticmethod
    def python_for_others():
        """This Python if every folder above it lets others in (pyenv's in
        /root does not), else the system's, else None."""
        executable = os.path.realpath(sys.executable)
        folder = os.path.dirname(executable)
        while folder != "/" and os.stat(folder).st_mode & stat.S_IXOTH:
            folder = os.path.dirname(folder)
        if folder == "/":
            return executable
        return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else None

    def remove_containers(self):
        DockerExampleTests.remove_containers(self)

    def break_server_name(self):
        """An NGINX_SERVER_NAME that nginx -t refuses."""
        path = os.path.join(self.daemon.upload_dir, self.project, "deploy.env")
        text = read_text(path).replace('NGINX_SERVER_NAME="localhost"',
                                         'NGINX_SERVER_NAME="localhost; bogus_directive on"')
        with open(path, "w") as file:
            file.write(text)

    def write_env(self):
        """deploy.env as the README says to set it: NGINX is left out, so
        a non-root control.sh leaves the reload to ipd-nginx.path."""
        project_dir = os.path.join(self.daemon.upload_dir, self.project)
        os.makedirs(project_dir, exist_ok=True)
        path = os.path.join(project_dir, "deploy.env")
        with open(path, "w") as file:
            file.write(textwrap.dedent("""\
                APP_PORT=8080
                HEALTH_PATH=/health
                HEALTH_TIMEOUT=8
                DRAIN_SECONDS=1
                STOP_TIMEOUT=0
                KEEP_IMAGES=2
                RESTART=unless-stopped
                DOCKER_RUN_OPTS=
                NGINX_LISTEN="unix:%s"
                NGINX_SERVER_NAME="localhost"
                NGINX_CONF=%s/%s.conf
                NGINX_STATUS=%s
                RELOAD_TIMEOUT=10
                """) % (self.app_socket, self.nginx_dir, self.project, self.status))
        os.chown(project_dir, 65534, 65534)
        os.chown(path, 65534, 65534)

    def test_deploy_switch_and_refused_reload_as_a_non_root_ipd(self):
        with open("/proc/%d/status" % self.daemon.process.pid) as file:
            status = file.read()
        self.assertRegex(status, r"Uid:\s+65534\s")
        self.assertRegex(status, r"NoNewPrivs:\s+1")
        self.write_env()
        self.deploy(self.image("v1"))
        self.assertEqual(self.app(), (200, "v1"))
        self.assertEqual(os.stat(os.path.join(self.nginx_dir, self.project + ".conf")).st_uid,
                         65534)
        with RequestLoop(self.app) as loop:
            self.deploy(self.image("v2"))
        self.assertEqual(loop.failures(), [])
        self.assertEqual(self.app(), (200, "v2"))
        # nginx -t refuses the new config: the old one is put back, v2 serves.
        self.break_server_name()
        log = self.deploy(self.image("v3"), expect="11")
        self.assertIn("bogus_directive", log)
        self.assertEqual(self.app(), (200, "v2"))
        self.assertNotIn("bogus", read_text(os.path.join(self.nginx_dir, self.project + ".conf")))
        self.assertGreaterEqual(self.path_unit.runs, 3)


class LayerPushDockerTests(DockerTestCase):
    """Issue #16: v1 then v2 of a real multi-layer image through ipd.py push;
    v2 sends only its changed layer, and the example's control.sh loads the
    rebuilt file."""
    script = "examples/docker/control.sh"

    def setUp(self):
        super().setUp()
        self.addCleanup(self.remove_containers)
        self.write_settings(DOCKER_EXAMPLE_SETTINGS)

    remove_containers = DockerExampleTests.remove_containers

    def push(self, image):
        """Push with the client; -> (deployment, body bytes ipd read)."""
        log_path = os.path.join(self.tmp, "ipd.log")
        since = os.path.getsize(log_path)
        result = subprocess.run(
            [sys.executable, IPD, "push", "--project", self.project, "--image", image,
             "--package", self.package], env=dict(
                 os.environ, IPD_URL="http://127.0.0.1:%d/deploy" % self.daemon.port,
                 IPD_USER="admin", IPD_PASSWORD="admin-pw"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr)
        deployment = result.stdout.decode().strip()
        wait_until(lambda: "/deploy/push" in self.daemon.daemon_log()[since:])
        with open(log_path, "rb") as file:
            file.seek(since)
            text = file.read().decode()
        state = self.daemon.wait_state(self.project, deployment, timeout=240)
        self.assertEqual(state, "ok", self.daemon.log(self.project, deployment))
        return deployment, sum(int(n) for n in re.findall(r" in=(\d+) ", text))

    def test_v2_sends_only_its_changed_layer(self):
        filler, changed = os.urandom(8 << 20), os.urandom(1 << 20)
        tag = "ipd-test-%s" % self.project
        v1 = layered_busybox_image(tag + ":v1", self.tmp, "v1", filler,
                                   os.urandom(1 << 20))
        v2 = layered_busybox_image(tag + ":v2", self.tmp, "v2", filler, changed)
        first, sent1 = self.push(v1)
        self.assertEqual(self.app(), (200, "v1"))
        second, sent2 = self.push(v2)
        self.assertEqual(self.app(), (200, "v2"))
        with tarfile.open(v2) as tar:
            layout = "OCI" if "oci-layout" in tar.getnames() else "legacy"
        report("docker save of v2 (%s, %d bytes; layers: busybox, 8 MiB filler, "
               "1 MiB changed): v1 sent %d bytes, v2 %d" % (
                   layout, os.path.getsize(v2), sent1, sent2))
        self.assertGreater(sent1, len(filler) + len(changed))
        self.assertGreater(sent2, len(changed))
        self.assertLess(sent2, len(changed) + 64 * 1024)
        # the rebuilt file was what docker load read; it was dropped after
        # the run (DROP_REBUILT) and its recipe kept
        folder = os.path.join(self.daemon.upload_dir, self.project, "deployments")
        self.assertTrue(os.path.exists(os.path.join(folder, second + ".recipe")))
        wait_until(lambda: not os.path.exists(os.path.join(folder, first + ".image")))


class RegistryClientTests(DockerTestCase):
    """Issue #24: real clients push to ipd's registry and the push deploys
    through examples/docker/control.sh (on the server, as for an image-only
    upload): docker push (a second push sends only its changed layer, and
    docker pull by digest works for the project's users only), buildah
    push, podman push and skopeo copy; and a push through the README's
    nginx block."""
    script = "examples/docker/control.sh"

    def setUp(self):
        super().setUp()
        self.addCleanup(self.remove_containers)
        self.write_settings(DOCKER_EXAMPLE_SETTINGS)
        script = os.path.join(self.daemon.upload_dir, self.project, "control.sh")
        shutil.copy(os.path.join(HERE, self.script), script)
        os.chmod(script, 0o755)
        self.host = "127.0.0.1:%d" % self.daemon.port
        self.docker_config = os.path.join(self.tmp, "docker-config")
        os.makedirs(self.docker_config)

    remove_containers = DockerExampleTests.remove_containers

    def run_tool(self, *command, env=None, check=True, stdin=None):
        env = dict(os.environ, **(env or {}))
        if command[0] == "docker":  # its login, in this test's folder
            env["DOCKER_CONFIG"] = self.docker_config
        result = subprocess.run(command, input=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=300, env=env)
        if check:
            self.assertEqual(result.returncode, 0, result.stdout.decode())
        return result.returncode, result.stdout.decode()

    def pushed(self, push, expect_version):
        """Run push (a function), then wait for the deployment it made to
        be ok and the app to answer expect_version; -> (deployment, bytes
        the registry read)."""
        log_path = os.path.join(self.tmp, "ipd.log")
        since = os.path.getsize(log_path)
        push()
        deployment = self.daemon.get_json("/status/" + self.project)[1]["deployment"]
        self.assertNotIn(deployment, self.deployments)
        self.deployments.append(deployment)
        state = self.daemon.wait_state(self.project, deployment, timeout=240)
        self.assertEqual(state, "ok", self.daemon.log(self.project, deployment))
        self.assertEqual(self.app(), (200, expect_version))
        with open(log_path, "rb") as file:
            file.seek(since)
            text = file.read().decode()
        return deployment, sum(int(n) for n in re.findall(r'"\w+ /v2/.*" \d+ .* in=(\d+) ',
                                                          text))

    def docker_push(self, version):
        reference = "%s/%s:%s" % (self.host, self.project, version)
        self.run_tool("docker", "build", "-q", "-t", reference,
                      busybox_context(self.tmp, version), env={"DOCKER_BUILDKIT": "0"})
        self.run_tool("docker", "push", reference)

    def test_docker_push_deploys_then_sends_only_the_changed_layer(self):
        self.run_tool("docker", "login", "-u", "admin", "--password-stdin", self.host,
                      stdin=b"admin-pw")
        first, sent1 = self.pushed(lambda: self.docker_push("v1"), "v1")
        second, sent2 = self.pushed(lambda: self.docker_push("v2"), "v2")
        busybox = os.path.getsize(os.path.realpath(shutil.which("busybox")))
        report("docker push to ipd: v1 sent %d bytes, v2 (www/ changed) %d"
               % (sent1, sent2))
        self.assertGreater(sent1, busybox // 3)  # gzip-compressed
        self.assertLess(sent2, 16 * 1024)
        log = self.daemon.log(self.project, second)
        self.assertIn("Loaded image: %s/%s:v2" % (self.host, self.project), log)
        # pull by digest: for a user of the project, not for another's
        digest = re.search(r"sha256:[0-9a-f]{64}", self.registry_digest(second)).group(0)
        pull = "%s/%s@%s" % (self.host, self.project, digest)
        self.run_tool("docker", "pull", pull)
        with open(self.daemon.users_file, "a") as file:
            file.write("USER:other:%s:api\n" % sha256_hex("other-pw"))
        self.run_tool("docker", "logout", self.host)
        self.run_tool("docker", "login", "-u", "other", "--password-stdin", self.host,
                      stdin=b"other-pw")
        self.assertIn('"GET /v2/%s/manifests/%s" 200 user=admin' % (self.project, digest),
                      self.daemon.daemon_log())
        # by tag (by digest, the engine takes the manifest it cached)
        code, output = self.run_tool("docker", "pull", "%s/%s:v2" % (
            self.host, self.project), check=False)
        self.assertNotEqual(code, 0)
        self.assertIn("denied", output.lower())
        self.assertIn('/manifests/v2" 403 user=other', self.daemon.daemon_log())

    def test_a_push_through_the_readme_nginx_block(self):
        """The README's location /v2/ block beside location /deploy: a chunked
        PATCH streams through, Location stays the client's, a tag deploys."""
        folder = os.path.join(self.tmp, "front")
        os.makedirs(folder)
        proxy = Nginx(folder, self.daemon.port, os.path.join(folder, "none-*.conf"))
        deploy_block = readme_nginx_location().replace(
            "localhost:9955", "127.0.0.1:%d" % self.daemon.port)
        registry_block = re.search(r"\n(    location /v2/ \{.*?\n    \})\n", read_text(
            os.path.join(HERE, "README.md")), re.S).group(1).replace(
                "localhost:9955", "127.0.0.1:%d" % self.daemon.port)
        self.assertIn("proxy_request_buffering off;", registry_block)
        conf = os.path.join(folder, "nginx.conf")
        text = read_text(conf).replace(deploy_block, deploy_block + "\n" + registry_block)
        with open(conf, "w") as file:
            file.write(text)
        try:
            proxy.start()
        except subprocess.CalledProcessError:
            raise AssertionError(read_text(os.path.join(folder, "error.log")))
        self.addCleanup(proxy.stop)
        project = "proxied-" + uuid.uuid4().hex[:8]
        RegistryTestCase.place_script(self, self.daemon, project)

        def call(method, path, body=None, headers=None):
            connection = UnixHTTPConnection(proxy.front, timeout=60)
            try:
                connection.request(method, path, body=body, headers=dict(
                    {"Authorization": ADMIN_AUTH}, **(headers or {})))
                response = connection.getresponse()
                return response.status, response.headers, response.read()
            finally:
                connection.close()
        self.assertEqual(call("GET", "/v2/", headers={"Authorization": ""})[0], 401)
        layer = gzip_layer({"big": os.urandom(4 << 20)})
        config, manifest = image_manifest([layer])
        for blob in (layer, config):
            status, headers, _ = call("POST", "/v2/%s/blobs/uploads/" % project)
            self.assertEqual(status, 202)
            pieces = [blob[i:i + 65536] for i in range(0, len(blob), 65536)]
            status, headers, _ = call("PATCH", headers["Location"], iter(pieces))
            self.assertEqual((status, headers["Range"]), (202, "0-%d" % (len(blob) - 1)))
            status, _, _ = call("PUT", headers["Location"] + "?digest=" + digest_of(blob))
            self.assertEqual(status, 201)
        status, headers, body = call("PUT", "/v2/%s/manifests/v1" % project, manifest,
                                     {"Content-Type": DOCKER_MANIFEST})
        self.assertEqual(status, 201, body)
        deployment = headers["Ipd-Deployment"]
        self.assertEqual(self.daemon.wait_state(project, deployment), "ok")
        self.assertIn("IMAGE_REF=localhost/%s:v1\n" % project,
                      self.daemon.log(project, deployment))

    def registry_digest(self, deployment):
        """The IMAGE_DIGEST of a pushed deployment, from the audit log."""
        for line in read_text(os.path.join(self.tmp, "audit.log")).splitlines():
            event = json.loads(line)
            if event.get("deployment") == deployment and "image_digest" in event:
                return event["image_digest"]
        raise AssertionError("no audit event of %s with its image_digest" % deployment)

    def containers_tools(self):
        """Storage options of buildah and podman (vfs, in this test's folder)."""
        for tool in ("buildah", "podman", "skopeo"):
            if not shutil.which(tool):
                if os.environ.get("IPD_TEST_DOCKER") == "required":
                    raise AssertionError(tool + " is not installed")
                self.skipTest(tool + " is not installed")
        self.storage = (os.path.join(self.tmp, "storage"), os.path.join(self.tmp, "run"))
        return ["--root", self.storage[0], "--runroot", self.storage[1],
                "--storage-driver", "vfs"]

    def buildah_image(self, options, version):
        """An image FROM scratch built by buildah: busybox-static, www/."""
        context = busybox_context(self.tmp, version)
        container = self.run_tool("buildah", *options, "from", "scratch")[1].split()[-1]
        self.run_tool("buildah", *options, "copy", container,
                      os.path.join(context, "busybox"), "/bin/busybox")
        self.run_tool("buildah", *options, "copy", container,
                      os.path.join(context, "www"), "/www")
        self.run_tool("buildah", *options, "config", "--cmd", json.dumps(
            ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]), container)
        name = "localhost/ipd-test-%s:%s" % (self.project, version)
        self.run_tool("buildah", *options, "commit", "-q", container, name)
        self.run_tool("buildah", *options, "rm", container)
        return name

    def test_buildah_podman_and_skopeo_pushes_deploy(self):
        options = self.containers_tools()
        destination = "docker://%s/%s:" % (self.host, self.project)
        login = ["--tls-verify=false", "--creds", "admin:admin-pw"]
        image = self.buildah_image(options, "b1")
        self.pushed(lambda: self.run_tool("buildah", *options, "push", *login, image,
                                          destination + "b1"), "b1")
        image = self.buildah_image(options, "p1")
        self.pushed(lambda: self.run_tool("podman", *options, "push", *login, image,
                                          destination + "p1"), "p1")
        image = self.buildah_image(options, "s1")
        store = "containers-storage:[vfs@%s+%s]%s" % (self.storage + (image,))
        self.pushed(lambda: self.run_tool("skopeo", "copy", "--dest-tls-verify=false",
                                          "--dest-creds", "admin:admin-pw", store,
                                          destination + "s1"), "s1")


class SwarmExampleTests(DockerTestCase):
    script = "examples/swarm/control.sh"

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        state = docker("info", "-f", "{{.Swarm.LocalNodeState}}").strip()
        cls.made_swarm = state != "active"
        if cls.made_swarm:
            docker("swarm", "init", "--advertise-addr", "127.0.0.1")

    @classmethod
    def tearDownClass(cls):
        if cls.made_swarm:
            docker("swarm", "leave", "--force", check=False)

    def setUp(self):
        super().setUp()
        self.addCleanup(self.remove_service)
        self.write_settings("""
            APP_PORT=8080
            REPLICAS=1
            HEALTH_PATH=/health
            HEALTH_TIMEOUT=8
            DRAIN_SECONDS=1
            STOP_TIMEOUT=2
            KEEP_IMAGES=2
            REGISTRY=
            SERVICE_OPTS=
            """)

    def remove_service(self):
        services = docker("service", "ls", "-q", "--filter",
                          "label=ipd.project=" + self.project).split()
        if services:
            docker("service", "rm", *services, check=False)
        # The tasks' containers go first, then their images and networks
        # (the swarm network's removal reaches the engine a moment later).
        deadline = time.monotonic() + 30
        while docker("ps", "-aq", "--filter", "label=ipd.project=" + self.project) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        images = docker("image", "ls", "-q", "ipd-" + self.project).split()
        if images:
            docker("rmi", "-f", *set(images), check=False)
        docker("network", "rm", "ipd-" + self.project, check=False)
        while docker("network", "ls", "-q", "--filter", "name=ipd-%s-config" % self.project) \
                and time.monotonic() < deadline:
            docker("network", "rm", "ipd-%s-config" % self.project, check=False)
            time.sleep(0.2)

    def test_v1_v2_then_broken_v3_rolled_back(self):
        v1, v2, v3 = self.image("v1"), self.image("v2"), self.image("v3", healthy=False)
        self.deploy(v1)
        self.assertEqual(self.app(), (200, "v1"))
        self.deploy(v2)
        self.assertEqual(self.app(), (200, "v2"))
        log = self.deploy(v3, expect="10")
        self.assertIn("previous version keeps serving", log)
        self.assertEqual(self.app(), (200, "v2"))
        services = docker("service", "ls", "--filter", "label=ipd.project=" + self.project,
                          "--format", "{{.Name}} {{.Image}}").splitlines()
        self.assertEqual(len(services), 1, services)
        self.assertEqual(services[0].split()[1].split("@")[0],
                         "ipd-%s:%s" % (self.project, self.deployments[1]))


class RegistrySwarmTests(SwarmExampleTests):
    """Issue #24: docker push to ipd deploys a Swarm service whose image the
    node pulls from ipd itself (REGISTRY=ipd: IMAGE_REF@IMAGE_DIGEST,
    --with-registry-auth), on a single-node swarm."""
    test_v1_v2_then_broken_v3_rolled_back = None  # SwarmExampleTests' own

    def setUp(self):
        super().setUp()
        # control.sh's docker needs the manager's login to ipd (DOCKER_CONFIG)
        self.docker_config = os.path.join(self.tmp, "docker-config")
        os.makedirs(self.docker_config)
        self.daemon.stop()
        self.daemon = DaemonProcess(self.tmp, {"PASS_ENV": "DOCKER_HOST DOCKER_CONFIG",
                                               "STEP_TIMEOUT": "180"})
        self.daemon.start(env={"DOCKER_CONFIG": self.docker_config})
        self.addCleanup(self.daemon.stop, signal.SIGKILL)
        settings = os.path.join(self.daemon.upload_dir, self.project, "deploy.env")
        with open(settings) as file:
            text = file.read().replace("REGISTRY=\n", "REGISTRY=ipd\n")
        with open(settings, "w") as file:
            file.write(text)
        script = os.path.join(self.daemon.upload_dir, self.project, "control.sh")
        shutil.copy(os.path.join(HERE, self.script), script)
        os.chmod(script, 0o755)
        self.host = "127.0.0.1:%d" % self.daemon.port

    run_tool = RegistryClientTests.run_tool
    pushed = RegistryClientTests.pushed
    docker_push = RegistryClientTests.docker_push

    def test_docker_push_runs_a_service_that_pulls_from_ipd(self):
        self.run_tool("docker", "login", "-u", "admin", "--password-stdin", self.host,
                      stdin=b"admin-pw")
        first, _ = self.pushed(lambda: self.docker_push("v1"), "v1")
        second, _ = self.pushed(lambda: self.docker_push("v2"), "v2")
        services = docker("service", "ls", "--filter", "label=ipd.project=" + self.project,
                          "--format", "{{.Image}}").split()
        self.assertEqual(len(services), 1, services)
        self.assertRegex(services[0], r"^%s/%s@sha256:[0-9a-f]{64}$" % (
            re.escape(self.host), self.project))
        self.assertIn('"GET /v2/%s/manifests/sha256:' % self.project,
                      self.daemon.daemon_log())


class SwarmVerifyTests(SwarmExampleTests):
    """Issue 25: examples/swarm/control.sh verify per slot: a task the swarm
    has to replace after the switch (a crash loop) is rolled back."""

    test_v1_v2_then_broken_v3_rolled_back = None  # run once, above

    def test_a_crashing_slot_is_rolled_back(self):
        v1 = self.image("v1")
        v2 = busybox_image("ipd-test-%s:v2" % self.project, self.tmp, "v2",
                           command=("/bin/sh", "-c", "/bin/busybox httpd -p 8080 "
                                    "-h /www; sleep 5; exit 1"))
        self.deploy(v1)
        path = os.path.join(self.daemon.upload_dir, self.project, "project.conf")
        with open(path, "w") as file:
            file.write("VERIFY_SECONDS=15\n")
        log = self.deploy(v2, expect="reverted")
        self.assertIn("a task was replaced or stopped", log)
        record = self.daemon.get_json("/status/%s/%s" % (self.project,
                                                         self.deployments[-1]))[1]
        self.assertEqual(record["steps"][-1]["code"], 12)
        rollback = record["rollback"]
        self.assertEqual(self.daemon.wait_state(self.project, rollback, timeout=180), "ok")
        self.assertIn("held for 15s", self.daemon.log(self.project, rollback))
        self.assertEqual(self.app(), (200, "v1"))


class SwarmOperatorTests(SwarmExampleTests):
    """examples/swarm/control.sh fails safe: a refused reload, REPLICAS
    changed, a crash, nothing listening (issue #17)."""

    test_v1_v2_then_broken_v3_rolled_back = None  # run once, above

    def settings(self, replicas=1, server_name="localhost", health_timeout=8):
        self.write_settings("""
            APP_PORT=8080
            REPLICAS=%d
            HEALTH_PATH=/health
            HEALTH_TIMEOUT=%d
            DRAIN_SECONDS=1
            STOP_TIMEOUT=1
            KEEP_IMAGES=2
            REGISTRY=
            SERVICE_OPTS=
            """ % (replicas, health_timeout))
        if server_name != "localhost":
            path = os.path.join(self.daemon.upload_dir, self.project, "deploy.env")
            text = read_text(path).replace("NGINX_SERVER_NAME=localhost",
                                             'NGINX_SERVER_NAME="%s"' % server_name)
            with open(path, "w") as file:
                file.write(text)

    def ports(self):
        """The app's ports in the proxy config."""
        path = os.path.join(self.daemon.upload_dir, self.project, "nginx.conf")
        return [int(port) for port in re.findall(r"server 127\.0\.0\.1:(\d+);",
                                                 read_text(path))]

    def services(self):
        return sorted(docker("service", "ls", "--filter", "label=ipd.project=" + self.project,
                             "--format", "{{.Name}}").split())

    def assert_every_port_answers(self, ports, body):
        for port in ports:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                connection.request("GET", "/")
                self.assertEqual(connection.getresponse().read(), body)
            finally:
                connection.close()

    def test_refused_reload_then_replicas_then_a_crash(self):
        self.settings()
        log = self.deploy(self.image("v1"))
        self.assertEqual(log.count("Loaded image"), 1)  # loaded once
        self.assertEqual(self.app(), (200, "v1"))
        [port] = self.ports()
        self.assertEqual(listening_addresses(port), ["0100007F"])  # 127.0.0.1 alone

        # nginx refuses v2's config: v1 keeps serving, v2's task is gone.
        self.settings(server_name="localhost; bogus_directive on")
        with RequestLoop(self.app) as loop:
            log = self.deploy(self.image("v2"), expect="11")
        self.assertIn("bogus_directive", log)
        self.assertEqual(loop.failures(), [])
        self.assertEqual(self.app(), (200, "v1"))
        self.assertEqual(self.ports(), [port])
        self.assertEqual(len(self.services()), 1)
        self.assertFalse(image_exists("ipd-%s:%s" % (self.project, self.deployments[-1])))

        # REPLICAS=2 applies on the next deploy: two tasks, both in nginx.
        self.settings(replicas=2)
        with RequestLoop(self.app) as loop:
            self.deploy(self.image("v3"))
        self.assertEqual(loop.failures(), [])
        ports = self.ports()
        self.assertEqual(len(ports), 2)
        self.assertEqual(len(self.services()), 2)
        # Images: the two that deployed, under the project's name only.
        self.assertEqual(docker("image", "ls", "-q", "ipd-test-" + self.project), "")
        tags = docker("image", "ls", "--format", "{{.Tag}}", "ipd-" + self.project).split()
        self.assertEqual(sorted(tags), sorted([self.deployments[0], self.deployments[2]]))
        self.assert_every_port_answers(ports, b"v3\n")

        # A task crashes: the swarm replaces it on the same port.
        service = self.services()[0]
        port = int(docker("service", "inspect", "-f", "{{range .Endpoint.Ports}}"
                          "{{.PublishedPort}}{{end}}", service))
        container = docker("ps", "-q", "--no-trunc", "--filter",
                           "label=com.docker.swarm.service.name=" + service).strip()
        with RequestLoop(self.app) as loop:
            loop.wait_for((200, "v3"), 0)
            crashed = time.monotonic()
            crash(container)
            deadline = time.monotonic() + 20
            while True:
                running = docker("ps", "-q", "--no-trunc", "--filter",
                                 "label=com.docker.swarm.service.name=" + service).split()
                if running and running[0] != container and listening_addresses(port):
                    break
                self.assertLess(time.monotonic(), deadline, "no new task")
                time.sleep(0.2)
            time.sleep(0.5)
        self.assertEqual(self.ports(), ports)
        self.assert_every_port_answers(ports, b"v3\n")  # the new task too
        # requests go on to the other task meanwhile (proxy_next_upstream)
        self.assertEqual([failure for failure in loop.failures() if failure[0] > crashed], [])

    def test_nothing_listening_fails_and_leaves_nothing(self):
        self.settings(health_timeout=3)
        sleeper = busybox_image("ipd-test-%s:sleep" % self.project, self.tmp, "sleep",
                                command=("/bin/busybox", "sleep", "600"))
        log = self.deploy(sleeper, expect="10")
        self.assertIn("nothing answers /health", log)
        self.assertEqual(self.services(), [])


###############################################################################
# The README ##################################################################
###############################################################################

class ReadmeExampleTests(DaemonTestCase):

    def test_the_readme_control_sh(self):
        # the README links to it: docs/DETAILS.md, "A complete control.sh"
        readme = read_text(os.path.join(HERE, "docs", "DETAILS.md"))
        script = re.search(r"```sh\n(#!/bin/sh\n# control.sh - ipd runs it as.*?)```",
                           readme, re.S).group(1)
        package = tar_bytes({"control.sh": (script.encode(), 0o755),
                             "index.html": b"release one"})
        status, _, first = self.daemon.upload("site", package, image=b"IMG")
        self.assertEqual(self.daemon.wait_state("site", first.strip()), "ok")
        log = self.daemon.log("site", first.strip())
        self.assertIn("no %s/site/releases yet" % self.daemon.upload_dir, log)
        current = os.path.join(self.daemon.upload_dir, "site", "current")
        self.assertEqual(read_text(os.path.join(current, "index.html")), "release one")
        self.assertEqual(read_text(os.path.join(current, "image")), "IMG")
        package = tar_bytes({"control.sh": (script.encode(), 0o755),
                             "index.html": b"release two"})
        status, _, second = self.daemon.upload("site", package)
        self.assertEqual(self.daemon.wait_state("site", second.strip()), "ok")
        self.assertEqual(read_text(os.path.join(current, "index.html")), "release two")
        self.assertEqual(os.readlink(current), os.path.join(
            self.daemon.upload_dir, "site", "releases", second.strip()))
        self.assertIn("site now runs release " + second.strip(),
                      self.daemon.log("site", second.strip()))


class ReadmeTruthTests(DaemonTestCase):
    """Issue #15: what the README states about states, errors, /info, the
    demo, install and the bench is what the code does."""

    def readme(self):
        return read_text(os.path.join(HERE, "README.md"))

    def test_every_state_is_in_the_states_table(self):
        table = self.readme().split("### States", 1)[1].split("A step killed", 1)[0]
        listed = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
        source = read_text(IPD)
        produced = set(re.findall(r'state="(\w+)"', source))
        produced |= set(re.findall(r'outcome = "(\w+)"', source))
        produced |= {"await", "ok", "no"}
        self.assertIn("cancelled", produced)
        self.assertEqual(listed, produced)

    def test_every_error_status_is_in_the_errors_list(self):
        errors = " ".join(self.readme().split("### Errors", 1)[1]
                          .split("\n## ", 1)[0].split())
        codes = {cls.http_status for cls in vars(ipd).values() if isinstance(cls, type)
                 and issubclass(cls, ipd.IpdError) and cls is not ipd.IpdError}
        codes |= {500, 503}
        self.assertTrue({409, 410, 500} <= codes)
        for code in sorted(codes):
            self.assertRegex(errors, r"(, | )%d [a-z]" % code)
        status, _, _ = self.daemon.request("POST", "/cancel/app/" + self.ended())
        self.assertEqual(status, 409)

    def ended(self):
        deployment = self.daemon.deploy()
        self.daemon.wait_state("app", deployment)
        return deployment

    def test_info_json_has_user_sizes_and_sha256(self):
        self.assertIn("(JSON status and `/info`)", " ".join(self.readme().split()))
        status, _, body = self.daemon.upload("app", control_script(OK_SCRIPT),
                                             image=b"IMAGE")
        self.daemon.wait_state("app", body.strip())
        _, info = self.daemon.get_json("/info")
        files = info["projects"][0]["files"]
        self.assertEqual(files["image"]["size"], 5)
        self.assertEqual(files["image"]["sha256"], hashlib.sha256(b"IMAGE").hexdigest())
        self.assertIn("sha256", files["package"])
        self.assertEqual(info["projects"][0]["user"], "admin")

    def test_api_examples_use_the_demo_login(self):
        readme = self.readme()
        self.assertIn("`U=demo:demo`", readme)
        self.assertNotIn("admin:secret", readme)
        self.assertIn('"demo", hashlib.sha256(b"demo")', read_text(IPD))

    def test_a_cancelled_deployment_log_says_who(self):
        gate = os.path.join(self.tmp, "gate")
        marker = os.path.join(self.tmp, "started")
        running = self.daemon.deploy(gate_script(gate, "echo started; touch " + marker))
        self.wait_for_file(marker)
        waiting = self.daemon.deploy()
        for deployment in (waiting, running):
            status, _, body = self.daemon.request("POST", "/cancel/app/" + deployment,
                                                  user="dev")
            self.assertEqual((status, body), (200, "cancelled\n"))
        self.assertRegex(self.daemon.log("app", waiting),
                         r"\Aipd: cancelled by dev from 127\.0\.0\.1 at 20\S+Z\n\Z")
        self.assertRegex(self.daemon.log("app", running),
                         r"\Astarted\nipd: cancelled by dev from 127\.0\.0\.1 at ")

    def test_a_pushed_directory_is_named_after_it(self):
        folder = os.path.join(self.tmp, "deploy")
        os.makedirs(folder)
        with open(os.path.join(folder, "control.sh"), "w") as file:
            file.write("#!/bin/sh\nexit 1\n")
        os.chmod(os.path.join(folder, "control.sh"), 0o755)
        result = run_ipd("push", "--project", "app", "--package", folder + "/", env={
            "IPD_URL": "http://127.0.0.1:%d/deploy" % self.daemon.port,
            "IPD_USER": "admin", "IPD_PASSWORD": "admin-pw"})
        self.assertEqual(result.returncode, 0, result.stderr)
        deployment = result.stdout.strip()
        _, data = self.daemon.get_json("/status/app/" + deployment)
        self.assertEqual(data["files"]["package"]["name"], "deploy.tar.gz")
        audit_log = read_text(os.path.join(self.tmp, "audit.log"))
        upload = [json.loads(line) for line in audit_log.splitlines()
                  if '"upload"' in line][-1]
        self.assertIn("deploy.tar.gz", json.dumps(upload))
        self.assertNotIn("ipd-package-", audit_log)

    @unittest.skipUnless(shutil.which("curl"), "needs curl")
    def test_demo_hint_and_readme_lines_work_without_ipd_py_at_hand(self):
        # as after a wheel or .deb install: no ipd.py in the current folder
        cwd = os.path.join(self.tmp, "elsewhere")
        os.makedirs(cwd)
        demo = start_demo(self, cwd)
        self.assertNotIn("ipd.py", demo.hint)
        base = "http://127.0.0.1:%d/deploy/" % demo.port
        block = re.search(r"In a second terminal.*?```sh\n(.*?)```", self.readme(),
                          re.S).group(1)
        readme_upload = block.splitlines()[0].replace(
            "http://127.0.0.1:9955/deploy/", base)
        for line in (demo.hint, readme_upload):
            with self.subTest(line=line):
                result = subprocess.run(shlex.split(line) + ["-sS", "--fail"], cwd=cwd,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        universal_newlines=True, timeout=60)
                self.assertEqual(result.returncode, 0, result.stderr)
                deployment = result.stdout.strip()
                self.assertTrue(ipd.DEPLOYMENT_ID.match(deployment), deployment)
                state = subprocess.run(
                    ["curl", "-sS", "-u", "demo:demo",
                     base + "status/hello/%s?wait=30" % deployment],
                    stdout=subprocess.PIPE, universal_newlines=True, timeout=60).stdout
                self.assertEqual(state, "ok\n")
                log = subprocess.run(["curl", "-sS", "-u", "demo:demo",
                                      base + "log/hello/" + deployment],
                                     stdout=subprocess.PIPE, universal_newlines=True,
                                     timeout=60).stdout
                self.assertIn(".image (10240 bytes)\ndone\n", log)

    @unittest.skipUnless(shutil.which("make"), "needs make")
    def test_install_unit_documentation_line(self):
        for args, documentation in (
                (["EXEC=/opt/ipd/bin/ipd"], None),
                (["PREFIX=/usr"], "Documentation=file:///usr/lib/ipd/README.md")):
            with self.subTest(args=args):
                stage = os.path.join(self.tmp, "stage")
                subprocess.run(["make", "-s", "install-unit", "DESTDIR=" + stage] + args,
                               cwd=HERE, check=True, stdout=subprocess.DEVNULL)
                unit = read_text(os.path.join(stage, "etc/systemd/system/ipd.service"))
                lines = [l for l in unit.splitlines() if l.startswith("Documentation=")]
                self.assertEqual(lines, [documentation] if documentation else [])
                shutil.rmtree(stage)

    def test_wheel_route_users_file_and_license(self):
        readme = self.readme()
        wheel = readme.split("**2. A wheel in a virtualenv**", 1)[1].split("```", 2)[1]
        self.assertIn("sudo install -m 0640 -o ipd -g ipd /dev/null /opt/ipd/users.txt",
                      wheel)
        self.assertNotIn("touch", wheel)
        license_text = read_text(os.path.join(HERE, "LICENSE"))
        self.assertTrue(license_text.startswith("MIT License\n"))
        self.assertIn("Copyright (c) 2026 ipd authors", license_text)
        self.assertIn('license = {text = "MIT"}',
                      read_text(os.path.join(HERE, "pyproject.toml")))
        wheel = build("wheel", os.path.join(self.tmp, "dist"))
        with zipfile.ZipFile(wheel) as zipped:
            self.assertEqual(zipped.read("ipd-%s.dist-info/LICENSE" % ipd.__version__)
                             .decode(), license_text)

    def test_bench_units_agree_with_the_readme(self):
        sys.path.insert(0, HERE)
        self.addCleanup(sys.path.remove, HERE)
        import bench_ipd
        # the bench's table and its ceilings: docs/PERFORMANCE.md, which the
        # README's Performance section links to with the latest figures
        self.assertNotIn("MB/s", self.readme().split("\n## Performance", 1)[1]
                         .split("\n## ", 1)[0])
        readme = read_text(os.path.join(HERE, "docs", "PERFORMANCE.md"))
        self.assertIn("\n" + bench_ipd.TABLE_HEADER + "\n", readme)
        self.assertNotIn("MB/s", readme.split("## Uploads beside nginx", 1)[1]
                         .split("\n## ", 1)[0])
        sha = float(re.search(r"SHA-256, ([\d,]+) MiB/s", readme).group(1)
                    .replace(",", ""))
        nginx = [float(n) for n in re.findall(
            r"^\| nginx raw PUT \(the ceiling\) \| \d GiB \| (\d+) \|", readme, re.M)]
        ipd_rates = [float(n) for n in re.findall(
            r"^\| ipd `/upload` \| \d GiB \| (\d+) \|", readme, re.M)]
        stated = re.search(r"= (\d+) MiB/s for 1 GiB, (\d+) MiB/s for 4 GiB. ipd "
                           r"reached \*\*([\d.]+)\*\* and\s+\*\*([\d.]+)\*\*", readme)
        for number, (reference, rate) in enumerate(zip(nginx, ipd_rates)):
            ceiling = 1 / (1 / reference + 1 / sha)
            self.assertEqual(int(stated.group(1 + number)), round(ceiling))
            self.assertEqual(stated.group(3 + number), "%.2f" % (rate / ceiling))


class ReadmeShellBlockTests(unittest.TestCase):
    """Issue #27: every shell block of the README and of the files it links
    to is run here, or says what it needs or which test runs it; every
    link reaches its file and heading; the README stays a guide."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    @staticmethod
    def text(name):
        return read_text(os.path.join(HERE, name))

    def test_every_block_is_run_or_marked(self):
        unmarked = {}
        for name in DOC_FILES:
            for line, marker, code in doc_sh_blocks(self.text(name)):
                with self.subTest(name=name, line=line):
                    if marker is None:
                        unmarked.setdefault(name, []).append(code)
                        continue
                    kind = re.match(r"<!-- (needs|run by): (\S.*?) -->\Z", marker)
                    self.assertTrue(kind, "%s:%d: %s" % (name, line, marker))
                    if kind.group(1) == "run by":
                        self.assert_tests_exist(kind.group(2))
        self.assertIn("README.md", unmarked)
        demo = start_demo(self, self.tmp)
        for name, codes in sorted(unmarked.items()):
            with self.subTest(name=name):
                self.run_blocks(demo.port, name, codes)

    def assert_tests_exist(self, text):
        named = re.findall(r"\b([A-Z]\w*Tests)(?:\.(test_\w+))?", text)
        self.assertTrue(named, text)
        for class_name, method in named:
            test_class = globals().get(class_name)
            self.assertTrue(isinstance(test_class, type), class_name)
            if method:
                self.assertTrue(callable(getattr(test_class, method, None)), method)

    def run_blocks(self, port, name, codes):
        """Run a file's unmarked blocks as one script, as a reader would in
        the demo's folder (ipd-demo/, examples/ and ipd.py at hand)."""
        folder = os.path.join(self.tmp, name.replace("/", "-"))
        os.makedirs(folder)
        for link, target in (("ipd-demo", os.path.join(self.tmp, "ipd-demo")),
                             ("examples", os.path.join(HERE, "examples")), ("ipd.py", IPD)):
            os.symlink(target, os.path.join(folder, link))
        script = "".join(codes).replace("127.0.0.1:9955", "127.0.0.1:%d" % port)
        base = "http://127.0.0.1:%d/deploy" % port
        result = subprocess.run(
            ["sh", "-e", "-c", script], cwd=folder, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, universal_newlines=True, timeout=120,
            env={"PATH": os.environ.get("PATH", os.defpath), "HOME": self.tmp,
                 "IPD_AUTH": "demo:demo", "IPD_URL": base})
        self.assertEqual(result.returncode, 0, "%s:\n%s" % (name, result.stdout))
        if name == "README.md":  # the API block's lines, each answered
            self.assertIn("ipd %s" % ipd.__version__, result.stdout)
            self.assertIn("ipd: state: ok", result.stdout)
            self.assertRegex(result.stdout, r"has ended already: ok\n")  # 409
            self.assertRegex(result.stdout, r"(?m)^web [0-9a-f-]{36} \w+ started=")

    def test_the_first_block_starts_the_demo(self):
        readme = self.text("README.md")
        self.assertLess(readme.index("## Try it"), readme.index("```sh"))
        first = doc_sh_blocks(readme)[0][2].splitlines()
        commands = [line.split("#", 1)[0].split() for line in first]
        self.assertEqual(commands, [["python3", "ipd.py", "demo"], ["make", "test"]])
        self.assertRegex(read_text(os.path.join(HERE, "Makefile")),
                         r"(?m)^test:.*\n\t\$\(PYTHON\) test_ipd\.py")
        shutil.copy(IPD, self.tmp)
        stderr_path = os.path.join(self.tmp, "stderr")
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable] + commands[0][1:] + ["--listen", "127.0.0.1:0"],
                cwd=self.tmp, stderr=stderr, stdout=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL)
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        deadline = time.monotonic() + 30
        while "try:" not in read_text(stderr_path):
            self.assertIsNone(process.poll(), read_text(stderr_path))
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        self.assertIn("demo: user demo, password demo", read_text(stderr_path))
        self.assertTrue(os.path.isfile(os.path.join(self.tmp, "ipd-demo", "image.tar")))

    def test_every_link_reaches_its_file_and_heading(self):
        for name in DOC_FILES:
            text = re.sub(r"(?ms)^ *```.*?^ *```", "", self.text(name))
            for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", text)):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                with self.subTest(name=name, target=target):
                    destination = os.path.normpath(os.path.join(
                        HERE, os.path.dirname(name), path)) if path else os.path.join(HERE, name)
                    self.assertTrue(os.path.exists(destination))
                    if anchor:
                        self.assertIn(anchor, doc_anchors(read_text(destination)))

    def test_the_readme_guides_in_an_operators_order(self):
        readme = self.text("README.md")
        self.assertLess(len(readme.split()), 6000)
        headings = ["## Try it", "## Contents", "## How a deployment runs", "## API",
                    "## Deploy from CI", "### Deploy with docker push",
                    "## Deploy a Docker app", "### From an empty server to your app on https",
                    "## Status page", "## Install on a server", "## Users",
                    "## Deploy tokens", "## Deploy from CI without secrets (OIDC)",
                    "## Signed releases", "## Settings", "## Security and guarantees",
                    "## Performance", "## Compared with", "## Development"]
        places = [readme.index("\n%s\n" % heading) for heading in headings]
        self.assertEqual(places, sorted(places))
        for name in DOC_FILES[1:]:  # each moved part is linked from the README
            self.assertIn("](%s" % name, readme)
        self.assertEqual(len(re.findall(r"(?i)the original ipd\b", readme)), 1)
        compared = readme.split("## Compared with", 1)[1].split("\n## ", 1)[0]
        for name in ("webhook", "Dokku", "Kamal", "CapRover", "Watchtower"):
            self.assertIn(name, compared)

    def test_the_headline_figures_are_those_of_the_performance_file(self):
        readme = self.text("README.md")
        section = readme.split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]
        details = " ".join(self.text("docs/PERFORMANCE.md").replace("*", "").split())
        # the registry's table lives here only (its full run is in the file)
        prose = re.sub(r"(?m)^\|.*\n", "", section)
        figures = re.findall(r"\d[\d,]*\.\d+|\d{2,}[\d,]*", prose)
        self.assertGreater(len(figures), 10)
        for figure in figures:
            self.assertTrue(figure in details, "README's Performance figure %s is not "
                            "in docs/PERFORMANCE.md" % figure)


class ExampleReadmeTests(unittest.TestCase):
    """Issue #27: each example's README documents the settings its prepare
    writes, with the defaults it writes; the Swarm one fills in the six
    its deploy reads without a default."""

    setUp = ExampleSettingsTests.setUp
    run_step = ExampleSettingsTests.run_step
    settings = ExampleSettingsTests.settings
    NO_DEFAULT_IN_DEPLOY = ("APP_PORT", "REPLICAS", "REGISTRY", "SERVICE_OPTS",
                            "NGINX_LISTEN", "NGINX_SERVER_NAME")

    def documented(self, example):
        """{name: default cell} of the settings table of examples/EXAMPLE/README.md."""
        readme = read_text(os.path.join(HERE, "examples", example, "README.md"))
        table = readme.split("Settings in `$PROJECT_DIR/deploy.env`", 1)[1]
        table = table.split("\n\n", 2)[1]
        return dict(re.findall(r"(?m)^\| `([A-Z_]+)` \| ([^|]*?) \|", table))

    def test_each_documented_default_is_what_prepare_writes(self):
        for example in ("docker", "swarm"):
            with self.subTest(example=example):
                fresh = os.path.join(self.tmp, example)
                os.makedirs(fresh)
                script = "examples/%s/control.sh" % example
                self.assertEqual(self.run_step(script, "prepare", fresh).returncode, 1)
                written = self.settings(os.path.join(fresh, "deploy.env"))
                documented = self.documented(example)
                self.assertEqual(sorted(documented), sorted(written))
                for name, cell in documented.items():
                    literal = re.match(r"`([^`]*)`\Z", cell)
                    if literal:
                        self.assertEqual(written[name], literal.group(1), name)
                    elif cell.startswith("empty"):
                        self.assertEqual(written[name], "", name)
                    elif cell == "the project":
                        self.assertEqual(written[name], "web", name)

    def test_the_exit_codes_are_the_scripts(self):
        for example in ("docker", "swarm"):
            with self.subTest(example=example):
                readme = read_text(os.path.join(HERE, "examples", example, "README.md"))
                listed = readme.split("Exit codes", 1)[1].split("\n\n", 2)
                listed = listed[0] if listed[0].strip(": \n") else listed[1]
                documented = set(map(int, re.findall(r"\b\d+\b", listed)))
                script = read_text(os.path.join(HERE, "examples", example, "control.sh"))
                used = {int(code) for code in re.findall(
                    r"\b(?:fail|give_up|exit) (\d+)", script)} | {1}
                self.assertEqual(documented, used)

    def test_a_swarm_deploy_env_of_two_lines_gets_every_setting_deploy_reads(self):
        project_dir = os.path.join(self.tmp, "web")
        os.makedirs(project_dir)
        env = os.path.join(project_dir, "deploy.env")
        for given in ("NGINX_LISTEN=8081\nNGINX_SERVER_NAME=web.example\n", ""):
            with self.subTest(given=given):
                with open(env, "w") as file:
                    file.write(given)
                script = "examples/swarm/control.sh"
                result = self.run_step(script, "prepare", project_dir)
                self.assertEqual(result.returncode, 1, result.stdout)
                shown = subprocess.run(
                    ["sh", "-u", "-c", '. "$0"; echo "$APP_PORT|$REPLICAS|$REGISTRY|'
                     '$SERVICE_OPTS|$NGINX_LISTEN|$NGINX_SERVER_NAME"', env],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    universal_newlines=True)
                self.assertEqual(shown.returncode, 0, shown.stdout)
                listen = "8081|web.example" if given else "80|web"
                self.assertEqual(shown.stdout, "8080|1|||%s\n" % listen)
                self.assertTrue(set(self.NO_DEFAULT_IN_DEPLOY) <= set(self.settings(env)))
                check = self.run_step(script, "check", project_dir)
                self.assertEqual(check.returncode, 1, check.stdout)  # ready


class HttpsWalkthroughTests(unittest.TestCase):
    """Issue #27: "From an empty server to your app on https" as written:
    its deploy.env lines are what examples/docker/control.sh reads, and
    nginx takes its conf.d file, the ipd blocks and the proxy config that
    prepare writes from that deploy.env, certificate and all."""
    system = True  # the same on every Python: once per CI run

    setUp = ExampleSettingsTests.setUp
    run_step = ExampleSettingsTests.run_step

    def section(self):
        readme = read_text(os.path.join(HERE, "README.md"))
        return readme.split("### From an empty server to your app on https", 1)[1] \
            .split("\n## ", 1)[0]

    def write_deploy_env(self, project_dir):
        """Run the section's printf line into PROJECT_DIR/deploy.env."""
        printf = re.search(r"(?ms)^printf .*?> /srv/upload/web/deploy\.env$",
                           self.section()).group(0)
        env = os.path.join(project_dir, "deploy.env")
        subprocess.run(["sh", "-e", "-c", printf.replace("/srv/upload/web/deploy.env",
                                                         shlex.quote(env))], check=True)
        return env

    def test_the_deploy_env_lines_are_settings_of_the_docker_example(self):
        project_dir = os.path.join(self.tmp, "web")
        os.makedirs(project_dir)
        env = self.write_deploy_env(project_dir)
        script = "examples/docker/control.sh"
        result = self.run_step(script, "prepare", project_dir)
        self.assertEqual(result.returncode, 1, result.stdout)
        check = self.run_step(script, "check", project_dir)
        self.assertNotIn("warning", check.stdout)
        shown = subprocess.run(
            ["sh", "-u", "-c", '. "$0"; set -f; set -- $DOCKER_RUN_OPTS; '
             'echo "$NGINX_LISTEN|$NGINX_SERVER_NAME|$#|$1|$2"', env],
            stdout=subprocess.PIPE, universal_newlines=True, check=True)
        self.assertEqual(shown.stdout, "443 ssl|example.com|2|--env-file|/etc/ipd/web.env\n")
        self.assertIn("/etc/ipd/web.env", self.section().split("install -d -m 0750", 1)[1])

    @unittest.skipUnless(shutil.which("nginx") and shutil.which("openssl"),
                         "needs nginx and openssl")
    def test_nginx_takes_the_walkthroughs_config(self):
        project_dir = os.path.join(self.tmp, "web")
        os.makedirs(project_dir)
        env = self.write_deploy_env(project_dir)
        with open(env, "a") as file:  # not the system's /var/lib/ipd/nginx
            file.write("NGINX_CONF=%s/nginx.conf\n" % project_dir)
        result = self.run_step("examples/docker/control.sh", "prepare", project_dir)
        self.assertEqual(result.returncode, 1, result.stdout)
        _, certificate, key = make_test_ca(self.tmp)
        conf_d = re.search(r"(?s)`/etc/nginx/conf\.d/ipd\.conf`.*?\n```\n(.*?)```",
                           self.section()).group(1)
        self.assertIn("include /var/lib/ipd/nginx/*.conf;", conf_d)
        registry = re.search(r"\n(    location /v2/ \{.*?\n    \})\n", read_text(
            os.path.join(HERE, "README.md")), re.S).group(1)
        conf_d = (conf_d.replace("/etc/letsencrypt/live/example.com/fullchain.pem",
                                 certificate)
                  .replace("/etc/letsencrypt/live/example.com/privkey.pem", key)
                  .replace("/var/lib/ipd/nginx/*.conf", project_dir + "/*.conf")
                  .replace('    # the location /deploy and location /v2/ blocks of '
                           '"nginx" below\n', readme_nginx_location() + "\n" +
                           registry + "\n"))
        self.assertNotIn("letsencrypt", conf_d)
        with open(os.path.join(self.tmp, "ipd.conf"), "w") as file:
            file.write(conf_d)
        main = os.path.join(self.tmp, "nginx-main.conf")
        with open(main, "w") as file:
            file.write("pid %s/nginx.pid;\nevents { }\nhttp {\n    include %s/ipd.conf;\n}\n"
                       % (self.tmp, self.tmp))
        tested = subprocess.run(["nginx", "-t", "-p", self.tmp, "-c", main, "-e",
                                 os.path.join(self.tmp, "error.log")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                universal_newlines=True)
        self.assertEqual(tested.returncode, 0, tested.stdout)
        app = read_text(os.path.join(project_dir, "nginx.conf"))
        self.assertIn("listen 443 ssl;", app)
        self.assertIn("server_name example.com;", app)


###############################################################################
# Guarantees: the long runs of make soak ######################################
###############################################################################

class GuaranteeFuzzTests(DaemonTestCase):
    """Mutated, truncated, duplicated and random uploads: never a 5xx,
    never a hang, never a temporary file left, always answering after."""
    settings = {"MAX_UPLOAD_SIZE": "1M", "READ_TIMEOUT": "5", "HEADER_TIMEOUT": "5"}
    requests = int(os.environ.get("IPD_FUZZ_REQUESTS", soak(20000, 600)))

    def request_bytes(self, rng):
        boundary = rng.choice(["b", "testboundary1234", "----WebKitFormBoundary7MA4",
                               "x" * 70, "a'()+_,-./:=?b"])
        fields = [("project", rng.choice(["fz", "fz2", "../x", "", "a" * 70]))]
        if rng.random() < 0.8:
            fields.append(("package", ("p.tgz", rng.choice(
                [self.package, b"", os.urandom(rng.randrange(1, 300))]))))
        if rng.random() < 0.6:
            fields.append(("image", ("i", os.urandom(rng.randrange(0, 3000)))))
        rng.shuffle(fields)
        _, body = multipart(fields, boundary)
        kind = rng.randrange(9)
        if kind == 1:
            body = body[:rng.randrange(len(body))]
        elif kind == 2:
            start = rng.randrange(len(body))
            body = body[:start] + body[start:start + rng.randrange(1, 200)] + body[start:]
        elif kind == 3:
            body = bytearray(body)
            for _ in range(rng.randrange(1, 8)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            body = bytes(body)
        elif kind == 4:
            at = rng.randrange(len(body))
            body = body[:at] + rng.choice([b"\r\n--", b"--", b"\r\n\r\n", b"\r"]) + \
                boundary.encode()[:rng.randrange(len(boundary) + 1)] + \
                rng.choice([b"", b"--", b"\r\n", b" \r\n"]) + body[at:]
        elif kind == 5:
            start = rng.randrange(len(body))
            body = body[:start] + body[start + rng.randrange(1, 100):]
        elif kind == 6:
            body = os.urandom(rng.randrange(0, 2000))
        headers = {"Content-Type": "multipart/form-data; boundary=" + boundary,
                   "Content-Length": str(len(body))}
        shape = rng.randrange(10)
        if shape == 1:
            headers["Content-Type"] = rng.choice([
                "multipart/form-data", "text/plain", "multipart/form-data; boundary=",
                "multipart/form-data; boundary=\"%s\"" % boundary,
                "multipart/mixed; boundary=" + boundary, "multipart/form-data; boundary=z"])
        elif shape == 2:
            headers["Content-Length"] = rng.choice([
                str(len(body) + rng.randrange(1, 50)), str(max(0, len(body) - 10)),
                "-1", "abc", "99999999999999999999", ""])
        elif shape == 3:
            del headers["Content-Length"]
            headers["Transfer-Encoding"] = "chunked"
            chunks, position = [], 0
            while position < len(body):
                size = rng.randrange(1, 500)
                chunks.append(b"%x\r\n%s\r\n" % (size, body[position:position + size])
                              if rng.random() > 0.05 else b"zz\r\n")
                position += size
            body = b"".join(chunks) + rng.choice([b"0\r\n\r\n", b"", b"0\r\n"])
        elif shape == 4:
            headers["Expect"] = "100-continue"
        elif shape == 5:
            del headers["Content-Length"]
        head = "POST /deploy/upload HTTP/1.1\r\nHost: x\r\n"
        if rng.random() < 0.95:
            head += "Authorization: Basic %s\r\n" % base64.b64encode(b"admin:admin-pw").decode()
        head += "".join("%s: %s\r\n" % item for item in headers.items())
        return head.encode() + b"\r\n" + body

    def test_fuzz_the_upload_endpoint(self):
        project_dir = os.path.join(self.daemon.upload_dir, "fz")
        os.makedirs(project_dir)
        self.package = control_script("exit 1")
        statuses, hangs = {}, []
        lock = threading.Lock()

        def worker(seed, count):
            rng = random.Random(seed)
            for number in range(count):
                data = self.request_bytes(rng)
                answer = raw_exchange(self.daemon.port, data)
                status = answer_status(answer)
                with lock:
                    if answer is None:
                        hangs.append(data[:300])
                    statuses[status] = statuses.get(status, 0) + 1
        threads = [threading.Thread(target=worker, args=(2026 + n, self.requests // 4))
                   for n in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        self.assertEqual(self.daemon.get("/stat")[0], 200)
        deadline = time.monotonic() + 30
        while self.daemon.leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        errors = sum(count for status, count in statuses.items() if status and status >= 500)
        total = sum(statuses.values())
        report("fuzz: %d upload requests in %.0fs, %d answered 5xx, %d hangs, "
               "%d temporary files left; answers %s" % (
                   total, elapsed, errors, len(hangs), len(self.daemon.leftovers()),
                   ", ".join("%s: %d" % (status or "closed", count) for status, count
                             in sorted(statuses.items(), key=lambda i: str(i[0])))))
        self.assertEqual(total, self.requests // 4 * 4)
        self.assertEqual(errors, 0)
        self.assertEqual(hangs[:1], [])
        self.assertEqual(self.daemon.leftovers(), [])
        self.assertGreater(statuses.get(202, 0), 0)  # some stayed valid
        self.assertGreater(statuses.get(400, 0), 0)
        log = self.daemon.daemon_log()
        self.assertNotIn("Traceback", log, log[log.find("Traceback") - 300:][:2000])

    def test_boundary_split_at_every_point_across_reads(self):
        os.makedirs(os.path.join(self.daemon.upload_dir, "fz"))
        content_type, body = multipart([("project", "fz"), ("image", ("i", b"I" * 100)),
                                        ("package", ("p", control_script("exit 1"))),
                                        ("force", "1")])  # the same files each time
        head = ("POST /deploy/upload HTTP/1.1\r\nHost: x\r\nAuthorization: Basic %s\r\n"
                "Content-Type: %s\r\nContent-Length: %d\r\n\r\n"
                % (base64.b64encode(b"admin:admin-pw").decode(), content_type,
                   len(body))).encode()
        delimiter = body.index(b"\r\n--testboundary1234", body.index(b"I" * 100))
        splits = range(delimiter - 5, delimiter + 60)
        for split in splits:
            answer = raw_exchange(self.daemon.port, None, pieces=[
                head + body[:split], body[split:]])
            self.assertEqual(answer_status(answer), 202, (split, answer))
        report("every split point of a boundary across two reads: %d uploads, "
               "all accepted whole" % len(splits))


class GuaranteeSlowClientTests(DaemonTestCase):
    alone = True  # measures time: runs while no other test does
    settings = {"HEADER_TIMEOUT": "2", "READ_TIMEOUT": "3", "MAX_CONNECTIONS": "400",
                "MAX_CONNECTIONS_PER_ADDRESS": "400"}

    def test_idle_and_byte_a_second_clients_do_not_stop_others(self):
        idle = [socket.create_connection(("127.0.0.1", self.daemon.port))
                for _ in range(100)]
        slow = [socket.create_connection(("127.0.0.1", self.daemon.port))
                for _ in range(100)]
        for sock in idle + slow:
            self.addCleanup(sock.close)
        request = b"GET /deploy/stat HTTP/1.1\r\nHost: x\r\n"
        stop = threading.Event()
        cut = set()

        def trickle():
            for position in range(len(request)):
                if stop.is_set():
                    return
                for number, sock in enumerate(slow):
                    try:
                        sock.send(request[position:position + 1])
                    except OSError:
                        cut.add(number)
                time.sleep(0.25)
        thread = threading.Thread(target=trickle)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(stop.set)
        time.sleep(0.5)
        latencies = []
        for _ in range(20):
            started = time.monotonic()
            status, _, _ = self.daemon.get("/status/app")
            latencies.append(time.monotonic() - started)
            self.assertEqual(status, 404)
            time.sleep(0.05)
        # the slow ones are cut once their head is late (HEADER_TIMEOUT=2)
        deadline = time.monotonic() + 20  # each is cut by then, however busy
        closed = 0
        for sock in idle + slow:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = sock.recv(100)
                closed += data == b""
            except OSError:
                closed += 1
        report("200 open connections (100 idle, 100 sending a byte each 0.25 s): "
               "status answered in at most %.0f ms (median %.0f ms); all 200 cut "
               "after HEADER_TIMEOUT: %s" % (max(latencies) * 1000,
                                            sorted(latencies)[10] * 1000, closed == 200))
        self.assertLess(max(latencies), 1.0)
        self.assertEqual(closed, 200)
        self.assertEqual(self.daemon.get("/stat")[0], 200)


class GuaranteeConnectionCapTests(DaemonTestCase):
    settings = {"MAX_CONNECTIONS": "20", "HEADER_TIMEOUT": "30"}

    def test_connections_over_the_cap_get_503(self):
        held = [socket.create_connection(("127.0.0.1", self.daemon.port))
                for _ in range(20)]
        for sock in held:
            self.addCleanup(sock.close)
        status, headers, body = wait_until(lambda: (lambda answer: answer if answer[0]
                                                    == 503 else None)(
            self.daemon.get("/stat")), message="every connection taken")
        self.assertEqual((status, body), (503, "too many connections, try again\n"))
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 30  # the daemon sees them closed
        while self.daemon.get("/stat")[0] != 200:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)


class GuaranteePasswordGuessingTests(DaemonTestCase):
    alone = True  # measures time: runs while no other test does

    def setUp(self):
        # the users file written before the daemon starts: one start, not
        # a start, a stop and a start, in the phase that runs alone
        self.tmp = tempfile.mkdtemp(prefix="ipd-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(kill_processes_in, self.tmp)
        with open(os.path.join(self.tmp, "users.txt"), "w") as file:
            file.write("ADMIN:admin:%s\n" % ipd.hash_password("admin-pw"))
            file.write("USER:dev:%s\n" % sha256_hex("dev-pw"))
        self.daemon = self.start_daemon(self.settings)

    def test_a_burst_of_wrong_passwords_does_not_slow_others(self):
        token = base64.b64encode(b"admin:guess").decode()
        statuses = {}
        lock = threading.Lock()

        def guesser(count):
            connection = self.daemon.connection()
            for number in range(count):
                connection.request("GET", "/deploy/stat", headers={
                    "Authorization": "Basic " + token, "X-Real-IP": "198.51.100.7"})
                response = connection.getresponse()
                response.read()
                with lock:
                    statuses[response.status] = statuses.get(response.status, 0) + 1
            connection.close()
        baseline = [self.timed_status() for _ in range(20)]
        total = soak(1000, 100)
        threads = [threading.Thread(target=guesser, args=(total // 4,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        during = []
        while any(thread.is_alive() for thread in threads):
            during.append(self.timed_status())
        for thread in threads:
            thread.join()
        log = self.daemon.daemon_log("failed login")
        report("%d wrong passwords from one address: %s; another user's status "
               "p50 %.1f ms, max %.1f ms during the burst (%.1f ms, %.1f ms before)"
               % (total, ", ".join("%d: %d" % item for item in sorted(statuses.items())),
                  sorted(during)[len(during) // 2] * 1000, max(during) * 1000,
                  sorted(baseline)[10] * 1000, max(baseline) * 1000))
        self.assertEqual(sum(statuses.values()), total)
        self.assertLessEqual(statuses.get(401, 0), 20)
        self.assertGreaterEqual(statuses.get(429, 0), total - 20)
        self.assertLess(max(during), 0.5)
        self.assertIn("failed login as 'admin' from 198.51.100.7", log)
        self.assertNotIn("guess", log.replace("failed login", ""))
        # the guessed account itself still works from elsewhere
        self.assertEqual(self.daemon.get("/stat")[0], 200)

    def timed_status(self):
        started = time.monotonic()
        status, _, _ = self.daemon.get("/status/app", user="dev",
                                       headers={"X-Real-IP": "198.51.100.8"})
        self.assertEqual(status, 404)
        return time.monotonic() - started


class GuaranteeRandomKillTests(DaemonTestCase):
    """SIGKILL at random moments through 50 uploads over 5 projects."""
    settings = {"MAX_PARALLEL": "3", "KILL_GRACE": "1"}

    def test_kill_9_at_random_moments(self):
        rng = random.Random(7)
        runs = os.path.join(self.tmp, "runs")
        # Overlap is seen through a kernel lock (flock), which dies with its
        # holder: no PID check that a zombie could fool.
        script = ('#!/bin/sh\n'
                  'exec 9>>"$PROJECT_DIR/running.lock"\n'
                  'echo "$DEPLOY $1 start" >> %s\n'
                  'if ! flock -n 9; then\n'
                  '  echo "OVERLAP $PROJECT $DEPLOY" >> %s; flock 9; fi\n'
                  'sleep 0.0$(( $(od -An -N1 -tu1 /dev/urandom) %% 9 + 1 ))\n'
                  'echo "$DEPLOY $1 end" >> %s\n'
                  'exit 1\n' % (runs, runs, runs))
        package = tar_bytes({"control.sh": (script.encode(), 0o755)})
        answered, seen_final, kills = [], {}, 0
        uploads = soak(50, 20)
        for number in range(uploads):
            project = "p%d" % (number % 5)
            torn = None
            if rng.random() < 0.2:  # an upload in flight when the kill comes
                torn = threading.Thread(target=self.try_upload, args=(
                    project, package, os.urandom(3 << 20)))
                torn.start()
            deployment = self.try_upload(project, package)
            if deployment:
                answered.append((project, deployment))
            if rng.random() < 0.3 or torn:
                time.sleep(rng.random() * 0.3)
                self.daemon.kill()
                kills += 1
                if torn:
                    torn.join()
                self.daemon.start()
                self.check_states(answered, seen_final)
        self.daemon.kill()
        self.daemon.start()
        for project, deployment in answered:
            self.daemon.wait_state(project, deployment)
        self.check_states(answered, seen_final)
        lines = read_text(runs).splitlines()
        starts = [line for line in lines if line.endswith(" start")]
        overlaps = [line for line in lines if line.startswith("OVERLAP")]
        report("%d uploads over 5 projects, %d kill -9 at random moments: %d ids "
               "answered, all answering their state after every restart; %d step "
               "runs, %d ran twice, %d overlaps in a project; %d temporary files "
               "left" % (uploads, kills, len(answered), len(starts),
                         len(starts) - len(set(starts)), len(overlaps),
                         len(self.daemon.leftovers())))
        self.assertGreaterEqual(kills, uploads // 5)
        self.assertEqual(len(starts), len(set(starts)))
        self.assertEqual(overlaps, [])
        self.assertEqual(self.daemon.leftovers(), [])
        states = {self.daemon.state(p, d) for p, d in answered}
        self.assertTrue(states <= {"ok", "changed", "interrupted"}, states)

    def try_upload(self, project, package, image=None):
        try:
            status, _, body = self.daemon.upload(project, package, image=image)
        except (OSError, http.client.HTTPException):
            return None
        return body.strip() if status == 202 else None

    def check_states(self, answered, seen_final):
        for project, deployment in answered:
            state = self.daemon.state(project, deployment)
            self.assertNotEqual(state, "no", deployment)
            if deployment in seen_final:
                self.assertEqual(state, seen_final[deployment], deployment)
            elif state not in ("await", "active"):
                seen_final[deployment] = state


class GuaranteeControlScriptTests(DaemonTestCase):
    settings = {"STEP_TIMEOUT": "20"}

    def peak_rss_kib(self):
        with open("/proc/%d/status" % self.daemon.process.pid) as file:
            return int(re.search(r"VmHWM:\s+(\d+)", file.read()).group(1))

    def test_megabytes_of_output_and_a_closed_stdout(self):
        warm = self.daemon.deploy()
        self.daemon.wait_state("app", warm)
        before = self.peak_rss_kib()
        loud = self.daemon.deploy('[ "$1" = deploy ] && head -c 50000000 /dev/zero '
                                  '| tr "\\0" x; exit 1')
        self.assertEqual(self.daemon.wait_state("app", loud), "ok")
        status, headers, body = self.daemon.get("/log/app/" + loud)
        self.assertEqual(len(body), 50000000)
        quiet = self.daemon.deploy('[ "$1" = deploy ] || exit 1\n'
                                   'echo before; exec >&- 2>&-; sleep 0.3; exit 1')
        self.assertEqual(self.daemon.wait_state("app", quiet), "ok")
        self.assertEqual(self.daemon.log("app", quiet), "before\n")
        after = self.peak_rss_kib()
        report("control.sh printing 50 MB: daemon peak RSS %d -> %d KiB; one that "
               "closes its stdout early ends ok" % (before, after))
        self.assertLess(after - before, 16 * 1024)


class GuaranteeSystemdTests(DaemonTestCase):

    def test_ready_watchdog_and_stopping(self):
        path = os.path.join(self.tmp, "notify.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(path)
        listener.settimeout(10)
        self.addCleanup(listener.close)
        self.daemon.stop()
        self.daemon.start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "300000"})
        messages = [listener.recv(4096).decode()]
        self.assertTrue(messages[0].startswith("READY=1\n"), messages)
        # a ping each 0.15 s (half of WATCHDOG_USEC): four within 3 s, five
        # times their due time, for a busy machine (counted, not sampled)
        started = time.monotonic()
        while messages.count("WATCHDOG=1") < 4:
            messages.append(listener.recv(4096).decode())
        self.assertLess(time.monotonic() - started, 3)
        self.daemon.process.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages:
            messages.append(listener.recv(4096).decode())
        self.assertEqual(self.daemon.process.wait(20), 0)

    def test_abstract_socket_and_no_watchdog_for_another_pid(self):
        name = "ipd-test-%s" % uuid.uuid4().hex
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind("\0" + name)
        listener.settimeout(10)
        self.addCleanup(listener.close)
        self.daemon.stop()
        self.daemon.start(env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "200000",
                               "WATCHDOG_PID": "1"})
        self.assertTrue(listener.recv(4096).startswith(b"READY=1"))
        listener.settimeout(0.8)
        with self.assertRaises(socket.timeout):
            listener.recv(4096)


###############################################################################
# The runner ##################################################################
###############################################################################

# make test runs the suite on one Python in a few worker processes, each
# taking the next test as it gets free; make test-system runs the classes
# marked `system` (they need a Docker engine, Chromium, packaging tools or
# the system's own Python: the same for every Python, so CI runs them
# once), the Docker ones (`serial`) one at a time in a worker of their
# own; make soak the soaks at full size.  Classes marked `alone` measure
# time and run after the others, one at a time.

# Known to take longest, longest first (measured with IPD_TEST_TIMES=40):
# started first, so that no worker is left with one at the end.  A run
# that finds the times of the last whole run (TIMES_FILE) goes by those.
SLOW_FIRST = (
    "TokenFileLockTests.test_a_revoke_that_said_revoked_stays_revoked",
    "SegmentTakeoverTests.test_a_writer_still_receiving_is_not_taken_over",
    "OidcPushTests.test_push_oidc_env_with_a_gitlab_id_token",
    "OidcPushTests.test_a_push_longer_than_its_token_lives_completes",
    "LayerPushBoundsTests.test_probes_leave_the_daemon_small",
    "SegmentTakeoverTests.test_a_push_right_after_a_cut_resumes",
    "LayerDiskTests.test_layers_held_once_rebuilt_on_redeploy_and_collected",
    "OidcDiscoveryTests.test_a_hanging_or_garbage_issuer_blocks_no_other_request",
    "LayerJsonFuzzTests", "UnpackLimitTests.test_header_bombs_are_refused_before",
    "VerifyTests.test_a_verify_over_its_time_limit_is_reverted",
    "TokenFileLockTests.test_twelve_creates_at_once_are_all_kept",
    "ClientTests.test_errors_are_one_line_with_distinct_exit_codes",
    "RunAsIsolationTests.test_a_project_reads_nothing_of_another_projects",
    "SegmentFloorTests", "ClientTimeoutTests.test_logs_follow_and_status_wait_end",
    "AuditAndNotifyTests.test_failing_notify_url_is_logged_not_fatal",
    "OidcTests.test_a_token_that_logged_in_outlives_its_exp_for_its_push",
    "UnpackLimitTests.test_bytes_after_the_end_of_a_tar_are_bounded",
    "TokenTests", "GuaranteeRandomKillTests", "StepSessionTests.test_a_waiting_",
    "RegistryRetentionTests.test_unfinished_sessions_and_unreferenced_blobs",
    "TokenFileLockTests.test_users_written_at_once_are_all_kept",
    "ScriptsUserTests.test_timeout_", "StepSessionTests.test_a_child_in_a_process_",
    "LayerPushTests.test_a_killed_push_resumes_mid_segment",
    "LayerPushTests.test_second_push_sends_only_the_changed_layer",
    "PromiseTests.test_an_unsigned_extra_file_beside_a_signed_manifest",
    "PromiseTests.test_a_step_ends_at_step_timeout_not_later",
    "VerifyTests.test_wait_and_push_wait_answer_once_verify_ended",
    "OidcTests.test_each_bad_token_is_a_401_audited_and_queues_nothing",
    "OidcDiscoveryTests.test_keys_over_https_cached_and_a_rotated_key_fetched_once",
    "PromiseTests.test_the_follow_streams_state_line_is_a_line_of_its_own",
    "ScriptsUserTests.test_start_warns_when_the_users_file_is_within_reach",
    "ReadmeTruthTests.test_demo_hint_and_readme_lines_work_without_ipd_py",
    "ClientTimeoutTests.test_push_wait_ends_at_the_timeout_of_a_chatty_script",
    "SignedPushTests", "ClientTests.test_push_of_1_gib", "ClientTests.test_status_logs",
    "PackageBombTests", "GuaranteeFuzzTests.test_fuzz_the_upload_endpoint")

# Where a whole run (make test, make test-system) keeps how long each unit
# took, so that the next one starts the longest first however the tests
# changed since SLOW_FIRST was measured; build/ is not in git.
TIMES_FILE = os.path.join(HERE, "build", "test-times.json")


def known_seconds():
    """{unit: seconds} that the last whole runs took, from TIMES_FILE; {}
    where there is none or it cannot be read (a first run, a copy)."""
    try:
        with open(TIMES_FILE, encoding="utf-8") as file:
            known = json.load(file)
    except (OSError, ValueError):
        return {}
    if not isinstance(known, dict):
        return {}
    return {unit: spent for unit, spent in known.items()
            if isinstance(spent, (int, float))}


def keep_seconds(seconds):
    """Add seconds ({unit: seconds}, of units that ran whole) to TIMES_FILE,
    replaced whole (two runs at once each leave a whole file); a folder we
    may not write to leaves it as it was."""
    known = dict(known_seconds(), **seconds)
    try:
        os.makedirs(os.path.dirname(TIMES_FILE), exist_ok=True)
        partial = "%s.%d" % (TIMES_FILE, os.getpid())
        with open(partial, "w", encoding="utf-8") as file:
            json.dump(known, file, indent=0, sort_keys=True)
        os.replace(partial, TIMES_FILE)
    except OSError:
        pass


def count_outcomes(result):
    """(passed, failed, skipped) of a unittest result: what ran, counted as
    it ran.  A class whose setUpClass skipped or failed counts once as
    skipped or failed, and never against passed."""
    def split(outcomes):
        ran = [t for t, _ in outcomes if not isinstance(t, unittest.suite._ErrorHolder)]
        return len(ran), len(outcomes) - len(ran)
    failed_ran, failed_around = split(result.failures + result.errors)
    skipped_ran, skipped_around = split(result.skipped)
    failed_ran += len(result.unexpectedSuccesses)
    skipped_ran += len(result.expectedFailures)
    passed = result.testsRun - failed_ran - skipped_ran
    return passed, failed_ran + failed_around, skipped_ran + skipped_around


class CountingRunner(unittest.TextTestRunner):
    """Ends with 'N passed, N failed, N skipped' alone on a line, for CI."""

    def run(self, test):
        result = super().run(test)
        self.stream.writeln("%d passed, %d failed, %d skipped" % count_outcomes(result))
        return result


def test_classes(test_set):
    """The TestCase classes of this file in test_set: "fast" (all but the
    system ones), "system", or "all"; in file order."""
    found = [value for value in globals().values() if isinstance(value, type)
             and issubclass(value, unittest.TestCase) and value.__module__ == __name__
             and unittest.defaultTestLoader.getTestCaseNames(value)]  # in file order
    if test_set == "all":
        return found
    return [cls for cls in found
            if bool(getattr(cls, "system", False)) == (test_set == "system")]


def cpu_seconds():
    """The processor time this process and its ended children have used:
    what a test costs the machine, beside how long it takes."""
    return sum(usage.ru_utime + usage.ru_stime for usage in (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_worker():
    """--worker: run the tests named on stdin (Class or Class.test), one a
    line; answer each with a JSON line {output, passed, failed, skipped,
    seconds} on stdout."""
    answers = sys.stdout
    sys.stdout = sys.stderr  # a test's print() must not break the answers
    warnings.simplefilter("default")  # an unclosed file is a ResourceWarning
    for line in sys.stdin:
        stream = io.StringIO()
        saved, sys.stderr = sys.stderr, stream  # report() and warnings with it
        started, cpu = time.monotonic(), cpu_seconds()
        try:
            result = unittest.TextTestResult(unittest.runner._WritelnDecorator(stream),
                                             True, 2)
            unittest.defaultTestLoader.loadTestsFromName(
                line.strip(), sys.modules[__name__]).run(result)
            result.printErrors()
        finally:
            sys.stderr = saved
        passed, failed, skipped = count_outcomes(result)
        answers.write(json.dumps({"output": stream.getvalue(), "passed": passed,
                                  "failed": failed, "skipped": skipped,
                                  "seconds": time.monotonic() - started,
                                  "cpu": cpu_seconds() - cpu}) + "\n")
        answers.flush()


def longest_first(known):
    """The sort key that puts the units that took longest first: by known
    ({unit: seconds}, a new unit counted as a median one), or without
    times by SLOW_FIRST, then in file order."""
    if known:
        usual = sorted(known.values())[len(known) // 2]
        return lambda unit: -known.get(unit, usual)
    return lambda unit: next((index for index, slow in enumerate(SLOW_FIRST)
                              if unit.startswith(slow)), len(SLOW_FIRST))


def time_report(seconds, cpu, count):
    """IPD_TEST_TIMES=N: the text of the N slowest units (a test, or a class
    run whole) and the N slowest classes (their units' sum), each with its
    seconds and the processor seconds it used."""
    by_class = collections.defaultdict(lambda: [0.0, 0.0])
    for unit, spent in seconds.items():
        by_class[unit.split(".")[0]][0] += spent
        by_class[unit.split(".")[0]][1] += cpu.get(unit, 0)
    lines = ["\nslowest tests (seconds, processor seconds):"]
    lines.extend("%7.2fs %6.2fs %s" % (seconds[unit], cpu.get(unit, 0), unit)
                 for unit in sorted(seconds, key=seconds.get, reverse=True)[:count])
    lines.append("slowest classes:")
    lines.extend("%7.2fs %6.2fs %s" % (spent[0], spent[1], name) for name, spent in
                 sorted(by_class.items(), key=lambda item: -item[1][0])[:count])
    lines.append("%7.2fs %6.2fs in all, in the workers"
                 % (sum(seconds.values()), sum(cpu.values())))
    return "\n".join(lines) + "\n"


def work_units(classes):
    """The names a worker is given: each test of a class on its own, but a
    class with a setUpClass of its own whole."""
    units = []
    for cls in classes:
        if "setUpClass" in vars(cls):
            units.append(cls.__name__)
        else:
            units.extend("%s.%s" % (cls.__name__, name) for name
                         in unittest.defaultTestLoader.getTestCaseNames(cls))

    return sorted(units, key=longest_first(known_seconds()))


def prepare_workers():
    """Make what the workers share, once before they start: this file's
    bytecode (they run it with -m, not each compiling it anew) and a folder
    for the OIDC tests' RSA keys (IPD_TEST_KEYS, RsaKey.generate), which
    the workers inherit.  Returns that folder."""
    py_compile.compile(__file__, importlib.util.cache_from_source(__file__), doraise=True)
    os.environ["IPD_TEST_KEYS"] = tempfile.mkdtemp(prefix="ipd-test-keys-")
    return os.environ["IPD_TEST_KEYS"]


def report_times(seconds, cpu, failed):
    """After a whole run: keep the seconds of the units that passed for
    the next run's order (TIMES_FILE), and with IPD_TEST_TIMES=N print the
    slowest N (time_report)."""
    keep_seconds({unit: spent for unit, spent in seconds.items() if unit not in failed})
    if os.environ.get("IPD_TEST_TIMES"):
        sys.stderr.write(time_report(seconds, cpu, int(os.environ["IPD_TEST_TIMES"])))


def run_in_workers(classes, jobs):
    """Run the tests of classes in jobs worker processes, the slow ones
    first, those of one `serial` kind one after another, and the `alone`
    ones last, one at a time; print each one's output when it ends, then
    the totals line.  -> exit status."""
    keys = prepare_workers()
    together = work_units(cls for cls in classes if not getattr(cls, "alone", False))
    alone = work_units(cls for cls in classes if getattr(cls, "alone", False))
    totals = [0, 0, 0]
    seconds = {}  # unit (test or class) -> how long it ran
    cpu = {}      # unit -> the processor seconds it used (IPD_TEST_TIMES)
    failed = []   # units that failed, named again at the end
    lock = threading.Lock()
    started = time.monotonic()

    def work(pending):
        worker = subprocess.Popen([sys.executable, "-m", "test_ipd", "--worker"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  universal_newlines=True, env=ipd_environ())
        try:
            while True:
                with lock:
                    if not pending:
                        break
                    unit = pending.pop(0)
                worker.stdin.write(unit + "\n")
                worker.stdin.flush()
                line = worker.stdout.readline()
                answer = json.loads(line) if line else {
                    "output": "%s: the worker process ended\n" % unit,
                    "passed": 0, "failed": 1, "skipped": 0, "seconds": 0}
                with lock:
                    seconds[unit] = answer["seconds"]
                    cpu[unit] = answer.get("cpu", 0)
                    if answer["failed"]:
                        failed.append(unit)
                    sys.stderr.write(answer["output"])
                    sys.stderr.flush()
                    for index, key in enumerate(("passed", "failed", "skipped")):
                        totals[index] += answer[key]
                if not line:
                    break
        finally:
            worker.stdin.close()
            worker.wait()
            worker.stdout.close()

    # the units of each `serial` kind in a worker of their own, one after
    # another; the rest shared by the other workers; then the alone ones
    serial = {}
    for unit in together:
        kind = getattr(globals()[unit.split(".")[0]], "serial", None)
        serial.setdefault(kind, []).append(unit)
    shared = serial.pop(None, [])
    phases = ([(units, 1) for units in serial.values()]
              + [(shared, max(1, jobs - len(serial)))], [(alone, 1)])
    for phase in phases:
        threads = [threading.Thread(target=work, args=(group,))
                   for group, count in phase for _ in range(min(count, len(group)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    slowest = sorted(seconds, key=seconds.get, reverse=True)[:5]
    sys.stderr.write("\nRan %d test classes in %.1fs with %d workers; slowest: %s\n"
                     % (len(classes), time.monotonic() - started, jobs, ", ".join(
                         "%s %.1fs" % (name, seconds[name]) for name in slowest)))
    report_times(seconds, cpu, failed)
    if failed:
        sys.stderr.write("failed: %s\n" % ", ".join(sorted(failed)))
    shutil.rmtree(keys, True)
    print("%d passed, %d failed, %d skipped" % tuple(totals))
    return 0 if totals[1] == 0 and sum(totals) else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(run_worker())
    py_compile.compile(IPD, importlib.util.cache_from_source(IPD), doraise=True)
    test_set = os.environ.get("IPD_TEST_SET", "fast")
    # four workers a processor this process may use: most tests wait (for
    # a daemon, a step, a timeout) most of their time, and the others fill
    # it (on 2 cores, 8 took 0.93 of the time 6 took, 6 0.79 of what 4 took)
    jobs = int(os.environ.get("IPD_TEST_JOBS", min(16, 4 * len(os.sched_getaffinity(0)))))
    if len(sys.argv) == 1 and jobs > 1:
        sys.exit(run_in_workers(test_classes(test_set), jobs))
    # One process: named tests or -k patterns (any class), or one job.
    # Warnings on (an unclosed file is a ResourceWarning, not silence).
    options = {"verbosity": 2, "warnings": "default"}
    if sys.version_info >= (3, 12) and os.environ.get("IPD_TEST_DURATIONS"):
        options["durations"] = int(os.environ["IPD_TEST_DURATIONS"])  # slowest N
    if len(sys.argv) == 1:
        suite = unittest.TestSuite(unittest.defaultTestLoader.loadTestsFromTestCase(cls)
                                   for cls in test_classes(test_set))
        result = CountingRunner(**options).run(suite)
        sys.exit(0 if result.wasSuccessful() else 1)
    unittest.main(testRunner=CountingRunner(**options))
