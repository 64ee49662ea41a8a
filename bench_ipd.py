#!/usr/bin/env python3
"""bench_ipd.py - how fast ipd takes an upload, beside what else one would run.

    make bench                       # all payloads: 64 MiB, 1 GiB, 4 GiB, an image tar
    python3 bench_ipd.py --quick     # 64 MiB, one run: a check of the bench itself

Every system runs on loopback on this machine in the same run and gets the
same payloads from curl; each stored file's SHA-256 is checked against the
payload (a wrong byte fails the run).  Systems:

  nginx     raw PUT to a file (WebDAV module): no multipart, the ceiling
  ipd       POST /upload, the file as the `image` part
  uvicorn   Starlette's request.form() (python-multipart), part saved to a file
  multipart the `multipart` package's PushMultipartParser in a
            ThreadingHTTPServer, part saved to a file

Server pinned to core 0, curl to core 1 (and ipd once unpinned), median of
the runs; each stored file is deleted after its run for every system alike,
and the systems alternate run by run, so that each starts from the same
page-cache state.  Also measured: /status under 64 keep-alive clients (wrk)
alone and during a large upload, beside a bare http.server handler; an
upload's last byte to control.sh starting; start-up and /info, /stat over
1,000 projects x 100 deployments.

The peers (uvicorn, starlette, python-multipart, multipart) go into a
throwaway virtualenv under build/; nginx, curl and wrk come from Debian
(installed with apt-get when missing and run as root).
"""

import argparse
import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.join(HERE, "build", "bench")
IPD_SCRIPT = os.path.join(HERE, "ipd.py")
# The ipd.py whose start-up at scale is printed beside this one's: the last
# commit before its deployment state got one owner and lazy records (#22).
STARTUP_BASELINE = "ae953d2"
VENV = os.path.join(HERE, "build", "bench-venv")
PEERS = ["uvicorn", "starlette", "python-multipart", "multipart"]
MIB = 1 << 20
TICKS = os.sysconf("SC_CLK_TCK")
AUTH = "Basic " + base64.b64encode(b"bench:bench").decode()


# --- machine and process figures

def process_tree(pid):
    """pid and all its descendants."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as file:
                    ppid = int(file.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(name))
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as file:
                fields = file.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return total / TICKS


def reset_peak_rss(pids):
    for pid in pids:
        try:
            with open("/proc/%d/clear_refs" % pid, "w") as file:
                file.write("5")  # resets VmHWM to the current RSS
        except OSError:
            pass


def peak_rss_mib(pids):
    peak = 0
    for pid in pids:
        try:
            with open("/proc/%d/status" % pid) as file:
                peak = max(peak, int(re.search(r"VmHWM:\s+(\d+)", file.read()).group(1)))
        except (OSError, AttributeError):
            pass
    return peak / 1024


def free_port():
    """For nginx alone, which cannot be handed a socket: a port that was
    free a moment ago (a benchmark, not a test; it retries on a clash)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while True:
            block = file.read(4 * MIB)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def sha256_rate_one_core():
    """MiB/s of hashlib's SHA-256 on core 0, as ipd's hashing thread gets
    (MiB/s like every rate here, so that they combine in one formula)."""
    code = ("import hashlib, os, time; os.sched_setaffinity(0, {0});"
            "b = os.urandom(256 << 20); t = time.perf_counter();"
            "hashlib.sha256(b).digest(); print(256 / (time.perf_counter() - t))")
    return float(subprocess.check_output([sys.executable, "-c", code]))


# --- the systems

class System:
    """A server under test: started pinned (or not), with a way to upload."""

    name = "?"
    pinned = True

    def __init__(self, work):
        self.work = os.path.join(work, self.name.replace(" ", "-"))
        os.makedirs(self.work, exist_ok=True)
        self.store = os.path.join(self.work, "store")
        os.makedirs(self.store, exist_ok=True)
        self.process = None

    def taskset(self):
        return ["taskset", "-c", "0"] if self.pinned else []

    def pids(self):
        return process_tree(self.process.pid)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def stored_file(self, answer):
        """The file the server stored for the upload that answered answer."""
        raise NotImplementedError


class Nginx(System):
    name = "nginx PUT"

    def start(self):
        self.port = free_port()
        conf = os.path.join(self.work, "nginx.conf")
        with open(conf, "w") as file:
            file.write(textwrap.dedent("""\
                user root;
                worker_processes 1;
                pid {w}/nginx.pid;
                error_log {w}/error.log;
                events {{ worker_connections 256; }}
                http {{
                    access_log off;
                    client_body_temp_path {w}/store/.tmp;
                    server {{
                        listen 127.0.0.1:{port};
                        location /put/ {{
                            root {w}/store;
                            dav_methods PUT;
                            create_full_put_path on;
                            client_max_body_size 0;
                        }}
                    }}
                }}
                """).format(w=self.work, port=self.port))
        self.command = ["nginx", "-p", self.work, "-c", conf, "-e",
                        os.path.join(self.work, "error.log")]
        self.process = subprocess.Popen(self.taskset() + self.command +
                                        ["-g", "daemon off;"])
        wait_for_port(self.port)

    def curl(self, payload):
        return ["-T", payload, "http://127.0.0.1:%d/put/upload.bin" % self.port]

    def stored_file(self, answer):
        return os.path.join(self.store, "put", "upload.bin")


class Ipd(System):
    name = "ipd"

    def start(self):
        os.makedirs(os.path.join(self.store, "bench"), exist_ok=True)
        control = os.path.join(self.store, "bench", "control.sh")
        with open(control, "w") as file:
            file.write('#!/bin/sh\n[ "$1" = check ] && date +%s.%N >> '
                       + os.path.join(self.work, "started") + "\nexit 1\n")
        os.chmod(control, 0o755)
        users = os.path.join(self.work, "users.txt")
        with open(users, "w") as file:
            file.write("ADMIN:bench:%s\n" % hashlib.sha256(b"bench").hexdigest())
        environ = dict(os.environ, UPLOAD_DIR=self.store, LOG_DIR=self.work,
                       AUTH_DB=users, LISTEN="127.0.0.1:0", KEEP_DEPLOYMENTS="1",
                       MAX_UNPACKED_SIZE="0")
        self.port = start_and_read_port(
            self.taskset() + [sys.executable, os.path.join(HERE, "ipd.py"), "--config",
                              os.devnull, "serve"], environ, self)

    def curl(self, payload):
        return ["-u", "bench:bench", "-F", "project=bench", "-F", "image=@" + payload,
                "http://127.0.0.1:%d/deploy/upload" % self.port]

    def stored_file(self, answer):
        return os.path.join(self.store, "bench", "deployments", answer.strip() + ".image")


class IpdUnpinned(Ipd):
    name = "ipd unpinned"
    pinned = False


STARLETTE_APP = '''
import os, shutil
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

STORE = os.environ["BENCH_STORE"]

async def upload(request):
    form = await request.form()
    part = form["image"]
    with open(os.path.join(STORE, "upload.bin"), "wb") as out:
        shutil.copyfileobj(part.file, out, 1 << 20)
    await form.close()
    return PlainTextResponse("ok")

app = Starlette(routes=[Route("/upload", upload, methods=["POST"])])
'''

MULTIPART_HARNESS = '''
import os, socket, sys, http.server
from multipart import PushMultipartParser, MultipartSegment, parse_options_header

STORE = os.environ["BENCH_STORE"]

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        _, options = parse_options_header(self.headers["Content-Type"])
        remaining = int(self.headers["Content-Length"])
        out = None
        with PushMultipartParser(options["boundary"]) as parser:
            while not parser.closed:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                remaining -= len(chunk)
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        if event.name == "image":
                            out = open(os.path.join(STORE, "upload.bin"), "wb")
                    elif event:
                        if out:
                            out.write(event)
                    elif out:
                        out.close()
                        out = None
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("port", server.server_address[1], flush=True)
server.serve_forever()
'''


class Uvicorn(System):
    name = "uvicorn+starlette"

    def start(self):
        with open(os.path.join(self.work, "app.py"), "w") as file:
            file.write(STARLETTE_APP)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        environ = dict(os.environ, BENCH_STORE=self.store, PYTHONPATH=self.work)
        self.process = subprocess.Popen(
            self.taskset() + [os.path.join(VENV, "bin", "python"), "-m", "uvicorn",
                              "app:app", "--fd", str(sock.fileno()), "--log-level",
                              "warning", "--no-access-log"],
            env=environ, pass_fds=[sock.fileno()])
        sock.close()
        wait_for_port(self.port)

    def curl(self, payload):
        return ["-F", "image=@" + payload, "http://127.0.0.1:%d/upload" % self.port]

    def stored_file(self, answer):
        return os.path.join(self.store, "upload.bin")


class MultipartPackage(Uvicorn):
    name = "multipart (push parser)"

    def start(self):
        with open(os.path.join(self.work, "harness.py"), "w") as file:
            file.write(MULTIPART_HARNESS)
        self.port = start_and_read_port(
            self.taskset() + [os.path.join(VENV, "bin", "python"),
                              os.path.join(self.work, "harness.py")],
            dict(os.environ, BENCH_STORE=self.store), self, stream="stdout")


def start_and_read_port(command, environ, system, stream="stderr"):
    """Start a server that prints its port; return the port."""
    log = os.path.join(system.work, "server.log")
    with open(log, "wb") as out:
        system.process = subprocess.Popen(command, env=environ, stdin=subprocess.DEVNULL,
                                          stdout=out if stream == "stdout" else
                                          subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"(?:listening on http://127\.0\.0\.1:|port )(\d+)",
                          open(log).read())
        if match:
            return int(match.group(1))
        time.sleep(0.05)
    raise SystemExit("%s did not start: %s" % (system.name, open(log).read()))


def wait_for_port(port):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("nothing listens on port %d" % port)


# --- one upload, measured

def upload(system, payload, size, digest):
    """Upload payload to system with curl on core 1; return its figures."""
    pids = system.pids()
    reset_peak_rss(pids)
    cpu_before = cpu_seconds(pids)
    result = subprocess.run(["taskset", "-c", "1", "curl", "-sS", "-f", "-o", "-",
                             "-w", "\n%{time_total}"] + system.curl(payload),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if result.returncode:
        raise SystemExit("%s: curl failed: %s" % (system.name, result.stderr.decode()))
    answer, _, seconds = result.stdout.decode().rpartition("\n")
    pids = system.pids()
    cpu = cpu_seconds(pids) - cpu_before
    rss = peak_rss_mib(pids)
    stored = system.stored_file(answer)
    if sha256_file(stored) != digest:
        raise SystemExit("%s stored a wrong file for %s" % (system.name, payload))
    os.unlink(stored)  # every system starts each run from the same state
    seconds = float(seconds)
    return {"mbps": size / MIB / seconds,  # MiB/s
            "cpu_per_gib": cpu / (size / (1 << 30)), "rss": rss}


def make_payloads(work, sizes):
    payloads = []
    for label, size in sizes:
        path = os.path.join(work, "payload-" + label)
        with open(path, "wb") as file:
            block = os.urandom(4 * MIB)
            written = 0
            while written < size:
                file.write(block[:size - written])
                written += min(len(block), size - written)
        payloads.append((label, path, size, sha256_file(path)))
    return payloads


def image_tar(work):
    """An image tar as `docker save` makes one (several layers in a tar),
    of random data: 256 MiB."""
    import tarfile
    path = os.path.join(work, "payload-image.tar")
    with tarfile.open(path, "w") as tar:
        for number in range(4):
            layer = os.path.join(work, "layer.tar")
            with open(layer, "wb") as file:
                for _ in range(16):
                    file.write(os.urandom(4 * MIB))
            tar.add(layer, "%064x/layer.tar" % number)
        os.unlink(layer)
    return ("image tar", path, os.path.getsize(path), sha256_file(path))


# --- /status latency, control.sh start, start-up at scale

def wrk(url, seconds, auth=True):
    command = ["taskset", "-c", "1", "wrk", "-t2", "-c64", "-d%ds" % seconds,
               "--latency", url]
    if auth:
        command[6:6] = ["-H", "Authorization: " + AUTH]
    text = subprocess.run(command, stdout=subprocess.PIPE).stdout.decode()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))

    def latency(percent):
        value, unit = re.search(r"%s%%\s+([\d.]+)(us|ms|s)" % percent, text).groups()
        return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": rps, "p50": latency(50), "p99": latency(99),
            "errors": int(errors.group(1)) if errors else 0}


BARE_HANDLER = '''
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\\n")
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # as ipd's: the same listen backlog
server = Server(("127.0.0.1", 0), Handler)
print("port", server.server_address[1], flush=True)
server.serve_forever()
'''


class Bare(System):
    name = "bare http.server"

    def start(self):
        with open(os.path.join(self.work, "bare.py"), "w") as file:
            file.write(BARE_HANDLER)
        self.port = start_and_read_port(
            self.taskset() + [sys.executable, os.path.join(self.work, "bare.py")],
            dict(os.environ), self, stream="stdout")


def control_start_latency(system, runs):
    """Seconds from an upload's last byte sent to control.sh starting (its
    check step writes the time; same clock, same machine)."""
    started = os.path.join(system.work, "started")
    delays = []
    for number in range(runs):
        if os.path.exists(started):
            os.unlink(started)
        head = (b'--b\r\nContent-Disposition: form-data; name="project"\r\n\r\n'
                b'bench\r\n--b\r\nContent-Disposition: form-data; name="image"; '
                b'filename="i"\r\n\r\n' + os.urandom(100000) + b"\r\n")
        tail = b"--b--\r\n"
        connection = http.client.HTTPConnection("127.0.0.1", system.port)
        connection.putrequest("POST", "/deploy/upload")
        connection.putheader("Authorization", AUTH)
        connection.putheader("Content-Type", "multipart/form-data; boundary=b")
        connection.putheader("Content-Length", str(len(head) + len(tail)))
        connection.endheaders()
        connection.send(head)
        connection.send(tail)
        sent = time.time()
        connection.getresponse().read()
        connection.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.path.exists(started) and open(started).read().strip():
                break
            time.sleep(0.001)
        delays.append(float(open(started).read().split()[0]) - sent)
        time.sleep(0.05)
    return statistics.median(delays)


def make_scale_store(store, projects, per_project):
    """An UPLOAD_DIR of projects x per_project finished deployments (kept
    between runs of the bench, as it takes a while to write)."""
    if not os.path.exists(os.path.join(store, ".complete-%d-%d" % (projects, per_project))):
        shutil.rmtree(store, ignore_errors=True)
        for number in range(projects):
            folder = os.path.join(store, "p%04d" % number, "deployments")
            os.makedirs(folder)
            for seq in range(per_project):
                deployment = "%08x-0000-4000-8000-%012x" % (number, seq)
                record = {"version": 1, "id": deployment, "project": "p%04d" % number,
                          "seq": number * per_project + seq, "state": "ok",
                          "created": 1.7e9, "started": 1.7e9, "ended": 1.7e9 + 3,
                          "user": "ci", "files": {}, "control": "/bin/true",
                          "steps": [{"step": "deploy", "code": 1, "seconds": 3}],
                          "pruned": True}
                with open(os.path.join(folder, deployment + ".json"), "w") as file:
                    json.dump(record, file)
                open(os.path.join(folder, deployment + ".log"), "w").close()
        open(os.path.join(store, ".complete-%d-%d" % (projects, per_project)), "w").close()


def startup_beside(work, projects, per_project, revision):
    """Start-up time and memory over projects x per_project finished
    deployments, and /info and /stat latency over them: of this ipd.py and
    of ipd.py at git revision (an older one, for today's figures), each in
    a store of its own whose caches its first start builds; -> {label:
    [(startup, rss, latencies) of the first start, of the next]}."""
    older = os.path.join(work, "ipd-%s.py" % revision)
    with open(older, "wb") as file:
        file.write(subprocess.run(["git", "-C", HERE, "show", "%s:ipd.py" % revision],
                                  check=True, stdout=subprocess.PIPE).stdout)
    figures = {}
    for label, script in (("this ipd.py", IPD_SCRIPT), (revision, older)):
        store = os.path.join(BUILD, "scale-%s-%d" % (
            "this" if script == IPD_SCRIPT else revision, projects * per_project))
        make_scale_store(store, projects, per_project)
        figures[label] = [start_once(work, store, script) for _ in range(2)]
    return figures


def start_once(work, store, script):
    system = Ipd(work)
    users = os.path.join(system.work, "users.txt")
    with open(users, "w") as file:
        file.write("ADMIN:bench:%s\n" % hashlib.sha256(b"bench").hexdigest())
    environ = dict(os.environ, UPLOAD_DIR=store, LOG_DIR=system.work, AUTH_DB=users,
                   LISTEN="127.0.0.1:0")
    began = time.monotonic()
    system.port = start_and_read_port(
        [sys.executable, script, "--config", os.devnull, "serve"], environ, system)
    startup = time.monotonic() - began
    with open("/proc/%d/status" % system.process.pid) as file:
        rss = int(re.search(r"VmRSS:\s+(\d+)", file.read()).group(1)) / 1024
    latencies = {}
    for path in ("/info", "/stat"):
        times = []
        for _ in range(10):
            connection = http.client.HTTPConnection("127.0.0.1", system.port)
            began = time.monotonic()
            connection.request("GET", "/deploy" + path, headers={"Authorization": AUTH})
            connection.getresponse().read()
            times.append(time.monotonic() - began)
            connection.close()
        latencies[path] = statistics.median(times) * 1000
    system.stop()
    return startup, rss, latencies


# --- setup and the table

def ensure_tools():
    missing = [name for name, package in (("nginx", "nginx"), ("curl", "curl"),
                                          ("wrk", "wrk"), ("taskset", "util-linux"))
               if not shutil.which(name)]
    packages = {"nginx": "nginx", "curl": "curl", "wrk": "wrk", "taskset": "util-linux"}
    if missing and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq"] + [packages[m] for m in missing],
                       check=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    elif missing:
        raise SystemExit("bench needs %s (apt-get install %s)"
                         % (", ".join(missing), " ".join(packages[m] for m in missing)))
    if not os.path.exists(os.path.join(VENV, "bin", "python")):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "-q",
                    "--disable-pip-version-check"] + PEERS, check=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB, one run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", action="store_true", help="only the layer "
                        "push figures (issue #16)")
    parser.add_argument("--registry", action="store_true", help="only docker push "
                        "to ipd beside docker-registry (issue #24)")
    parser.add_argument("--scale", action="store_true", help="only the start-up "
                        "over 100,000 deployments, beside %s's" % STARTUP_BASELINE)
    args = parser.parse_args(argv)
    runs = 1 if args.quick else args.runs
    os.makedirs(BUILD, exist_ok=True)
    work = tempfile.mkdtemp(prefix="run-", dir=BUILD)
    if args.scale:
        report_scale(startup_beside(work, 1000, 100, STARTUP_BASELINE))
        shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.layers:
        report_layers(layer_figures(work, args.quick))
        shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.registry:
        report_registry(registry_figures(work, args.quick, runs))
        shutil.rmtree(work, ignore_errors=True)
        return 0
    ensure_tools()
    sizes = [("64 MiB", 64 * MIB)]
    if not args.quick:
        sizes += [("1 GiB", 1 << 30), ("4 GiB", 4 << 30)]
    print("machine: %s, %d cores, Python %s" % (
        open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": "),
        os.cpu_count(), sys.version.split()[0]), flush=True)
    payloads = make_payloads(work, sizes)
    if not args.quick:
        payloads.append(image_tar(work))
    systems = [Nginx(work), Ipd(work), IpdUnpinned(work), Uvicorn(work),
               MultipartPackage(work)]
    results = {}
    try:
        for system in systems:
            system.start()
        sha_rate = sha256_rate_one_core()
        for label, path, size, digest in payloads:
            for number in range(runs):
                order = systems if number % 2 == 0 else systems[::-1]
                for system in order:
                    figures = upload(system, path, size, digest)
                    results.setdefault((system.name, label), []).append(figures)
                    print("  %-24s %-9s run %d: %7.1f MiB/s" % (
                        system.name, label, number + 1, figures["mbps"]), flush=True)
            os.unlink(path)
        status = status_figures(systems[1], work, 3 if args.quick else 5,
                                payloads, args.quick)
        start_delay = control_start_latency(systems[1], 5 if args.quick else 20)
    finally:
        for system in systems:
            system.stop()
    scale = startup_beside(work, *((100, 10) if args.quick else (1000, 100)),
                           revision=STARTUP_BASELINE)
    report(results, payloads, sha_rate, status, start_delay, scale, runs)
    report_layers(layer_figures(work, args.quick))
    if shutil.which("docker-registry") and shutil.which("docker"):
        report_registry(registry_figures(work, args.quick, runs))
    else:
        print("\ndocker push beside docker-registry: skipped (apt-get install "
              "docker.io docker-registry)")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def status_figures(ipd, work, seconds, payloads, quick):
    bare = Bare(work)
    bare.start()
    try:
        figures = {"bare http.server": wrk("http://127.0.0.1:%d/" % bare.port, seconds,
                                           auth=False)}
    finally:
        bare.stop()
    url = "http://127.0.0.1:%d/deploy/status/bench" % ipd.port
    figures["ipd /status"] = wrk(url, seconds)
    # again while a large upload runs
    size = (256 if quick else 4096) * MIB
    path = os.path.join(work, "payload-during")
    with open(path, "wb") as file:
        file.truncate(size)
    upload_process = subprocess.Popen(
        ["taskset", "-c", "1", "curl", "-sS", "-o", os.devnull] + ipd.curl(path))
    time.sleep(0.5)
    figures["ipd /status during upload"] = wrk(url, seconds)
    upload_process.wait()
    os.unlink(path)
    return figures


TABLE_HEADER = "| system | payload | MiB/s | CPU s/GiB | peak RSS MiB | vs nginx |"


def report(results, payloads, sha_rate, status, start_delay, scale, runs):
    print("\nUploads (median of %d; server on core 0, curl on core 1; "
          "SHA-256 of one core: %.0f MiB/s)" % (runs, sha_rate))
    print(TABLE_HEADER)
    print("| ------ | ------ | ------: | ------: | ------: | ------: |")
    for label, _, _, _ in payloads:
        reference = statistics.median(r["mbps"] for r in results[("nginx PUT", label)])
        for name in ("nginx PUT", "ipd", "ipd unpinned", "uvicorn+starlette",
                     "multipart (push parser)"):
            rows = results[(name, label)]
            mbps = statistics.median(r["mbps"] for r in rows)
            print("| %s | %s | %.0f | %.2f | %.1f | %.2f |" % (
                name, label, mbps, statistics.median(r["cpu_per_gib"] for r in rows),
                max(r["rss"] for r in rows), mbps / reference))
        ceiling = 1 / (1 / reference + 1 / sha_rate)
        ipd_mbps = statistics.median(r["mbps"] for r in results[("ipd", label)])
        uvicorn = statistics.median(r["mbps"] for r in results[("uvicorn+starlette",
                                                                 label)])
        print("|  | %s: ipd / (nginx + SHA-256 ceiling %.0f MiB/s) = %.2f; "
              "ipd / uvicorn = %.2f |  |  |  |  |" % (label, ceiling, ipd_mbps / ceiling,
                                                     ipd_mbps / uvicorn))
    print("\n/status, 64 keep-alive clients (wrk)")
    print("| server | requests/s | p50 ms | p99 ms | vs bare |")
    print("| ------ | ------: | ------: | ------: | ------: |")
    bare = status["bare http.server"]["rps"]
    for name, figures in status.items():
        print("| %s | %.0f | %.2f | %.2f | %.2f |" % (name, figures["rps"], figures["p50"],
                                                     figures["p99"], figures["rps"] / bare))
    print("\nan upload's last byte to control.sh starting: %.1f ms (median)"
          % (start_delay * 1000))
    report_scale(scale)


def report_scale(scale):
    """The start-up figures of startup_beside, this ipd.py's first."""
    for label, starts in scale.items():
        for when, (startup, rss, latencies) in zip(("first", "next"), starts):
            print("%-12s %s start-up over the deployments on disk: %.2f s, RSS %.0f "
                  "MiB; /info %.1f ms, /stat %.1f ms" % (
                      label, when, startup, rss, latencies["/info"], latencies["/stat"]))


# --- layer pushes (issue #16)

class Relay:
    """A TCP relay in front of ipd: counts the bytes clients send (request
    lines, headers and bodies: what goes on the wire) and, with a rate,
    passes them no faster than a link of that many bytes a second."""

    def __init__(self, target_port, rate=None):
        self.target_port = target_port
        self.rate = rate
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.cut_after = None  # bytes after which every connection is cut
        self.reset()
        threading.Thread(target=self.accept, daemon=True).start()

    def reset(self):
        with self.lock:
            self.sent = 0
            self.free_at = 0.0  # when the link has passed what it was given
            self.connections = []

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.connections += [client, upstream]
            threading.Thread(target=self.pump, args=(upstream, client, False),
                             daemon=True).start()
            threading.Thread(target=self.pump, args=(client, upstream, True),
                             daemon=True).start()

    def pump(self, source, target, counted):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if counted:
                    # a link of rate bytes a second: each block leaves when
                    # the ones before it have; time the link stood idle is
                    # not saved up for later, beyond the few milliseconds
                    # that a sleep oversleeps
                    with self.lock:
                        self.sent += len(data)
                        sent, now = self.sent, time.monotonic()
                        if self.rate:
                            self.free_at = max(now - 0.005, self.free_at) + \
                                len(data) / self.rate
                        ahead = self.free_at - now
                    if self.rate and ahead > 0:
                        time.sleep(ahead)
                    if self.cut_after is not None and sent >= self.cut_after:
                        break
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.listener.close()


def layered_tar(path, layers):
    """A tar laid out as `docker save` makes one: each layer (a seed for
    random bytes, a size) as NAME/layer.tar, a config naming the layers'
    SHA-256 (rootfs.diff_ids), manifest.json."""
    import random
    import tarfile
    names, diff_ids = [], []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for number, (seed, size) in enumerate(layers):
            name = "%064x/layer.tar" % (seed + 1)
            names.append(name)
            info = tarfile.TarInfo(name)
            info.size, info.mtime = size, 1700000000
            # a random MiB of its own, repeated: no two layers alike
            block = random.Random(seed).getrandbits(8 * MIB).to_bytes(MIB, "little")
            digest = hashlib.sha256()

            class Reader:
                position = 0

                def read(self, count=-1):
                    count = size - self.position if count < 0 else \
                        min(count, size - self.position)
                    pieces, left = [], count
                    while left:
                        start = self.position % MIB
                        piece = block[start:start + left]
                        pieces.append(piece)
                        left -= len(piece)
                        self.position += len(piece)
                    digest.update(b"".join(pieces))
                    return b"".join(pieces)
            tar.addfile(info, Reader())
            diff_ids.append("sha256:" + digest.hexdigest())
        config = json.dumps({"os": "linux", "rootfs": {
            "type": "layers", "diff_ids": diff_ids}}).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        manifest = json.dumps([{"Config": config_name, "RepoTags": ["bench:1"],
                                "Layers": names}]).encode()
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    return path


def disk_bytes(folder):
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


class LayerIpd(System):
    name = "ipd layers"
    pinned = False


def layer_figures(work, quick):
    """The issue #16 figures: a redeploy with one changed layer at 100
    Mbit/s, a cut push resumed, ten deployments sharing layers on disk."""
    layer = (2 if quick else 10) * MIB
    count = 5 if quick else 50
    rate = 100 * 1000 * 1000 // 8  # 100 Mbit/s
    store = os.path.join(work, "layers-store")
    for project in ("bench", "ten"):
        os.makedirs(os.path.join(store, project))
        control = os.path.join(store, project, "control.sh")
        with open(control, "w") as file:
            file.write("#!/bin/sh\nexit 1\n")
        os.chmod(control, 0o755)
    users = os.path.join(work, "layers-users.txt")
    with open(users, "w") as file:
        file.write("ADMIN:bench:%s\n" % hashlib.sha256(b"bench").hexdigest())
    environ = dict(os.environ, UPLOAD_DIR=store, LOG_DIR=work, AUTH_DB=users,
                   LISTEN="127.0.0.1:0", KEEP_DEPLOYMENTS="10", MAX_UNPACKED_SIZE="0")
    system = LayerIpd(work)
    port = start_and_read_port([sys.executable, os.path.join(HERE, "ipd.py"),
                                "--config", os.devnull, "serve"], environ, system)
    figures = {}
    relay = Relay(port)

    def push(image, *extra, project="bench"):
        relay.reset()
        started = time.monotonic()
        subprocess.run([sys.executable, os.path.join(HERE, "ipd.py"), "push",
                        "--project", project, "--image", image, "--wait"] + list(extra),
                       check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=dict(
                           os.environ, IPD_URL="http://127.0.0.1:%d/deploy" % relay.port,
                           IPD_USER="bench", IPD_PASSWORD="bench"))
        return time.monotonic() - started, relay.sent

    try:
        # 1. a redeploy where one layer changed, through a 100 Mbit/s link
        v1 = layered_tar(os.path.join(work, "v1.tar"),
                         [(number, layer) for number in range(count)])
        push(v1)
        relay.rate = rate
        sha_before = sha256_rate_one_core()
        layer_runs = []  # three such releases, each with a layer of its own
        for release in range(3):
            v2 = layered_tar(os.path.join(work, "v2.tar"),
                             [(number, layer) for number in range(count - 1)]
                             + [(1000 + release, layer)])
            layer_runs.append(push(v2))
        sha_after = sha256_rate_one_core()
        whole_time, whole_bytes = push(v2, "--whole")
        relay.rate = None
        layer_time, layer_bytes = sorted(layer_runs)[1]  # the median
        figures["redeploy"] = {
            "image": os.path.getsize(v2), "changed": layer,
            "layer_bytes": layer_bytes, "layer_time": layer_time,
            "layer_times": [run[0] for run in layer_runs],
            "whole_bytes": whole_bytes, "whole_time": whole_time,
            "sha256": (sha_before + sha_after) / 2}
        os.unlink(v1)
        # 2. a push cut at half, then pushed again
        big = layered_tar(os.path.join(work, "big.tar"),
                          [(2000, (64 if quick else 1024) * MIB)])
        size = os.path.getsize(big)
        relay.reset()
        process = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "ipd.py"), "push", "--project",
             "bench", "--image", big], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=dict(
                os.environ, IPD_URL="http://127.0.0.1:%d/deploy" % relay.port,
                IPD_USER="bench", IPD_PASSWORD="bench"))
        while relay.sent < size // 2 and process.poll() is None:
            time.sleep(0.01)
        process.kill()
        process.wait()
        with relay.lock:
            for sock in relay.connections:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        cut = relay.sent
        time.sleep(1)
        _, resumed = push(big)
        figures["resume"] = {"size": size, "cut": cut, "resumed": resumed}
        os.unlink(big)
        os.unlink(v2)
        # 3. ten deployments sharing all but one layer
        shared = [(3000 + number, layer) for number in range(count - 1)]
        before = disk_bytes(store)
        for number in range(10):
            image = layered_tar(os.path.join(work, "ten.tar"),
                                shared + [(4000 + number, layer)])
            push(image, project="ten")
            os.unlink(image)
        used = disk_bytes(store) - before
        figures["ten"] = {"used": used, "unique": layer * (count - 1 + 10),
                          "full": 10 * layer * count}
    finally:
        relay.close()
        system.stop()
    return figures


def report_layers(figures):
    redeploy, resume, ten = figures["redeploy"], figures["resume"], figures["ten"]
    print("\nLayer pushes (issue #16), through a relay that counts the bytes on "
          "the wire")
    print("| figure | measured | target |")
    print("| ------ | ------: | ------ |")
    print("| redeploy of a %.0f MiB image, one %.0f MiB layer changed: bytes on "
          "the wire | %.0f (%.3f x the changed layer) | at most 1.05 x (changed + "
          "metadata) |" % (redeploy["image"] / MIB, redeploy["changed"] / MIB,
                          redeploy["layer_bytes"],
                          redeploy["layer_bytes"] / redeploy["changed"]))
    print("| the same at 100 Mbit/s, push to ok (median of %s s) | %.2f s (whole "
          "upload: %.2f s, %.0f bytes): %.1f x faster | at least 20 x |" % (
              ", ".join("%.2f" % time for time in redeploy["layer_times"]),
              redeploy["layer_time"], redeploy["whole_time"], redeploy["whole_bytes"],
              redeploy["whole_time"] / redeploy["layer_time"]))
    print("| SHA-256 of one core around that push (client and server each hash "
          "the whole image once) | %.0f MiB/s | |" % redeploy["sha256"])
    print("| a %.0f MiB push cut after %.0f%%: the next push sends | %.1f%% | at "
          "most 55%% |" % (resume["size"] / MIB, 100 * resume["cut"] / resume["size"],
                           100 * resume["resumed"] / resume["size"]))
    print("| ten deployments sharing all but one layer: disk used | %.0f MiB, %.2f x "
          "the unique %.0f MiB (full copies: %.0f MiB) | at most 1.3 x |" % (
              ten["used"] / MIB, ten["used"] / ten["unique"], ten["unique"] / MIB,
              ten["full"] / MIB))


# --- docker push to ipd beside Debian's docker-registry (issue #24)

class DockerRegistry(System):
    """Debian's docker-registry (the reference implementation), on loopback."""
    name = "docker-registry"

    def start(self):
        self.port = free_port()
        shutil.rmtree(self.store, ignore_errors=True)
        config = os.path.join(self.work, "config.yml")
        with open(config, "w") as file:
            file.write("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                       "    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%d\n"
                       % (self.store, self.port))
        with open(os.path.join(self.work, "server.log"), "wb") as out:
            self.process = subprocess.Popen(["docker-registry", "serve", config],
                                            stdout=out, stderr=out)
        wait_for_port(self.port)


class IpdRegistry(System):
    """ipd as a registry: project bench, whose control.sh loads nothing."""
    name = "ipd registry"
    pinned = False  # as docker-registry: the engine compresses beside it

    def start(self):
        shutil.rmtree(self.store, ignore_errors=True)
        Ipd.start(self)

    def login(self, config):
        subprocess.run(["docker", "login", "-u", "bench", "--password-stdin",
                        "127.0.0.1:%d" % self.port], input=b"bench", check=True,
                       stdout=subprocess.DEVNULL, env=dict(os.environ, DOCKER_CONFIG=config))

    def wait_ok(self, since):
        """Seconds from since until the project's latest deployment is ok."""
        auth = "Basic " + base64.b64encode(b"bench:bench").decode()
        while True:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            connection.request("GET", "/deploy/status/bench", headers={"Authorization": auth})
            state = connection.getresponse().read().decode().strip()
            connection.close()
            if state == "ok":
                return time.monotonic() - since
            if state not in ("await", "active", "no"):
                raise SystemExit("the pushed deployment ended %s" % state)
            time.sleep(0.05)


def registry_image(work, tag, size, top):
    """Build tag FROM scratch: a layer of one random file of size bytes (the
    same in every run), then a small top layer (top: its bytes)."""
    context = os.path.join(work, "registry-context")
    os.makedirs(context, exist_ok=True)
    big = os.path.join(context, "big.bin")
    if not os.path.exists(big) or os.path.getsize(big) != size:
        with open(big, "wb") as out:
            for _ in range(size // MIB):
                out.write(os.urandom(MIB))
    with open(os.path.join(context, "top.txt"), "wb") as out:
        out.write(top)
    with open(os.path.join(context, "Dockerfile"), "w") as out:
        out.write("FROM scratch\nCOPY big.bin /big.bin\nCOPY top.txt /top.txt\n"
                  'CMD ["/big.bin"]\n')
    subprocess.run(["docker", "build", "-q", "-t", tag, context], check=True,
                   stdout=subprocess.DEVNULL, env=dict(os.environ, DOCKER_BUILDKIT="0"))


def registry_push(tag, config):
    """Seconds docker push of tag takes."""
    started = time.monotonic()
    subprocess.run(["docker", "push", "-q", tag], check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, DOCKER_CONFIG=config))
    return time.monotonic() - started


def registry_figures(work, quick, runs):
    """docker push of the same image to docker-registry and to ipd, fresh
    each run; ipd's peak RSS in its push; push-to-ok of a one-layer change."""
    size = 64 * MIB if quick else 500 * MIB
    config = os.path.join(work, "docker-config")
    os.makedirs(config, exist_ok=True)
    registry, ipd = DockerRegistry(work), IpdRegistry(work)
    times = {registry.name: [], ipd.name: []}
    peak = 0
    for number in range(runs):
        for system in (registry, ipd) if number % 2 == 0 else (ipd, registry):
            system.start()
            try:
                tag = "127.0.0.1:%d/bench:v%d" % (system.port, number)
                registry_image(work, tag, size, b"run %d\n" % number)
                if system is ipd:
                    ipd.login(config)
                    reset_peak_rss(ipd.pids())
                times[system.name].append(registry_push(tag, config))
                if system is ipd:
                    peak = max(peak, peak_rss_mib(ipd.pids()))
                print("  docker push %-16s %d MiB run %d: %.2f s" % (
                    system.name, size // MIB, number + 1, times[system.name][-1]),
                    flush=True)
                subprocess.run(["docker", "rmi", "-f", tag], stdout=subprocess.DEVNULL)
            finally:
                system.stop()
    ipd.start()
    try:
        ipd.login(config)
        tag = "127.0.0.1:%d/bench:" % ipd.port
        registry_image(work, tag + "a", size, b"a\n")
        registry_push(tag + "a", config)
        ipd.wait_ok(time.monotonic())
        registry_image(work, tag + "b", size, b"b\n")
        started = time.monotonic()
        registry_push(tag + "b", config)
        change = ipd.wait_ok(started)
    finally:
        ipd.stop()
    return {"size": size, "times": {name: statistics.median(values)
                                    for name, values in times.items()},
            "peak": peak, "change": change}


def report_registry(figures):
    times = figures["times"]
    print("\ndocker push (issue #24): the same %d MiB image, fresh servers, "
          "median" % (figures["size"] // MIB))
    print("| figure | measured | target |")
    print("| ------ | ------: | ------ |")
    print("| push time, ipd / docker-registry | %.2f s / %.2f s = %.2f | at most "
          "1.05 |" % (times["ipd registry"], times["docker-registry"],
                      times["ipd registry"] / times["docker-registry"]))
    print("| ipd's peak RSS during the push | %.0f MiB | under 64 MiB |" % figures["peak"])
    print("| push to ok of a one-layer change | %.2f s | |" % figures["change"])


if __name__ == "__main__":
    sys.exit(main())
