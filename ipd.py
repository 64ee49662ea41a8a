#!/usr/bin/env python3
"""ipd - Image Push and Deploy.

A small daemon that receives an app's container image and deploy package
over HTTP and switches the server to the new version by running the
project's ``control.sh``: ``check``, then ``prepare`` where the check
failed, then ``deploy`` (exit status 1 means success, as the original
README says; see SUCCESS_CODE).

One file, standard library only, CPython 3.8 to 3.13:

    python3 ipd.py demo             # a local daemon to try, user demo:demo
    python3 ipd.py serve            # the daemon, configured by /etc/ipd.conf
    python3 ipd.py passwd ROLE NAME # add or replace a user in AUTH_DB

How it is built, top to bottom (each section opens with what it owns, and
refers only to names defined above it): errors; settings; helpers (file
locks, the bounded JSON decoder every JSON body goes through); users
and passwords; signed releases and deploy tokens; the streaming multipart
parser (pure, no I/O); request bodies and uploads; safe unpacking of
packages; processes (who runs the scripts: RUN_AS, project.conf; stopping
what a step leaves); deployments (the Deployment type, its on-disk store,
the queue of waiting and running ones, the metrics); the deploy worker
that runs control.sh; segments (layers stored once, recipes, resumable
uploads); the service (what an upload, a redeploy, a cancel does); the
status pages; HTTP (routes, the request handler, the server); running the
daemon; the client (ipd.py push, status, logs...); the command line.

On disk, under UPLOAD_DIR, each project has a folder (PROJECT_DIR, kept
across deployments, where an administrator may place a control.sh,
notify.sh and project.conf; with RUN_AS the scripts' PROJECT_DIR is its
``work/`` instead) and in it ``deployments/`` with, per deployment ID:

    ID/         the unpacked package; control.sh runs here
    ID.image    the uploaded image ($IMAGE)
    ID.package  the uploaded package archive, as sent
    ID.log      everything control.sh printed
    ID.step     the running step's session and start time, to stop what a
                killed ipd left of it (RUN_AS: not ours to read otherwise)
    ID.json     state and times, written atomically; the deployment exists
                once this file does, and the daemon's memory is a cache of it
    ID.recipe   of a push by recipe: how to rebuild ID.image and ID.package
                from inline bytes and segments

and UPLOAD_DIR/.ipd.lock, flock'ed by the one daemon that uses the folder;
UPLOAD_DIR/.segments/ holds the segments (sha256/ab/abcd...), each once,
and partial/ the segment uploads under way.
"""

__version__ = "1.0.0"

import argparse
import base64
import binascii
import bisect
import bz2
import calendar
import codecs
import collections
import ctypes
import errno
import fcntl
import fnmatch
import getpass
import grp
import gzip
import hashlib
import hmac
import html
import http.client
import http.server
import io
import itertools
import ipaddress
import json
import logging
import logging.handlers
import lzma
import netrc
import os
import pwd
import queue
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
import zipfile


###############################################################################
# Errors ######################################################################
###############################################################################

# The one error family: each IpdError is an HTTP status and a one-line
# reason that reaches the client; ConfigError stops the daemon at start.


class ConfigError(Exception):
    """A setting or the users file is wrong; the daemon does not start."""


class StartupError(ConfigError):
    """The daemon cannot start: one line per reason, each naming a setting."""


class IpdError(Exception):
    """An error answered to the client with its HTTP status and message."""

    http_status = 500

    def __init__(self, message, headers=None):
        super().__init__(message)
        self.headers = headers or {}


class BadRequest(IpdError):
    http_status = 400


class Unauthorized(IpdError):
    http_status = 401


class Forbidden(IpdError):
    http_status = 403


class NotFound(IpdError):
    http_status = 404


class MethodNotAllowed(IpdError):
    http_status = 405


class Conflict(IpdError):
    http_status = 409


class LengthRequired(IpdError):
    http_status = 411


class Gone(IpdError):
    http_status = 410


class TooLarge(IpdError):
    http_status = 413


class TooManyRequests(IpdError):
    http_status = 429


class DiskFull(IpdError):
    http_status = 507


class Unavailable(IpdError):
    http_status = 503


class MultipartError(BadRequest):
    """The request body is not well-formed multipart/form-data."""


class ClientGone(Exception):
    """The client closed the connection or stopped sending; nobody to answer."""


###############################################################################
# Settings ####################################################################
###############################################################################

# /etc/ipd.conf and the environment into one Settings object: every key,
# its default and its parser in SETTINGS, checked once at start.

# What names a project or a deployment (settings name projects too).
PROJECT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\Z")
DEPLOYMENT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-"
                           r"[0-9a-f]{4}-[0-9a-f]{12}\Z")


def is_project_name(name):
    """True for 1-64 of letters, digits, '.', '_', '-', not led by '.' or '-'."""
    return bool(PROJECT_NAME.match(name)) and name.isascii()


DEFAULT_CONFIG = "/etc/ipd.conf"


# KEY: (default, kind, description).  The same table feeds the parser, the
# README and ipd.conf.example, so a setting is documented where it is read.
SETTINGS = {
    "LISTEN": ("127.0.0.1:9955", "address",
               "host:port to listen on; the nginx proxy_pass target"),
    "API_ROOT": ("/deploy", "root", "URL prefix of every endpoint"),
    "UPLOAD_DIR": (".", "path", "projects, deployments and temporary uploads"),
    "LOG_DIR": (".", "path", "where ipd.log is written"),
    "AUTH_DB": ("/opt/ipd/users.txt", "path",
                "users file: ROLE:username:hash lines"),
    "SUCCESS_CODE": ("1", "int", "exit status of control.sh that means success"),
    "STEP_TIMEOUT": ("600", "seconds", "time limit of each control.sh step"),
    "KILL_GRACE": ("10", "seconds", "between SIGTERM and SIGKILL of a step"),
    "SHUTDOWN_GRACE": ("30", "seconds",
                       "on SIGTERM, how long running steps may go on"),
    "MAX_PARALLEL": ("4", "count", "how many projects deploy at once"),
    "KEEP_DEPLOYMENTS": ("10", "count",
                         "deployments per project that keep their files"),
    "MAX_UPLOAD_SIZE": ("0", "size", "largest request body, 0 for no limit"),
    "MAX_UNPACKED_SIZE": ("8G", "size",
                          "largest unpacked package, 0 for no limit"),
    "READ_TIMEOUT": ("60", "seconds",
                     "a request body stalled this long is dropped"),
    "HEADER_TIMEOUT": ("30", "seconds",
                       "time to send a request's line and headers; also the "
                       "idle time of a kept-alive connection"),
    "MAX_CONNECTIONS": ("512", "count", "open connections; more get 503"),
    "MAX_CONNECTIONS_PER_ADDRESS": ("64", "count",
                                    "open connections of one client address "
                                    "(behind a trusted proxy: its X-Real-IP); "
                                    "more get 503"),
    "TRUSTED_PROXIES": ("127.0.0.0/8 ::1", "networks",
                        "peers whose X-Real-IP / X-Forwarded-For name the "
                        "client (the nginx in front); empty: none"),
    "ALLOWED_SIGNERS": ("", "file",
                        "OpenSSH allowed-signers file of the keys that may sign "
                        "pushes (principals WHO@PROJECT); empty: none"),
    "REQUIRE_SIGNATURE": ("", "projects",
                          "projects whose pushes must be signed, * for all; "
                          "empty: none"),
    "TOKENS_DB": ("", "file", "deploy tokens file; empty: tokens.txt beside "
                  "AUTH_DB"),
    "PUBLIC_ORIGIN": ("", "origins",
                      "origin(s) browsers reach ipd at, like "
                      "https://deploy.example.com; empty: from the Host header"),
    "PASS_ENV": ("", "names",
                 "daemon environment variables passed on to control.sh"),
    "NOTIFY_URL": ("", "url", "where a JSON summary of each ended deployment "
                   "is POSTed; empty for none"),
    "NOTIFY_TIMEOUT": ("30", "seconds", "time limit of notify.sh and of each "
                       "NOTIFY_URL attempt"),
    "SEGMENT_EXPIRY": ("86400", "seconds",
                       "partial segment uploads untouched this long are removed, "
                       "and so are segments no kept deployment refers to"),
    "DROP_REBUILT": ("yes", "yesno",
                     "remove the image and package a recipe push rebuilt once "
                     "its run ends (a redeploy rebuilds them from segments)"),
    "MIN_FREE_SPACE": ("0", "size",
                       "free space floor of UPLOAD_DIR: below it the files of "
                       "the oldest prunable deployments go first; 0 for none"),
    "SEGMENT_QUOTA": ("20G", "size",
                      "bytes of partial segment uploads and of segments no "
                      "kept deployment refers to that one user may hold; more "
                      "is refused (507); 0 for no bound"),
    "SEGMENT_UPLOADS": ("4", "count",
                        "segment uploads one user may have under way at once; "
                        "more get 429"),
    # What an uploader can reach (issue 14): see README, Guarantees.
    "SCRIPTS": ("package", "scripts",
                "package: a package may carry its own control.sh (the "
                "original); server: only the control.sh an administrator "
                "placed in the project folder runs, and a package with one "
                "is refused"),
    "RUN_AS": ("", "run_as",
               "user[:group[,group...]] that control.sh and notify.sh run "
               "as (names or numbers, e.g. ipd-run:ipd-run,docker); empty: "
               "as ipd's own user"),
    "MAX_MEMBERS": ("50000", "count", "entries in a package"),
    "MAX_HEADER_SIZE": ("64K", "size",
                        "headers of one tar entry, its pax records and GNU "
                        "long name or link included"),
    "MAX_NAME_SIZE": ("4096", "size",
                      "longest entry name and link target in a package"),
    "MAX_TRAILING_SIZE": ("1M", "size",
                          "bytes after the end of a tar archive (padding); "
                          "more is refused"),
    "AUDIT_SYSLOG": ("", "syslog",
                     "also send each audit event to syslog: a socket path "
                     "(/dev/log, read by the journal) or host:port (UDP); "
                     "empty for none"),
}


# A deployment is "await" or "active" until it ends in a final state: ok,
# changed, cancelled, timeout, interrupted, or an exit code.
UNFINISHED = ("await", "active")
STATE_FORMAT_VERSION = 1


class Settings:
    """The daemon's settings, each an attribute named as its key."""

    def __init__(self, values):
        for key, value in values.items():
            setattr(self, key, value)


def parse_size(text):
    """'512', '64K', '10M', '4G', '1T' -> bytes.  Raises ValueError."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError("not a size (like 512, 64K, 10M, 4G)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(match.group(1)) * 1024 ** power


def parse_listen(text):
    """'127.0.0.1:9955', '[::1]:9955', ':9955' -> (host, port)."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s]*):(\d+)", text)
    if not match:
        raise ValueError("must be host:port")
    host = match.group(1) or match.group(3) or "0.0.0.0"
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError("port out of range")
    return host, port


def normalize_origin(text):
    """'HTTPS://Example.com' -> 'https://example.com:443'; None when text is
    not an http(s) origin (RFC 6454: scheme, host and port, nothing else)."""
    match = re.fullmatch(r"(https?)://([^/?#@\s]+)", text.strip(), re.IGNORECASE)
    if not match:
        return None
    try:
        parts = urllib.parse.urlsplit(text.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    scheme = match.group(1).lower()
    port = port or (443 if scheme == "https" else 80)
    host = "[%s]" % host if ":" in host else host
    return "%s://%s:%d" % (scheme, host.lower(), port)


def address_in(address, networks):
    """True when the address text is in one of networks."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def unquote_env_value(text):
    """A value as systemd's EnvironmentFile reads it: quotes removed."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        inner = text[1:-1]
        if text[0] == '"':
            inner = re.sub(r'\\(["\\$`])', r"\1", inner)
        return inner
    return text


def read_config_file(path):
    """KEY=VALUE lines of an EnvironmentFile -> {key: (value, line_no)}.

    Raises ConfigError naming the file and line of a malformed line.
    """
    entries = {}
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except OSError as error:
        raise ConfigError("%s: cannot read: %s" % (path, error.strerror))
    except UnicodeDecodeError:
        raise ConfigError("%s: not UTF-8 text" % path)
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        match = re.fullmatch(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)",
                             line)
        if not match:
            raise ConfigError("%s:%d: malformed line, expected KEY=VALUE"
                              % (path, number))
        entries[match.group(1)] = (unquote_env_value(match.group(2)), number)
    return entries


class RunAs:
    """A user with its primary group and supplementary groups."""

    def __init__(self, uid, gid, groups, text):
        self.uid, self.gid, self.groups, self.text = uid, gid, tuple(groups), text

    def __repr__(self):
        return "%s (uid %d, gid %d, groups %s)" % (
            self.text, self.uid, self.gid, ",".join(map(str, self.groups)) or "-")


def lookup_id(name, database):
    """A user or group name or number -> its number.  Raises ValueError."""
    if name.isdigit():
        return int(name)
    try:
        return (pwd.getpwnam(name).pw_uid if database == "user"
                else grp.getgrnam(name).gr_gid)
    except KeyError:
        raise ValueError("no such %s: %r" % (database, name)) from None


def resolve_run_as(text):
    """'user[:group[,group...]]' -> RunAs.  The first group is the primary
    one, the others supplementary; with the user alone, its groups are those
    of the passwd and group databases.  Numbers need no account.  Root is
    refused: scripts under it would reach everything.  Raises ValueError."""
    user, colon, groups = text.strip().partition(":")
    if not user or (colon and not groups.strip(",")):
        raise ValueError("must be user[:group[,group...]]")
    uid = lookup_id(user, "user")
    if colon:
        gids = [lookup_id(name, "group") for name in groups.split(",") if name]
        gid, extra = gids[0], gids[1:]
    else:
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            raise ValueError("user %s has no account: give its group as "
                             "%s:GROUP" % (user, user)) from None
        gid = entry.pw_gid
        extra = [g for g in os.getgrouplist(entry.pw_name, gid) if g != gid]
    if uid == 0 or gid == 0 or 0 in extra:
        raise ValueError("scripts may not run as root or in group root")
    return RunAs(uid, gid, sorted(set(extra)), text.strip())


def parse_setting(kind, text):
    """Turn the text of one setting into its value.  Raises ValueError."""
    text = text.strip()
    if kind in ("int", "count"):
        if not re.fullmatch(r"-?\d+", text):
            raise ValueError("not a whole number")
        value = int(text)
        if kind == "count" and value < 1:
            raise ValueError("must be at least 1")
        return value
    if kind == "seconds":
        try:
            value = float(text)
        except ValueError:
            raise ValueError("not a number of seconds") from None
        if not 0 < value < 10 ** 7:
            raise ValueError("must be a positive number of seconds")
        return value
    if kind == "size":
        return parse_size(text)
    if kind == "yesno":
        if text.lower() not in ("yes", "no", "1", "0", "true", "false"):
            raise ValueError("must be yes or no")
        return text.lower() in ("yes", "1", "true")
    if kind == "names":
        names = text.replace(",", " ").split()
        for name in names:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError("not a variable name: %r" % name)
        return names
    if kind == "address":
        return parse_listen(text)
    if kind == "file":
        return os.path.abspath(text) if text else ""
    if kind == "projects":
        names = text.replace(",", " ").split()
        for name in names:
            if name != "*" and not is_project_name(name):
                raise ValueError("not a project name: %r" % name)
        return names
    if kind == "networks":
        return [ipaddress.ip_network(word, strict=False)
                for word in text.replace(",", " ").split()]
    if kind == "origins":
        origins = [normalize_origin(word) for word in text.replace(",", " ").split()]
        if None in origins:
            raise ValueError("each must be scheme://host[:port], like "
                             "https://deploy.example.com")
        return origins
    if kind == "url":
        if text and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", text):
            raise ValueError("must be an http:// or https:// URL")
        return text
    if kind == "scripts":
        if text not in ("package", "server"):
            raise ValueError("must be package or server")
        return text
    if kind == "run_as":
        if text:
            resolve_run_as(text)  # raises ValueError naming what is unknown
        return text
    if kind == "syslog":
        if text and not (text.startswith("/")
                         or re.fullmatch(r"[^\s/:]+:\d+", text)):
            raise ValueError("must be a socket path like /dev/log or host:port")
        return text
    if kind == "root":
        if not text.startswith("/") or re.search(r"[\s?#%]", text):
            raise ValueError("must be a URL path starting with /")
        return text.rstrip("/")
    if not text:
        raise ValueError("must not be empty")
    return text


def load_settings(config_path=None, environ=None, warn=None):
    """Read settings: defaults, then the config file, then the environment.

    config_path None means IPD_CONFIG or /etc/ipd.conf, either of which
    may be absent; a path given explicitly must exist.  Returns Settings;
    raises ConfigError with a one-line reason naming file, line and key.
    """
    environ = os.environ if environ is None else environ
    explicit = config_path or environ.get("IPD_CONFIG")
    path = explicit or DEFAULT_CONFIG
    sources = {key: (default, "default") for key, (default, _, _)
               in SETTINGS.items()}
    if explicit or os.path.exists(path):
        for key, (value, number) in read_config_file(path).items():
            where = "%s:%d" % (path, number)
            if key not in SETTINGS:
                if warn:
                    warn("%s: unknown setting %s ignored" % (where, key))
                continue
            sources[key] = (value, where)
    for key in SETTINGS:
        if key in environ:
            sources[key] = (environ[key], "environment")
    values = {}
    for key, (text, where) in sources.items():
        try:
            values[key] = parse_setting(SETTINGS[key][1], text)
        except ValueError as error:
            raise ConfigError("%s: %s: %s (got %r)" % (where, key, error, text))
    for key in ("UPLOAD_DIR", "LOG_DIR"):
        values[key] = os.path.abspath(values[key])
    return Settings(values)


###############################################################################
# Helpers #####################################################################
###############################################################################

# Small pure functions and file primitives the rest builds on: times,
# atomic writes, file locks, audit lines, hashing on a second core, JSON
# decoded within bounds.


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


log = logging.getLogger("ipd")
audit = logging.getLogger("ipd.audit")  # LOG_DIR/audit.log, JSON lines


def printable(text, limit=200):
    """text for a log line or a one-line answer: control characters (a
    forged line's CR and LF) escaped, cut to limit characters."""
    text = str(text)
    cut = len(text) > limit
    text = CONTROL_CHARACTERS.sub(lambda match: "\\x%02x" % ord(match.group()),
                                  text[:limit])
    return text + "..." if cut else text


def check_project_name(name):
    """Return name, or raise BadRequest."""
    if not is_project_name(name):
        raise BadRequest("bad project name: use 1-64 letters, digits, '.', "
                         "'_' or '-', not starting with '.' or '-'")
    return name


def iso_time(timestamp):
    """Seconds since the epoch -> '2026-11-25T10:25:58.123Z', or None."""
    if timestamp is None:
        return None
    try:
        whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp))
    except (OverflowError, OSError, ValueError):  # created=2**62 (issue 23)
        return "%.0f s after the epoch" % timestamp
    return "%s.%03dZ" % (whole, int(timestamp * 1000) % 1000)


def audit_event(event, **fields):
    """Append one event to the audit log: who did what to which deployment.
    Never a password."""
    now = time.time()
    audit.info("%s", json.dumps(dict({"time": iso_time(now), "ts": round(now, 3),
                                      "event": event}, **fields), sort_keys=True))


def write_all(fd, data):
    """os.write until every byte of data is written."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(path):
    """Make a rename or create in folder path durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ParallelHash:
    """A SHA-256 computed by a thread of its own from the blocks (bytes, not
    to be changed afterwards) given to update(), so that the caller can copy
    or hash the same bytes on a second core meanwhile (hashlib lets go of
    the GIL).  hexdigest() waits for the last block; close() gives up."""

    def __init__(self):
        self.hash = hashlib.sha256()
        self.blocks = queue.Queue(2)  # two blocks in flight: flat memory
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for block in iter(self.blocks.get, None):
            self.hash.update(block)

    def update(self, block):
        self.blocks.put(block)

    def close(self):
        if self.thread.is_alive():
            self.blocks.put(None)
            self.thread.join()

    def hexdigest(self):
        self.close()
        return self.hash.hexdigest()


class Background:
    """function(*args) run by a thread of its own; result() waits for it
    and returns what it returned, or raises what it raised."""

    def __init__(self, function, *args):
        self.value = self.error = None
        self.thread = threading.Thread(target=self._run, args=(function, args),
                                       daemon=True)
        self.thread.start()

    def _run(self, function, args):
        try:
            self.value = function(*args)
        except BaseException as error:  # handed to result()
            self.error = error

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def remove_quietly(path):
    """Remove a file or a whole folder; a missing one is fine."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


class FileLock:
    """An exclusive lock (flock) on PATH.lock, beside a file that several
    commands read, change and write back (the tokens file, its last uses,
    the users file): one at a time, or a change is lost (issue 23).  The
    kernel drops it with its holder; the empty lock file stays."""

    def __init__(self, path):
        self.path = path + ".lock"
        self.fd = None

    def __enter__(self):
        # read-only is enough for flock: root and the daemon's user share it
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc_info):
        os.close(self.fd)  # and with it the lock
        self.fd = None


def write_file_atomic(path, data, mode=0o640):
    """Replace path with data: temporary file, fsync, rename, fsync folder."""
    folder = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                                     suffix=".tmp", dir=folder)
    try:
        write_all(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(temporary, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        remove_quietly(temporary)
        raise
    fsync_dir(folder)


def disk_errors(error):
    """Turn a full disk into DiskFull (507); other OSErrors are re-raised."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC,
                                                      errno.EDQUOT):
        return DiskFull("disk full: the upload was not stored")
    return error


def free_space(path):
    try:
        info = os.statvfs(path)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize


# --- bounded JSON (issue 23): what json.loads would pay for, checked first

# JSON bodies and files are nested at most this deep: json.loads recurses
# once a level (RecursionError near 1,000), and no ipd document needs more.
MAX_JSON_DEPTH = 16
# What gives JSON text its structure: quotes, brackets, commas.
NOT_STRUCTURE = bytes(set(range(256)) - set(b'"[]{},'))
QUOTE, COMMA = ord('"'), ord(",")
OPENING = frozenset(b"[{")


def json_items(data):
    """The containers and commas of JSON text: about how many objects
    json.loads would make of it (a string's commas counted too, so an
    upper bound).  Cheap: for a body as it arrives."""
    return data.count(b"{") + data.count(b"[") + data.count(b",")


def check_json_shape(data, what, max_items, max_depth=MAX_JSON_DEPTH):
    """Refuse JSON text (bytes) with more than max_items values or nested
    deeper than max_depth, before json.loads builds anything of it.  Only
    the structure is walked (escaped quotes and backslashes dropped first,
    then all but quotes, brackets and commas): no object per value is
    made, however hostile the text.  Raises BadRequest naming what."""
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = unescaped.translate(None, NOT_STRUCTURE)
    del unescaped
    if len(marks) > 8 * max_items + 64:  # a value has 2 quotes, a key 2 more
        raise BadRequest("%s has more than %d values" % (what, max_items))
    items = depth = 0
    in_string = False
    for mark in marks:
        if mark == QUOTE:
            in_string = not in_string
        elif in_string:
            continue
        elif mark in OPENING:
            depth += 1
            items += 1
            if depth > max_depth:
                raise BadRequest("%s is nested more than %d deep" % (what, max_depth))
        elif mark == COMMA:
            items += 1
        else:
            depth -= 1
    if items > max_items:
        raise BadRequest("%s has more than %d values" % (what, max_items))


def bounded_int(text):
    """json.loads' parse_int: a number of more than 40 digits costs it
    quadratic time (and 3.11+ refuse them); no ipd number needs one."""
    if len(text) > 40:
        raise BadRequest("a number of more than 40 digits")
    return int(text)


def return_freed_memory():
    """Give the memory freed since back to the system, where the C library
    can (glibc's malloc_trim): glibc keeps what a thread freed in that
    thread's arena, so a few requests with large JSON bodies, each on a
    thread of its own, would otherwise hold the daemon's RSS up until it
    restarts (issue 23).  Elsewhere, nothing."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def json_kind(value):
    """What a decoded JSON value is, in JSON's words."""
    for kind, name in ((bool, "a boolean"), (dict, "an object"), (list, "an array"),
                       (str, "a string"), ((int, float), "a number")):
        if isinstance(value, kind):
            return name
    return "null"


def load_json_object(data, what, max_items, max_depth=MAX_JSON_DEPTH):
    """JSON text (bytes) that must be an object -> dict, its shape checked
    first (check_json_shape).  Raises BadRequest with the reason, never
    RecursionError or a TypeError."""
    check_json_shape(data, what, max_items, max_depth)
    try:
        value = json.loads(bytes(data).decode("utf-8"), parse_int=bounded_int)
    except BadRequest as error:
        raise BadRequest("%s has %s" % (what, error))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("%s is not JSON" % what)
    if not isinstance(value, dict):
        raise BadRequest("%s must be a JSON object, not %s" % (what, json_kind(value)))
    return value


###############################################################################
# Users and passwords #########################################################
###############################################################################

# AUTH_DB (ROLE:name:hash lines, re-read when it changes), password
# hashing and checking in constant time, roles and project lists.


ROLES = ("ADMIN", "USER", "METRICS")
# Which roles each endpoint's role admits (METRICS: a scraper's login).
ADMITTED = {"ADMIN": ("ADMIN",), "USER": ("ADMIN", "USER"),
            "METRICS": ("ADMIN", "METRICS")}
PBKDF2_ITERATIONS = 200000


def hash_password(password, iterations=PBKDF2_ITERATIONS, salt=None):
    """Salted PBKDF2-SHA256, as 'pbkdf2_sha256$ITERATIONS$SALT$HASH'.

    The original's plain sha256 hex is still accepted by check_password;
    this form keeps the ROLE:username:hash line format (no ':' inside).
    """
    salt = salt or secrets.token_hex(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(),
                                 iterations)
    return "pbkdf2_sha256$%d$%s$%s" % (iterations, salt, digest.hex())


def check_password(password, stored):
    """True when password matches stored hash; constant-time comparison."""
    if stored.startswith("pbkdf2_sha256$"):
        try:
            _, iterations, salt, expected = stored.split("$")
            computed = hash_password(password, int(iterations), salt)
        except ValueError:
            return False
        return hmac.compare_digest(computed, stored)
    computed = hashlib.sha256(password.encode()).hexdigest()
    return hmac.compare_digest(computed, stored.lower())


def users_line_problem(fields):
    """What is wrong with the fields of one users file line, or None.  A
    reason ending in 'line ignored' means the line gives no user."""
    if len(fields) not in (3, 4):
        return ("expected ROLE:username:hash[:projects], found %d field%s; "
                "line ignored" % (len(fields), "" if len(fields) == 1 else "s"))
    if fields[0] not in ROLES:
        return ("unknown role %r (ADMIN, USER or METRICS); line ignored"
                % fields[0][:20])
    if not fields[1]:
        return "empty user name; line ignored"
    if len(fields) == 4 and fields[0] != "USER":
        return "a project list is for USER lines only; ignored for %s" % fields[0]
    return None


class User:
    """One line of the users file."""

    def __init__(self, name, role, password_hash, projects=None):
        self.name = name
        self.role = role
        self.password_hash = password_hash
        self.projects = projects  # None: every project

    def may_use(self, project):
        return (self.role == "ADMIN" or self.projects is None
                or project in self.projects)


def parse_users(text, source="users file"):
    """ROLE:username:hash[:project,...] lines -> ({name: User}, warnings)."""
    users, warnings = {}, []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        problem = users_line_problem(fields)
        if problem:
            warnings.append("%s, line %d: %s" % (source, number, problem))
            if problem.endswith("line ignored"):
                continue
        projects = None
        if len(fields) == 4:
            projects = frozenset(p for p in fields[3].split(",") if p)
        users[fields[1]] = User(fields[1], fields[0], fields[2], projects)
    return users, warnings


def file_signature(path):
    """(mtime, size, inode) of the file at path, or None when it cannot be
    seen: a change of any of them means the file must be read again."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


class UserDB:
    """The users file, read again whenever it changes on disk.

    A verified password is remembered (as a keyed hash, never in clear) so
    that status polling does not pay PBKDF2 on every request.
    """

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._signature = None
        self._users = {}
        self._verified = {}
        self._cache_key = secrets.token_bytes(32)
        self._decoy = None

    def _reload_if_changed(self):
        signature = file_signature(self.path)
        with self._lock:
            if signature == self._signature:
                return
            self._signature = signature
            self._verified = {}
            if signature is None:
                self._users = {}
                log.warning("users file %s is missing: nobody can log in",
                            self.path)
                return
            try:
                with open(self.path, encoding="utf-8") as file:
                    text = file.read()
            except (OSError, UnicodeDecodeError) as error:
                log.error("cannot read users file %s: %s", self.path, error)
                self._users = {}
                return
            self._users, warnings = parse_users(text, self.path)
            for warning in warnings:
                log.warning("%s", warning)

    def decoy_hash(self):
        """A PBKDF2 hash of no one's password, checked for a login that
        fails before a PBKDF2 check of its own, so that every wrong login
        costs the same."""
        if self._decoy is None:
            self._decoy = hash_password(secrets.token_hex(16))
        return self._decoy

    def authenticate(self, name, password):
        """Return the User for a right name and password, else None."""
        self._reload_if_changed()
        with self._lock:
            user = self._users.get(name)
        if user is None:  # as slow as a wrong password: names stay secret
            check_password(password, self.decoy_hash())
            return None
        stored = user.password_hash
        key = hmac.new(self._cache_key, ("%s\0%s\0%s" % (name, stored, password))
                       .encode(), "sha256").digest()
        with self._lock:
            if key in self._verified:
                return self._verified[key]
        if not check_password(password, stored):
            if not stored.startswith("pbkdf2_sha256$"):  # a fast hash: pay PBKDF2
                check_password(password, self.decoy_hash())
            return None
        with self._lock:
            if len(self._verified) > 10000:
                self._verified.clear()
            self._verified[key] = user
        return user


class LoginThrottle:
    """Failed logins per client address: a burst of `burst`, then one each
    `refill` seconds.  An address that used them up is refused (429) before
    any password is checked, so guessing costs the guesser, not the server.
    """

    def __init__(self, burst=10, refill=2.0, max_addresses=100000):
        self.burst = burst
        self.refill = refill
        self.max_addresses = max_addresses
        self._lock = threading.Lock()
        self._failures = {}  # address -> (tokens left, when last counted)

    def _tokens(self, address, now):
        tokens, when = self._failures.get(address, (self.burst, now))
        return min(self.burst, tokens + (now - when) / self.refill)

    def retry_after(self, address):
        """0 when address may try to log in, else seconds to wait."""
        with self._lock:
            tokens = self._tokens(address, time.monotonic())
        return 0 if tokens >= 1 else int((1 - tokens) * self.refill) + 1

    def failed(self, address):
        with self._lock:
            now = time.monotonic()
            if len(self._failures) >= self.max_addresses:
                self._failures = {a: v for a, v in self._failures.items()
                                  if self._tokens(a, now) < self.burst}
            self._failures[address] = (self._tokens(address, now) - 1, now)


def check_name_for_config(project):
    if not is_project_name(project):
        raise ConfigError("bad project name %r" % project)


def set_user(path, role, name, password_hash, projects=None):
    """Add or replace the line of user name in the users file at path.

    A new file is made 0640, and a rewritten one loses what others could
    read (it holds password hashes).  Raises ConfigError.
    """
    if role not in ROLES:
        raise ConfigError("role must be ADMIN, USER or METRICS, not %r" % role)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError("cannot write the users file %s: its folder %s does "
                          "not exist (create it, or give --auth-db FILE)"
                          % (path, folder))
    if not name or ":" in name or any(c.isspace() for c in name):
        raise ConfigError("user name must not be empty or contain ':' or spaces")
    record = "%s:%s:%s" % (role, name, password_hash)
    if projects:
        for project in projects:
            check_name_for_config(project)
        record += ":" + ",".join(projects)
    with FileLock(path):  # another passwd may be at it too
        replace_user_line(path, name, record)


def replace_user_line(path, name, record):
    """Write the users file at path with record instead of name's line."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
        info = os.stat(path)
    except FileNotFoundError:
        lines, info = [], None
    kept = [line for line in lines
            if line.strip().split(":")[1:2] != [name]
            or line.strip().startswith("#")]
    kept.append(record)
    write_file_atomic(path, ("\n".join(kept) + "\n").encode(),
                      stat.S_IMODE(info.st_mode) & ~0o007 if info else 0o640)
    if info and os.geteuid() == 0:  # root edits it; the ipd user reads it
        os.chown(path, info.st_uid, info.st_gid)


###############################################################################
# Signed releases and deploy tokens ###########################################
###############################################################################

# A signed push carries a small manifest (project, each file's SHA-256 and
# size, a creation time, a nonce) signed with `ssh-keygen -Y sign -n ipd`.
# ALLOWED_SIGNERS (OpenSSH's allowed-signers format) names the keys; each
# key's principals are WHO@PROJECT patterns: "ci@web,ci@api", "alice@*".
SIGNATURE_NAMESPACE = "ipd"
MANIFEST_FORMAT = 1
MANIFEST_MAX_ITEMS = 64     # values in a manifest: two files and their fields
MANIFEST_CLOCK_SKEW = 300   # seconds a manifest may be dated ahead of us


def make_manifest(project, files, created=None):
    """The manifest of a push: files is {field: (sha256 hex, size)}.
    Returns canonical JSON bytes, the text that is signed."""
    return json.dumps({
        "ipd_manifest": MANIFEST_FORMAT, "project": project,
        "created": int(created if created is not None else time.time()),
        "nonce": secrets.token_hex(16),
        "files": {field: {"sha256": digest, "size": size}
                  for field, (digest, size) in sorted(files.items())},
    }, sort_keys=True, separators=(",", ":")).encode()


def parse_manifest(data):
    """Manifest bytes -> dict, checked in shape.  Raises BadRequest, and
    Forbidden for one dated more than MANIFEST_CLOCK_SKEW ahead."""
    manifest = load_json_object(data, "the manifest", MANIFEST_MAX_ITEMS)
    files = manifest.get("files")
    if (manifest.get("ipd_manifest") != MANIFEST_FORMAT or
            not isinstance(manifest.get("project"), str) or
            not isinstance(manifest.get("created"), int) or
            not isinstance(manifest.get("nonce"), str) or not isinstance(files, dict)
            or not files or any(field not in ("image", "package") or
                                not isinstance(meta, dict) or
                                not re.fullmatch(r"[0-9a-f]{64}", str(meta.get("sha256")))
                                or not isinstance(meta.get("size"), int)
                                for field, meta in files.items())):
        raise BadRequest("manifest must be ipd_manifest 1 with project, created, "
                         "nonce and files {image|package: {sha256, size}}")
    check_manifest_time(manifest["created"])
    return manifest


def check_manifest_time(created, now=None):
    """Refuse a manifest dated ahead of this clock by more than a skew: it
    would be the project's newest signed release until that day, and
    every release signed before then would be refused as a rollback."""
    now = time.time() if now is None else now
    if created > now + MANIFEST_CLOCK_SKEW:
        raise Forbidden("the signed manifest is dated %s, more than %d s ahead of "
                        "this server's clock: check the signer's clock"
                        % (iso_time(created), MANIFEST_CLOCK_SKEW))


def check_manifest_files(manifest, project, upload):
    """The manifest must name project and exactly the files that arrived
    (same fields, sizes and SHA-256).  Raises Forbidden."""
    if manifest["project"] != project:
        raise Forbidden("the signed manifest is for project %s, not %s"
                        % (printable(manifest["project"], 64), project))
    received = {field: {"sha256": sink.describe()["sha256"],
                        "size": sink.describe()["size"]}
                for field, sink in upload.files.items()}
    if received != manifest["files"]:
        raise Forbidden("the files received do not match the signed manifest "
                        "(SHA-256 or size)")


def run_ssh_keygen(arguments, stdin_path=None, timeout=30):
    """ssh-keygen with arguments; -> (exit status, output text)."""
    try:
        with open(stdin_path or os.devnull, "rb") as stdin:
            done = subprocess.run(["ssh-keygen"] + arguments, stdin=stdin,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=timeout)
    except FileNotFoundError:
        raise Forbidden("signatures cannot be checked: ssh-keygen is not "
                        "installed (Debian: openssh-client)")
    except subprocess.TimeoutExpired:
        return 1, "ssh-keygen timed out"
    return done.returncode, done.stdout.decode("utf-8", "replace")


def principals_for(found, project):
    """From find-principals' output ('ci@web,alice@*' lines), the concrete
    principals WHO@project whose pattern admits project."""
    names = []
    for line in found.splitlines():
        for pattern in line.strip().split(","):
            who, at, where = pattern.rpartition("@")
            if at and who and fnmatch.fnmatchcase(project, where):
                name = "%s@%s" % (who, project)
                if name not in names and re.fullmatch(r"[^\s,*?!]+", name):
                    names.append(name)
    return names


def verify_signature(allowed_signers, manifest, signature, project, folder):
    """Check signature (armored text) of manifest (bytes) for project
    against ALLOWED_SIGNERS.  Returns {"principal", "fingerprint"};
    raises Forbidden with the reason.  ssh-keygen enforces the key's
    namespaces, valid-after and valid-before options itself."""
    if not allowed_signers:
        raise Forbidden("signed pushes are not set up here: no ALLOWED_SIGNERS")
    fd, signature_path = tempfile.mkstemp(prefix=".sig-", dir=folder)
    os.close(fd)
    manifest_path = signature_path + ".manifest"
    try:
        with open(signature_path, "w", encoding="ascii", errors="replace") as file:
            file.write(signature)
        with open(manifest_path, "wb") as file:
            file.write(manifest)
        status, output = run_ssh_keygen(["-Y", "find-principals", "-f", allowed_signers,
                                         "-s", signature_path])
        if status != 0:
            raise Forbidden("signature refused: its key is not in ALLOWED_SIGNERS "
                            "(or not valid now)")
        for principal in principals_for(output, project):
            status, output = run_ssh_keygen(
                ["-Y", "verify", "-f", allowed_signers, "-I", principal,
                 "-n", SIGNATURE_NAMESPACE, "-s", signature_path], manifest_path)
            match = re.search(r"key (SHA256:[A-Za-z0-9+/=]+)", output)
            if status == 0 and match:
                return {"principal": principal, "fingerprint": match.group(1)}
        raise Forbidden("signature refused: not a valid signature by a key "
                        "allowed to sign for project %s" % project)
    finally:
        remove_quietly(signature_path)
        remove_quietly(manifest_path)


def sign_manifest(key, manifest):
    """Sign manifest bytes with the SSH private key at path key (or an
    agent's key when key is its public half); -> armored signature text.
    Raises ConfigError."""
    folder = tempfile.mkdtemp(prefix="ipd-sign-")
    try:
        path = os.path.join(folder, "manifest")
        with open(path, "wb") as file:
            file.write(manifest)
        try:
            done = subprocess.run(["ssh-keygen", "-Y", "sign", "-f", key, "-n",
                                   SIGNATURE_NAMESPACE, path], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except FileNotFoundError:
            raise ConfigError("--sign needs ssh-keygen (Debian: openssh-client)")
        if done.returncode != 0:
            raise ConfigError("ssh-keygen -Y sign failed: %s" % done.stdout.decode(
                "utf-8", "replace").strip().splitlines()[-1:])
        with open(path + ".sig", encoding="ascii") as file:
            return file.read()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# Deploy tokens: "ipd_ID_SECRET", shown once; TOKENS_DB keeps one line per
# token, ID:SHA256-of-token:PROJECTS:EXPIRES:CREATOR:CREATED:REVOKED (times
# as seconds since the epoch, 0 for never/no).  Last use: TOKENS_DB.used.
TOKEN_PATTERN = re.compile(r"ipd_([0-9a-f]{12})_[A-Za-z0-9_-]{32,64}\Z")


class Token:
    """One line of the tokens file."""

    def __init__(self, token_id, digest, projects, expires, creator, created,
                 revoked=0):
        self.id, self.digest, self.projects = token_id, digest, projects
        self.expires, self.creator = expires, creator
        self.created, self.revoked = created, revoked

    def line(self):
        return "%s:%s:%s:%d:%s:%d:%d" % (
            self.id, self.digest, ",".join(self.projects), self.expires,
            self.creator, self.created, self.revoked)

    def refusal(self, now=None):
        """None when the token may be used now, else why not."""
        if self.revoked:
            return "revoked"
        if self.expires and (now or time.time()) >= self.expires:
            return "expired"
        return None


def parse_tokens(text):
    tokens = {}
    for line in text.splitlines():
        fields = line.strip().split(":")
        if line.startswith("#") or len(fields) != 7:
            continue
        try:
            token = Token(fields[0], fields[1], [p for p in fields[2].split(",") if p],
                          int(fields[3]), fields[4], int(fields[5]), int(fields[6]))
        except ValueError:
            continue
        tokens[token.id] = token
    return tokens


def tokens_path(settings):
    """TOKENS_DB, or tokens.txt beside AUTH_DB."""
    return settings.TOKENS_DB or os.path.join(os.path.dirname(settings.AUTH_DB),
                                              "tokens.txt")


def read_token_uses(path):
    try:
        with open(path + ".used", encoding="utf-8") as file:
            used = json.load(file)
        return used if isinstance(used, dict) else {}
    except (OSError, ValueError):
        return {}


class TokenDB:
    """The tokens file, read again whenever it changes; last uses kept in
    TOKENS_DB.used (written at most once a minute per token)."""

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()
        self._signature = None
        self._tokens = {}
        self._used = {}

    def _reload_if_changed(self):
        signature = file_signature(self.path)
        with self._lock:
            if signature == self._signature:
                return
            self._signature = signature
            try:
                with open(self.path, encoding="utf-8") as file:
                    self._tokens = parse_tokens(file.read())
            except (OSError, UnicodeDecodeError):
                self._tokens = {}

    def authenticate(self, secret):
        """-> (User, None) for a good token; (None, reason) otherwise."""
        match = TOKEN_PATTERN.match(secret)
        self._reload_if_changed()
        with self._lock:
            token = self._tokens.get(match.group(1)) if match else None
        digest = hashlib.sha256(secret.encode()).hexdigest()
        if token is None or not hmac.compare_digest(digest, token.digest):
            return None, "unknown token"
        refusal = token.refusal()
        if refusal:
            return None, "token %s %s" % (token.id, refusal)
        self._note_use(token.id)
        return User("token:" + token.id, "USER", "", token.projects), None

    def _note_use(self, token_id):
        now = time.time()
        with self._lock:
            if now - self._used.get(token_id, 0) < 60:
                return
            self._used[token_id] = now
        try:
            with FileLock(self.path + ".used"):
                used = read_token_uses(self.path)
                used[token_id] = int(now)
                write_file_atomic(self.path + ".used", json.dumps(used).encode(),
                                  0o640)
        except (OSError, ValueError) as error:
            log.warning("cannot note the use of token %s: %s", token_id, error)


def rewrite_tokens(path, change):
    """Read the tokens file, change(list of Token), write it atomically
    (0640, as the users file), all under the file's lock: of two commands
    at once, each sees what the other wrote (issue 23)."""
    with FileLock(path):
        try:
            with open(path, encoding="utf-8") as file:
                tokens = list(parse_tokens(file.read()).values())
            info = os.stat(path)
        except FileNotFoundError:
            tokens, info = [], None
        change(tokens)
        write_file_atomic(path, "".join(t.line() + "\n" for t in tokens).encode(),
                          0o640)
        if info and os.geteuid() == 0:
            os.chown(path, info.st_uid, info.st_gid)


def create_token(path, projects, expires, creator):
    """Add a token for projects to the tokens file; return its secret,
    which is shown once and kept nowhere."""
    for project in projects:
        check_name_for_config(project)
    token_id = secrets.token_hex(6)
    secret = "ipd_%s_%s" % (token_id, secrets.token_urlsafe(32))
    token = Token(token_id, hashlib.sha256(secret.encode()).hexdigest(), projects,
                  int(expires), re.sub(r"[^A-Za-z0-9@._-]", "_", creator) or "-",
                  int(time.time()))
    rewrite_tokens(path, lambda tokens: tokens.append(token))
    return secret


def parse_duration(text):
    """'30d', '12h', '90m', '3600' (seconds) -> seconds.  Raises ValueError."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text)
    if not match or not int(match.group(1)):
        raise ValueError("not a duration (like 30d, 12h, 90m)")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400,
                                  "w": 604800}[match.group(2)]


###############################################################################
# Multipart parser ############################################################
###############################################################################

# A streaming multipart/form-data parser: bytes in, events out, no I/O;
# what it may keep in memory is bounded whatever the input.


# Events returned by MultipartParser.feed
PART_START = "start"   # value: {header name (lower case): value}
PART_DATA = "data"     # value: bytes-like; valid until the next feed()
PART_END = "end"       # value: None


BOUNDARY_CHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]\Z")


HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def parse_part_headers(block):
    """b'Name: value\\r\\n...' -> {'name': 'value'}.  Raises MultipartError
    for a header that is not UTF-8 or whose name is not an HTTP token."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise MultipartError("malformed part header: not UTF-8")
    headers = {}
    name = None
    for line in text.split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and name:  # obsolete line folding
            headers[name] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not HTTP_TOKEN.match(name):
            raise MultipartError("malformed part header: %s" % printable(line, 60))
        name = name.lower()
        headers[name] = value.strip()
    return headers


class MultipartParser:
    """Push parser for multipart/form-data (RFC 7578, RFC 2046 5.1).

    It does no I/O: feed() takes bytes as they arrive, in pieces of any
    size, and returns a list of (event, value).  File data comes back as
    views into the fed buffer, without copies; only a short tail that may
    be the start of a delimiter is carried between feeds.  close() raises
    MultipartError unless the final boundary was seen.
    """

    PREAMBLE, AFTER_DELIMITER, HEADERS, BODY, DONE = range(5)

    def __init__(self, boundary, max_header_bytes=16384, max_parts=16):
        if isinstance(boundary, str):
            boundary = boundary.encode("latin-1")
        self.delimiter = b"\r\n--" + boundary
        self.max_header_bytes = max_header_bytes
        self.max_parts = max_parts
        self.parts = 0
        self.state = self.PREAMBLE
        # As if a CRLF came before the body, so that the first boundary
        # ("--b" at the very start) matches like every later "\r\n--b".
        self._tail = b"\r\n"
        self._pending = bytearray()

    def feed(self, data, size=None):
        """Parse data[:size]; return the events it completes."""
        end = len(data) if size is None else size
        events = []
        position = 0
        while position < end:
            if self.state in (self.PREAMBLE, self.BODY):
                position = self._scan_body(data, position, end, events)
            elif self.state == self.AFTER_DELIMITER:
                position = self._after_delimiter(data, position, end)
            elif self.state == self.HEADERS:
                position = self._headers(data, position, end, events)
            else:
                break  # DONE: the epilogue is ignored (RFC 2046)
        return events

    def close(self):
        """Raise MultipartError when the body ended before the final boundary."""
        if self.state != self.DONE:
            raise MultipartError("malformed multipart body: "
                                 "missing final boundary")

    # --- body: find the delimiter, emit what comes before it

    def _emit(self, events, data):
        if self.state == self.BODY and len(data):
            events.append((PART_DATA, data))

    def _scan_body(self, data, position, end, events):
        delimiter = self.delimiter
        size = len(delimiter)
        if self._tail:
            # Could a delimiter begin in the tail and end in data?  Such a
            # match lies within the tail and the next size - 1 bytes.
            tail, self._tail = self._tail, b""
            head = tail + bytes(data[position:min(end, position + size - 1)])
            found = head.find(delimiter)
            if found >= 0:
                self._emit(events, tail[:found])
                return self._delimiter_found(position + found + size
                                             - len(tail), events)
            if end - position < size - 1:  # all of data is in head
                self._keep_tail(head, 0, len(head), events)
                return end
            self._emit(events, tail)
        found = data.find(delimiter, position, end)
        if found >= 0:
            self._emit(events, memoryview(data)[position:found])
            return self._delimiter_found(found + size, events)
        return self._keep_tail(data, position, end, events)

    def _keep_tail(self, data, position, end, events):
        """Emit data[position:end] but for a possible start of a delimiter."""
        # The delimiter holds a single CR, at its start (a boundary has none),
        # so a partial delimiter at the end begins at the last CR.
        start = max(position, end - len(self.delimiter) + 1)
        carriage_return = data.rfind(b"\r", start, end)
        keep_from = end if carriage_return < 0 else carriage_return
        self._emit(events, memoryview(data)[position:keep_from])
        self._tail = bytes(data[keep_from:end])
        return end

    def _delimiter_found(self, position, events):
        if self.state == self.BODY:
            events.append((PART_END, None))
        self.state = self.AFTER_DELIMITER
        self._pending = bytearray()
        return position

    # --- after a delimiter: "--" ends the body, else padding and CRLF

    def _after_delimiter(self, data, position, end):
        pending = self._pending
        before = len(pending)
        take = min(end, position + 80 - before)
        pending += data[position:take]
        if pending[:2] == b"--":
            self.state = self.DONE
            return end
        if pending == b"-":
            return take  # one more byte tells
        line_end = pending.find(b"\r\n")
        if line_end < 0:
            if len(pending) >= 80 or pending.strip(b" \t\r"):
                raise MultipartError("malformed multipart body: "
                                     "garbage after a boundary")
            return take
        if pending[:line_end].strip(b" \t"):
            raise MultipartError("malformed multipart body: "
                                 "garbage after a boundary")
        self.parts += 1
        if self.parts > self.max_parts:
            raise MultipartError("too many parts in the form")
        self.state = self.HEADERS
        self._pending = bytearray(b"\r\n")  # so an empty header block matches
        return position + line_end + 2 - before

    # --- part headers, up to the empty line

    def _headers(self, data, position, end, events):
        pending = self._pending
        before = len(pending)
        limit = min(end, position + self.max_header_bytes + 4 - before)
        pending += data[position:limit]
        found = pending.find(b"\r\n\r\n", max(0, before - 3))
        if found < 0:
            if len(pending) > self.max_header_bytes:
                raise MultipartError("part headers too long")
            return limit
        events.append((PART_START, parse_part_headers(bytes(pending[2:found]))))
        self.state = self.BODY
        self._tail = b""
        return position + found + 4 - before


# A parameter: name=token, or name="quoted" where the quoted value runs to
# the last quote before the next ';' (browsers send '"' as %22 and do not
# escape with backslashes: WHATWG HTML, multipart/form-data encoding).
HEADER_PARAM = re.compile(r'\s*([^\s=;]+)\s*=\s*(?:"((?:[^"]|"(?!\s*(?:;|$)))*)"'
                          r'|([^;]*?))\s*(?:;|$)')
EXTENDED_CHARSETS = ("utf-8", "iso-8859-1", "us-ascii")


def decode_extended_value(text):
    """"UTF-8'en'%C3%A9" -> 'é'; None unless charset, language and
    percent-encoding are well-formed and the charset is one RFC 8187 names."""
    parts = text.split("'")
    if len(parts) != 3 or parts[0].lower() not in EXTENDED_CHARSETS:
        return None
    if (not re.fullmatch(r"[A-Za-z0-9-]{0,35}", parts[1]) or
            not re.fullmatch(r"(?:[!#$&+.^_`|~0-9A-Za-z-]|%[0-9A-Fa-f]{2})*", parts[2])):
        return None
    try:
        return urllib.parse.unquote_to_bytes(parts[2]).decode(parts[0].lower())
    except UnicodeDecodeError:
        return None


def parse_header_params(value):
    """'form-data; name="a"; filename="b"' -> ('form-data', {'name': 'a', ...}).

    Quoted values as browsers write them (%22, %0D, %0A for '"', CR, LF; a
    backslash is itself); an extended value (RFC 8187: filename*=UTF-8'en'
    %C3%A9.tar) wins over the plain one when it decodes, and a bad one
    without a plain fallback is BadRequest.
    """
    kind, _, rest = value.partition(";")
    params, extended = {}, {}
    position = 0
    while position < len(rest):
        match = HEADER_PARAM.match(rest, position)
        if not match or match.end() == position:
            break
        key = match.group(1).lower()
        if match.group(2) is not None:
            text = re.sub("%(22|0[dD]|0[aA])",
                          lambda m: chr(int(m.group(1), 16)), match.group(2))
        else:
            text = match.group(3).strip()
        if key.endswith("*"):
            extended[key[:-1]] = text
        else:
            params[key] = text
        position = match.end()
    for key, text in extended.items():
        decoded = decode_extended_value(text)
        if decoded is not None:
            params[key] = decoded
        elif key not in params:
            raise BadRequest("bad %s* parameter: use UTF-8''percent-encoded "
                             "text (RFC 8187)" % printable(key, 40))
    return kind.strip().lower(), params


def client_filename(name):
    """The base name of a file name as a browser or client sent it: old
    browsers send a whole Windows path (C:\\Users\\x\\a.png: a.png);
    a backslash elsewhere is part of the name."""
    if re.match(r"[A-Za-z]:\\|\\\\", name):
        name = name.rsplit("\\", 1)[-1]
    return name.rsplit("/", 1)[-1]


###############################################################################
# Request bodies ##############################################################
###############################################################################

# A request's body (Content-Length or chunked) streamed through the
# parser into temporary files and fields: an Upload, or nothing left.


CHUNK_SIZE = 1 << 20


class LengthBody:
    """A request body of Content-Length bytes, read into caller buffers."""

    def __init__(self, rfile, length):
        self.rfile = rfile
        self.remaining = length
        self.received = 0

    @property
    def finished(self):
        """True once every byte of the body was read."""
        return self.remaining <= 0

    def readinto(self, view):
        """Fill view from the body; 0 at its end.  Raises ClientGone."""
        if self.remaining <= 0:
            return 0
        # readinto1: what has arrived, at most one read of the socket, so
        # the parser sees data (and refuses bad input) as soon as it comes.
        count = self.rfile.readinto1(view[:min(len(view), self.remaining)])
        if not count:
            raise ClientGone("the body ended %d bytes early" % self.remaining)
        self.remaining -= count
        self.received += count
        return count


class ChunkedBody:
    """A Transfer-Encoding: chunked request body (RFC 9112 section 7.1)."""

    def __init__(self, rfile, limit=0):
        self.rfile = rfile
        self.limit = limit
        self.chunk_left = 0
        self.finished = False
        self.received = 0

    def _line(self):
        line = self.rfile.readline(4096)
        if not line:
            raise ClientGone("the chunked body ended early")
        if not line.endswith(b"\n"):
            raise BadRequest("malformed chunked body: line too long")
        return line.strip()

    def _next_chunk(self):
        size_text = self._line().split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,15}", size_text):
            raise BadRequest("malformed chunked body: bad chunk size")
        self.chunk_left = int(size_text, 16)
        if self.chunk_left == 0:
            while self._line():  # trailer fields, up to the empty line
                pass
            self.finished = True

    def readinto(self, view):
        if self.finished:
            return 0
        if self.chunk_left == 0:
            self._next_chunk()
            if self.finished:
                return 0
        count = self.rfile.readinto1(view[:min(len(view), self.chunk_left)])
        if not count:
            raise ClientGone("the chunked body ended early")
        self.chunk_left -= count
        self.received += count
        if self.limit and self.received > self.limit:
            raise TooLarge("upload larger than MAX_UPLOAD_SIZE (%d bytes)"
                           % self.limit)
        if self.chunk_left == 0 and self.rfile.read(2) != b"\r\n":
            raise BadRequest("malformed chunked body: missing CRLF after data")
        return count


class FileSink:
    """A file part written to a temporary file, hashed as it streams (with
    parallel, on a second core: then write() takes only bytes)."""

    def __init__(self, folder, field, filename, parallel=False):
        self.field = field
        self.filename = filename
        self.fd, self.path = tempfile.mkstemp(prefix=".upload-", suffix=".tmp",
                                              dir=folder)
        self.sha256 = ParallelHash() if parallel else hashlib.sha256()
        self.size = 0

    def write(self, data):
        self.sha256.update(data)
        try:
            write_all(self.fd, data)
        except OSError as error:
            raise disk_errors(error)
        self.size += len(data)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self):
        self.close()
        if isinstance(self.sha256, ParallelHash):
            self.sha256.close()
        remove_quietly(self.path)

    def describe(self):
        return {"name": self.filename, "size": self.size,
                "sha256": self.sha256.hexdigest()}


class KeptFile:
    """A file of an earlier deployment, linked (or copied) to a temporary
    file so that a redeploy can move it in like an upload's file."""

    def __init__(self, source, meta, folder):
        self.meta = meta
        fd, self.path = tempfile.mkstemp(prefix=".upload-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(self.path)
        try:
            os.link(source, self.path)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copyfile(source, self.path)

    def describe(self):
        return dict(self.meta)

    def discard(self):
        remove_quietly(self.path)


class RecipeFile:
    """A pushed recipe in a temporary file, moved in beside the deployment's
    files like them (#16)."""

    def __init__(self, data, folder):
        fd, self.path = tempfile.mkstemp(prefix=".upload-", suffix=".recipe",
                                         dir=folder)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self):
        remove_quietly(self.path)


class FieldSink:
    """A text field kept in memory, with a small limit."""

    def __init__(self, field, limit=1024):
        self.field = field
        self.value = bytearray()
        self.limit = limit

    def write(self, data):
        self.value += data
        if len(self.value) > self.limit:
            raise BadRequest("form field %r is too long" % self.field)

    def close(self):
        pass

    def discard(self):
        pass

    def text(self):
        try:
            return self.value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("form field %r is not UTF-8" % self.field)


UPLOAD_FILE_FIELDS = ("image", "package")
UPLOAD_TEXT_FIELDS = ("project", "image_sha256", "package_sha256", "force",
                      "manifest", "signature")
# Longest text field value (bytes); others take 1 KiB.
FIELD_LIMITS = {"manifest": 4096, "signature": 16384}


class Upload:
    """The fields of one upload request; files in temporary files until
    they are moved into a deployment, or discarded."""

    def __init__(self):
        self.fields = {}
        self.files = {}
        self.recipe = None  # a pushed recipe's temporary file (#16)

    def discard(self):
        for sink in self.files.values():
            sink.discard()
        self.files = {}
        if self.recipe is not None:
            self.recipe.discard()
            self.recipe = None


def parse_since(text):
    """?since= as seconds since the epoch: a number, or ISO 8601 UTC."""
    if not text:
        return 0.0
    try:
        return float(text)
    except ValueError:
        pass
    match = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d))?"
                         r"(?:\.\d+)?)?Z?", text)
    if not match:
        raise BadRequest("since must be seconds since the epoch or "
                         "YYYY-MM-DDTHH:MM:SSZ")
    parts = [int(p or 0) for p in match.groups()]
    return float(calendar.timegm(tuple(parts) + (0, 0, 0)))


def read_audit(path, project=None, since=0.0):
    """The events of the audit log at path, filtered, one at a time (the
    log may be larger than memory)."""
    try:
        file = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with file:
        for line in file:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if (not isinstance(event, dict) or
                    not isinstance(event.get("ts", 0), (int, float))):
                continue
            if event.get("ts", 0) < since:
                continue
            if project and event.get("project") != project:
                continue
            yield event


def check_digests(upload):
    """Compare image_sha256 / package_sha256, where given, with the SHA-256
    of the files as received.  Raises BadRequest."""
    for name in UPLOAD_FILE_FIELDS:
        expected = upload.fields.get(name + "_sha256")
        if expected is None:
            continue
        if not re.fullmatch(r"[0-9a-fA-F]{64}", expected.strip()):
            raise BadRequest("%s_sha256 must be 64 hex digits" % name)
        if name not in upload.files:
            raise BadRequest("%s_sha256 given without an %s" % (name, name))
        received = upload.files[name].describe()["sha256"]
        if received != expected.strip().lower():
            raise BadRequest("%s_sha256 does not match: the %s received has "
                             "SHA-256 %s" % (name, name, received))


def open_sink(upload, headers, folder):
    """Start the sink of a new part, from its headers."""
    disposition, params = parse_header_params(headers.get("content-disposition",
                                                          ""))
    name = params.get("name")
    if disposition != "form-data" or not name:
        raise MultipartError("malformed multipart body: a part without "
                             "Content-Disposition: form-data; name=...")
    if name in upload.fields or name in upload.files:
        raise BadRequest("form field %r given twice" % name)
    encoding = headers.get("content-transfer-encoding", "binary").lower()
    if encoding not in ("7bit", "8bit", "binary"):  # RFC 7578 4.7
        raise BadRequest("part %s: Content-Transfer-Encoding %s is not taken: "
                         "send the bytes as they are" % (printable(name, 40),
                                                         printable(encoding, 20)))
    if name in UPLOAD_FILE_FIELDS:
        filename = client_filename(params.get("filename") or "") or name
        sink = FileSink(folder, name, filename)
        upload.files[name] = sink
        return sink
    if name in UPLOAD_TEXT_FIELDS:
        return FieldSink(name, FIELD_LIMITS.get(name, 1024))
    raise BadRequest("unknown form field %s: expected project, image, package, "
                     "image_sha256, package_sha256, force, manifest, signature"
                     % printable(repr(name), 80))


def receive_upload(body, boundary, folder, on_field=None):
    """Stream a multipart/form-data body into an Upload.

    Files go to temporary files in folder, text fields to memory; on_field
    is called with (name, value) as each text field completes, so that a
    bad project name stops the upload before its files are read.  On any
    error every temporary file is removed and the error raised.
    """
    parser = MultipartParser(boundary)
    upload = Upload()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    sink = None
    try:
        while True:
            count = body.readinto(view)
            if not count:
                break
            for event, value in parser.feed(buffer, count):
                if event == PART_DATA:
                    sink.write(value)
                elif event == PART_START:
                    sink = open_sink(upload, value, folder)
                else:
                    sink.close()
                    if isinstance(sink, FieldSink):
                        upload.fields[sink.field] = sink.text()
                        if on_field:
                            on_field(sink.field, upload.fields[sink.field])
                    sink = None
        parser.close()
        return upload
    except BaseException:
        if sink is not None:
            sink.discard()
        upload.discard()
        raise


###############################################################################
# Packages: safe unpacking ####################################################
###############################################################################

# A package (tar, tar.gz/bz2/xz, zip) unpacked into a deployment's folder:
# every name, link, size and count checked before a byte is written.


def member_parts(name):
    """An archive member's name -> its path components.

    Raises BadRequest for names that could land outside the folder:
    absolute paths, '..', drive letters, backslashes, NUL.
    """
    if "\0" in name or "\\" in name:
        raise BadRequest("package entry %r: backslash or NUL in name" % name)
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise BadRequest("package entry %r: absolute path" % name)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise BadRequest("package entry %r: '..' in path" % name)
    # What a Linux file system takes: 255 bytes a name, 4095 a path.
    if any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in parts):
        raise BadRequest("package entry %s: a name over 255 bytes"
                         % printable(repr(name), 80))
    if len(name.encode("utf-8", "surrogateescape")) > 3800 or len(parts) > 200:
        raise BadRequest("package entry %s: path too long or too deep"
                         % printable(repr(name), 80))
    return parts


class PackageLimits:
    """The caps on unpacking: MAX_MEMBERS, MAX_HEADER_SIZE, MAX_NAME_SIZE,
    MAX_TRAILING_SIZE from settings, their defaults where not given."""

    KEYS = ("MAX_MEMBERS", "MAX_HEADER_SIZE", "MAX_NAME_SIZE",
            "MAX_TRAILING_SIZE")

    def __init__(self, settings=None):
        for key in self.KEYS:
            value = getattr(settings, key, None)
            if value is None:
                value = parse_setting(SETTINGS[key][1], SETTINGS[key][0])
            setattr(self, key, value)


class PackageWriter:
    """Writes archive entries into a fresh folder and nowhere else.

    Every entry is checked against what was written before it: no entry is
    written through a symlink, no link points outside or through another
    link, and the bytes written are counted against a limit (decompression
    bombs).  Nothing written is writable by group or others.
    """

    def __init__(self, root, max_bytes, limits=None):
        self.root = root
        self.max_bytes = max_bytes
        self.limits = limits or PackageLimits()
        self.written = 0
        self.members = 0
        self.kinds = {(): "dir"}  # path components -> "dir", "file", "link"
        self.traversed = set()    # paths some link's target passes through

    def _path(self, parts):
        return os.path.join(self.root, *parts)

    def _count(self, name):
        """One more entry; refuse a name over MAX_NAME_SIZE or an entry
        over MAX_MEMBERS."""
        self.members += 1
        if self.members > self.limits.MAX_MEMBERS:
            raise BadRequest("package has more than MAX_MEMBERS (%d) entries"
                             % self.limits.MAX_MEMBERS)
        if len(name.encode("utf-8", "surrogateescape")) > self.limits.MAX_NAME_SIZE:
            raise BadRequest("package entry %r...: name longer than "
                             "MAX_NAME_SIZE (%d bytes)"
                             % (name[:60], self.limits.MAX_NAME_SIZE))

    def _mkdir(self, parts):
        os.mkdir(self._path(parts), 0o755)
        os.chmod(self._path(parts), 0o755)  # whatever the umask: readable
        self.kinds[tuple(parts)] = "dir"

    def _prepare_parent(self, name, parts):
        for depth in range(1, len(parts)):
            prefix = tuple(parts[:depth])
            kind = self.kinds.get(prefix)
            if kind is None:
                self._mkdir(prefix)
            elif kind != "dir":
                raise BadRequest("package entry %r: goes through a %s"
                                 % (name, "symlink" if kind == "link" else "file"))
        existing = self.kinds.get(tuple(parts))
        if existing in ("dir", "link"):
            raise BadRequest("package entry %r: given twice" % name)

    def directory(self, name, mode):
        self._count(name)
        parts = member_parts(name)
        if not parts:
            return
        kind = self.kinds.get(tuple(parts))
        if kind == "dir":
            return
        if kind is not None:
            raise BadRequest("package entry %r: a folder where the package has "
                             "a %s" % (name, "symlink" if kind == "link" else "file"))
        self._prepare_parent(name, parts)
        self._mkdir(parts)

    def file(self, name, mode, source):
        """Copy file object source to entry name."""
        self._count(name)
        parts = member_parts(name)
        if not parts:
            raise BadRequest("package entry %r: a file without a name" % name)
        self._prepare_parent(name, parts)
        path = self._path(parts)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        fd = os.open(path, flags, 0o600)
        try:
            while True:
                data = source.read(CHUNK_SIZE)
                if not data:
                    break
                self.written += len(data)
                if self.max_bytes and self.written > self.max_bytes:
                    raise TooLarge("package unpacks to more than "
                                   "MAX_UNPACKED_SIZE (%d bytes)" % self.max_bytes)
                write_all(fd, data)
            # Owner may always read and write; no set-id or sticky bits,
            # nothing writable by group or others.
            os.fchmod(fd, (mode & 0o755) | 0o600)
        finally:
            os.close(fd)
        self.kinds[tuple(parts)] = "file"

    def symlink(self, name, target):
        self._count(name)
        if len(target.encode("utf-8", "surrogateescape")) > self.limits.MAX_NAME_SIZE:
            raise BadRequest("package entry %r: link target longer than "
                             "MAX_NAME_SIZE" % name)
        parts = member_parts(name)
        if not parts:
            raise BadRequest("package entry %r: a link without a name" % name)
        if not target or target.startswith("/") or "\0" in target:
            raise BadRequest("package entry %r: link to an absolute path" % name)
        if tuple(parts) in self.traversed:
            raise BadRequest("package entry %r: a link where an earlier link's "
                             "target passes" % name)
        passed = self.resolve_link(name, parts[:-1], target)
        self._prepare_parent(name, parts)
        if tuple(parts) in self.kinds:
            raise BadRequest("package entry %r: given twice" % name)
        os.symlink(target, self._path(parts))
        self.kinds[tuple(parts)] = "link"
        self.traversed.update(passed)

    def resolve_link(self, name, folder, target):
        """Follow target from folder against what was written so far, as
        the kernel will: refuse it when it leaves the package or passes
        through a link (b -> . then x -> b/b/../.. looks inside to a
        lexical check, and is '/').  Returns the paths it passes through:
        no link may be made there later."""
        path, passed = list(folder), []
        steps = [part for part in target.split("/") if part not in ("", ".")]
        for number, part in enumerate(steps):
            if self.kinds.get(tuple(path)) == "link":
                raise BadRequest("package entry %r: link target passes "
                                 "through a link" % name)
            if part == "..":
                if not path:
                    raise BadRequest("package entry %r: link points outside"
                                     % name)
                path.pop()
            else:
                path.append(part)
                if number < len(steps) - 1:
                    passed.append(tuple(path))
        return passed

    def hardlink(self, name, target):
        self._count(name)
        parts = member_parts(name)
        target_parts = member_parts(target)
        if self.kinds.get(tuple(target_parts)) != "file":
            raise BadRequest("package entry %r: hard link to %r, which is not "
                             "a file of the package" % (name, target))
        self._prepare_parent(name, parts)
        if tuple(parts) in self.kinds:
            raise BadRequest("package entry %r: given twice" % name)
        os.link(self._path(target_parts), self._path(parts))
        self.kinds[tuple(parts)] = "file"


class TarStream:
    """A tar's decompressed bytes as tarfile reads them: forward only, and
    with the headers of each entry capped before they are read.

    tarfile reads an entry's pax records and GNU long name or link into
    memory with one read() of their declared size (1 GiB from a 947-byte
    .tar.bz2).  Reads made while tarfile parses headers count against
    MAX_HEADER_SIZE for that entry, checked before the read happens;
    reads of file data (data=True) do not.  Skipping forward decompresses
    in pieces, never all at once.
    """

    def __init__(self, raw, header_limit):
        self.raw = raw
        self.position = 0
        self.header_limit = header_limit
        self.header_bytes = 0
        self.data = False

    def read(self, size=-1):
        if size is None or size < 0:
            raise BadRequest("package: a tar entry to be read whole")
        if not self.data:
            self.header_bytes += size
            if self.header_bytes > self.header_limit:
                raise BadRequest("package entry header (pax records, long "
                                 "name or link) over MAX_HEADER_SIZE (%d bytes)"
                                 % self.header_limit)
        data = self.raw.read(size)
        self.position += len(data)
        return data

    def tell(self):
        return self.position

    def seek(self, offset, whence=os.SEEK_SET):
        if whence != os.SEEK_SET or offset < self.position:
            raise BadRequest("package: a tar that must be read backwards")
        self.skip(offset - self.position)
        return self.position

    def skip(self, count):
        """Read and drop count bytes (fewer at the end); returns how many."""
        dropped = 0
        while dropped < count:
            data = self.raw.read(min(CHUNK_SIZE, count - dropped))
            if not data:
                break
            dropped += len(data)
        self.position += dropped
        return dropped


def open_decompressed(file, magic):
    """The file's bytes decompressed as its first bytes say (gzip, bzip2,
    xz), read in bounded pieces; the file itself when plain."""
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=file, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(file, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(file, "rb")
    return file


def unpack_member(tar, stream, member, writer):
    """Write one tar entry; its data is read as data, not as headers."""
    if member.isdir():
        writer.directory(member.name, member.mode)
    elif member.isreg():
        stream.data = True
        try:
            with tar.extractfile(member) as source:
                writer.file(member.name, member.mode, source)
        finally:
            stream.data = False
    elif member.issym():
        writer.symlink(member.name, member.linkname)
    elif member.islnk():
        writer.hardlink(member.name, member.linkname)
    else:
        raise BadRequest("package entry %r: device files and FIFOs "
                         "are refused" % member.name)


def unpack_tar(archive, writer, magic=b""):
    """Unpack a tar (plain or compressed, as magic says) through writer,
    one entry at a time with bounded memory.  Raises BadRequest, TooLarge
    or the archive's own errors (see unpack_package)."""
    limits = writer.limits
    with open(archive, "rb") as file:
        stream = TarStream(open_decompressed(file, magic), limits.MAX_HEADER_SIZE)
        try:
            tar = tarfile.TarFile(fileobj=stream, mode="r")
        except tarfile.ReadError:
            raise BadRequest("package is not a tar, tar.gz or zip archive")
        while True:
            stream.header_bytes = 0
            member = tar.next()
            if member is None:
                break
            tar.members.clear()  # tarfile keeps every entry: memory per entry
            unpack_member(tar, stream, member, writer)
        # Read the compressed stream to its end: only there does gzip (or
        # bz2, xz) check its checksum, which tarfile alone never reaches.
        # What follows the archive's end is padding, bounded: not 10 GiB of
        # zeros as bz2 streams of 12 KB each.
        stream.data = True
        if stream.skip(limits.MAX_TRAILING_SIZE + 1) > limits.MAX_TRAILING_SIZE:
            raise BadRequest("package has more than MAX_TRAILING_SIZE (%d "
                             "bytes) after the end of its tar archive"
                             % limits.MAX_TRAILING_SIZE)


# Central directory entry: 46 fixed bytes, the name, then extra fields and
# a comment; extra and comment get this much between them in a package.
ZIP_ENTRY_EXTRA = 1024


def zip_directory(path):
    """(entries, central directory bytes) from a zip's end records, read
    before zipfile reads the whole directory into memory.  Raises
    BadRequest."""
    with open(path, "rb") as file:
        end = file.seek(0, os.SEEK_END)
        file.seek(max(0, end - 65557))  # 22 bytes and the longest comment
        tail = file.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            raise BadRequest("package is not a valid zip: no end record")
        entries = int.from_bytes(tail[at + 10:at + 12], "little")
        size = int.from_bytes(tail[at + 12:at + 16], "little")
        if ((entries == 0xFFFF or size == 0xFFFFFFFF) and at >= 20
                and tail[at - 20:at - 16] == b"PK\x06\x07"):
            file.seek(int.from_bytes(tail[at - 12:at - 4], "little"))
            record = file.read(56)
            if len(record) < 56 or record[:4] != b"PK\x06\x06":
                raise BadRequest("package is not a valid zip: bad zip64 record")
            entries = int.from_bytes(record[32:40], "little")
            size = int.from_bytes(record[40:48], "little")
    return entries, size


def unpack_zip_entry(zipped, info, writer):
    """Write one zip entry; a link's target is read to MAX_NAME_SIZE + 1."""
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        with zipped.open(info) as source:
            target = source.read(writer.limits.MAX_NAME_SIZE + 1)
        if len(target) > writer.limits.MAX_NAME_SIZE:
            raise BadRequest("package entry %r: link target longer than "
                             "MAX_NAME_SIZE" % info.filename[:200])
        writer.symlink(info.filename, target.decode("utf-8", "replace"))
    elif info.is_dir() or stat.S_ISDIR(mode):
        writer.directory(info.filename, mode)
    elif stat.S_IFMT(mode) in (0, stat.S_IFREG):  # 0: made without a type
        with zipped.open(info) as source:
            writer.file(info.filename, mode or 0o644, source)
    else:
        raise BadRequest("package entry %r: device files and FIFOs "
                         "are refused" % info.filename[:200])


def unpack_zip(archive, writer):
    """Unpack a zip through writer: entries and directory size checked
    from its end record first, stored or deflated entries only.  Raises
    BadRequest or TooLarge."""
    limits = writer.limits
    entries, size = zip_directory(archive)
    if entries > limits.MAX_MEMBERS:
        raise BadRequest("package has more than MAX_MEMBERS (%d) entries"
                         % limits.MAX_MEMBERS)
    if size > max(entries, 1) * (46 + limits.MAX_NAME_SIZE + ZIP_ENTRY_EXTRA):
        raise BadRequest("package: zip central directory too large for its "
                         "%d entries" % entries)
    with zipfile.ZipFile(archive) as zipped:
        for info in zipped.infolist():
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                # bzip2 and lzma entries are decompressed by zipfile in
                # unbounded pieces: 1 GiB from 4 KB in one call.
                raise BadRequest("package entry %r: zip compression other than "
                                 "deflate is refused" % info.filename[:200])
            unpack_zip_entry(zipped, info, writer)


def unpack_package(archive, folder, max_bytes, limits=None):
    """Unpack archive (tar, tar.gz/bz2/xz or zip, known by content) into
    the existing empty folder, within limits (a PackageLimits).  Raises
    BadRequest or TooLarge."""
    writer = PackageWriter(folder, max_bytes, limits)
    with open(archive, "rb") as file:
        magic = file.read(6)
    try:
        if magic[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            unpack_zip(archive, writer)
        else:
            unpack_tar(archive, writer, magic)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, ValueError,
            NotImplementedError, RuntimeError, LookupError) as error:
        # zlib.error, lzma.LZMAError are raised as ValueError subclasses or
        # plain errors; catch the decompressors' errors by name below too.
        raise BadRequest("package is not a valid tar, tar.gz or zip archive: "
                         "%s" % (str(error).splitlines() or ["?"])[0])
    except OSError as error:
        if error.errno is None:  # gzip and bz2 say "corrupt" this way
            raise BadRequest("package is not a valid archive: %s" % error)
        if error.errno in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR,
                           errno.EEXIST, errno.ELOOP):  # a layout no folder takes
            raise BadRequest("package cannot be unpacked: %s" % error.strerror)
        raise disk_errors(error)
    except Exception as error:
        if type(error).__module__ in ("zlib", "lzma", "_lzma", "bz2", "_bz2"):
            raise BadRequest("package is not a valid archive: %s" % error)
        raise


def find_control_script(unpacked, project_dir):
    """The control.sh to run: the package's, else the project folder's.

    Returns its absolute path; raises BadRequest when there is none or it
    is not executable.
    """
    for folder, where in ((unpacked, "package"), (project_dir, "project folder")):
        if folder is None:
            continue
        path = os.path.join(folder, "control.sh")
        if not os.path.lexists(path):
            continue
        real = os.path.realpath(path)
        if not real.startswith(os.path.realpath(folder) + os.sep):
            raise BadRequest("control.sh of the %s points outside it" % where)
        if not os.path.isfile(real) or not os.access(real, os.X_OK):
            raise BadRequest("control.sh of the %s is not an executable file"
                             % where)
        return path
    raise BadRequest("no control.sh: put one at the package's root, or in "
                     "the project folder on the server")


###############################################################################
# Processes: who runs the scripts, and what they leave ########################
###############################################################################

# RUN_AS and project.conf: the user, groups and capabilities the scripts
# run with; finding and stopping the processes a step leaves behind.


# UPLOAD_DIR/$PROJECT/project.conf: an administrator's SCRIPTS and RUN_AS
# for one project (KEY=VALUE lines, as /etc/ipd.conf).
PROJECT_CONF = "project.conf"
PROJECT_KEYS = ("SCRIPTS", "RUN_AS")
# With RUN_AS, PROJECT_DIR is this folder of the project's: the one place
# its scripts may write.  The project folder itself, where control.sh,
# notify.sh and project.conf lie, stays the daemon's.
WORK_DIR = "work"
CAP_KILL, CAP_SETGID, CAP_SETUID = 5, 6, 7


def has_capability(number, field="CapEff"):
    """True when this process holds capability number (/proc/self/status)."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return bool(int(line.split()[1], 16) >> number & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def credentials(run_as=None, gid=None):
    """Popen arguments that start a process as run_as, with exactly its
    groups (or, with gid alone, only in that group).  subprocess does it on
    3.9+; 3.8 needs a preexec_fn.  A process whose uids all leave 0 has
    its permitted, effective and ambient capabilities cleared by the kernel
    (capabilities(7)); see keep_scripts_without_capabilities."""
    if run_as is None and gid is None:
        if os.geteuid() == 0 or not has_capability(CAP_SETUID, "CapPrm"):
            return {}
        # ipd holds capabilities (ipd-run-as.conf) but the scripts run as
        # ipd itself: switching to its own uid sheds them all the same.
        run_as = RunAs(os.getuid(), os.getgid(), os.getgroups(), "ipd")
    if sys.version_info >= (3, 9):
        if run_as is None:
            return {"group": gid}
        return {"user": run_as.uid, "group": run_as.gid,
                "extra_groups": list(run_as.groups)}

    def become():
        if run_as is None:
            os.setresgid(gid, gid, gid)
            return
        os.setgroups(list(run_as.groups))
        os.setresgid(run_as.gid, run_as.gid, run_as.gid)
        os.setresuid(run_as.uid, run_as.uid, run_as.uid)
    return {"preexec_fn": become}


def keep_scripts_without_capabilities():
    """Make sure scripts started under RUN_AS get no capability.

    Root switching to another user loses every capability.  A daemon that
    is not root but holds CAP_SETUID (systemd's AmbientCapabilities) would
    hand its ambient set on through execve to control.sh; with its saved
    uid set to 0, a child that switches all its uids to the scripts' user
    goes from "one uid is 0" to "none is", and the kernel then clears its
    permitted, effective and ambient sets.  Call before any thread starts
    (the change is process-wide).  Returns a line for the log, or None."""
    if os.geteuid() == 0:
        return None
    missing = [name for number, name in ((CAP_SETUID, "CAP_SETUID"),
                                         (CAP_SETGID, "CAP_SETGID"),
                                         (CAP_KILL, "CAP_KILL"))
               if not has_capability(number)]
    if missing:
        return ("RUN_AS needs ipd to run as root or with %s: scripts cannot "
                "be started as their user" % ", ".join(missing))
    ruid, euid, _ = os.getresuid()
    os.setresuid(ruid, euid, 0)
    return None


def project_settings(settings, project_dir):
    """{SCRIPTS, RUN_AS} of a project: the global settings, overridden by
    the project folder's project.conf.  Only a file an administrator could
    have placed counts: a regular file owned by root or ipd's user and not
    writable by group or others.  Raises IpdError (500) for another one,
    or for a bad value: never a silent fallback to the looser setting."""
    values = {key: getattr(settings, key) for key in PROJECT_KEYS}
    path = os.path.join(project_dir, PROJECT_CONF)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return values
    if (not stat.S_ISREG(info.st_mode) or info.st_uid not in (0, os.geteuid())
            or info.st_mode & 0o022):
        raise IpdError("%s is not an administrator's file (owner root or "
                       "ipd, not writable by group or others)" % path)
    try:
        for key, (text, number) in read_config_file(path).items():
            if key not in PROJECT_KEYS:
                raise ConfigError("%s:%d: only %s may be set here"
                                  % (path, number, " and ".join(PROJECT_KEYS)))
            values[key] = parse_setting(SETTINGS[key][1], text)
    except (ConfigError, ValueError) as error:
        raise IpdError("project settings: %s" % error)
    return values


def scripts_user(settings, project_dir):
    """The RunAs of a project's scripts, or None: they run as ipd."""
    text = project_settings(settings, project_dir)["RUN_AS"]
    try:
        return resolve_run_as(text) if text else None
    except ValueError as error:
        raise IpdError("RUN_AS of %s: %s" % (project_dir, error))


def share_with_group(path, gid, mode):
    """Let the group gid (a project's scripts' group) read path, and no
    other user: group-owned, mode (0750, 0640), so that another project's
    scripts' user reads nothing of this project's deployments (issue 23).
    Where ipd may not give the file to that group (an unprivileged ipd
    outside it, without CAP_CHOWN), everyone may read it, as before, and
    the log says so."""
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        log.warning("cannot give %s to group %d (ipd is neither root nor in that "
                    "group): readable by every user, so by other projects' "
                    "scripts too", path, gid)
        os.chmod(path, mode | 0o005 if mode & 0o100 else mode | 0o004)
        return
    os.chmod(path, mode)


def open_to_scripts(project_dir, deployment_folder, image, run_as):
    """Give run_as what its scripts need and nothing more: UPLOAD_DIR and
    the project folder to pass through (not to list), its work folder to write (made on first use,
    owned by ipd, group run_as's: ipd needs no CAP_CHOWN), the
    deployment's folder and image to read.  deployments/ lets it pass but
    not list; state files, logs and packages stay ipd's (mode 0640)."""
    for folder, mode, unwanted in (
            (os.path.dirname(project_dir), stat.S_IXOTH, 0),
            (project_dir, 0o711, 0o022),
            (os.path.dirname(deployment_folder), 0o711, 0o022)):
        info = os.stat(folder)
        wanted = (stat.S_IMODE(info.st_mode) | mode) & ~unwanted
        if info.st_uid == os.geteuid() and wanted != stat.S_IMODE(info.st_mode):
            os.chmod(folder, wanted)
    if os.path.isdir(deployment_folder):
        share_with_group(deployment_folder, run_as.gid, 0o750)
    if image and os.path.exists(image):
        share_with_group(image, run_as.gid, 0o640)
    work = os.path.join(project_dir, WORK_DIR)
    try:
        info = os.lstat(work)
    except FileNotFoundError:
        subprocess.run(["mkdir", "-m", "0770", work], check=True,
                       stdin=subprocess.DEVNULL, **credentials(gid=run_as.gid))
        return work
    if not stat.S_ISDIR(info.st_mode):
        raise IpdError("%s is not a folder" % work)
    return work


def read_step_identity(path):
    """ID.step's identity, or None."""
    try:
        with open(path, encoding="utf-8") as file:
            identity = json.load(file)
        return (identity if isinstance(identity, dict) and
                isinstance(identity.get("session"), int) else None)
    except (OSError, ValueError):
        return None


def process_start(pid):
    """Start time of a process in clock ticks since boot, or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as file:
            return int(file.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def boot_id():
    """This boot's id (it changes at every boot), or None."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:
        return None


def write_step_identity(path, pid):
    """Write ID.step: what identifies a running step's processes after a
    restart without reading their environment (another user's is not ours
    to read): its session, which its children keep, the start time of its
    leader, and the boot.  A plain write, the moment the step started."""
    data = json.dumps({"session": pid, "start": process_start(pid),
                       "boot": boot_id()}).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def list_pids():
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def processes_of_deployments(deployment_ids):
    """{deployment id: [pid, ...]} of the processes whose environment has
    DEPLOY=id: the control.sh of a daemon that was killed, and its children."""
    wanted = {("DEPLOY=" + i).encode(): i for i in deployment_ids}
    found = {}
    if not wanted:
        return found
    for pid in list_pids():
        try:
            with open("/proc/%d/environ" % pid, "rb") as file:
                variables = file.read().split(b"\0")
        except OSError:
            continue
        for variable in variables:
            if variable in wanted:
                found.setdefault(wanted[variable], []).append(pid)
    return found


def process_state(pid):
    """(state letter, process group) of a process from /proc, or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def process_running(pid):
    state = process_state(pid)
    return state is not None and state[0] != b"Z"


def processes_of_session(identity):
    """The pids still running in the session a step started, or []: none
    when the machine rebooted since, or when its leader's pid now belongs
    to another process (pids are not reused while a session has members)."""
    if not identity or identity.get("boot") != boot_id():
        return []
    session = identity["session"]
    if process_running(session) and process_start(session) != identity["start"]:
        return []
    return session_members(session)


def session_members(session):
    """The pids running in session (zombies left out), whichever process
    group they moved to: what setsid() alone would take them out of."""
    found = []
    for pid in list_pids():
        try:
            with open("/proc/%d/stat" % pid, "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != b"Z":
            found.append(pid)
    return found


def stop_processes(pids, grace):
    """SIGTERM pids, SIGKILL those still running after grace seconds."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while any(process_running(pid) for pid in pids):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return


def signal_group(group, signum):
    """Send signum to a process group; a group already gone is fine."""
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(group):
    """True while a process of the group is running (zombies do not count:
    orphans left to an init that does not reap them must not hold us up)."""
    if not os.path.isdir("/proc"):  # ask the kernel, zombies included
        try:
            os.killpg(group, 0)
            return True
        except OSError:
            return False
    for pid in list_pids():
        state = process_state(pid)
        if state and state[1] == group and state[0] != b"Z":
            return True
    return False


def wait_for_group(process, seconds, pause):
    """Wait up to seconds, looking every pause seconds, until no process of
    process's group runs; reap process meanwhile (its zombie is not one)."""
    deadline = time.monotonic() + seconds
    while group_alive(process.pid) and time.monotonic() < deadline:
        process.poll()
        time.sleep(pause)


def stop_process_group(process, grace):
    """SIGTERM the process group of process, SIGKILL what is left after
    grace seconds, and reap process: once it returns, none of the group
    runs (what comes next, a final state, may say so)."""
    group = process.pid
    if group_alive(group):
        signal_group(group, signal.SIGTERM)
        wait_for_group(process, grace, 0.05)
        signal_group(group, signal.SIGKILL)
        # SIGKILL is not instant: wait until the kernel has ended them all
        # (a process stuck in the kernel, in state D, for at most grace more)
        wait_for_group(process, grace, 0.01)
    process.wait()
    # What moved to a process group of its own is still in the step's
    # session (each step leads one): it ends with the step too (issue 23).
    # Only a process that left the session as well (setsid) escapes.  The
    # leader is reaped: a process with its pid now is another's, not ours.
    stop_processes([pid for pid in session_members(group) if pid != group], grace)


###############################################################################
# Deployments: the type, the store, the queue, the metrics ####################
###############################################################################

# What a deployment is (Deployment), where it is kept (DeploymentStore, on
# disk first), what waits and runs (DeployQueue); Metrics counts its changes.


class Deployment:
    """One deployment: what was uploaded, by whom, and how far it got.

    to_disk() and from_disk() are its form in ID.json and the index cache,
    with the field names of STATE_FORMAT_VERSION (an older ipd reads what
    this one writes); public() is what the API tells.  The store never
    changes one in place: replace() makes a changed copy, and callers get
    copies (copy()), never the store's own.
    """

    FIELDS = ("id", "project", "seq", "state", "created", "started", "ended",
              "user", "files", "control", "steps", "pruned", "signer", "recipe")
    __slots__ = FIELDS + ("others",)
    FIELDS_SET = frozenset(FIELDS)

    def __init__(self, deployment_id, project, seq=None, user=None, files=None,
                 control=None, **fields):
        """A deployment just uploaded (state 'await'); fields set any other
        field, or one this class has no name for (superseded_by, ...)."""
        self.id, self.project, self.seq = deployment_id, project, seq
        self.state, self.created = "await", time.time()
        self.started = self.ended = None
        self.user, self.control = user, control
        self.files = {} if files is None else files
        self.steps, self.pruned, self.signer, self.recipe = [], False, None, False
        self.others = {}  # fields without a name here, kept as they were
        self._set(fields)

    def _set(self, fields):
        for key, value in fields.items():
            if key in self.FIELDS:
                setattr(self, key, value)
            elif key != "version":
                self.others[key] = value

    @classmethod
    def from_disk(cls, data):
        """The Deployment of an ID.json's dict, of this format or an older
        one: fields an older one lacks get a new upload's defaults.  Raises
        KeyError, TypeError or AttributeError for what is not one."""
        if data.keys() - {"version"} != cls.FIELDS_SET:
            deployment = cls(data["id"], data["project"], data["seq"])
            deployment._set(data)
        else:
            # this format's state file, every field and no other (start-up
            # reads 100,000 of them from the index caches): set them straight
            deployment = cls.__new__(cls)
            for key in cls.FIELDS:
                setattr(deployment, key, data[key])
            deployment.others = {}
        if not (isinstance(deployment.id, str) and isinstance(deployment.project, str)
                and isinstance(deployment.seq, int) and isinstance(deployment.state, str)
                and isinstance(deployment.files, dict) and isinstance(deployment.steps, list)
                and isinstance(deployment.signer, (dict, type(None)))):
            raise TypeError("a field of deployment %r is of the wrong type"
                            % (deployment.id,))
        return deployment

    def to_disk(self):
        """The dict written as ID.json (and into the index cache)."""
        data = dict(self.others, version=STATE_FORMAT_VERSION)
        data.update((key, getattr(self, key)) for key in self.FIELDS)
        return data

    def encode(self):
        """ID.json's bytes."""
        return (json.dumps(self.to_disk(), indent=1, sort_keys=True) + "\n").encode()

    def public(self):
        """What the API tells of a deployment (times as ISO 8601)."""
        duration = None
        if self.started and self.ended:
            duration = round(self.ended - self.started, 3)
        return {
            "project": self.project,
            "deployment": self.id,
            "state": self.state,
            "created": iso_time(self.created),
            "started": iso_time(self.started),
            "ended": iso_time(self.ended),
            "duration": duration,
            "user": self.user,
            "files": self.files,
            "steps": self.steps,
            "pruned": self.pruned,
            "signer": self.signer,
        }

    def copy(self):
        return self.replace()

    def replace(self, **changes):
        """A copy with changes (any field, named or not); what it holds in
        lists and dicts is copied too, so that no change to it reaches
        the store's own."""
        deployment = Deployment.__new__(Deployment)
        deployment.id, deployment.project, deployment.seq = self.id, self.project, self.seq
        deployment.state, deployment.user, deployment.control = (
            self.state, self.user, self.control)
        deployment.created, deployment.started, deployment.ended = (
            self.created, self.started, self.ended)
        deployment.pruned, deployment.recipe = self.pruned, self.recipe
        deployment.files = {name: dict(meta) for name, meta in self.files.items()}
        deployment.steps = [dict(step) for step in self.steps]
        deployment.signer = self.signer and dict(self.signer)
        deployment.others = (json.loads(json.dumps(self.others))  # JSON values
                             if self.others else {})
        if changes:
            deployment._set(changes)
        return deployment

    def __repr__(self):
        return "<Deployment %s of %s: %s>" % (self.id, self.project, self.state)


# Each project's deployments/index.cache holds its records as last read,
# each with its state file's mtime: a start-up reads one file a project
# instead of one a deployment, and reads a state file again only when it
# changed since (the cache is never trusted over the file).
INDEX_FILE = "index.cache"


def read_index(folder):
    """{id: (mtime_ns, record as on disk)} from folder's index, or {} when
    there is none or it is unreadable."""
    try:
        with open(os.path.join(folder, INDEX_FILE), encoding="utf-8") as file:
            data = json.load(file)
        if data.get("version") != STATE_FORMAT_VERSION:
            return {}
        return {key: (value[0], value[1]) for key, value in data["records"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}


def cached_deployment(data):
    """The Deployment of an index entry, or None when it is not one."""
    try:
        return Deployment.from_disk(data)
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


def write_index(folder, index):
    """Write folder's index (a cache: no fsync, a torn one is ignored)."""
    path = os.path.join(folder, INDEX_FILE)
    temporary = os.path.join(folder, ".%s.%d.part" % (INDEX_FILE, os.getpid()))
    try:
        text = json.dumps({"version": STATE_FORMAT_VERSION,  # dumps: the C encoder
                           "records": {key: [mtime, record.to_disk()]
                                       for key, (mtime, record)
                                       in index.items()}}, separators=(",", ":"))
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except OSError as error:
        log.warning("cannot write %s: %s", path, error)
        remove_quietly(temporary)


def summarize(values):
    """count, mean, median, max of a sorted list of seconds."""
    if not values:
        return {"count": 0, "mean": None, "median": None, "max": None}
    return {"count": len(values),
            "mean": round(sum(values) / len(values), 3),
            "median": round(values[len(values) // 2], 3),
            "max": round(values[-1], 3)}


def escape_label(value):
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


STEP_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """The figures behind /stat and /metrics, kept current by the store's
    change events (state_changed is one of its listeners), so that a scrape
    reads no disk and takes no lock but this object's own."""

    def __init__(self):
        self._lock = threading.Lock()
        self.deployments = {}     # (project, state) -> number
        self.steps = {}           # step -> [per bucket..., +Inf, sum]
        self.last_success = {}    # project -> end time of its latest ok
        self.durations = []       # seconds of the latest finished deployments

    def state_changed(self, old, new):
        """The store's listener: count new (and no longer old)."""
        project = new.project
        with self._lock:
            if old is not None:
                self.deployments[(project, old.state)] -= 1
            key = (project, new.state)
            self.deployments[key] = self.deployments.get(key, 0) + 1
            for step in new.steps[len(old.steps) if old else 0:]:
                self._observe(step["step"], step.get("seconds"))
            if new.state == "ok" and new.ended:
                self.last_success[project] = max(new.ended,
                                                 self.last_success.get(project, 0))
            if (old is None or old.ended is None) and new.ended and new.started:
                self.durations.append(new.ended - new.started)
                del self.durations[:-1000]

    def _observe(self, step, seconds):
        if seconds is None:
            return
        # per bucket (not yet cumulative), then +Inf, then the sum
        counts = self.steps.setdefault(step, [0] * (len(STEP_BUCKETS) + 2))
        counts[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1
        counts[-1] += seconds

    def statistics(self):
        """{'deployments': how many, 'states': {state: how many},
        'durations': summarize() of the latest 1000 that ended}."""
        with self._lock:
            states = {}
            for (_, state), count in self.deployments.items():
                states[state] = states.get(state, 0) + count
            return {"deployments": sum(states.values()),
                    "states": {state: count for state, count
                               in sorted(states.items()) if count},
                    "durations": summarize(sorted(self.durations))}

    def render(self, gauges, counters):
        """Prometheus text format (version 0.0.4)."""
        lines = []

        def family(name, kind, text, samples):
            lines.append("# HELP %s %s\n# TYPE %s %s\n" % (name, text, name, kind))
            for labels, value in samples:
                label_text = ",".join('%s="%s"' % (key, escape_label(str(v)))
                                      for key, v in labels)
                lines.append("%s%s %s\n" % (name, "{%s}" % label_text
                                            if label_text else "", value))
        with self._lock:
            deployments = sorted(self.deployments.items())
            steps = sorted((step, list(counts)) for step, counts in self.steps.items())
            last_success = sorted(self.last_success.items())
        family("ipd_deployments", "gauge", "Deployments by project and state.",
               [((("project", p), ("state", st)), n) for (p, st), n in deployments if n])
        lines.append("# HELP ipd_step_duration_seconds Time control.sh steps "
                     "took.\n# TYPE ipd_step_duration_seconds histogram\n")
        for step, counts in steps:
            total = 0
            for bound, count in zip(STEP_BUCKETS + ("+Inf",), counts):
                total += count
                lines.append('ipd_step_duration_seconds_bucket{step="%s",le="%s"} '
                             '%d\n' % (step, bound, total))
            lines.append('ipd_step_duration_seconds_sum{step="%s"} %.3f\n'
                         % (step, counts[-1]))
            lines.append('ipd_step_duration_seconds_count{step="%s"} %d\n'
                         % (step, total))
        family("ipd_last_success_timestamp_seconds", "gauge",
               "When the latest successful deployment of a project ended.",
               [((("project", p),), "%.3f" % t) for p, t in last_success])
        for name, (text, value) in sorted(gauges.items()):
            family(name, "gauge", text, [((), value)])
        for name, (text, value) in sorted(counters.items()):
            family(name, "counter", text, [((), value)])
        return "".join(lines)


class DeploymentStore:
    """Every deployment's record, on disk and in memory: loading after a
    start or crash, the index per project, sequence numbers, pruning.

    Records are Deployments; callers get copies.  Every change goes through
    update() (or commit() for a new one), which writes the record to disk
    before the change is visible, so a state once answered survives any
    crash, and then calls each of listeners with (old, new) copies, one
    change at a time in the order they were made (old is None for a new or
    loaded record): the queue, the metrics and the notifier learn of states
    this way, and never take this store's lock.
    """

    def __init__(self, upload_dir, keep):
        self.upload_dir = upload_dir
        self.keep = keep
        self._lock = threading.Condition()  # wait_final() waits on it
        # One change at a time, from writing it to telling the listeners.
        self._write_lock = threading.Lock()
        # Held from taking an upload's sequence number until it is added,
        # so that each project's list is in upload order.
        self._commit_lock = threading.Lock()
        self._records = {}        # id -> Deployment
        self._by_project = {}     # project -> [ids, oldest first]
        self._next_seq = 1
        self.listeners = []       # called with (old or None, new) after a change
        self.segments = None      # the SegmentStore of recipe pushes (#16)
        self.drop_rebuilt = False  # DROP_REBUILT
        self.min_free = 0         # MIN_FREE_SPACE

    # --- paths

    def project_dir(self, project):
        return os.path.join(self.upload_dir, project)

    def deployments_dir(self, project):
        return os.path.join(self.upload_dir, project, "deployments")

    def path(self, record, suffix=""):
        """Folder of a deployment, or its file with suffix ('.log', ...)."""
        return os.path.join(self.deployments_dir(record.project),
                            record.id + suffix)

    # --- loading

    def load(self, kill_grace=10):
        """Rebuild state from UPLOAD_DIR after a start, a crash or kill -9.

        Torn uploads are removed; a deployment that was running becomes
        'interrupted' and what is left of its control.sh is stopped, so that
        it never overlaps the project's next deployment.  Listeners hear of
        each record found (the queue: what waited waits again, in upload
        order).  Returns the number of deployments found.
        """
        os.makedirs(self.upload_dir, exist_ok=True)
        for entry in os.scandir(self.upload_dir):
            if entry.name.startswith(".upload-"):
                log.info("removing torn upload %s", entry.name)
                remove_quietly(entry.path)
            elif is_project_name(entry.name) and entry.is_dir():
                self._load_project(entry.name)
        records = sorted(self._records.values(), key=lambda r: r.seq)
        with self._write_lock:
            for record in records:
                self._by_project.setdefault(record.project, []).append(record.id)
                self._changed(None, record)
        orphans = processes_of_deployments(
            [record.id for record in records if record.state == "active"])
        for record in records:
            if record.state == "active":
                # Another user's processes: found by the session recorded
                # at the step's start, not by their environment.
                left = processes_of_session(
                    read_step_identity(self.path(record, ".step")))
                if left:
                    orphans[record.id] = sorted(
                        set(orphans.get(record.id, [])) | set(left))
                if orphans.get(record.id):
                    log.warning("stopping what was left running of deployment %s",
                                record.id)
                    stop_processes(orphans[record.id], kill_grace)
                self.update(record.id, state="interrupted", ended=time.time())
                log.info("deployment %s of %s was running at a stop: interrupted",
                         record.id, record.project)
        return len(records)

    def _load_project(self, project):
        folder = self.deployments_dir(project)
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        names = {entry.name for entry in entries}
        cached = read_index(folder)
        index, stale = {}, False
        for entry in entries:
            stem, dot, suffix = entry.name.partition(".")
            if entry.name.startswith("."):  # a torn atomic write
                remove_quietly(entry.path)
            elif suffix == "json" and DEPLOYMENT_ID.match(stem):
                mtime = entry.stat().st_mtime_ns
                cached_mtime, cached_record = cached.get(stem, (None, None))
                record = (cached_deployment(cached_record)
                          if cached_mtime == mtime else None)
                if record is None:
                    stale = True
                    record = self._read_record(entry.path, project, stem)
                if record:
                    index[stem] = (mtime, record)
                    self._records[record.id] = record
                    self._next_seq = max(self._next_seq, record.seq + 1)
            elif stem + ".json" not in names and DEPLOYMENT_ID.match(stem):
                # Files moved in by an upload that died before its record
                # was written: that deployment never existed.
                remove_quietly(entry.path)
        if stale or len(index) != len(cached):
            write_index(folder, index)

    def _read_record(self, path, project, deployment_id):
        try:
            with open(path, encoding="utf-8") as file:
                record = json.load(file)
            if record.get("id") != deployment_id or record.get("project") != project:
                raise ValueError("id or project does not match its file name")
            if record.get("version", 1) > STATE_FORMAT_VERSION:
                raise ValueError("written by a newer ipd (format %s)"
                                 % record.get("version"))
            return Deployment.from_disk(record)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.error("skipping unreadable deployment state %s: %s", path, error)
            return None

    # --- changes

    def commit(self, record, folder, files, announce=None):
        """Move an upload's folder and files ({suffix: path}) into place and
        write its record with the next sequence number; -> a copy of it.
        All or nothing: on an error what was moved is removed again.
        announce(record), when given, logs it once it is on disk and before
        anything can happen to it (the audit log: an upload before the
        states it goes through); the listeners hear of it before it returns
        (the queue: it waits)."""
        moved = []
        with self._commit_lock:
            try:
                os.makedirs(self.deployments_dir(record.project), exist_ok=True)
                for suffix, source in [("", folder)] + sorted(files.items()):
                    os.rename(source, self.path(record, suffix))
                    moved.append(self.path(record, suffix))
                moved.append(self.path(record, ".log"))
                open(moved[-1], "ab").close()
                with self._lock:
                    record = record.replace(seq=self._next_seq)
                    self._next_seq += 1
                write_file_atomic(self.path(record, ".json"), record.encode())
            except BaseException:
                for path in moved:
                    remove_quietly(path)
                raise
            with self._write_lock:  # it exists now: the record is on disk
                if announce:
                    announce(record.copy())
                with self._lock:
                    self._records[record.id] = record
                    self._by_project.setdefault(record.project, []).append(record.id)
                self._changed(None, record)
        return record.copy()

    def update(self, deployment_id, **changes):
        """Change a deployment: on disk first (atomically), then in memory,
        then tell the listeners.  Returns a copy of the new record."""
        with self._write_lock:
            with self._lock:
                old = self._records[deployment_id]
            new = old.replace(**changes)
            write_file_atomic(self.path(new, ".json"), new.encode())
            if new.state != old.state:  # in the audit log before it shows
                log.info("deployment %s of %s: %s -> %s", new.id,
                         new.project, old.state, new.state)
                audit_event("state", project=new.project, deployment=new.id,
                            previous=old.state, state=new.state)
            with self._lock:
                self._records[deployment_id] = new
                self._lock.notify_all()  # wakes wait_final() and followers
            self._changed(old, new)
            return new.copy()

    def settle(self):
        """Return once the listeners have heard of every change a reader can
        see here (they hear of it, under _write_lock, just after it shows):
        figures they keep are then at least as new as any state answered."""
        with self._write_lock:
            pass

    def _changed(self, old, new):
        """Tell each listener of a change (called with _write_lock held)."""
        old = old and old.copy()
        new = new.copy()
        for listener in self.listeners:
            try:
                listener(old, new)
            except Exception:
                log.exception("a listener failed on deployment %s", new.id)

    def wait_final(self, deployment_id, timeout):
        """Wait up to timeout seconds for the deployment to end; return a
        copy of its record, ended or not."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                record = self._records[deployment_id]
                remaining = deadline - time.monotonic()
                if record.state not in UNFINISHED or remaining <= 0:
                    return record.copy()
                self._lock.wait(remaining)

    # --- pruning

    def prune(self, project, ending=None):
        """Remove image and package files of finished deployments beyond
        the newest KEEP_DEPLOYMENTS; states and logs stay.  ending: a
        deployment with the final state its worker writes next, taken as
        written (it prunes first, so a client that sees the end sees the
        files it let go already gone)."""
        with self._lock:
            ids = list(self._by_project.get(project, ()))
            old = [i for i in ids[:-self.keep] if not self._records[i].pruned
                   and self._state_of(i, ending) not in UNFINISHED]
        for deployment_id in old:
            self.prune_files(deployment_id)
        if self.segments:
            self.after_prune(project, ending)

    def _state_of(self, deployment_id, ending):
        """A deployment's state; ending's coming one for ending (held _lock)."""
        if ending is not None and deployment_id == ending.id:
            return ending.state
        return self._records[deployment_id].state

    def prune_files(self, deployment_id):
        record = self.get(deployment_id)
        for suffix in ("", ".image", ".package", ".step", ".recipe"):
            remove_quietly(self.path(record, suffix))
        self.update(deployment_id, pruned=True)
        if self.segments:
            self.segments.forget(deployment_id)

    def after_prune(self, project, ending=None):
        """(#16) Ended recipe deployments of project lose their rebuilt
        files (DROP_REBUILT); below MIN_FREE_SPACE the oldest prunable
        deployments are pruned; unreferenced segments go."""
        if self.drop_rebuilt:
            with self._lock:
                ended = [self._records[i].copy() for i in self._by_project.get(project, ())
                         if self._records[i].recipe and not self._records[i].pruned
                         and self._state_of(i, ending) not in UNFINISHED]
            for record in ended:
                for name in record.files:
                    remove_quietly(self.path(record, "." + name))
        self.segments.collect()
        self.make_room(ending)

    def make_room(self, ending=None):
        """Below MIN_FREE_SPACE: prune the oldest deployments that may be
        pruned (never a waiting or running one, nor a project's latest ok
        one) until there is room or none is left."""
        while self.min_free:
            free = free_space(self.upload_dir)
            if free is None or free >= self.min_free:
                return
            with self._lock:
                keep = set()
                for ids in self._by_project.values():
                    done = [i for i in ids if self._state_of(i, ending) == "ok"]
                    keep.update(done[-1:])
                candidates = [record for record in self._records.values()
                              if record.id not in keep and not record.pruned
                              and self._state_of(record.id, ending) not in UNFINISHED]
            if not candidates:
                log.warning("free space below MIN_FREE_SPACE and nothing left "
                            "to prune")
                return
            oldest = min(candidates, key=lambda record: record.seq)
            log.info("free space below MIN_FREE_SPACE: pruning deployment %s of %s",
                     oldest.id, oldest.project)
            self.prune_files(oldest.id)
            if self.segments:
                self.segments.collect()

    # --- reading

    def get(self, deployment_id):
        with self._lock:
            record = self._records.get(deployment_id)
            return record.copy() if record else None

    def find(self, project, deployment_id=None):
        """The deployment of project with deployment_id, or its latest."""
        with self._lock:
            if deployment_id is None:
                ids = self._by_project.get(project)
                deployment_id = ids[-1] if ids else None
            record = self._records.get(deployment_id)
            if record is None or record.project != project:
                return None
            return record.copy()

    def deployments_of(self, project):
        """Copies of the project's records, oldest first."""
        with self._lock:
            return [self._records[i].copy() for i in self._by_project.get(project, ())]

    def projects(self):
        """{project: (latest record, number of deployments)}."""
        with self._lock:
            return {project: (self._records[ids[-1]].copy(), len(ids))
                    for project, ids in sorted(self._by_project.items())}

    def kept_files(self):
        """(record, has a recipe) of each deployment that keeps its files;
        the records are the store's own: read them, do not change them."""
        with self._lock:
            return [(record, record.recipe) for record in self._records.values()
                    if not record.pruned and record.files]


class DeployQueue:
    """Which deployments wait and which run: per project at most one waiting
    (a newer upload supersedes it) and one running; the oldest waiting one
    of a project that runs none goes first; the cancel Event of each one
    that runs.

    It is one of the store's listeners (state_changed): a deployment waits
    from the change that makes it exist, and the queue keeps, under its own
    lock, the latest state of each one it holds.  cancel() asks the store
    too, which shows a final state before its listeners hear of it.
    """

    def __init__(self, store):
        self.store = store
        self._lock = threading.Condition()
        self._held = {}      # id of a waiting or running deployment -> Deployment
        self._waiting = {}   # project -> id
        self._running = {}   # project -> id
        self._cancels = {}   # id of a running deployment -> Event
        self._superseded = []  # (older, newer id): to be recorded 'changed'
        self._stopping = False
        store.listeners.append(self.state_changed)  # before the store loads

    def state_changed(self, old, new):
        """The store's listener.  A new deployment (committed or loaded,
        'await') waits from the change that makes it exist; of what the
        queue holds it keeps the latest state."""
        with self._lock:
            if old is None and new.state == "await":
                self._wait(new)
            elif new.id in self._held:
                self._held[new.id] = new

    def _wait(self, record):
        """Make record its project's waiting deployment (the events come in
        upload order); the one that waited is to be superseded."""
        waiting = self._waiting.get(record.project)
        if waiting is not None:
            del self._held[waiting]
            self._superseded.append((waiting, record.id))
        self._waiting[record.project] = record.id
        self._held[record.id] = record
        self._lock.notify_all()

    def holding(self, project, digests):
        """The waiting or running deployment of project whose files have
        these SHA-256s ({field: hex}), or None: one a newer upload has
        superseded is no longer held, though the store may not yet say so."""
        with self._lock:
            for record in self._held.values():
                if record.project == project and record.state in UNFINISHED and (
                        digests == {name: meta["sha256"]
                                    for name, meta in record.files.items()}):
                    return record.copy()
        return None

    def supersede(self):
        """Record each waiting deployment a newer one replaced as 'changed'
        (a listener may not change the store): after a commit or a load."""
        while True:
            with self._lock:
                if not self._superseded:
                    return
                older, newer = self._superseded.pop(0)
            self.store.update(older, state="changed", ended=time.time(),
                              superseded_by=newer)

    def cancel(self, deployment_id, announce=None):
        """Cancel a waiting deployment (it never runs) or ask the worker to
        stop a running one.  announce(), when given, is called once the
        cancel is decided and before it takes effect (the log line and the
        audit event that say who cancelled: before the state they explain
        can show; when it raises, nothing is cancelled).  Returns its
        record; raises Conflict when it had ended already, NotFound when
        there is no such deployment."""
        asked = None
        with self._lock:
            # The state first, as the store has it: the store makes a final
            # state visible (to ?wait= and status) before the queue hears it.
            record = self.store.get(deployment_id)
            if record is None:
                raise NotFound("no deployment %s" % deployment_id)
            if deployment_id in self._held and record.state in UNFINISHED:
                if announce:
                    announce()
                if deployment_id in self._cancels:
                    self._cancels[deployment_id].set()
                    asked = "running"
                else:
                    del self._waiting[record.project]
                    del self._held[deployment_id]
                    asked = "waiting"
        if asked == "waiting":
            return self.store.update(deployment_id, state="cancelled", ended=time.time())
        if asked is None:
            state = record.state
            if state in UNFINISHED:  # let go by the queue, not yet recorded
                state = "cancelled or replaced by a newer upload"
            raise Conflict("deployment %s has ended already: %s" % (deployment_id, state))
        return record

    def cancel_requested(self, deployment_id):
        """The Event the worker watches while deployment_id runs."""
        with self._lock:
            return self._cancels[deployment_id]

    def counts(self):
        """{'queue': deployments waiting, 'running': deployments running}, by
        their states as the store shows them: one that has ended counts no
        more, though the worker has yet to release it."""
        self.store.settle()
        with self._lock:
            states = collections.Counter(record.state for record in self._held.values())
        return {"queue": states["await"], "running": states["active"]}

    # --- as the worker sees it

    def claim(self):
        """Block until a waiting deployment may run; return it as 'active'.

        Picks the oldest waiting deployment of a project that is not
        running one; returns None once stop() was called.
        """
        with self._lock:
            while True:
                if self._stopping:
                    return None
                ready = [self._held[deployment_id] for project, deployment_id
                         in self._waiting.items() if project not in self._running]
                if ready:
                    record = min(ready, key=lambda r: r.seq)
                    del self._waiting[record.project]
                    self._running[record.project] = record.id
                    self._cancels[record.id] = threading.Event()
                    break
                self._lock.wait()
        return self.store.update(record.id, state="active", started=time.time())

    def release(self, record):
        """The worker is done with record's project: let its next one run."""
        with self._lock:
            if self._running.get(record.project) == record.id:
                del self._running[record.project]
            self._cancels.pop(record.id, None)
            self._held.pop(record.id, None)
            self._lock.notify_all()

    def stop(self):
        """Let claim() return None to every worker."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()


###############################################################################
# The deploy worker ###########################################################
###############################################################################

# The thread that runs waiting deployments: control.sh check, prepare,
# deploy, each step logged and timed; notify.sh and NOTIFY_URL at the end.


class DeployWorker:
    """Runs waiting deployments, MAX_PARALLEL projects at once.

    Each thread claims a deployment from the queue as soon as one may run,
    and runs its control.sh steps as the original README says: check;
    prepare where check did not succeed; deploy.
    """

    def __init__(self, settings, store, queue):
        self.settings = settings
        self.store = store
        self.queue = queue
        self.threads = []
        self.kill_event = threading.Event()  # set when the grace period ends

    def start(self):
        for number in range(self.settings.MAX_PARALLEL):
            thread = threading.Thread(target=self._loop, name="deploy-%d" % number,
                                      daemon=True)
            thread.start()
            self.threads.append(thread)

    def alive(self):
        return all(thread.is_alive() for thread in self.threads)

    def stop(self, grace):
        """Stop taking deployments; give running ones grace seconds, then
        stop their steps (state 'interrupted')."""
        self.queue.stop()
        deadline = time.monotonic() + grace
        for thread in self.threads:
            thread.join(max(0, deadline - time.monotonic()))
        self.kill_event.set()
        for thread in self.threads:
            thread.join(self.settings.KILL_GRACE + 5)

    def _loop(self):
        while True:
            record = self.queue.claim()
            if record is None:
                return
            try:
                self.run(record)
            except Exception:
                log.exception("deployment %s failed inside ipd", record.id)
                try:
                    self.end(record, "interrupted")
                except Exception:
                    log.exception("cannot record the failure of %s", record.id)
            finally:
                self.queue.release(record)

    def run(self, record):
        """Run the steps of one deployment and record its final state."""
        success = self.settings.SUCCESS_CODE
        cancel = self.queue.cancel_requested(record.id)
        steps = []
        outcome = None
        run_as = self.scripts_user(record.project)
        if run_as:
            open_to_scripts(self.store.project_dir(record.project),
                            self.store.path(record), self.store.path(record, ".image")
                            if "image" in record.files else None, run_as)
        with open(self.store.path(record, ".log"), "ab") as log_file:
            for step in ("check", "prepare", "deploy"):
                if step == "prepare" and steps[0]["code"] == success:
                    continue
                if cancel.is_set():
                    outcome = "cancelled"
                    break
                started = time.monotonic()
                code, outcome = self.run_step(record, step, log_file, cancel,
                                              run_as)
                steps.append({"step": step, "code": code,
                              "seconds": round(time.monotonic() - started, 3)})
                self.store.update(record.id, steps=list(steps))
                if outcome:
                    break
                if step != "check" and code != success:
                    outcome = str(code)
                    break
        self.end(record, outcome or "ok")

    def end(self, record, state):
        """Prune the project, then write the final state: whoever sees the
        end sees the files that it let go already gone."""
        ended = time.time()
        try:
            self.store.prune(record.project, ending=record.replace(state=state))
        except Exception:
            log.exception("pruning %s after deployment %s failed",
                          record.project, record.id)
        self.store.update(record.id, state=state, ended=ended)

    def scripts_user(self, project):
        """RunAs of the project's scripts (RUN_AS, project.conf), or None."""
        return scripts_user(self.settings, self.store.project_dir(project))

    def environment(self, record, run_as=None):
        """The environment of control.sh: the original's, plus IMAGE,
        PROJECT_DIR and what PASS_ENV names; nothing else of ours.  Under
        RUN_AS, PROJECT_DIR is the project's work folder."""
        env = {name: os.environ[name] for name in self.settings.PASS_ENV
               if name in os.environ}
        image = self.store.path(record, ".image")
        env.update({
            "PATH": os.environ.get("PATH", os.defpath),
            "DEPLOY": record.id,
            "PROJECT": record.project,
            "IMAGE": image if "image" in record.files else "",
            "PROJECT_DIR": self.store.project_dir(record.project),
        })
        if run_as:
            env["PROJECT_DIR"] = os.path.join(env["PROJECT_DIR"], WORK_DIR)
        if record.signer:  # a signed release: a script may check who signed
            env["SIGNER"] = record.signer["principal"]
            env["SIGNER_KEY"] = record.signer["fingerprint"]
        return env

    def script_refusal(self, record):
        """Why record's control.sh may no longer run, or None: its project
        was switched to SCRIPTS=server after a package's own script was
        taken (checked again as it starts: its first step, issue 23)."""
        project_dir = self.store.project_dir(record.project)
        if project_settings(self.settings, project_dir)["SCRIPTS"] != "server":
            return None
        if record.control == os.path.join(project_dir, "control.sh"):
            return None
        return ("project %s now runs only the control.sh an administrator placed "
                "on the server (SCRIPTS=server), and this deployment's is its "
                "package's" % record.project)

    def refused_script(self, record, log_file):
        """True, with the reason in the log, when record's control.sh may
        no longer run (script_refusal)."""
        refusal = self.script_refusal(record)
        if refusal:
            log_file.write(("ipd: control.sh not run: %s\n" % refusal).encode())
            log_file.flush()
            log.warning("deployment %s: control.sh not run: %s", record.id, refusal)
        return bool(refusal)

    def run_step(self, record, step, log_file, cancel, run_as=None):
        """Run 'control.sh STEP' in its own session (as run_as, when given);
        return (code, outcome), where outcome is 'timeout', 'cancelled' or
        'interrupted' when we had to stop it."""
        log_file.flush()
        started = time.monotonic()
        if step == "check" and self.refused_script(record, log_file):
            return 126, "126"  # cannot execute, as a shell says
        try:
            process = subprocess.Popen(
                [record.control, step], cwd=self.store.path(record),
                env=self.environment(record, run_as), stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True, **credentials(run_as))
        except (OSError, subprocess.SubprocessError) as error:
            # A broken "#!" line or a vanished file: end as a shell would
            # (127 not found, 126 cannot execute), saying why in the log.
            code = 127 if isinstance(error, FileNotFoundError) else 126
            log_file.write(("ipd: cannot run control.sh %s: %s\n"
                            % (step, getattr(error, "strerror", None) or error)
                            ).encode())
            log_file.flush()
            log.warning("deployment %s: cannot run control.sh %s: %s",
                        record.id, step, error)
            return code, None
        # Recorded at once (no fsync: it must outlive ipd, not the machine)
        # so that a restart after kill -9 finds what is left of the step.
        write_step_identity(self.store.path(record, ".step"), process.pid)
        deadline = started + self.settings.STEP_TIMEOUT
        outcome = None
        while True:
            try:
                process.wait(timeout=min(0.1, max(0.01, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if self.kill_event.is_set():
                    outcome = "interrupted"
                elif cancel.is_set():
                    outcome = "cancelled"
                elif time.monotonic() >= deadline:
                    outcome = "timeout"
                if outcome:
                    log.warning("deployment %s: control.sh %s %s, stopping it",
                                record.id, step, outcome)
                    stop_process_group(process, self.settings.KILL_GRACE)
                    break
        # Children it left behind belong to the step: none may outlive it.
        stop_process_group(process, self.settings.KILL_GRACE)
        code = process.returncode
        if code < 0:
            code = 128 - code  # killed by a signal, as a shell reports it
        log.info("deployment %s of %s: control.sh %s exited %d after %.3fs",
                 record.id, record.project, step, code,
                 time.monotonic() - started)
        return code, outcome


class Notifier:
    """Tells others that a deployment ended: UPLOAD_DIR/$PROJECT/notify.sh,
    where an administrator placed one, and a POST of a JSON summary to
    NOTIFY_URL.  Each runs in a thread of its own with a time limit: a slow
    or failing notifier is logged, and never holds up the queue."""

    ATTEMPTS = 3

    def __init__(self, settings, store, environment, scripts_user=None):
        self.settings = settings
        self.store = store
        self.environment = environment
        self.scripts_user = scripts_user or (lambda project: None)

    def state_changed(self, old, new):
        """The store's listener: notify when a deployment ends."""
        if old is not None and new.state != old.state and new.state not in UNFINISHED:
            self.deployment_ended(new)

    def deployment_ended(self, record):
        threading.Thread(target=self._notify, args=(record,), name="notify",
                         daemon=True).start()

    def _notify(self, record):
        try:
            script = os.path.join(self.store.project_dir(record.project),
                                  "notify.sh")
            if os.path.isfile(script) and os.access(script, os.X_OK):
                self.run_script(script, record)
            if self.settings.NOTIFY_URL:
                self.post(record)
        except Exception:
            log.exception("notifying the end of deployment %s failed", record.id)

    def run_script(self, script, record):
        """notify.sh, with control.sh's environment plus STATE, as the
        user control.sh runs as."""
        run_as = self.scripts_user(record.project)
        env = dict(self.environment(record, run_as), STATE=record.state)
        process = subprocess.Popen([script], cwd=os.path.dirname(script), env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   **credentials(run_as))
        try:
            output, _ = process.communicate(timeout=self.settings.NOTIFY_TIMEOUT)
        except subprocess.TimeoutExpired:
            stop_process_group(process, self.settings.KILL_GRACE)
            output, _ = process.communicate()
            log.warning("notify.sh of %s ran over NOTIFY_TIMEOUT and was stopped",
                        record.project)
        text = output[-1000:].decode("utf-8", "replace").strip().replace("\n", " | ")
        log.info("notify.sh of %s for %s (%s) exited %d: %s", record.project,
                 record.id, record.state, process.returncode, text)

    def post(self, record):
        """POST the summary to NOTIFY_URL; retried with a growing pause."""
        body = json.dumps(dict(record.public(), event="deployment_ended"),
                          sort_keys=True).encode()
        for attempt in range(self.ATTEMPTS):
            request = urllib.request.Request(
                self.settings.NOTIFY_URL, data=body, method="POST",
                headers={"Content-Type": "application/json",
                         "User-Agent": "ipd/" + __version__})
            try:
                with urllib.request.urlopen(request,
                                            timeout=self.settings.NOTIFY_TIMEOUT):
                    log.info("NOTIFY_URL told: %s of %s is %s", record.id,
                             record.project, record.state)
                    return
            except (OSError, http.client.HTTPException) as error:
                problem = error
            time.sleep(2 ** attempt)
        log.warning("NOTIFY_URL failed %d times for %s: %s", self.ATTEMPTS,
                    record.id, problem)


###############################################################################
# Segments: layers stored once, recipes, resumable uploads (issue #16) ########
###############################################################################

# Content-addressed segments shared by all deployments, the recipes that
# rebuild a file from them, and their resumable uploads.


SEGMENTS_DIR = ".segments"  # in UPLOAD_DIR; never a project name (leading dot)
SHA256_HEX = re.compile(r"[0-9a-f]{64}\Z")
RECIPE_LIMIT = 64 << 20      # largest recipe (JSON) body
# Pieces in one file's recipe: a segment is a tar member of 64 KiB or more
# (SEGMENT_MIN) or a run of smaller ones, so an image has hundreds; push
# sends a file with more as a whole upload.  Bounded so that what a recipe
# makes the daemon build stays small (issue 23).
RECIPE_MAX_PIECES = 10000
# JSON values a recipe may hold: each piece is an object, its two fields
# and a comma; two files; a few more for the rest (issue 23).
RECIPE_MAX_ITEMS = 4 * RECIPE_MAX_PIECES * 2 + 64
# /segments/missing: a list of digests needs this much, not 64 MiB.
MISSING_MAX_SEGMENTS = 2 * RECIPE_MAX_PIECES  # push asks in batches of these
MISSING_LIMIT = MISSING_MAX_SEGMENTS * 80 + 4096


def parse_recipe(data):
    """A recipe body -> {project, force, manifest, signature, files:
    {field: {name, size, sha256, segments: [{data: bytes} or {sha256,
    size}]}}}.  Raises BadRequest for anything malformed."""
    recipe = load_json_object(data, "the recipe", RECIPE_MAX_ITEMS)
    if not isinstance(recipe.get("files"), dict) or not recipe["files"]:
        raise BadRequest("the recipe needs a files object: image, package or both")
    for key in ("project", "manifest", "signature"):
        if key in recipe and not isinstance(recipe[key], str):
            raise BadRequest("recipe field %s must be a string" % key)
    files = {}
    for field, meta in recipe["files"].items():
        if field not in UPLOAD_FILE_FIELDS:
            raise BadRequest("unknown file in the recipe: %s (image or package)"
                             % printable(repr(field), 40))
        if (not isinstance(meta, dict) or not isinstance(meta.get("segments"), list)
                or not isinstance(meta.get("size"), int) or meta["size"] < 0
                or not SHA256_HEX.match(str(meta.get("sha256", "")))):
            raise BadRequest("recipe of %s: needs size, sha256 (64 lower case hex "
                             "digits) and segments" % field)
        if len(meta["segments"]) > RECIPE_MAX_PIECES:
            raise BadRequest("recipe of %s: more than %d segments"
                             % (field, RECIPE_MAX_PIECES))
        pieces = []
        for piece in meta["segments"]:
            if isinstance(piece, dict) and isinstance(piece.get("data"), str):
                try:
                    pieces.append({"data": base64.b64decode(piece["data"],
                                                            validate=True)})
                except (binascii.Error, ValueError):
                    raise BadRequest("recipe of %s: inline data is not base64"
                                     % field)
            elif isinstance(piece, dict) and SHA256_HEX.match(
                    str(piece.get("sha256", ""))) and isinstance(
                        piece.get("size"), int) and piece["size"] >= 0:
                pieces.append({"sha256": piece["sha256"], "size": piece["size"]})
            else:
                raise BadRequest("recipe of %s: each segment is {\"data\": base64} "
                                 "or {\"sha256\": hex, \"size\": bytes}" % field)
        check_pieces_add_up(field, pieces, meta["size"])
        name = client_filename(str(meta.get("name") or "")) or field
        files[field] = {"name": name, "size": meta["size"],
                        "sha256": meta["sha256"], "segments": pieces}
    force = recipe.get("force", False)
    return {"project": recipe.get("project"), "files": files,
            "force": "1" if force in (True, 1, "1", "true", "yes") else "0",
            "manifest": recipe.get("manifest"), "signature": recipe.get("signature")}


def check_pieces_add_up(field, pieces, size):
    """A recipe's pieces of a file must add up to its declared size, so
    that the size checked against the limits is what would be copied
    (issue 23).  Raises BadRequest."""
    total = sum(len(piece["data"]) if "data" in piece else piece["size"]
                for piece in pieces)
    if total != size:
        raise BadRequest("recipe of %s: its pieces add up to %d bytes, not the "
                         "%d it declares" % (field, total, size))


def parse_missing_request(data):
    """The body of POST /segments/missing -> its digests, each once, in
    order (duplicates go first, so that each costs the same whatever the
    server holds: issue 23).  Raises BadRequest."""
    request = load_json_object(data, "the list of segments", MISSING_MAX_SEGMENTS * 3)
    listed = request.get("segments")
    if not isinstance(listed, list):
        raise BadRequest('expected JSON {"segments": [sha256, ...]}')
    if len(listed) > MISSING_MAX_SEGMENTS:
        raise BadRequest("more than %d segments in one request" % MISSING_MAX_SEGMENTS)
    digests = [item.get("sha256") if isinstance(item, dict) else item
               for item in listed]
    if not all(isinstance(digest, str) and SHA256_HEX.match(digest)
               for digest in digests):
        raise BadRequest("each segment is named by its SHA-256 (64 lower "
                         "case hex digits)")
    return list(dict.fromkeys(digests))


def check_room(upload_dir, floor, needed, what):
    """Raise DiskFull (507) when needed more bytes in upload_dir would not
    fit or would leave less than floor (MIN_FREE_SPACE) free.  Nothing is
    pruned for it: a layer push never costs another project its kept
    deployments (issue 23); the deployments' own end prunes as before."""
    free = free_space(upload_dir)
    if free is not None and free - needed < floor:
        raise DiskFull("%s needs %d bytes, and the server has %d free%s: not "
                       "stored" % (what, needed, free, " above MIN_FREE_SPACE"
                                   if floor else ""))


def check_recipe_size(files, settings):
    """A recipe's files add up to at most MAX_UPLOAD_SIZE (TooLarge, 413)
    and fit on the disk above MIN_FREE_SPACE (DiskFull, 507): checked
    before the first byte is copied."""
    total = sum(meta["size"] for meta in files.values())
    limit = settings.MAX_UPLOAD_SIZE
    if limit and total > limit:
        raise TooLarge("the recipe's files have %d bytes, more than MAX_UPLOAD_SIZE "
                       "(%d bytes)" % (total, limit))
    check_room(settings.UPLOAD_DIR, settings.MIN_FREE_SPACE, total, "the recipe")


def encode_recipe(files):
    """The files part of a parsed recipe as stored beside a deployment."""
    return json.dumps({field: dict(meta, segments=[
        {"data": base64.b64encode(piece["data"]).decode()} if "data" in piece
        else piece for piece in meta["segments"]]) for field, meta in files.items()},
        sort_keys=True).encode()


def recipe_digests(files):
    return frozenset(piece["sha256"] for meta in files.values()
                     for piece in meta["segments"] if "sha256" in piece)


def parse_upload_complete(value, default):
    """Upload-Complete, a structured-field boolean: ?1 or ?0."""
    if value is None:
        return default
    value = value.strip()
    if value not in ("?1", "?0"):
        raise BadRequest("Upload-Complete must be ?1 or ?0")
    return value == "?1"


# The blocks in which a recipe's file is copied together from its segments.
REBUILD_BLOCK = 4 * CHUNK_SIZE


# A request writing a partial segment that has received nothing for this
# long is taken over by a newer request for it (a retry after a cut
# connection: the old one's client is gone, or as good as); the newer one
# waits at most TAKEOVER_WAIT for that, else it is answered 409 (issue 23).
TAKEOVER_STALL = 2.0
TAKEOVER_WAIT = 15.0


class SegmentWriter:
    """One request's bytes appended to a partial segment (see
    SegmentStore.begin); what arrived stays when the client goes away.
    A newer request for the same partial may take it over (supersede)."""

    def __init__(self, store, user, digest, path, offset, connection=None):
        self.store, self.user, self.digest = store, user, digest
        self.path, self.offset = path, offset
        self.connection = connection  # the request's socket, to wake it
        self.progress = time.monotonic()  # when it last received bytes
        self.superseded = self.finishing = False
        self.released = threading.Event()

    def receive(self, body):
        """Append the whole request body; raises what the body raises,
        after keeping (and fsyncing) what came; Conflict once superseded."""
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while not self.superseded:
                count = body.readinto(view)
                if not count or self.superseded:
                    break
                try:
                    write_all(fd, view[:count])
                except OSError as error:
                    raise disk_errors(error)
                self.offset += count
                self.progress = time.monotonic()
        finally:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if self.superseded:
            raise Conflict("a newer request for this segment took its upload over")
        return self.offset

    def stalled(self):
        """True when no byte came for TAKEOVER_STALL (never while the
        whole segment is being verified: that is progress too)."""
        return (not self.finishing and
                time.monotonic() - self.progress > TAKEOVER_STALL)

    def supersede(self):
        """Tell this writer to stop, and wake it from a read that waits for
        a client that is gone (its socket's reading side is shut)."""
        self.superseded = True
        if self.connection is not None:
            try:
                self.connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def finish(self):
        """Verify the whole segment's SHA-256 and move it into the store;
        -> its size.  A mismatch removes the partial (BadRequest)."""
        self.finishing = True
        digest = hashlib.sha256()
        with open(self.path, "rb") as file:
            for block in iter(lambda: file.read(CHUNK_SIZE), b""):
                digest.update(block)
        if digest.hexdigest() != self.digest:
            remove_quietly(self.path)
            raise BadRequest("the segment's bytes have SHA-256 %s, not %s: "
                             "send it again from the start"
                             % (digest.hexdigest(), self.digest))
        return self.store.add(self.user, self.digest, self.path)

    def release(self):
        self.store.writer_done(self)
        self.released.set()


class SegmentStore:
    """Content-addressed segments under UPLOAD_DIR/.segments: sha256/ab/abcd...
    complete ones (written as partial, renamed once the digest holds),
    partial/USER/abcd... uploads under way.  A user is told a segment is on
    the server only when it sent its bytes or a deployment of a project it
    may use refers to it; for everyone else it is missing."""

    def __init__(self, upload_dir, expiry):
        self.root = os.path.join(upload_dir, SEGMENTS_DIR)
        self.expiry = expiry
        self.lock = threading.Lock()
        self.sizes = {}      # digest -> size of each complete segment
        self.uploaders = {}  # digest -> names of the users who sent its bytes
        self.refs = {}       # deployment id -> (project, frozenset of digests)
        self.recent = {}     # digest -> when last sent or named by a push
        self.busy = {}       # (user, digest) -> the SegmentWriter writing it
        self.collected = time.monotonic()
        self._statistics = None  # (when, figures)

    def collect_now_and_then(self):
        """collect(), at most every SEGMENT_EXPIRY / 4 (and hour)."""
        if time.monotonic() - self.collected > min(self.expiry / 4, 3600):
            self.collect()

    # --- paths

    def path(self, digest):
        return os.path.join(self.root, "sha256", digest[:2], digest)

    def partial_path(self, user_name, digest):
        folder = hashlib.sha256(user_name.encode()).hexdigest()[:16]
        return os.path.join(self.root, "partial", folder, digest)

    def uploaders_path(self):
        return os.path.join(self.root, "uploaders")

    def make_folder(self, path):
        """A folder under the store, the store itself made first and for
        ipd alone (0700): the scripts' user (RUN_AS) reads no layer."""
        os.makedirs(self.root, 0o700, exist_ok=True)
        os.makedirs(path, exist_ok=True)

    # --- loading

    def load(self, store):
        """Find the segments on disk, who sent them, and which kept
        deployments refer to which."""
        try:  # made with the first segment
            folders = list(os.scandir(os.path.join(self.root, "sha256")))
        except FileNotFoundError:
            folders = []
        for folder in folders:
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder.path):
                if SHA256_HEX.match(entry.name):
                    info = entry.stat()
                    self.sizes[entry.name] = info.st_size
                    self.recent[entry.name] = info.st_mtime
                else:  # a torn rename or stray file
                    remove_quietly(entry.path)
        try:
            with open(self.uploaders_path(), encoding="utf-8") as file:
                for line in file:
                    try:
                        digest, name = json.loads(line)
                    except (ValueError, TypeError):
                        continue
                    if digest in self.sizes:
                        self.uploaders.setdefault(digest, set()).add(name)
        except FileNotFoundError:
            pass
        for record, has_recipe in store.kept_files():
            if has_recipe:
                self.read_refs(store, record)
        self.collect()

    def read_refs(self, store, record):
        try:
            with open(store.path(record, ".recipe"), "rb") as file:
                files = json.loads(file.read().decode())
            digests = recipe_digests(files)
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as error:
            log.error("unreadable recipe of deployment %s: %s", record.id, error)
            return
        with self.lock:
            self.refs[record.id] = (record.project, digests)

    # --- who may know of what

    def visible(self, user, digests):
        """The digests of digests that are on the server for user."""
        with self.lock:
            own = set()
            for project, referred in self.refs.values():
                if user.may_use(project):
                    own |= referred
            # both tests for every digest: the same work whether another
            # project holds it or nobody does (issue 23)
            return {digest for digest in digests if (digest in own) + (
                user.name in self.uploaders.get(digest, ())) > 0 and
                digest in self.sizes}

    def touch(self, digests):
        """Digests named by a push: not collected for SEGMENT_EXPIRY."""
        now = time.time()
        with self.lock:
            for digest in digests:
                self.recent[digest] = now

    def partial_offset(self, user, digest):
        try:
            return os.stat(self.partial_path(user.name, digest)).st_size
        except OSError:
            return None

    # --- uploads

    def begin(self, user, digest, offset, restart=False, connection=None,
              max_uploads=0):
        """A SegmentWriter at offset of user's partial upload of digest;
        Conflict (with the current Upload-Offset) when offset is not where
        the partial ends or another request keeps writing to it;
        TooManyRequests when user has max_uploads under way (0: no bound)."""
        path = self.partial_path(user.name, digest)
        writer = SegmentWriter(self, user, digest, path, 0, connection)
        self.claim(writer, max_uploads)
        try:
            self.make_folder(os.path.dirname(path))
            if restart:
                remove_quietly(path)
            current = self.partial_offset(user, digest) or 0
            if offset != current:
                raise Conflict("Upload-Offset is %d but the server has %d bytes "
                               "of this segment" % (offset, current),
                               {"Upload-Offset": str(current)})
            writer.offset = current
            return writer
        except BaseException:
            writer.release()
            raise

    def claim(self, writer, max_uploads):
        """Make writer the one request that writes its partial.  One still
        writing it is waited for while it receives bytes, and taken over
        once it stalls (TAKEOVER_STALL): a retry right after a cut goes on
        where the partial ends (issue 23).  Raises Conflict, TooManyRequests."""
        key = (writer.user.name, writer.digest)
        deadline = time.monotonic() + TAKEOVER_WAIT
        while True:
            with self.lock:
                old = self.busy.get(key)
                if old is None:
                    uploads = sum(1 for name, _ in self.busy if name == key[0])
                    if max_uploads and uploads >= max_uploads:
                        raise TooManyRequests(
                            "%d segment uploads of %s are under way (SEGMENT_UPLOADS):"
                            " finish one first" % (uploads, key[0]),
                            {"Retry-After": "5"})
                    self.busy[key] = writer
                    return
            if old.stalled():
                old.supersede()
            left = deadline - time.monotonic()
            if left <= 0:
                raise Conflict("this segment is being uploaded by another "
                               "request; ask HEAD for its offset and go on")
            old.released.wait(min(left, 0.1))

    def writer_done(self, writer):
        """A SegmentWriter's request ended: another may write to it."""
        with self.lock:
            key = (writer.user.name, writer.digest)
            if self.busy.get(key) is writer:
                del self.busy[key]

    def usage(self, user):
        """The bytes user holds that no kept deployment refers to: its
        partial uploads, and the segments it sent that none refers to
        (what SEGMENT_QUOTA bounds)."""
        total = 0
        try:
            for entry in os.scandir(os.path.dirname(self.partial_path(user.name, "-"))):
                total += entry.stat().st_size
        except OSError:
            pass
        with self.lock:
            referred = set()
            for _, digests in self.refs.values():
                referred |= digests
            total += sum(self.sizes.get(digest, 0) for digest, names
                         in self.uploaders.items()
                         if user.name in names and digest not in referred)
        return total

    def add(self, user, digest, partial):
        """Move a verified partial into the store (or drop it when the store
        has it already) and note who sent it; -> its size."""
        final = self.path(digest)
        size = os.stat(partial).st_size
        with self.lock:  # collect() removes files under it too
            if digest in self.sizes:
                remove_quietly(partial)
            else:
                self.make_folder(os.path.dirname(final))
                os.rename(partial, final)
                fsync_dir(os.path.dirname(final))
            self.sizes[digest] = size
            self.recent[digest] = time.time()
            names = self.uploaders.setdefault(digest, set())
            new = user.name not in names
            names.add(user.name)
        if new:
            with open(self.uploaders_path(), "a", encoding="utf-8") as file:
                file.write(json.dumps([digest, user.name]) + "\n")
        return size

    # --- recipes

    def rebuild(self, user, field, meta, sink, wanted=None):
        """Write the file of a recipe into sink (a FileSink) byte for byte
        and check its size and SHA-256.  Every named segment's presence and
        size is checked before the first byte is copied; wanted (a request's
        client still there?) is asked between blocks, and when it says no
        the copy stops (ClientGone).  Raises BadRequest."""
        self.check_pieces(user, field, meta)
        copied = 0
        for piece in meta["segments"]:
            if "data" in piece:
                sink.write(piece["data"])
                continue
            try:
                with open(self.path(piece["sha256"]), "rb") as file:
                    # fresh bytes each time: the sink's hash may still hold
                    # the last block on another core; large blocks, as the
                    # copy is what a push of a changed layer waits for
                    for block in iter(lambda: file.read(REBUILD_BLOCK), b""):
                        sink.write(block)
                        copied += 1
                        if wanted and copied % 16 == 0 and not wanted():
                            raise ClientGone("the client left during the rebuild")
            except FileNotFoundError:
                raise BadRequest("recipe of %s names segment %s, which the server "
                                 "does not have: send it first"
                                 % (field, piece["sha256"]))
            if sink.size > meta["size"]:
                break
        found = sink.describe()
        if found["size"] != meta["size"] or found["sha256"] != meta["sha256"]:
            raise BadRequest("the file the recipe of %s rebuilds has %d bytes and "
                             "SHA-256 %s, not %d bytes and %s" % (
                                 field, found["size"], found["sha256"],
                                 meta["size"], meta["sha256"]))

    def check_pieces(self, user, field, meta):
        """Each segment a recipe's file names is on the server for user and
        has the size the recipe says; then they are not collected for
        SEGMENT_EXPIRY.  Raises BadRequest."""
        named = [piece["sha256"] for piece in meta["segments"] if "sha256" in piece]
        present = self.visible(user, named)
        for piece in meta["segments"]:
            if "sha256" not in piece:
                continue
            digest = piece["sha256"]
            if digest not in present:
                raise BadRequest("recipe of %s names segment %s, which the server "
                                 "does not have: send it first" % (field, digest))
            if piece["size"] != self.sizes.get(digest):
                raise BadRequest("recipe of %s: segment %s has %s bytes, not %d"
                                 % (field, digest, self.sizes.get(digest),
                                    piece["size"]))
        self.touch(present)  # after the checks: only what exists (issue 23)

    # --- references and collection

    def refer(self, record, files):
        with self.lock:
            self.refs[record.id] = (record.project, recipe_digests(files))

    def forget(self, deployment_id):
        with self.lock:
            self.refs.pop(deployment_id, None)

    def collect(self, now=None):
        """Remove partial uploads untouched for SEGMENT_EXPIRY, and segments
        no kept deployment refers to that nobody sent or named for as
        long.  Returns the bytes freed."""
        now = now or time.time()
        self.collected = time.monotonic()
        freed = 0
        partial_root = os.path.join(self.root, "partial")
        try:
            folders = list(os.scandir(partial_root))
        except OSError:
            folders = []
        for folder in folders:
            for entry in os.scandir(folder.path):
                try:
                    if now - entry.stat().st_mtime > self.expiry:
                        with self.lock:
                            busy = any(entry.name == digest for _, digest in self.busy)
                        if not busy:
                            remove_quietly(entry.path)
                except OSError:
                    pass
        with self.lock:
            referred = set()
            for _, digests in self.refs.values():
                referred |= digests
            old = [digest for digest in self.sizes if digest not in referred
                   and now - self.recent.get(digest, 0) > self.expiry]
            for digest in old:
                freed += self.sizes.pop(digest)
                self.uploaders.pop(digest, None)
                self.recent.pop(digest, None)
                remove_quietly(self.path(digest))
        if old:
            log.info("removed %d unreferenced segment%s (%d bytes)", len(old),
                     "" if len(old) == 1 else "s", freed)
            self.rewrite_uploaders()
        return freed

    def rewrite_uploaders(self):
        with self.lock:
            lines = "".join(json.dumps([digest, name]) + "\n" for digest, names
                            in sorted(self.uploaders.items()) for name in sorted(names))
        write_file_atomic(self.uploaders_path(), lines.encode(), 0o600)

    def statistics(self, store):
        """Stored, unique and saved bytes of the kept deployments' files
        (figured at most once a second)."""
        cached = self._statistics
        if cached and time.monotonic() - cached[0] < 1:
            return dict(cached[1])
        with self.lock:
            unique = sum(self.sizes.values())
            count = len(self.sizes)
        logical = files_on_disk = 0
        for record, recipe in store.kept_files():
            for name, meta in record.files.items():
                logical += meta.get("size", 0)
                if not recipe:  # an upload's file: there until pruned
                    files_on_disk += meta.get("size", 0)
                    continue
                try:  # a rebuilt file, there until its run ended
                    files_on_disk += os.stat(store.path(record, "." + name)).st_size
                except OSError:
                    pass
        stored = unique + files_on_disk
        figures = {"segments": count, "unique_bytes": unique, "stored_bytes": stored,
                   "saved_bytes": max(0, logical - stored)}
        self._statistics = (time.monotonic(), figures)
        return dict(figures)


###############################################################################
# The service: what uploads, redeploys and cancels do #########################
###############################################################################

# One object the HTTP layer calls: users, tokens, store, queue, metrics,
# worker; signatures, redeploy, cancel, statistics, with their log and audit.


class Daemon:
    """What the handlers share: settings, users, deployments, counters."""

    def __init__(self, settings):
        self.settings = settings
        self.users = UserDB(settings.AUTH_DB)
        self.tokens = TokenDB(tokens_path(settings))
        self.login_throttle = LoginThrottle()
        self.store = DeploymentStore(settings.UPLOAD_DIR, settings.KEEP_DEPLOYMENTS)
        self.segments = SegmentStore(settings.UPLOAD_DIR, settings.SEGMENT_EXPIRY)
        self.store.segments = self.segments
        self.store.drop_rebuilt = settings.DROP_REBUILT
        self.store.min_free = settings.MIN_FREE_SPACE
        self.queue = DeployQueue(self.store)
        self.metrics = Metrics()
        self.store.listeners.append(self.metrics.state_changed)
        self.worker = DeployWorker(settings, self.store, self.queue)
        self.notifier = Notifier(settings, self.store, self.worker.environment,
                                 self.worker.scripts_user)
        self.store.listeners.append(self.notifier.state_changed)
        self.started = time.time()
        self._counter_lock = threading.Lock()
        self.uploads = 0
        self.bytes_received = 0

    def load(self, kill_grace):
        """Read UPLOAD_DIR at a start: deployments (DeploymentStore.load),
        the queue, the segments.  Returns the number of deployments."""
        count = self.store.load(kill_grace)
        self.queue.supersede()
        self.segments.load(self.store)
        return count

    def statistics(self):
        """Deployments, states, queue, running, durations (see
        Metrics.statistics), uploads and bytes received: as new as any
        state the store has answered."""
        self.store.settle()
        figures = self.metrics.statistics()
        stats = {"deployments": figures["deployments"], "states": figures["states"]}
        stats.update(self.queue.counts())
        stats["durations"] = figures["durations"]
        with self._counter_lock:
            stats.update(uploads=self.uploads, bytes_received=self.bytes_received)
        return stats

    def count_upload(self, size):
        with self._counter_lock:
            self.uploads += 1
            self.bytes_received += size

    def check_login(self, name, password):
        """-> (User, None), or (None, why) for a refused login.  A deploy
        token (ipd_...) is taken as the password, whatever the name."""
        if password.startswith("ipd_"):
            user, reason = self.tokens.authenticate(password)
            if user is None:  # as slow as a wrong password
                check_password(password, self.users.decoy_hash())
            return user, reason
        user = self.users.authenticate(name, password)
        return user, None if user else "wrong user or password"

    def signature_required(self, project):
        rule = self.settings.REQUIRE_SIGNATURE
        return "*" in rule or project in rule

    def newest_signed(self, project):
        """The newest manifest time of project's signed deployments that
        wait, run or succeeded, and the nonces ever used; (0, set())."""
        newest, nonces = 0, set()
        for record in self.store.deployments_of(project):
            signer = record.signer
            if signer:
                nonces.add(signer.get("nonce"))
                if record.state in UNFINISHED + ("ok",):
                    newest = max(newest, signer.get("created", 0))
        return newest, nonces

    def check_signature(self, project, upload, user, address):
        """The signer of a push ({principal, fingerprint, created, nonce})
        or None for an unsigned one; raises Forbidden (audited) for a push
        that must be signed and is not, or whose signature or manifest does
        not hold."""
        manifest_text = upload.fields.get("manifest")
        signature = upload.fields.get("signature")
        try:
            if manifest_text is None and signature is None:
                if self.signature_required(project):
                    raise Forbidden("project %s takes signed pushes only: push with "
                                    "ipd.py push --sign KEY" % project)
                return None
            if manifest_text is None or signature is None:
                raise BadRequest("a signed push needs both manifest and signature")
            manifest = parse_manifest(manifest_text.encode())
            signer = verify_signature(self.settings.ALLOWED_SIGNERS,
                                      manifest_text.encode(), signature, project,
                                      self.settings.UPLOAD_DIR)
            check_manifest_files(manifest, project, upload)
            signer.update(created=manifest["created"], nonce=manifest["nonce"])
            return signer
        except IpdError as error:
            audit_event("signature_refused", project=project, user=user.name,
                        address=address, reason=str(error))
            log.warning("push to %s by %s refused: %s", project, user.name, error)
            raise

    def check_not_replayed(self, project, signer, user, address):
        """Refuse a signed manifest seen before, or older than the newest
        signed release of project (a rollback its signer did not ask for)."""
        newest, nonces = self.newest_signed(project)
        reason = None
        if signer["nonce"] in nonces:
            reason = "this signed manifest was pushed before (a replay)"
        elif signer["created"] < newest:
            reason = ("this signed manifest (%s) is older than the newest signed "
                      "release of %s (%s): sign it anew, or have an ADMIN redeploy "
                      "it" % (iso_time(signer["created"]), project, iso_time(newest)))
        if reason:
            audit_event("signature_refused", project=project, user=user.name,
                        address=address, reason=reason)
            raise Forbidden(reason)

    def cancel(self, record, user, address):
        """Cancel a deployment for user (see DeployQueue.cancel); logged
        and audited before its state can say cancelled: a follower of its
        log, notify.sh and the audit log see who cancelled it first."""
        def announce():
            with open(self.store.path(record, ".log"), "ab") as file:
                file.write(("ipd: cancelled by %s from %s at %s\n" % (
                    user.name, address, iso_time(time.time()))).encode())
            log.info("deployment %s of %s: cancel asked by %s", record.id,
                     record.project, user.name)
            audit_event("cancel", project=record.project, deployment=record.id,
                        user=user.name, address=address)
        self.queue.cancel(record.id, announce)

    def redeploy(self, earlier, user, address):
        """A new deployment from the kept files of an earlier one: the
        rollback.  Raises Gone when they were pruned."""
        if earlier.pruned or not earlier.files:
            raise Gone("the files of deployment %s were pruned "
                       "(KEEP_DEPLOYMENTS): upload them again" % earlier.id)
        if self.signature_required(earlier.project) and user.role != "ADMIN":
            if not earlier.signer:
                raise Forbidden("project %s takes signed releases only: deployment "
                                "%s was not signed (an ADMIN may redeploy it)"
                                % (earlier.project, earlier.id))
            if earlier.signer["created"] < self.newest_signed(earlier.project)[0]:
                raise Forbidden("deployment %s is older than the newest signed "
                                "release of %s: only an ADMIN may roll back to it"
                                % (earlier.id, earlier.project))
        upload = Upload()
        try:
            for name, meta in earlier.files.items():
                path = self.store.path(earlier, "." + name)
                if earlier.recipe and not os.path.exists(path):
                    upload.files[name] = self.rebuild_kept(earlier, name, user)
                    continue
                upload.files[name] = KeptFile(path, meta, self.settings.UPLOAD_DIR)
            if earlier.recipe:
                upload.recipe = KeptFile(self.store.path(earlier, ".recipe"), {},
                                         self.settings.UPLOAD_DIR)
        except BaseException as error:
            upload.discard()
            if isinstance(error, FileNotFoundError):
                raise Gone("the files of deployment %s are gone" % earlier.id)
            if isinstance(error, IpdError):
                raise
            raise disk_errors(error)

        def announce(record):
            log.info("deployment %s of %s: redeploy of %s by %s", record.id,
                     record.project, earlier.id, user.name)
            audit_event("redeploy", project=record.project, deployment=record.id,
                        redeploy_of=earlier.id, user=user.name, address=address,
                        files=record.files)
        return self.deploy_upload(earlier.project, upload, user, announce,
                                  redeploy_of=earlier.id, signer=earlier.signer)

    def rebuild_kept(self, earlier, name, user):
        """(#16) The file name of a recipe deployment, rebuilt from its kept
        recipe into a FileSink; Gone when its segments are gone."""
        try:
            with open(self.store.path(earlier, ".recipe"), "rb") as file:
                stored = json.loads(file.read().decode())
            meta = parse_recipe(json.dumps({"files": {name: stored[name]}}).encode())[
                "files"][name]
        except (OSError, ValueError, KeyError, BadRequest):
            raise Gone("the recipe of deployment %s is gone" % earlier.id)
        sink = FileSink(self.settings.UPLOAD_DIR, name, meta["name"], parallel=True)
        try:
            self.segments.rebuild(user, name, meta, sink)
        except BadRequest as error:
            sink.discard()
            raise Gone("the files of deployment %s cannot be rebuilt: %s"
                       % (earlier.id, error))
        except BaseException:
            sink.discard()
            raise
        sink.close()
        return sink

    def create_deployment(self, project, upload, user, address, received):
        """Turn a complete Upload for project into a waiting deployment, all
        or nothing: fields checked, digests and signature checked, then
        unpacked, committed, logged, audited and counted (received bytes).

        Returns (record, True); or (the earlier record, False) when the same
        files for the same project still wait or run (a retried push), unless
        the form says force=1.  Raises IpdError.
        """
        if project is None:
            raise BadRequest("missing form field 'project'")
        if not upload.files:
            raise BadRequest("missing form field: give an image, a package, "
                             "or both")
        check_digests(upload)
        signer = self.check_signature(project, upload, user, address)
        digests = {name: sink.describe()["sha256"] for name, sink
                   in upload.files.items()}
        if upload.fields.get("force", "0") not in ("1", "true", "yes"):
            earlier = self.queue.holding(project, digests)
            if earlier:
                log.info("deployment %s of %s: the same files again, from %s; "
                         "not queued twice", earlier.id, project, user.name)
                return earlier, False
        if signer:
            self.check_not_replayed(project, signer, user, address)

        def announce(record):
            log.info("deployment %s of %s uploaded by %s: %s", record.id, project,
                     user.name, ", ".join("%s %s (%d bytes)" % (
                         name, meta["name"], meta["size"])
                         for name, meta in record.files.items()))
            audit_event("upload", project=project, deployment=record.id,
                        user=user.name, address=address, files=record.files,
                        signer=record.signer)
            # counted before it shows: /stat never lags a deployment seen
            self.count_upload(received)
        record = self.deploy_upload(project, upload, user, announce, signer=signer)
        return record, True

    def deploy_upload(self, project, upload, user, announce, **extra):
        """Unpack the package, find control.sh, and commit the deployment
        (announce: see DeploymentStore.commit).

        Returns its record; on any error nothing of the upload is left.
        """
        store = self.store
        staging = tempfile.mkdtemp(prefix=".upload-", suffix=".dir",
                                   dir=self.settings.UPLOAD_DIR)
        try:
            own_script = "package" in upload.files and project_settings(
                self.settings, store.project_dir(project))["SCRIPTS"] == "package"
            if "package" in upload.files:
                unpack_package(upload.files["package"].path, staging,
                               self.settings.MAX_UNPACKED_SIZE,
                               PackageLimits(self.settings))
                if not own_script and os.path.lexists(
                        os.path.join(staging, "control.sh")):
                    raise BadRequest(
                        "the package carries a control.sh, and project %s runs "
                        "only the one an administrator placed on the server "
                        "(SCRIPTS=server): leave it out of the package" % project)
            control = find_control_script(staging if own_script else None,
                                          store.project_dir(project))
            files = {name: sink.describe() for name, sink in upload.files.items()}
            record = Deployment(str(uuid.uuid4()), project, None, user.name,
                                files, control, recipe=upload.recipe is not None,
                                **extra)
            if control.startswith(staging + os.sep):
                record.control = os.path.join(store.path(record), "control.sh")
            moves = {"." + name: sink.path for name, sink in upload.files.items()}
            if upload.recipe is not None:
                moves[".recipe"] = upload.recipe.path

            def refer_and_announce(record):
                # its segments referred to before it can run, end and let
                # a collection take them
                if upload.recipe is not None:
                    self.segments.read_refs(store, record)
                announce(record)
            record = store.commit(record, staging, moves, refer_and_announce)
            self.queue.supersede()
        except BaseException as error:
            remove_quietly(staging)
            raise disk_errors(error)
        finally:
            upload.discard()
        return record


###############################################################################
# Status pages for people #####################################################
###############################################################################

# HTML for browsers, rendered from data by functions that the handler calls
# and sends: the projects, a project, a deployment with its live log.


# One inline stylesheet, no external resource (air-gapped hosts), readable
# on a phone; a strict Content-Security-Policy admits only this response's
# own style and script (by nonce).
PAGE_STYLE = (
    "body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:62em;"
    "padding:.8em;color:#1d1d1f}a{color:#1f5fa8}header{margin-bottom:1em}"
    "table{border-collapse:collapse;width:100%}th,td{padding:.35em .5em;"
    "border-bottom:1px solid #ddd;text-align:left;vertical-align:top}"
    ".badge{display:inline-block;padding:0 .55em;border-radius:.7em;color:#fff;"
    "background:#6b6b6b}.ok{background:#2a7d2e}.active,.await{background:#1f5fa8}"
    ".failed{background:#b3261e}code{font-size:.85em;word-break:break-all}"
    "pre{background:#111;color:#eee;padding:.8em;white-space:pre-wrap;"
    "word-break:break-all;min-height:3em}form{display:inline}"
    "button{font:inherit;padding:.15em .8em;margin-right:.4em}"
    "@media(max-width:40em){th,td{display:block;border:0}tr{display:block;"
    "border-bottom:1px solid #ddd}}")


# Reads the follow stream of a running deployment into the page; reloads
# it at the end to show the final state.
FOLLOW_SCRIPT = (
    "(function(){var log=document.getElementById('log');"
    "fetch(log.getAttribute('data-follow'),{credentials:'same-origin'})"
    ".then(function(r){var reader=r.body.getReader(),dec=new TextDecoder();"
    "function pump(){return reader.read().then(function(x){"
    "if(x.done){location.reload();return;}"
    "log.textContent+=dec.decode(x.value,{stream:true});return pump();});}"
    "return pump();});})();")


# The deployment page shows this much of a log's end; the rest is a link.
PAGE_LOG_TAIL = 256 * 1024


def read_log_tail(path, limit):
    """(bytes left out, the last at most limit bytes of the file at path,
    from a line's start where one begins in them); (0, b'') if missing."""
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        return 0, b""
    with file:
        size = file.seek(0, io.SEEK_END)
        start = max(0, size - limit)
        file.seek(start)
        text = file.read(limit)
    if start:
        newline = text.find(b"\n")
        if 0 <= newline < len(text) - 1:
            start, text = start + newline + 1, text[newline + 1:]
    return start, text


def signed_by(record):
    """', signed by WHO@PROJECT (SHA256:...)' for a signed release."""
    signer = record.signer
    if not signer:
        return ""
    return "<br>signed by %s <code>%s</code>" % (html.escape(signer["principal"]),
                                                 html.escape(signer["fingerprint"]))


def state_badge(state):
    kind = (state if state in ("ok", "active", "await") else
            "neutral" if state in ("changed", "cancelled") else "failed")
    return '<span class="badge %s">%s</span>' % (kind, html.escape(state))


def page_time(timestamp):
    return html.escape(iso_time(timestamp) or "-")


def page_duration(record):
    if record.started and record.ended:
        return "%.1f s" % (record.ended - record.started)
    return "-"


def ui_link(root, *parts):
    """The escaped address of a page under API_ROOT root: /ui/PARTS."""
    return html.escape("%s/ui/%s" % (root, "/".join(
        urllib.parse.quote(part, safe="") for part in parts)))


def render_page(root, title, body, nonce, script=None, refresh=False):
    """The pieces of an HTML page; body is its text, or pieces of it (a long
    list is rendered as it is sent, never whole in memory).  Its style and
    script carry nonce (see page_headers)."""
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
             '<meta name="viewport" content="width=device-width,initial-scale=1">'
             '<title>%s - ipd</title><style nonce="%s">%s</style>'
             % (html.escape(title), nonce, PAGE_STYLE)]
    if refresh:
        parts.append('<noscript><meta http-equiv="refresh" content="3"></noscript>')
    parts.append('</head><body><header><a href="%s/ui/">ipd</a> &middot; %s'
                 '</header>' % (html.escape(root), html.escape(title)))
    tail = ['<script nonce="%s">%s</script>' % (nonce, script)] if script else []
    tail.append("</body></html>\n")
    body = [body] if isinstance(body, str) else body
    return itertools.chain(parts, body, tail)


def page_headers(nonce):
    """The headers of a page whose style and script carry nonce."""
    return {"Content-Security-Policy":
            "default-src 'none'; style-src 'nonce-%s'; script-src "
            "'nonce-%s'; connect-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'" % (nonce, nonce),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store"}


def buttons(root, record):
    """The cancel and redeploy buttons that apply to record."""
    actions = []
    if record.state in UNFINISHED:
        actions.append("cancel")
    if record.files and not record.pruned:
        actions.append("redeploy")
    return "".join('<form method="post" action="%s"><button>%s</button></form>'
                   % (ui_link(root, record.project, record.id, action), action)
                   for action in actions)


def deployment_row(root, record):
    files = "".join("<div>%s: %s, %d bytes<br><code>%s</code></div>" % (
        html.escape(name), html.escape(meta.get("name") or "-"),
        meta.get("size", 0), html.escape(meta.get("sha256", "")))
        for name, meta in sorted(record.files.items()))
    return ("<tr><td><a href=\"%s\"><code>%s</code></a></td><td>%s</td>"
            "<td>%s<br>%s<br>%s</td><td>%s</td><td>%s</td><td>%s%s</td>"
            "<td>%s</td></tr>" % (
                ui_link(root, record.project, record.id),
                html.escape(record.id[:8]), state_badge(record.state),
                page_time(record.created), page_time(record.started),
                page_time(record.ended), page_duration(record),
                html.escape(record.user or "-") + signed_by(record), files,
                "<div>(pruned)</div>" if record.pruned else "",
                buttons(root, record)))


def render_projects(root, projects):
    """The body of the projects page: projects is a list of (project, its
    latest Deployment, its number of deployments)."""
    if not projects:
        return "<p>No deployments yet.</p>"
    rows = ("<tr><td><a href=\"%s\">%s</a></td><td>%s</td><td>%s</td>"
            "<td>%s</td><td>%s</td><td>%d</td></tr>" % (
                ui_link(root, project), html.escape(project),
                state_badge(latest.state),
                page_time(latest.ended or latest.started or latest.created),
                page_duration(latest), html.escape(latest.user or "-"), count)
            for project, latest, count in projects)
    return itertools.chain(
        ["<table><tr><th>project</th><th>latest</th><th>when</th><th>took</th>"
         "<th>by</th><th>deployments</th></tr>"], rows, ["</table>"])


def render_project(root, records):
    """The body of a project's page: its deployments (records, oldest
    first), newest first."""
    rows = (deployment_row(root, record) for record in reversed(records))
    return itertools.chain(
        ["<table><tr><th>deployment</th><th>state</th><th>uploaded, started, "
         "ended</th><th>took</th><th>by</th><th>files (SHA-256)</th><th></th>"
         "</tr>"], rows, ["</table>"])


def render_deployment(root, record, skipped, text):
    """The body of a deployment's page: its state, times, buttons and the
    end of its log (text, the log's bytes after the first skipped)."""
    project, deployment_id = record.project, record.id
    follow = "%s/log/%s/%s?follow=1&offset=%d" % (
        root, project, deployment_id, skipped + len(text))
    whole = ("<p>The first %d bytes of the log are left out here: "
             "<a href=\"%s/log/%s/%s\">the whole log</a> (text).</p>" % (
                 skipped, html.escape(root),
                 html.escape(urllib.parse.quote(project, safe="")),
                 html.escape(deployment_id))) if skipped else ""
    return ("<p>%s of <a href=\"%s\">%s</a> by %s &middot; uploaded %s, "
            "started %s, ended %s, took %s</p><p>%s</p>" % (
                state_badge(record.state), ui_link(root, project),
                html.escape(project),
                html.escape(record.user or "-") + signed_by(record),
                page_time(record.created), page_time(record.started),
                page_time(record.ended), page_duration(record),
                buttons(root, record)) + whole +
            "<pre id=\"log\" data-follow=\"%s\">%s</pre>" % (
                html.escape(follow), html.escape(text.decode("utf-8", "replace"))))


###############################################################################
# HTTP: routes, the request handler and the server ############################
###############################################################################

# Parse, call the service, answer: the route table, the cross-origin
# check, connection limits, then one Handler per connection.


# (method, first path segment, number of segments) -> (handler name, role)
ROUTES = {
    ("GET", "", 0): ("welcome", None),
    ("GET", "list", 1): ("list_projects", "ADMIN"),
    ("POST", "upload", 1): ("upload", "USER"),
    ("GET", "info", 1): ("info", "ADMIN"),
    ("GET", "stat", 1): ("statistics", "ADMIN"),
    ("GET", "status", 2): ("status", "USER"),
    ("GET", "status", 3): ("status", "USER"),
    ("GET", "log", 3): ("deployment_log", "USER"),
    ("POST", "cancel", 3): ("cancel", "USER"),
    ("POST", "redeploy", 3): ("redeploy", "USER"),
    ("GET", "metrics", 1): ("metrics", "METRICS"),
    ("GET", "audit", 1): ("audit", "ADMIN"),
    ("GET", "ui", 1): ("ui_projects", "USER"),
    ("GET", "ui", 2): ("ui_project", "USER"),
    ("GET", "ui", 3): ("ui_deployment", "USER"),
    ("POST", "ui", 4): ("ui_action", "USER"),
    ("POST", "push", 1): ("push", "USER"),                  # recipe (#16)
    ("POST", "segments", 2): ("segment_post", "USER"),      # new or /missing
    ("PATCH", "segments", 2): ("segment_patch", "USER"),    # append at offset
    ("GET", "segments", 2): ("segment", "USER"),            # HEAD: the offset
}


def json_array_pieces(key, items):
    """'{"key": [' item, item ... ']}' as pieces, for send_stream."""
    yield '{"%s": [' % key
    separator = "\n"
    for item in items:
        yield separator + item
        separator = ",\n"
    yield "\n]}\n"


def json_string_pieces(file):
    """The bytes of file as the inside of a JSON string, piece by piece
    (UTF-8 split across reads is joined; bad bytes become U+FFFD)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while True:
        data = file.read(CHUNK_SIZE)
        text = decoder.decode(data, final=not data)
        if text:
            yield json.dumps(text)[1:-1]
        if not data:
            return


def parse_credentials(scheme, credentials):
    """Authorization 'Basic base64(name:password)' or 'Bearer TOKEN' ->
    (name, password); ('', '') when malformed."""
    if scheme.lower() == "bearer":
        return "token", credentials.strip()
    try:
        name, colon, password = base64.b64decode(
            credentials.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    return (name, password) if colon else ("", "")


# Methods that change nothing, so a browser may send them from any page.
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def check_origin(method, headers, own_origins):
    """Refuse a state-changing request that a page of another origin made a
    browser send.  Browsers attach remembered Basic credentials to every
    request to this server, even one that a foreign page's form or fetch()
    starts, so a login alone proves nothing about who asked.  Sec-Fetch-Site
    (sent by current browsers) must say same-origin or none; an Origin, when
    present, must be exactly one of own_origins.  A request with neither
    header (curl, CI, ipd.py push) is no browser's and passes.  Raises
    Forbidden."""
    if method in SAFE_METHODS:
        return
    site = headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
        raise Forbidden("cross-origin request refused: Sec-Fetch-Site is %s"
                        % printable(site, 20))
    origin = headers.get("Origin")
    if origin is not None and normalize_origin(origin) not in own_origins:
        raise Forbidden("cross-origin request refused: Origin %s is not this "
                        "server's (see PUBLIC_ORIGIN)" % printable(origin, 100))


def peer_closed(connection):
    """True when the client has closed its end (the socket reads as EOF),
    or the socket is broken; pipelined bytes waiting to be read are not
    an end."""
    try:
        readable = select.select([connection], [], [], 0)[0]
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


# How long a refused body may still be read and dropped before we close.
LINGER_SECONDS = 2


def drain_before_close(connection, seconds=LINGER_SECONDS):
    """After an answer to a request whose body was not read: end our side,
    then read and drop what the client still sends, until it closes, is
    idle for a second, or seconds pass.  Closing a socket with unread
    bytes resets the connection, and a reset can destroy the answer (a
    413, a 401) before the client has read it: a lingering close, as
    nginx does."""
    deadline = time.monotonic() + seconds
    try:
        connection.shutdown(socket.SHUT_WR)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([connection], [], [], min(left, 1))[0]:
                return
            if not connection.recv(1 << 16):
                return
    except (OSError, ValueError):
        pass


def answer_busy(connection):
    """503 to a connection over the limit, without a thread for it."""
    body = b"too many connections, try again\n"
    try:
        connection.settimeout(1)
        connection.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                           b"text/plain\r\nRetry-After: 1\r\nConnection: close"
                           b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    except OSError:
        pass


class ConnectionGuard:
    """Counts open connections against a limit, in all and per client
    address, and cuts those whose request head is not complete by its
    deadline.

    A socket timeout alone cannot stop a client that sends one byte a
    second; a reaper thread shuts such sockets down, which ends the read
    that their handler thread is blocked in.  A connection counts against
    its peer's address until a request on it names its client (a trusted
    proxy's X-Real-IP), then against that client's.
    """

    def __init__(self, limit, per_address, head_timeout):
        self.limit = limit
        self.per_address = per_address
        self.head_timeout = head_timeout
        self._lock = threading.Lock()
        self._open = {}  # socket -> the address it counts against
        self._counts = {}  # address -> its open connections
        self._deadlines = {}  # socket -> monotonic deadline of its head
        self._reaper = None

    def admit(self, connection, address):
        """Count a new connection; returns None, or the setting it would
        exceed."""
        with self._lock:
            if len(self._open) >= self.limit:
                return "MAX_CONNECTIONS"
            if self._counts.get(address, 0) >= self.per_address:
                return "MAX_CONNECTIONS_PER_ADDRESS"
            self._open[connection] = address
            self._counts[address] = self._counts.get(address, 0) + 1
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="reaper",
                                                daemon=True)
                self._reaper.start()
            return None

    def attribute(self, connection, address):
        """Count connection against address from now on; False when that
        address has MAX_CONNECTIONS_PER_ADDRESS open already."""
        with self._lock:
            current = self._open.get(connection)
            if current is None or current == address:
                return True
            if self._counts.get(address, 0) >= self.per_address:
                return False
            self._uncount(current)
            self._open[connection] = address
            self._counts[address] = self._counts.get(address, 0) + 1
            return True

    def release(self, connection):
        with self._lock:
            address = self._open.pop(connection, None)
            if address is not None:
                self._uncount(address)
            self._deadlines.pop(connection, None)

    def _uncount(self, address):
        self._counts[address] -= 1
        if not self._counts[address]:
            del self._counts[address]

    def expect_head(self, connection):
        with self._lock:
            self._deadlines[connection] = time.monotonic() + self.head_timeout

    def head_done(self, connection):
        with self._lock:
            self._deadlines.pop(connection, None)

    def _reap(self):
        while True:
            time.sleep(min(0.5, self.head_timeout / 4))
            now = time.monotonic()
            with self._lock:
                late = [c for c, deadline in self._deadlines.items() if deadline < now]
                for connection in late:
                    del self._deadlines[connection]
            for connection in late:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection; each request is routed to a method of the API."""

    protocol_version = "HTTP/1.1"
    server_version = "ipd/" + __version__

    # --- plumbing

    def setup(self):
        self.timeout = self.server.ipd.settings.READ_TIMEOUT
        self.ipd = self.server.ipd
        super().setup()

    def finish(self):
        super().finish()  # the answer flushed
        if self.close_connection and self.has_unread_body():
            drain_before_close(self.connection)

    def handle_one_request(self):
        self.begin_request()
        # The request line and headers must come within HEADER_TIMEOUT,
        # however slowly they trickle in (see ConnectionGuard).
        self.server.guard.expect_head(self.connection)
        super().handle_one_request()

    def begin_request(self):
        """Set every per-request attribute afresh, before the request line
        is read (as http.server's parse_request does for its own): nothing
        of one request may leak into the next on a kept-alive connection."""
        self.headers = None
        self.path = ""
        self.query = {}
        self.user = None
        self.body = None  # the body reader, once the body is opened
        self.expects_continue = False
        self.large_body = False  # a JSON body of 64 KiB or more was read
        self.announced_project = None
        self.status_sent = None
        self.bytes_sent = 0
        self.started = time.monotonic()

    def handle_expect_100(self):
        # Answer 100 Continue only once the request passed its checks
        # (see api_upload), so a refused upload sends no body.
        self.expects_continue = True
        return True

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def do_OPTIONS(self):
        self.dispatch("OPTIONS")

    def dispatch(self, method):
        self.server.guard.head_done(self.connection)
        try:
            self.check_framing()
            self.count_against_client()
            check_origin(method, self.headers, self.own_origins())
            handler, role, args = self.route(method)
            if role:
                self.user = self.authenticate(role)
            handler(*args)
        except IpdError as error:
            self.send_error_answer(error)
        except ClientGone as error:
            log.info("%s %s: client gone: %s", method, self.path[:200], error)
            self.close_connection = True
        except (socket.timeout, ConnectionError) as error:
            log.info("%s %s: connection lost: %s", method, self.path[:200], error)
            self.close_connection = True
        except Exception:
            log.exception("internal error on %s %s", method, self.path[:200])
            self.send_error_answer(IpdError("internal error, see the ipd log"))
        finally:
            if self.has_unread_body():
                self.close_connection = True
            self.log_access(method)
            if self.large_body:
                return_freed_memory()

    def count_against_client(self):
        """A proxied request's connection counts against the client the
        proxy names (MAX_CONNECTIONS_PER_ADDRESS); over it, 503 and close."""
        if not self.server.guard.attribute(self.connection, self.client_ip()):
            self.close_connection = True
            raise Unavailable("too many connections from %s, try again"
                              % self.client_ip(), {"Retry-After": "1"})

    def check_framing(self):
        """One way to find where the body ends, or the request is refused
        and the connection closed (RFC 9112 6.1 and 6.3): a request that
        names both Content-Length and Transfer-Encoding, chunked on
        HTTP/1.0, a coding other than chunked, or differing lengths."""
        codings = self.headers.get_all("Transfer-Encoding") or []
        lengths = self.headers.get_all("Content-Length") or []
        reason = None
        if codings and lengths:
            reason = "both Content-Length and Transfer-Encoding"
        elif codings and self.request_version == "HTTP/1.0":
            reason = "Transfer-Encoding on HTTP/1.0"
        elif codings and ",".join(codings).strip().lower() != "chunked":
            reason = "unsupported Transfer-Encoding (only chunked)"
        elif lengths:
            values = {value.strip() for value in ",".join(lengths).split(",")}
            if len(values) != 1 or not re.fullmatch(r"[0-9]{1,19}", values.pop()):
                reason = "bad Content-Length"
        if reason:
            self.close_connection = True
            raise BadRequest("malformed request: %s" % reason)

    def route(self, method):
        """Map the request to (bound method, required role, arguments)."""
        path, query = urllib.parse.urlsplit(self.path)[2:4]
        self.query = urllib.parse.parse_qs(query)
        root = self.ipd.settings.API_ROOT
        if path != root and not path.startswith(root + "/"):
            raise NotFound("not found: the API is under %s/" % root)
        segments = [urllib.parse.unquote(part)
                    for part in path[len(root):].strip("/").split("/") if part]
        key_name = segments[0] if segments else ""
        lookup = "GET" if method == "HEAD" else method
        entry = ROUTES.get((lookup, key_name, len(segments)))
        if entry is None:
            allowed = sorted({m for (m, name, count) in ROUTES
                              if name == key_name and count == len(segments)})
            if allowed:
                raise MethodNotAllowed("method %s not allowed here" % method,
                                       {"Allow": ", ".join(allowed)})
            raise NotFound("not found: %s" % printable(path, 200))
        name, role = entry
        if name == "welcome" and self.wants_html():  # a browser: the projects
            name, role = "ui_projects", "USER"
        return getattr(self, "api_" + name), role, segments[1:]

    def authenticate(self, role):
        """Return the User of the request's Basic credentials, or raise."""
        header = self.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        user = None
        if scheme.lower() in ("basic", "bearer"):
            address = self.client_ip()
            wait = self.ipd.login_throttle.retry_after(address)
            if wait:
                raise TooManyRequests("too many failed logins from %s: retry in "
                                      "%d s" % (address, wait),
                                      {"Retry-After": str(wait)})
            name, password = parse_credentials(scheme, credentials)
            user, reason = (self.ipd.check_login(name, password) if password
                            else (None, "malformed credentials"))
            if user is None:
                self.ipd.login_throttle.failed(address)
                log.warning("failed login as %r from %s", name[:64], address)
                audit_event("login_refused", user=name[:64], address=address,
                            path=self.path[:200], reason=reason)
        if user is None:
            raise Unauthorized("authentication required",
                               {"WWW-Authenticate":
                                'Basic realm="ipd", charset="UTF-8"'})
        if user.role not in ADMITTED[role]:
            raise Forbidden("forbidden: this needs the %s role"
                            % " or ".join(ADMITTED[role]))
        return user

    def check_project_access(self, project):
        if not self.user.may_use(project):
            raise Forbidden("forbidden: user %s may not use project %s"
                            % (self.user.name, project))

    def wants_json(self):
        # headers is None before a request's head is read (begin_request)
        return (self.headers is not None and
                "application/json" in self.headers.get("Accept", ""))

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, header too long...)
        answered like ours: one line of text, or JSON."""
        self.close_connection = True
        if getattr(self, "request_version", None) == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # garbage, not a 0.9 client
        message = message or http.server.BaseHTTPRequestHandler.responses.get(
            code, ("error",))[0]
        error = IpdError(message)
        error.http_status = code
        self.status_sent = None
        self.bytes_sent = 0
        self.send_error_answer(error)

    def answer(self, status, text, data=None, headers=None):
        """Send text (or data as JSON, when the client asks for JSON)."""
        if data is not None and self.wants_json():
            body = (json.dumps(data, indent=1) + "\n").encode()
            content_type = "application/json"
        else:
            body = text.encode()
            content_type = "text/plain; charset=utf-8"
        self.send_whole(status, content_type, body, headers)

    def send_whole(self, status, content_type, body, headers=None):
        """An answer whose body (bytes) is known beforehand."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.write_body(body)

    def write_body(self, data, chunked=False):
        """Every byte of every answer's body goes out here: none for HEAD,
        each counted for the access log; a chunk of a chunked answer framed
        (an empty one ends it) and flushed at once."""
        if self.command == "HEAD":
            return
        if chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        else:
            self.wfile.write(data)
        self.bytes_sent += len(data)

    def send_response(self, code, message=None):
        """The status line; a request whose body was not read to its end
        is answered with Connection: close, and the connection closed,
        since its unread bytes must never be taken for the next request."""
        self.status_sent = code
        if self.has_unread_body():
            self.close_connection = True
        super().send_response(code, message)
        if self.close_connection:
            self.send_header("Connection", "close")

    def send_error_answer(self, error):
        if self.status_sent is not None:  # too late for a clean answer
            self.close_connection = True
            return
        message = str(error).splitlines()[0] if str(error) else "error"
        try:
            self.answer(error.http_status, message + "\n", {"error": message},
                        error.headers)
        except OSError:
            self.close_connection = True

    def has_unread_body(self):
        """True when the request announced a body that was not read to its
        end: whatever is left of it must not be parsed as a request."""
        if self.headers is None:
            return False
        if self.body is not None:
            return not self.body.finished
        return ("Transfer-Encoding" in self.headers or
                self.headers.get("Content-Length", "0").strip() not in ("", "0"))

    def client_ip(self):
        """The client's address: the proxy's word for it (X-Real-IP, else
        the last X-Forwarded-For) when the peer is in TRUSTED_PROXIES."""
        peer = self.client_address[0]
        if self.headers is None or not self.peer_is_trusted():
            return peer
        forwarded = (self.headers.get("X-Real-IP") or
                     self.headers.get("X-Forwarded-For", "").split(",")[-1])
        try:
            return str(ipaddress.ip_address(forwarded.strip()))
        except ValueError:
            return peer  # absent or not an address: the peer's own

    def peer_is_trusted(self):
        return address_in(self.client_address[0],
                          self.ipd.settings.TRUSTED_PROXIES)

    def own_origins(self):
        """This server's origins as a browser sees them: PUBLIC_ORIGIN, else
        the Host header's, with the scheme from a trusted proxy."""
        if self.ipd.settings.PUBLIC_ORIGIN:
            return self.ipd.settings.PUBLIC_ORIGIN
        scheme = "http"
        if self.peer_is_trusted():
            forwarded = self.headers.get("X-Forwarded-Proto", "").strip().lower()
            scheme = forwarded if forwarded in ("http", "https") else scheme
        origin = normalize_origin("%s://%s" % (scheme, self.headers.get("Host", "")))
        return [origin] if origin else []

    def log_access(self, method):
        path = re.sub(r"[\x00-\x20\x7f]", "?", self.path[:200])
        if len(self.path) > 200:
            path += "...(%d bytes)" % len(self.path)
        log.info('%s "%s %s" %s user=%s in=%d out=%d %.3fs', self.client_ip(), method,
                 path, self.status_sent or "-",
                 self.user.name if self.user else "-",
                 self.body.received if self.body else 0,
                 self.bytes_sent, time.monotonic() - self.started)

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)

    def log_request(self, code="-", size="-"):
        pass  # log_access writes one line per request, with more in it

    # --- the API, as in the README's table

    def api_welcome(self):
        self.answer(200, "ipd %s: Image Push and Deploy\n" % __version__,
                    {"name": "ipd", "version": __version__})

    def api_list_projects(self):
        projects = set(self.ipd.store.projects())
        try:
            for entry in os.scandir(self.ipd.settings.UPLOAD_DIR):
                if (is_project_name(entry.name) and
                        os.path.isfile(os.path.join(entry.path, "control.sh"))):
                    projects.add(entry.name)
        except OSError:
            pass
        names = sorted(projects)
        self.answer(200, "".join(name + "\n" for name in names),
                    {"projects": names})

    def api_info(self):
        rows, lines = [], []
        for project, (latest, count) in self.ipd.store.projects().items():
            row = {"project": project, "deployment": latest.id,
                   "state": latest.state, "started": iso_time(latest.started),
                   "ended": iso_time(latest.ended), "deployments": count,
                   "user": latest.user, "files": latest.files}
            rows.append(row)
            lines.append("%s %s %s started=%s ended=%s deployments=%d\n" % (
                project, latest.id, latest.state, row["started"] or "-",
                row["ended"] or "-", count))
        self.answer(200, "".join(lines), {"projects": rows})

    def api_statistics(self):
        daemon = self.ipd
        stats = daemon.statistics()
        stats.update(daemon.segments.statistics(daemon.store))
        stats = dict({"version": __version__,
                      "uptime": round(time.time() - daemon.started, 3)}, **stats)
        lines = ["version %s\n" % __version__, "uptime %.0f\n" % stats["uptime"]]
        for key in ("deployments", "queue", "running", "uploads", "bytes_received",
                    "segments", "unique_bytes", "stored_bytes", "saved_bytes"):
            lines.append("%s %d\n" % (key, stats[key]))
        for state, count in stats["states"].items():
            lines.append("state.%s %d\n" % (state, count))
        for key, value in stats["durations"].items():
            lines.append("duration.%s %s\n" % (key, "-" if value is None else value))
        self.answer(200, "".join(lines), stats)

    def api_status(self, project, deployment_id=None):
        record = self.find_deployment(project, deployment_id)
        if record is None:
            data = {"project": project, "deployment": deployment_id, "state": "no"}
            self.answer(404, "no\n", data)
            return
        wait = self.query_seconds("wait")
        if wait:
            record = self.wait_final(record, wait)
        self.answer(200, record.state + "\n", record.public())

    def wait_final(self, record, timeout):
        """The record once it ends or timeout passes, looking each second
        whether the client is still there (an abandoned wait must give its
        connection back).  Raises ClientGone."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            record = self.ipd.store.wait_final(record.id, min(1.0, remaining))
            if record.state not in UNFINISHED or remaining <= 1.0:
                return record
            if peer_closed(self.connection):
                raise ClientGone("gave up waiting")

    def query_number(self, name):
        """?name=N as a whole number of ASCII digits (0 when absent)."""
        text = self.query.get(name, ["0"])[-1]
        if not re.fullmatch(r"[0-9]{1,18}", text):
            raise BadRequest("%s must be a whole number" % name)
        return int(text)

    def query_seconds(self, name, limit=3600):
        """?name=SECONDS as a number from 0 to limit (0 when absent)."""
        text = self.query.get(name, ["0"])[-1]
        try:
            value = float(text)
        except ValueError:
            raise BadRequest("%s must be a number of seconds" % name)
        if not 0 <= value <= limit:
            raise BadRequest("%s must be from 0 to %d seconds" % (name, limit))
        return value

    def api_deployment_log(self, project, deployment_id):
        record = self.find_deployment(project, deployment_id)
        if record is None:
            raise NotFound("no")
        try:
            file = open(self.ipd.store.path(record, ".log"), "rb")
        except FileNotFoundError:
            file = io.BytesIO()
        with file:
            if self.query.get("follow", ["0"])[-1] not in ("", "0", "false", "no"):
                self.follow_log(record, file)
            elif self.wants_json():
                head = json.dumps({"project": project, "deployment": deployment_id,
                                   "state": record.state})
                self.send_stream("application/json", itertools.chain(
                    [head[:-1] + ', "log": "'], json_string_pieces(file), ['"}\n']))
            else:
                self.send_file(file)

    def send_file(self, file):
        size = file.seek(0, io.SEEK_END)
        file.seek(0)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if self.command == "HEAD":
            return
        while size > 0:
            data = file.read(min(size, CHUNK_SIZE))
            if not data:  # cannot shrink, but never send a short body
                data = b"\n" * size
            self.write_body(data)
            size -= len(data)

    def follow_log(self, record, file):
        """Stream the log as control.sh writes it, chunked, until the
        deployment ends; the last line names its final state.  Followers
        read the log file, never the script: many of them cost it nothing."""
        offset = self.query_number("offset")
        chunked = self.request_version == "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("X-Accel-Buffering", "no")  # nginx: pass it on at once
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        file.seek(offset)
        last = b"\n"
        quiet_since = time.monotonic()
        while True:
            data = file.read(CHUNK_SIZE)
            if data:
                self.write_body(data, chunked)
                last = data[-1:]
                continue
            current = self.ipd.store.wait_final(record.id, 0.2)
            if time.monotonic() - quiet_since >= 1:  # still anybody there?
                if peer_closed(self.connection):
                    raise ClientGone("stopped following the log")
                quiet_since = time.monotonic()
            if current.state not in UNFINISHED:
                data = file.read()  # what it printed last
                if data:
                    self.write_body(data, chunked)
                    last = data[-1:]
                break
        ending = b"" if last == b"\n" else b"\n"
        self.write_body(ending + ("ipd: state: %s\n" % current.state).encode(),
                        chunked)
        if chunked:
            self.write_body(b"", chunked)

    def send_stream(self, content_type, pieces, headers=None):
        """A 200 answer whose size is not known beforehand, sent as pieces
        (text) come, in batches of about 64 KiB: chunked on HTTP/1.1, to
        the connection's end on HTTP/1.0.  Memory: one batch."""
        chunked = self.request_version == "HTTP/1.1"
        if not chunked:
            self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            return
        batch = []
        size = 0
        for piece in pieces:
            data = piece.encode()
            batch.append(data)
            size += len(data)
            if size >= 65536:
                self.write_body(b"".join(batch), chunked)
                batch, size = [], 0
        if size:
            self.write_body(b"".join(batch), chunked)
        if chunked:
            self.write_body(b"", chunked)

    def api_cancel(self, project, deployment_id):
        record = self.find_deployment(project, deployment_id)
        if record is None:
            raise NotFound("no")
        self.ipd.cancel(record, self.user, self.client_ip())
        record = self.ipd.store.wait_final(record.id,
                                           self.ipd.settings.KILL_GRACE + 10)
        self.answer(200, record.state + "\n", record.public())

    def api_redeploy(self, project, deployment_id):
        record = self.find_deployment(project, deployment_id)
        if record is None:
            raise NotFound("no")
        self.answer_deployment(self.ipd.redeploy(record, self.user, self.client_ip()))

    def api_audit(self):
        """GET /audit?project=P&since=T: the audit log's events, oldest first
        (T: seconds since the epoch, or ISO 8601 like 2026-11-25T10:00:00Z)."""
        project = self.query.get("project", [None])[-1]
        since = parse_since(self.query.get("since", [""])[-1])
        events = read_audit(os.path.join(self.ipd.settings.LOG_DIR, "audit.log"),
                            project, since)
        lines = (json.dumps(event, sort_keys=True) for event in events)
        if self.wants_json():
            self.send_stream("application/json", json_array_pieces("events", lines))
        else:
            self.send_stream("text/plain; charset=utf-8",
                             (line + "\n" for line in lines))

    def api_metrics(self):
        daemon = self.ipd
        stats = daemon.statistics()
        uploads, received = stats["uploads"], stats["bytes_received"]
        gauges = {
            "ipd_queue_length": ("Deployments waiting to run.", stats["queue"]),
            "ipd_running_deployments": ("Deployments whose control.sh runs.",
                                        stats["running"]),
            "ipd_start_time_seconds": ("When ipd started.", "%.3f" % daemon.started),
        }
        disk = daemon.segments.statistics(daemon.store)
        gauges.update({
            "ipd_segments": ("Segments stored, each once.", disk["segments"]),
            "ipd_unique_bytes": ("Bytes of the stored segments.", disk["unique_bytes"]),
            "ipd_stored_bytes": ("Bytes the kept deployments' images and packages "
                                 "take: segments and files.", disk["stored_bytes"]),
            "ipd_saved_bytes": ("Bytes full copies of the kept deployments' files "
                                "would take beyond the stored bytes.",
                                disk["saved_bytes"]),
        })
        counters = {
            "ipd_uploads_total": ("Uploads accepted.", uploads),
            "ipd_upload_bytes_total": ("Bytes of accepted uploads.", received),
        }
        text = daemon.metrics.render(gauges, counters)
        self.send_whole(200, "text/plain; version=0.0.4; charset=utf-8", text.encode())

    def find_deployment(self, project, deployment_id):
        """The record, or None; names that cannot exist are looked up too
        (they are never used as paths), so every miss answers 'no'."""
        self.check_project_access(project)
        return self.ipd.store.find(project, deployment_id)

    # --- status pages (rendered by the functions of the pages section)

    def wants_html(self):
        return (self.headers is not None and not self.wants_json()
                and "text/html" in self.headers.get("Accept", ""))

    def send_page(self, title, body, script=None, refresh=False):
        """An HTML page (see render_page), sent as it is rendered."""
        nonce = secrets.token_urlsafe(16)
        self.send_stream("text/html; charset=utf-8", render_page(
            self.ipd.settings.API_ROOT, title, body, nonce, script, refresh),
            page_headers(nonce))

    def api_ui_projects(self):
        projects = [(project, latest, count) for project, (latest, count)
                    in self.ipd.store.projects().items() if self.user.may_use(project)]
        self.send_page("projects", render_projects(self.ipd.settings.API_ROOT,
                                                   projects))

    def api_ui_project(self, project):
        self.check_project_access(project)
        records = self.ipd.store.deployments_of(project)
        if not records:
            raise NotFound("no")
        self.send_page(project, render_project(self.ipd.settings.API_ROOT, records))

    def api_ui_deployment(self, project, deployment_id):
        record = self.find_deployment(project, deployment_id)
        if record is None:
            raise NotFound("no")
        skipped, text = read_log_tail(self.ipd.store.path(record, ".log"),
                                      PAGE_LOG_TAIL)
        running = record.state in UNFINISHED
        self.send_page("%s %s" % (project, deployment_id[:8]),
                       render_deployment(self.ipd.settings.API_ROOT, record,
                                         skipped, text),
                       FOLLOW_SCRIPT if running else None, refresh=running)

    def api_ui_action(self, project, deployment_id, action):
        """POST from a button: same origin only (no cross-site requests)."""
        self.check_same_origin()
        record = self.find_deployment(project, deployment_id)
        if record is None:
            raise NotFound("no")
        if action == "cancel":
            self.ipd.cancel(record, self.user, self.client_ip())
            target = record
        elif action == "redeploy":
            target = self.ipd.redeploy(record, self.user, self.client_ip())
        else:
            raise NotFound("no such action: %s" % action)
        self.send_response(303)
        self.send_header("Location", "%s/ui/%s/%s" % (
            self.ipd.settings.API_ROOT, project, target.id))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def check_same_origin(self):
        """A button's POST comes from a browser, which says where from:
        besides check_origin (done for every request), one with neither
        Origin nor Sec-Fetch-Site needs a Referer of this server's origin."""
        if "Origin" in self.headers or "Sec-Fetch-Site" in self.headers:
            return
        referer = self.headers.get("Referer", "")
        match = re.match(r"[^:/]+://[^/?#]+", referer)
        if not match or normalize_origin(match.group(0)) not in self.own_origins():
            raise Forbidden("cross-origin request refused: a button's POST "
                            "must name its origin")

    # --- upload

    def api_upload(self):
        settings = self.ipd.settings
        self.body = body = self.open_body(settings.MAX_UPLOAD_SIZE)
        boundary = self.multipart_boundary()
        self.announce_project()
        if self.expects_continue:
            self.send_response_only(100)
            self.end_headers()
        upload = receive_upload(body, boundary, settings.UPLOAD_DIR,
                                self.check_field)
        try:
            record, created = self.ipd.create_deployment(
                upload.fields.get("project") or self.announced_project, upload,
                self.user, self.client_ip(), body.received)
        finally:
            upload.discard()
        self.answer_deployment(record, 202 if created else 200)

    def answer_deployment(self, record, status=202):
        """The answer to an upload or a redeploy: the new deployment's id."""
        self.answer(status, record.id + "\n",
                    {"deployment": record.id, "project": record.project,
                     "state": record.state},
                    {"Location": "%s/status/%s/%s" % (self.ipd.settings.API_ROOT,
                                                      record.project,
                                                      record.id)})

    def open_body(self, limit):
        """The request body as a LengthBody or ChunkedBody, checked against
        limit before any of it is read."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return ChunkedBody(self.rfile, limit)
        length = self.headers.get("Content-Length")
        if length is None:
            raise LengthRequired("a Content-Length or chunked body is required")
        if not re.fullmatch(r"\s*\d{1,19}\s*", length):
            raise BadRequest("bad Content-Length: %r" % length[:40])
        length = int(length)
        if limit and length > limit:
            raise TooLarge("upload larger than MAX_UPLOAD_SIZE (%d bytes)" % limit)
        return LengthBody(self.rfile, length)

    def multipart_boundary(self):
        kind, params = parse_header_params(self.headers.get("Content-Type", ""))
        if kind != "multipart/form-data":
            raise BadRequest("the upload must be multipart/form-data")
        boundary = params.get("boundary", "")
        if not BOUNDARY_CHARS.match(boundary):
            raise BadRequest("multipart/form-data without a valid boundary")
        return boundary

    def announce_project(self):
        """The project named before the body (?project= or the X-Ipd-Project
        header), checked, kept as announced_project; or None.  A push that
        names one it may not use is refused before it sends a file byte."""
        announced = (self.query.get("project", [None])[-1] or
                     self.headers.get("X-Ipd-Project"))
        if announced is not None:
            check_project_name(announced)
            self.check_project_access(announced)
        self.announced_project = announced
        return announced

    def check_field(self, name, value):
        if name == "project":
            check_project_name(value)
            self.check_project_access(value)
            announced = self.announced_project
            if announced is not None and value != announced:
                raise BadRequest("the project field (%s) differs from the project "
                                 "named before the body (%s)" % (value, announced))

    # --- recipe pushes and segments (#16)

    def read_json_body(self, limit, max_items, what):
        """The whole (small) request body, read through LengthBody or
        ChunkedBody, at most limit bytes; refused (BadRequest) as soon as
        it holds more than about max_items JSON values, so that a body of
        millions of {} is not even kept (issue 23)."""
        try:
            self.body = body = self.open_body(limit)
        except TooLarge:
            raise TooLarge("%s is larger than %d bytes" % (what, limit))
        if self.expects_continue:
            self.send_response_only(100)
            self.end_headers()
        data = bytearray()
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        items = 0
        while True:
            count = body.readinto(view)
            if not count:
                return data
            data += view[:count]
            self.large_body = self.large_body or len(data) > (64 << 10)
            if len(data) > limit:
                raise TooLarge("body larger than %d bytes" % limit)
            items += json_items(view[:count].tobytes())
            if items > max_items + 4096:  # a few commas in strings counted too
                raise BadRequest("%s has more than %d values" % (what, max_items))

    def api_push(self):
        """A deployment from a recipe: its files rebuilt from inline bytes
        and stored segments, then exactly as an upload."""
        settings = self.ipd.settings
        self.announce_project()
        recipe = parse_recipe(self.read_json_body(RECIPE_LIMIT, RECIPE_MAX_ITEMS,
                                                  "the recipe"))
        project = recipe["project"] or self.announced_project
        if project is None:
            raise BadRequest("missing recipe field 'project'")
        self.check_field("project", project)
        check_recipe_size(recipe["files"], settings)
        upload = Upload()
        try:
            upload.fields["project"] = project
            upload.fields["force"] = recipe["force"]
            for key in ("manifest", "signature"):
                if recipe[key] is not None:
                    upload.fields[key] = recipe[key]
            for field, meta in sorted(recipe["files"].items()):
                upload.fields[field + "_sha256"] = meta["sha256"]
                # hashed on a second core while this one copies (#16)
                sink = upload.files[field] = FileSink(settings.UPLOAD_DIR, field,
                                                      meta["name"], parallel=True)
                self.ipd.segments.rebuild(self.user, field, meta, sink,
                                          lambda: not peer_closed(self.connection))
                sink.close()
            upload.recipe = RecipeFile(encode_recipe(recipe["files"]),
                                       settings.UPLOAD_DIR)
            record, created = self.ipd.create_deployment(
                project, upload, self.user, self.client_ip(), self.body.received)
        finally:
            upload.discard()
        self.answer_deployment(record, 202 if created else 200)

    def segment_digest(self, name):
        if not SHA256_HEX.match(name):
            raise NotFound("not found: a segment is named by its SHA-256 "
                           "(64 lower case hex digits)")
        return name

    def api_segment(self, name):
        """HEAD (or GET) of a segment: its Upload-Offset, Upload-Complete."""
        digest = self.segment_digest(name)
        segments = self.ipd.segments
        if segments.visible(self.user, [digest]):
            offset, complete = segments.sizes[digest], True
        else:
            offset, complete = segments.partial_offset(self.user, digest), False
            if offset is None:
                raise NotFound("no such segment on the server")
        self.send_upload_state(204 if self.command == "HEAD" else 200, offset,
                               complete)

    def send_upload_state(self, status, offset, complete):
        headers = {"Upload-Offset": str(offset),
                   "Upload-Complete": "?1" if complete else "?0",
                   "Cache-Control": "no-store"}
        if status == 204:
            self.send_response(204)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            return
        self.answer(status, "%d%s\n" % (offset, " complete" if complete else ""),
                    {"offset": offset, "complete": complete}, headers)

    def api_segment_post(self, name):
        if name == "missing":
            return self.api_segments_missing()
        self.receive_segment(self.segment_digest(name), 0, restart=True)

    def api_segment_patch(self, name):
        digest = self.segment_digest(name)
        offset = self.headers.get("Upload-Offset")
        if offset is None or not re.fullmatch(r"\s*\d{1,19}\s*", offset):
            raise BadRequest("PATCH needs an Upload-Offset: the byte it starts at")
        self.receive_segment(digest, int(offset))

    def receive_segment(self, digest, offset, restart=False):
        """Append the body to the user's partial segment at offset; with
        Upload-Complete: ?1 (the default) verify and store it."""
        complete = parse_upload_complete(self.headers.get("Upload-Complete"), True)
        segments = self.ipd.segments
        if self.expects_continue and segments.visible(self.user, [digest]):
            # stored already (a retry whose first try completed it while
            # it was taken over): the client that asked need send nothing
            return self.send_upload_state(200, segments.sizes[digest], True)
        settings = self.ipd.settings
        limit = settings.MAX_UPLOAD_SIZE  # of the whole segment, however sent
        if limit and offset >= limit:
            raise TooLarge("segment larger than MAX_UPLOAD_SIZE (%d bytes)" % limit)
        limit = self.segment_room(limit - offset if limit else 0)
        self.body = body = self.open_body(limit)
        writer = self.ipd.segments.begin(self.user, digest, offset, restart,
                                         self.connection, settings.SEGMENT_UPLOADS)
        try:
            if self.expects_continue:
                self.send_response_only(100)
                self.end_headers()
            offset = writer.receive(body)
            if complete:
                writer.finish()
        finally:
            writer.release()
        if complete:
            log.info("segment %s (%d bytes) stored, sent by %s", digest, offset,
                     self.user.name)
            self.send_upload_state(201, offset, True)
        else:
            self.send_upload_state(204, offset, False)

    def segment_room(self, limit):
        """The most a segment request's body may add (0: no bound), within
        limit: refused before a byte is read when its Content-Length would
        take this user over SEGMENT_QUOTA or the disk below MIN_FREE_SPACE
        (DiskFull, 507; nothing of another project is pruned for it)."""
        settings = self.ipd.settings
        length = self.headers.get("Content-Length")
        needed = int(length) if length and length.strip().isdigit() else 0
        check_room(settings.UPLOAD_DIR, settings.MIN_FREE_SPACE, needed, "the segment")
        quota = settings.SEGMENT_QUOTA
        if not quota:
            return limit
        left = max(0, quota - self.ipd.segments.usage(self.user))
        if needed > left:
            raise DiskFull("segment uploads of %s not yet in a deployment would "
                           "hold more than SEGMENT_QUOTA (%d bytes): %d bytes left"
                           % (self.user.name, quota, left))
        return min(limit, left) if limit else max(left, 1)

    def api_segments_missing(self):
        """Which of the listed segments the server lacks, for this user;
        and how much of each it has as a partial upload."""
        self.announce_project()  # a push it may not make sends nothing
        digests = parse_missing_request(self.read_json_body(
            MISSING_LIMIT, MISSING_MAX_SEGMENTS * 3, "the list of segments"))
        segments = self.ipd.segments
        segments.collect_now_and_then()
        present = segments.visible(self.user, digests)
        segments.touch(present)  # only what exists and this user may see
        missing = [digest for digest in digests if digest not in present]
        partial = {}
        for digest in missing:
            offset = segments.partial_offset(self.user, digest)
            if offset:
                partial[digest] = offset
        self.answer(200, "".join(digest + "\n" for digest in missing),
                    {"missing": missing, "partial": partial})


class Server(http.server.ThreadingHTTPServer):
    """The HTTP server; .ipd holds the Daemon the handlers serve."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, daemon):
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.ipd = daemon
        self.guard = ConnectionGuard(daemon.settings.MAX_CONNECTIONS,
                                     daemon.settings.MAX_CONNECTIONS_PER_ADDRESS,
                                     daemon.settings.HEADER_TIMEOUT)
        self.last_loop = time.monotonic()
        super().__init__(address, Handler)

    def service_actions(self):
        self.last_loop = time.monotonic()  # the watchdog's sign of life

    def process_request(self, request, client_address):
        exceeded = self.guard.admit(request, client_address[0])
        if exceeded:
            log.warning("refusing a connection from %s: %s reached",
                        client_address[0], exceeded)
            answer_busy(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.guard.release(request)

    def handle_error(self, request, client_address):
        log.exception("error on a connection from %s", client_address[0])


###############################################################################
# Running the daemon ##########################################################
###############################################################################

# From `ipd.py serve` to a listening server: logging, start-up checks,
# the data folder's lock, systemd notification, signals.


class OneLineFormatter(logging.Formatter):
    """One event, one line: control characters in a message (a file or
    user name with a CR or LF that a client chose) are escaped, so nobody
    can write a made-up line into ipd.log.  A traceback keeps its lines."""

    def formatMessage(self, record):
        record.message = printable(record.message, 4096)
        return super().formatMessage(record)


def log_to_stderr():
    """ipd.log's lines on stderr too (serve -v, the demo)."""
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(console)


def startup_error(lines, logged=True):
    """A StartupError of these lines, each logged first when ipd.log is open."""
    if logged:
        for line in lines:
            log.error("not started: %s", line)
    return StartupError("\n".join(lines))


def folder_problems(settings):
    """UPLOAD_DIR and LOG_DIR must be folders the daemon may write in; it
    makes neither, so that a mistyped path never starts an empty daemon.
    Returns {key: one line naming the setting, its value and what to do}."""
    problems = {}
    for key in ("UPLOAD_DIR", "LOG_DIR"):
        path = getattr(settings, key)
        try:
            is_folder = stat.S_ISDIR(os.stat(path).st_mode)
        except OSError as error:
            reason = ("no such folder: create it for the user ipd runs as"
                      if error.errno == errno.ENOENT else
                      "cannot reach it (%s)" % error.strerror)
        else:
            if not is_folder:
                reason = "not a folder"
            elif not os.access(path, os.W_OK | os.X_OK):
                reason = ("not writable by the user ipd runs as (uid %d): "
                          "chown or chmod it" % os.geteuid())
            else:
                continue
        problems[key] = "%s=%s: %s" % (key, path, reason)
    return problems


LOCK_FILE = ".ipd.lock"  # in UPLOAD_DIR; never a project name (leading dot)


def lock_holder(fd):
    """'PID n' of the process holding the flock on fd's file, from
    /proc/locks, else from the PID it wrote into the file."""
    info = os.fstat(fd)
    wanted = (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
    try:
        with open("/proc/locks") as file:
            for line in file:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK":
                    device = fields[5].split(":")
                    if len(device) == 3 and (int(device[0], 16), int(device[1], 16),
                                             int(device[2])) == wanted:
                        return "PID %s" % fields[4]
    except (OSError, ValueError):
        pass
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return "PID %s" % text if text.isdigit() else "another process"


def lock_upload_dir(upload_dir):
    """Take UPLOAD_DIR's exclusive lock, before anything in it is read or
    changed: one daemon per data folder.  It is a flock(2), which the kernel
    drops when its holder dies, even by kill -9, so it is never stale; the
    descriptor is close-on-exec, so control.sh never holds it.  Returns the
    descriptor; raises StartupError naming the process that holds it."""
    path = os.path.join(upload_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:  # made by another user; reading is enough to lock
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(fd)
        os.close(fd)
        raise startup_error(["UPLOAD_DIR=%s is in use by another ipd (%s): stop "
                             "it first, or give this one its own UPLOAD_DIR"
                             % (upload_dir, holder)])
    try:  # the PID, for people; the kernel's lock is what counts
        os.ftruncate(fd, 0)
        write_all(fd, b"%d\n" % os.getpid())
    except OSError:
        pass
    return fd


def listen_text(address):
    host, port = address
    return "%s:%d" % ("[%s]" % host if ":" in host else host, port)


def bind_server(settings, daemon):
    """The Server listening on LISTEN; raises StartupError saying why not."""
    try:
        return Server(settings.LISTEN, daemon)
    except OSError as error:
        reason = {errno.EADDRINUSE: "address already in use (another ipd, or "
                  "another program, listens there): stop it or set another LISTEN",
                  errno.EADDRNOTAVAIL: "no such address on this host",
                  errno.EACCES: "permission denied (ports below 1024 need "
                  "privileges)"}.get(error.errno, error.strerror or str(error))
        raise startup_error(["LISTEN=%s: cannot listen: %s"
                             % (listen_text(settings.LISTEN), reason)])


def syslog_handler(address):
    """A handler sending each audit event to syslog (facility authpriv):
    a socket path such as /dev/log, where journald listens, or host:port
    over UDP.  The deployed code cannot rewrite what has left the host
    or entered the journal."""
    if not address.startswith("/"):
        host, _, port = address.rpartition(":")
        address = (host, int(port))
    try:
        if isinstance(address, str) and not stat.S_ISSOCK(os.stat(address).st_mode):
            raise OSError(errno.ENOTSOCK, "not a socket")
        handler = logging.handlers.SysLogHandler(
            address, logging.handlers.SysLogHandler.LOG_AUTHPRIV)
    except OSError as error:
        raise ConfigError("AUDIT_SYSLOG: cannot reach %s: %s" % (address, error))
    handler.setFormatter(logging.Formatter("ipd-audit: %(message)s"))
    return handler


def setup_logging(log_dir, also_stderr=False, audit_syslog=""):
    """Log to LOG_DIR/ipd.log, reopened when logrotate moves it; audit
    events to LOG_DIR/audit.log and, with AUDIT_SYSLOG, to syslog too.
    Raises ConfigError when the syslog socket cannot be reached."""
    os.makedirs(log_dir, exist_ok=True)
    handler = logging.handlers.WatchedFileHandler(os.path.join(log_dir, "ipd.log"))
    formatter = OneLineFormatter("%(asctime)s %(levelname)s %(message)s")
    handler.setFormatter(formatter)
    log.handlers[:] = [handler]
    if also_stderr:
        log_to_stderr()
    log.setLevel(logging.INFO)
    log.propagate = False
    trail = logging.handlers.WatchedFileHandler(os.path.join(log_dir, "audit.log"))
    trail.setFormatter(logging.Formatter("%(message)s"))
    audit.handlers[:] = [trail]
    if audit_syslog:
        audit.addHandler(syslog_handler(audit_syslog))
    audit.setLevel(logging.INFO)
    audit.propagate = False  # not in ipd.log twice


def reachable_by(path, run_as, access):
    """True when run_as gets the access bits (S_IR*, S_IW*) of path through
    its owner, group or other bits."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    if info.st_uid == run_as.uid:
        return True
    groups = (run_as.gid,) + run_as.groups
    other = access & (stat.S_IROTH | stat.S_IWOTH)
    group = access & (stat.S_IRGRP | stat.S_IWGRP)
    return (bool(info.st_mode & other) or
            (info.st_gid in groups and bool(info.st_mode & group)))


def keep_from_scripts(settings, run_as):
    """At start with RUN_AS: warn about what the scripts' user may still
    reach (a file in one of its groups, a LOG_DIR it may write), and when
    it cannot even reach UPLOAD_DIR."""
    logs = [os.path.join(settings.LOG_DIR, name) for name in ("ipd.log", "audit.log")]
    checks = [(settings.AUTH_DB, stat.S_IROTH | stat.S_IRGRP),
              (settings.LOG_DIR, stat.S_IWOTH | stat.S_IWGRP)]
    checks += [(path, stat.S_IRWXO | stat.S_IRGRP | stat.S_IWGRP) for path in logs]
    for path, access in checks:
        if reachable_by(path, run_as, access):
            log.warning("%s is within reach of the scripts' user %s: chmod "
                        "o-rwx it, and keep that user out of its group",
                        path, settings.RUN_AS)
    folder = settings.UPLOAD_DIR
    while folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
        if not reachable_by(folder, run_as, stat.S_IXOTH | stat.S_IXGRP):
            log.warning("the scripts' user %s cannot pass through %s to reach "
                        "UPLOAD_DIR: chmod o+x it", settings.RUN_AS, folder)


def has_account(uid):
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def explain_scripts_mode(settings):
    """Say once, at start, who supplies the code that runs and as whom."""
    me = (pwd.getpwuid(os.geteuid()).pw_name if has_account(os.geteuid())
          else str(os.geteuid()))
    if settings.SCRIPTS == "package":
        log.warning("SCRIPTS=package: a USER who may upload to a project runs "
                    "the control.sh in its package on this host, as %s; where "
                    "that user is in the docker group, that is root. "
                    "SCRIPTS=server runs only scripts placed on the server",
                    settings.RUN_AS or me)
    if settings.RUN_AS:
        problem = keep_scripts_without_capabilities()
        if problem:
            raise ConfigError(problem)
        run_as = resolve_run_as(settings.RUN_AS)
        log.info("RUN_AS=%s: control.sh and notify.sh run as %r with no "
                 "capabilities; PROJECT_DIR is each project's %s/ folder",
                 settings.RUN_AS, run_as, WORK_DIR)
        keep_from_scripts(settings, run_as)
    else:
        keep_scripts_without_capabilities()  # for a project.conf's RUN_AS
        log.warning("RUN_AS is not set: control.sh and notify.sh run as ipd's "
                    "own user (%s), and can read the users file, rewrite "
                    "ipd.log and audit.log, and write every project's folder "
                    "and the deployments' state", me)


class SystemdNotifier:
    """sd_notify(3) with the standard library: datagrams to NOTIFY_SOCKET
    (Type=notify in ipd.service), and WATCHDOG=1 while ipd is healthy.
    Without NOTIFY_SOCKET every call does nothing."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        path = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        usec = environ.get("WATCHDOG_USEC", "")
        for_us = environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid())
        self.watchdog_interval = (int(usec) / 2e6 if usec.isdigit() and for_us
                                  and int(usec) > 0 else None)

    def send(self, message):
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as error:
            log.warning("cannot notify systemd at %s: %s", self.address, error)

    def start_watchdog(self, healthy):
        """Ping every half WATCHDOG_USEC while healthy() says so; systemd
        restarts ipd when the pings stop."""
        if not (self.address and self.watchdog_interval):
            return

        def ping():
            while True:
                time.sleep(self.watchdog_interval)
                if healthy():
                    self.send("WATCHDOG=1")
                else:
                    log.error("unhealthy: the HTTP loop or a deploy thread is "
                              "stuck or gone; no watchdog ping")
        threading.Thread(target=ping, name="watchdog", daemon=True).start()


class StopSignal:
    """SIGTERM and SIGINT, waited for by the main thread.

    The kernel may hand a signal to any thread; the wakeup fd wakes the
    main thread whichever one got it (an Event.wait would sleep on).
    """

    def __init__(self):
        self.received = []
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        signal.set_wakeup_fd(self._writer.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda number, frame: self.received.append(number))

    def wait(self):
        """Block until a stop signal came; return its number."""
        while not self.received:
            self._reader.recv(64)
        signal.set_wakeup_fd(-1)
        return self.received[0]


def run_daemon(settings, on_ready=None):
    """Run the daemon until SIGTERM or SIGINT.  Returns the exit status."""
    daemon = Daemon(settings)
    server = bind_server(settings, daemon)  # before load: a clash changes nothing
    stop_signal = StopSignal()
    count = daemon.load(settings.KILL_GRACE)
    host, port = server.server_address[:2]
    url = "http://%s:%d%s/" % ("[%s]" % host if ":" in host else host, port,
                               settings.API_ROOT)
    daemon.worker.start()
    threading.Thread(target=server.serve_forever, name="http",
                     daemon=True).start()
    log.info("ipd %s listening on %s (%d deployment%s on disk)", __version__, url,
             count, "" if count == 1 else "s")
    print("ipd %s listening on %s" % (__version__, url), file=sys.stderr,
          flush=True)
    systemd = SystemdNotifier()
    systemd.send("READY=1\nSTATUS=listening on %s" % url)
    systemd.start_watchdog(lambda: time.monotonic() - server.last_loop < 5
                           and daemon.worker.alive())
    if on_ready:
        on_ready(url)
    signum = stop_signal.wait()
    systemd.send("STOPPING=1")
    log.info("%s: no new connections, running steps get %.0fs",
             signal.Signals(signum).name, settings.SHUTDOWN_GRACE)
    server.shutdown()
    server.server_close()
    daemon.worker.stop(settings.SHUTDOWN_GRACE)
    log.info("stopped")
    return 0


def users_file_warnings(path):
    """What is wrong with the users file at start, one line each naming
    AUTH_DB (and the line).  The daemon starts anyway: the file is read
    again on the next request after it is fixed."""
    where = "AUTH_DB=%s" % path
    add_user = "add one with 'ipd passwd ADMIN NAME'"
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        return ["%s does not exist: every login is refused (401); %s"
                % (where, add_user)]
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        return ["%s cannot be read (%s): every login is refused (401)"
                % (where, reason)]
    warnings = []
    if mode & stat.S_IROTH:
        warnings.append("%s is readable by everyone: chmod o-r %s" % (where, path))
    users, problems = parse_users(text, where)
    warnings.extend(problems)
    if not users:
        warnings.append("%s has no users: every login is refused (401); %s"
                        % (where, add_user))
    return warnings


def print_warning(message):
    print("ipd: warning: %s" % message, file=sys.stderr)


def close_to_others(settings):
    """At start: take others' bits off the users file and the logs where
    ipd may (the original's installation left them 0644; a project.conf's
    RUN_AS user is such an other), saying so in the log."""
    for key, path in (("AUTH_DB", settings.AUTH_DB),
                      ("LOG_DIR", os.path.join(settings.LOG_DIR, "ipd.log")),
                      ("LOG_DIR", os.path.join(settings.LOG_DIR, "audit.log"))):
        try:
            info = os.stat(path)
        except OSError:
            continue
        if (stat.S_ISREG(info.st_mode) and info.st_mode & 0o007
                and os.geteuid() in (0, info.st_uid)):  # files only: never /tmp
            os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o007)
            message = "%s: %s was open to others: made it %o" % (
                key, path, stat.S_IMODE(info.st_mode) & ~0o007)
            log.warning("%s", message)
            print_warning(message)


def serve(settings, verbose=False, on_ready=None):
    """Check the folders, take UPLOAD_DIR's lock and run the daemon until
    SIGTERM or SIGINT.  Returns the exit status; raises StartupError (each
    line already in ipd.log where LOG_DIR allows) when it cannot start."""
    # Nothing ipd writes is for others unless it says so (systemd's UMask
    # does the same; ipd must not depend on being started by it).
    os.umask(0o027)
    problems = folder_problems(settings)
    if "LOG_DIR" not in problems:
        setup_logging(settings.LOG_DIR, audit_syslog=settings.AUDIT_SYSLOG)
    if problems:
        raise startup_error(list(problems.values()), "LOG_DIR" not in problems)
    lock = lock_upload_dir(settings.UPLOAD_DIR)
    try:
        close_to_others(settings)
        explain_scripts_mode(settings)
        for warning in users_file_warnings(settings.AUTH_DB):
            log.warning("%s", warning)
            print_warning(warning)
        if verbose:
            log_to_stderr()
        return run_daemon(settings, on_ready)
    finally:
        os.close(lock)  # only now may another daemon take UPLOAD_DIR


###############################################################################
# The client ##################################################################
###############################################################################

# ipd.py push, status, logs, list, info, cancel, redeploy: HTTP to a
# daemon with http.client, exit statuses scripts can tell apart.


# Exit statuses of the client commands, distinct for scripts to tell apart.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NETWORK = 0, 1, 2, 3
EXIT_FOR_STATUS = {401: 4, 403: 5, 413: 6, 507: 7}
EXIT_HTTP, EXIT_TIMEOUT = 8, 9
EXIT_STATUS_HELP = (
    "exit status of the client commands: 0 ok; 1 the deployment ended in "
    "another state; 2 usage; 3 network error; 4 wrong login (401); 5 "
    "forbidden (403); 6 too large (413); 7 disk full (507); 8 another HTTP "
    "error; 9 --timeout passed")


class ClientError(Exception):
    """A one-line reason for stderr, and the exit status it means."""

    def __init__(self, message, exit_status):
        super().__init__(message)
        self.exit_status = exit_status


# A broken log stream is resumed this many times in a row without progress.
FOLLOW_RETRIES = 5


# A tar member at least this large is sent as a segment of its own; the
# bytes between such members (headers, small members) go inline, or as a
# segment when they add up to as much (#16).
SEGMENT_MIN = 64 * 1024


def make_recipe(project, files, plans, signed=None, force=False, whole=None):
    """The body of POST /push for files ({field: path}) as planned by
    plan_file ({field: plan}); whole names each file's SHA-256 ({field:
    digest}; by default what start_checks began, waited for here)."""
    recipe = {"project": project, "force": bool(force), "files": {}}
    if signed:
        recipe["manifest"], recipe["signature"] = signed[0].decode(), signed[1]
    for field, plan in plans.items():
        recipe["files"][field] = {
            "name": os.path.basename(files[field]), "size": plan["size"],
            "sha256": whole[field] if whole else plan["whole"].result(),
            "segments": [
                {"sha256": digest, "size": end - start} if digest else
                {"data": base64.b64encode(data).decode()}
                for start, end, digest, data in plan["pieces"]]}
    return recipe


def parse_rate(text):
    try:
        rate = parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))
    if rate <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return rate


# The largest manifest or image config push reads for the layers' digests.
IMAGE_METADATA_LIMIT = 4 * 1024 * 1024
OCI_BLOB = re.compile(r"(?:\./)?blobs/sha256/([0-9a-f]{64})\Z")


def declared_digests(tar, members):
    """{member name: SHA-256} as the image in tar says of its layers: the
    OCI layout names each blob by it; a docker save manifest.json lists each
    image's layers beside its config, whose rootfs.diff_ids are the layers'
    digests, in order.  Push checks them before the recipe names them."""
    found = {}
    for name in members:
        match = OCI_BLOB.match(name)
        if match:
            found[name] = match.group(1)

    def read_json(name, kind):
        info = members.get(name) if isinstance(name, str) else None
        if info is None or not info.isreg() or info.size > IMAGE_METADATA_LIMIT:
            return kind()
        value = json.loads(tar.extractfile(info).read().decode("utf-8"))
        return value if isinstance(value, kind) else kind()

    for image in read_json("manifest.json", list):
        if not isinstance(image, dict):
            continue
        rootfs = read_json(image.get("Config"), dict).get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        layers = image.get("Layers")
        if not (isinstance(layers, list) and isinstance(diff_ids, list)
                and len(layers) == len(diff_ids)):
            continue
        for layer, diff_id in zip(layers, diff_ids):
            if (isinstance(layer, str) and isinstance(diff_id, str)
                    and diff_id.startswith("sha256:")
                    and SHA256_HEX.match(diff_id[len("sha256:"):])):
                found.setdefault(layer, diff_id[len("sha256:"):])
    return found


def tar_data_ranges(path, size):
    """(start, end, declared) of the data of each large regular member of a
    plain tar file, in order, declared being the SHA-256 that an image's own
    metadata gives for it, or None; [(0, size, None)] for anything else
    (compressed, not a tar)."""
    whole = [(0, size, None)] if size else []
    try:
        ranges, members = [], {}
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if info.issparse():
                    return whole
                members[info.name] = info
                if info.isreg() and info.size >= SEGMENT_MIN:
                    ranges.append((info.offset_data, info.offset_data + info.size,
                                   info.name))
            try:
                declared = declared_digests(tar, members)
            except Exception:  # odd metadata: the digests are computed
                declared = {}
    except Exception:  # not a tar: whatever tarfile says, one segment
        return whole
    position = 0
    for start, end, _ in ranges:
        if start < position or end > size:
            return whole
        position = end
    # a name that two members bear (tar -r), or a digest declared for two
    # of them, tells nothing certain of either: those are computed
    names = collections.Counter(name for _, _, name in ranges)
    digests = collections.Counter(declared.get(name) for name in names.elements())
    return [(start, end, declared.get(name) if names[name] == 1
             and digests[declared.get(name)] == 1 else None)
            for start, end, name in ranges] or whole


def range_chunks(path, start, end):
    """The bytes start..end of path, in chunks; a shorter file is an error."""
    with open(path, "rb") as file:
        file.seek(start)
        left = end - start
        while left:
            block = file.read(min(CHUNK_SIZE, left))
            if not block:
                raise ClientError("%s changed while it was read" % path, EXIT_USAGE)
            left -= len(block)
            yield block


def range_digest(path, start, end):
    digest = hashlib.sha256()
    for block in range_chunks(path, start, end):
        digest.update(block)
    return digest.hexdigest()


def range_bytes(path, start, end):
    return b"".join(range_chunks(path, start, end))


def read_pieces(path, bounds):
    """For each (start, end, segment, _) of path: the SHA-256 of a segment,
    the bytes of an inline piece; the first and second half of the bytes
    read by a thread each (hashlib lets go of the GIL)."""
    if not bounds:
        return []
    half = (bounds[0][0] + bounds[-1][1]) // 2
    first = [bound for bound in bounds if bound[0] < half]

    def read(part):
        return [range_digest(path, start, end) if segment else
                range_bytes(path, start, end) for start, end, segment, _ in part]

    jobs = [Background(read, part) for part in (first, bounds[len(first):]) if part]
    return [value for job in jobs for value in job.result()]


def file_digest(path, status):
    """The SHA-256 of a whole file that must still be as status (an os.stat
    result) says: a file changed while push read it is an error."""
    digest = range_digest(path, 0, status.st_size)
    now = os.stat(path)
    if (now.st_size, now.st_mtime_ns) != (status.st_size, status.st_mtime_ns):
        raise ClientError("%s changed while it was read" % path, EXIT_USAGE)
    return digest


def plan_file(path):
    """How push sends a file: {path, status, size, pieces: [(start, end,
    segment digest or None, inline bytes or None)] covering it byte for
    byte, declared: the indexes of pieces whose digest only the file's
    metadata gave}.

    Only the digests the file does not declare are computed here (on two
    cores): the whole file's SHA-256 is needed only by the recipe, at the
    end, and the declared digests only before it names them, so both are
    computed (start_checks) while the missing segments go out."""
    status = os.stat(path)
    size = status.st_size
    bounds, position = [], 0
    for start, end, declared in tar_data_ranges(path, size):
        if start > position:
            bounds.append((position, start, start - position >= SEGMENT_MIN, None))
        bounds.append((start, end, True, declared))
        position = end
    if position < size:
        bounds.append((position, size, size - position >= SEGMENT_MIN, None))
    found = read_pieces(path, [bound for bound in bounds if not bound[3]])
    pieces, declared = [], []
    for start, end, segment, digest in bounds:
        value = digest or found.pop(0)
        if digest:
            declared.append(len(pieces))
        if segment:
            pieces.append((start, end, value, None))
        elif pieces and pieces[-1][2] is None:  # one inline run
            pieces[-1] = (pieces[-1][0], end, None, pieces[-1][3] + value)
        else:
            pieces.append((start, end, None, value))
    return {"path": path, "status": status, "size": size, "pieces": pieces,
            "declared": declared}


def start_checks(plan, whole=None):
    """Start computing, each on a thread of its own, what plan_file left
    for later: plan["whole"], the file's SHA-256 (unless given: a signed
    manifest's), and plan["check"], the real digest of each piece whose
    digest the file only declared."""
    path, pieces = plan["path"], plan["pieces"]
    if whole:
        plan["whole"] = Background(lambda: whole)
    elif len(pieces) == 1 and pieces[0][2] and not plan["declared"]:
        plan["whole"] = Background(lambda: pieces[0][2])  # one segment: the file
    else:
        plan["whole"] = Background(file_digest, path, plan["status"])
    ranges = {index: pieces[index][:2] for index in plan["declared"]}
    plan["check"] = Background(lambda: {index: range_digest(path, start, end)
                                        for index, (start, end) in ranges.items()})


class Pacer:
    """Sends no faster than rate bytes a second (push --limit-rate), in
    front of an optional Progress."""

    def __init__(self, rate, progress=None):
        self.rate = rate
        self.progress = progress
        self.sent = 0
        self.started = None

    def start(self, total, present=0):
        if self.progress:
            self.progress.start(total, present)

    def advance(self, count):
        if self.started is None:
            self.started = time.monotonic()
        self.sent += count
        ahead = self.sent / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)
        if self.progress:
            self.progress.advance(count)

    def done(self):
        if self.progress:
            self.progress.done()


def field_part(boundary, name, value):
    return ('--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
            % (boundary, name, value)).encode()


def digest_part(boundary, name, hexdigest):
    """The end of a file's part, then the field with its SHA-256."""
    return b"\r\n" + field_part(boundary, name + "_sha256", hexdigest)


def file_part_head(boundary, name, filename):
    filename = (filename.replace("\\", "_").replace('"', "_").replace("\r", "_")
                .replace("\n", "_"))
    return ('--%s\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
            'Content-Type: application/octet-stream\r\n\r\n'
            % (boundary, name, filename)).encode("utf-8")


def send_segments(connection, segments, boundary, progress):
    """Send the multipart body: bytes as they are, files from disk in 1 MiB
    pieces through one reused buffer, each file's digest after it."""
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    digests = {}
    for segment in segments:
        if isinstance(segment, bytes):
            connection.send(segment)
        elif segment[0] == "digest":
            connection.send(digest_part(boundary, segment[1], digests[segment[1]]))
        else:
            name, path, size = segment
            hasher = hashlib.sha256()
            with open(path, "rb") as file:
                while True:
                    count = file.readinto(buffer)
                    if not count:
                        break
                    hasher.update(view[:count])
                    connection.send(view[:count])
                    if progress:
                        progress.advance(count)
            digests[name] = hasher.hexdigest()
    if progress:
        progress.done()


def parse_json(body):
    try:
        data = json.loads(body.decode("utf-8"))
        return data if isinstance(data, dict) else {}
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return {}


def await_continue(connection, wait=3):
    """After the headers of an Expect: 100-continue request: None when the
    body may follow (100 Continue, or no word within wait seconds, as
    RFC 9110 allows), else (status, body) of the server's early refusal."""
    sock = connection.sock
    readable = (getattr(sock, "pending", lambda: 0)() or
                select.select([sock], [], [], wait)[0])
    if not readable:
        return None
    reader = sock.makefile("rb", buffering=0)
    status_line = reader.readline(65537)
    headers = {}
    while True:
        line = reader.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(status_line.split()[1]) if len(status_line.split()) > 1 else 0
    if status == 100:
        return None
    length = int(headers.get("content-length", "0") or 0)
    body = reader.read(length) if length else b""
    return status, parse_json(body).get("error") or body


def late_answer(connection):
    """The server's answer after it stopped reading our body (413, 507...)."""
    if connection.sock is None:  # never connected: nobody answered
        return None
    try:
        response = connection.getresponse()
        return response.status, parse_json(response.read()).get("error")
    except Exception:
        return None


def http_error(status, message):
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    message = (str(message).strip().splitlines() or [""])[0]
    return ClientError("HTTP %d: %s" % (status, message or "error"),
                       EXIT_FOR_STATUS.get(status, EXIT_HTTP))


def network_error(url, error):
    return ClientError("cannot reach %s: %s" % (url, error), EXIT_NETWORK)


def human_size(count):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (count, unit)
        count /= 1024.0


class Client:
    """Talks to ipd's API at IPD_URL (e.g. https://host/deploy)."""

    def __init__(self, url, user, password, cacert=None, timeout=60):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientError("IPD_URL must be http(s)://host[:port]/api-root, "
                              "not %r" % url, EXIT_USAGE)
        self.url = url.rstrip("/")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.root = parts.path.rstrip("/")
        self.timeout = timeout
        token = base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
        self.authorization = "Basic " + token
        self.context = None
        if self.scheme == "https":
            self.context = ssl.create_default_context(cafile=cacert)

    def connection(self, timeout=None):
        timeout = timeout or self.timeout
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def headers(self, **extra):
        headers = {"Authorization": self.authorization, "Accept": "application/json",
                   "User-Agent": "ipd/" + __version__}
        headers.update(extra)
        return headers

    def exchange(self, method, path, body=None, timeout=None, headers=None):
        """One request on a connection of its own: -> (status, body bytes).
        Raises ClientError when the network fails."""
        try:
            connection = self.connection(timeout)
            try:
                connection.request(method, self.root + path, body=body,
                                   headers=self.headers(**(headers or {})))
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()
        except (OSError, http.client.HTTPException) as error:
            raise network_error(self.url, error)

    def request(self, method, path, timeout=None):
        """-> (status, parsed JSON); raises ClientError for errors."""
        status, body = self.exchange(method, path, timeout=timeout)
        data = parse_json(body)
        if status >= 400 and not (status == 404 and data.get("state") == "no"):
            raise http_error(status, data.get("error") or body)
        return status, data

    def text(self, path):
        """The plain text answer of a GET."""
        status, body = self.exchange("GET", path, headers={"Accept": "text/plain"})
        text = body.decode("utf-8", "replace")
        if status >= 400:
            raise http_error(status, text)
        return text

    def follow(self, project, deployment, out, deadline=None):
        """Print the deployment's log as it is written; return its final
        state.  A broken stream (a proxy's read timeout) is resumed where
        it stopped; after FOLLOW_RETRIES tries in a row that bring nothing,
        the server is taken as unreachable (ClientError, exit 3)."""
        offset = 0
        failures = 0
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise ClientError("timed out waiting for deployment %s" % deployment,
                                  EXIT_TIMEOUT)
            path = "/log/%s/%s?follow=1&offset=%d" % (project, deployment, offset)
            progress = offset
            try:
                connection = self.connection(min(remaining or 3600, 3600))
                connection.request("GET", self.root + path,
                                   headers=self.headers(Accept="text/plain"))
                response = connection.getresponse()
                if response.status >= 400:
                    raise http_error(response.status, response.read())
                pending, final = b"", None
                while True:
                    data = response.read1(65536)
                    if not data:
                        break
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if final:  # a script's own "ipd: state:" line
                            out.write(final[1] + b"\n")
                            offset += len(final[1]) + 1
                            final = None
                        match = re.match(rb"ipd: state: (\S+)\Z", line)
                        if match:  # the server's last line, if nothing follows
                            final = (match.group(1).decode(), line)
                            continue
                        out.write(line + b"\n")
                        offset += len(line) + 1
                    out.flush()
                if final and not pending:
                    return final[0]
            except socket.timeout:
                raise ClientError("timed out waiting for deployment %s" % deployment,
                                  EXIT_TIMEOUT)
            except (OSError, http.client.HTTPException) as error:
                problem = error
            else:
                problem = ConnectionError("the log stream ended early")
            failures = 0 if offset > progress else failures + 1
            if failures >= FOLLOW_RETRIES:
                raise network_error(self.url, problem)
            time.sleep(1)  # then resumed from offset

    def push(self, project, files, progress=None, signed=None):
        """Upload files ({field: path}) for project; return the new
        deployment's id.  Streams from disk with a Content-Length computed
        ahead; the SHA-256 of each file, computed as it is sent, follows it
        so that the server refuses a file damaged on the way.  signed:
        (manifest bytes, signature text) of a signed push."""
        boundary = "ipd-" + secrets.token_hex(16)
        segments = [field_part(boundary, "project", project)]
        if signed:
            segments.append(field_part(boundary, "manifest", signed[0].decode()))
            segments.append(field_part(boundary, "signature", signed[1]))
        for name, path in files.items():
            segments.append(file_part_head(boundary, name, os.path.basename(path)))
            segments.append((name, path, os.path.getsize(path)))
            segments.append(("digest", name))
        segments.append(("--%s--\r\n" % boundary).encode())
        length = sum(len(seg) if isinstance(seg, bytes) else seg[2] if len(seg) == 3
                     else len(digest_part(boundary, seg[1], "0" * 64))
                     for seg in segments)
        try:
            connection = self.connection()
            connection.putrequest("POST", self.root + "/upload")
            for name, value in self.headers(**{
                    "Content-Type": "multipart/form-data; boundary=" + boundary,
                    "Content-Length": str(length), "Expect": "100-continue",
                    "X-Ipd-Project": project}).items():
                connection.putheader(name, value)
            connection.endheaders()
            early = await_continue(connection)
            if early:
                raise http_error(*early)
            send_segments(connection, segments, boundary, progress)
            response = connection.getresponse()
            body = response.read()
        except ClientError:
            raise
        except (OSError, http.client.HTTPException) as error:
            answer = late_answer(connection)
            if answer:
                raise http_error(*answer)
            raise network_error(self.url, error)
        data = parse_json(body)
        if response.status >= 400:
            raise http_error(response.status, data.get("error") or body)
        return data["deployment"]

    # --- layer pushes (#16)

    def call_json(self, method, path, data, extra=None):
        """-> (status, parsed JSON answer) of a request with a JSON body;
        raises ClientError only for the network."""
        status, answer = self.exchange(
            method, path, json.dumps(data).encode(),
            headers=dict({"Content-Type": "application/json"}, **(extra or {})))
        parsed = parse_json(answer)
        if status >= 400 and not parsed.get("error"):
            parsed["error"] = answer.decode("utf-8", "replace")
        return status, parsed

    def segment_offset(self, digest):
        """How many bytes of the segment the server has (HEAD)."""
        connection = self.connection()
        try:
            connection.request("HEAD", self.root + "/segments/" + digest,
                               headers=self.headers())
            response = connection.getresponse()
            response.read()
        finally:
            connection.close()
        if response.status == 404:
            return 0
        if response.status >= 400:
            raise http_error(response.status, "HEAD of segment %s" % digest)
        return int(response.getheader("Upload-Offset", "0"))

    def send_segment(self, digest, path, start, end, offset, progress, attempts=4):
        """Send bytes start..end of path as segment digest, from offset on
        (resumable: POST from 0, else PATCH with Upload-Offset); a broken
        connection is resumed where the server's HEAD says."""
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        for attempt in range(attempts):
            try:
                if offset is None:
                    offset = self.segment_offset(digest)
                connection = self.connection()
                connection.putrequest("POST" if offset == 0 else "PATCH",
                                      self.root + "/segments/" + digest)
                headers = self.headers(**{
                    "Content-Length": str(end - start - offset),
                    "Content-Type": "application/partial-upload",
                    "Upload-Complete": "?1", "Upload-Offset": str(offset),
                    "Expect": "100-continue"})
                for name, value in headers.items():
                    connection.putheader(name, value)
                connection.endheaders()
                early = await_continue(connection)
                if early and early[0] == 200:  # the server has it already
                    connection.close()
                    return
                if early and early[0] == 409 and attempt < attempts - 1:
                    connection.close()
                    offset = None
                    continue
                if early:
                    raise http_error(*early)
                with open(path, "rb") as file:
                    file.seek(start + offset)
                    left = end - start - offset
                    while left:
                        count = file.readinto(view[:min(CHUNK_SIZE, left)])
                        if not count:
                            raise ClientError("%s changed while it was sent" % path,
                                              EXIT_USAGE)
                        connection.send(view[:count])
                        left -= count
                        if progress:
                            progress.advance(count)
                response = connection.getresponse()
                answer = response.read()
                connection.close()
            except (OSError, http.client.HTTPException) as error:
                if attempt == attempts - 1:
                    raise network_error(self.url, error)
                time.sleep(1)
                offset = None
                continue
            if response.status in (200, 201, 204):
                return
            if response.status == 409 and attempt < attempts - 1:
                offset = None
                continue
            raise http_error(response.status, parse_json(answer).get("error") or answer)

    def push_layers(self, project, files, signed=None, progress=None, out=None,
                    force=False):
        """Push files ({field: path}) as recipes: ask which segments the
        server lacks, send only those (resuming partial ones), then the
        recipe.  Returns the deployment's id, or None when the server does
        not take recipes (404/405): then a whole upload is the way."""
        plans = {field: plan_file(path) for field, path in files.items()}
        if any(len(plan["pieces"]) > RECIPE_MAX_PIECES for plan in plans.values()):
            return None  # more pieces than a recipe may have: a whole upload
        answer = self.missing_segments(project, plans, files)
        if answer is None:
            return None
        missing, partial, present = answer
        signed_digests = {}
        if signed:  # its manifest names each file's SHA-256 already
            manifest = json.loads(signed[0].decode())
            signed_digests = {field: meta["sha256"]
                              for field, meta in manifest["files"].items()}
        for field, plan in plans.items():
            start_checks(plan, signed_digests.get(field))
        # the recipe's size for the progress bar, before the whole files'
        # digests (at work while the segments go out) are known
        body_size = len(json.dumps(make_recipe(
            project, files, plans, signed, force, {field: "0" * 64 for field in plans})))
        to_send = sum(end - start - partial.get(digest, 0)
                      for digest, (_, start, end) in missing.items())
        if progress:
            progress.start(to_send + body_size, present)
        corrected = self.send_missing(missing, partial, plans, progress)
        # a digest the file only declared is named by the recipe when the
        # bytes have it: one that does not is corrected and its segment sent
        for plan in plans.values():
            for index, digest in plan["check"].result().items():
                if plan["pieces"][index][2] != digest:
                    start, end, _, _ = plan["pieces"][index]
                    plan["pieces"][index] = (start, end, digest, None)
                    corrected = True
        if corrected:
            answer = self.missing_segments(project, plans, files)
            if answer is None:
                raise ClientError("the server stopped taking segments during the "
                                  "push", EXIT_NETWORK)
            missing, partial, _ = answer
            to_send += sum(end - start - partial.get(digest, 0)
                           for digest, (_, start, end) in missing.items())
            self.send_missing(missing, partial, plans, progress)
        recipe = make_recipe(project, files, plans, signed, force)
        status, answer = self.call_json("POST", "/push", recipe,
                                        {"X-Ipd-Project": project})
        if progress:
            progress.advance(body_size)
            progress.done()
        if status >= 400:
            raise http_error(status, answer.get("error"))
        if out:
            out.write("ipd: sent %s, %s already on the server\n"
                      % (human_size(to_send + body_size), human_size(present)))
        return answer["deployment"]

    def missing_segments(self, project, plans, files):
        """Ask the server which of the plans' segments it lacks: ({digest:
        (path, start, end)} to send, {digest: bytes it has of them}, bytes it
        has of all), or None when it takes no recipes."""
        wanted = {}
        for field, plan in plans.items():
            for start, end, digest, _ in plan["pieces"]:
                if digest:
                    wanted.setdefault(digest, (files[field], start, end))
        listed, missing, partial = list(wanted), {}, {}
        for first in range(0, max(1, len(listed)), MISSING_MAX_SEGMENTS):
            status, answer = self.call_json(
                "POST", "/segments/missing",
                {"segments": listed[first:first + MISSING_MAX_SEGMENTS]},
                {"X-Ipd-Project": project})
            if status in (404, 405):
                return None
            if status >= 400:
                raise http_error(status, answer.get("error"))
            missing.update((digest, wanted[digest]) for digest
                           in answer.get("missing", []) if digest in wanted)
            partial.update((digest, int(offset)) for digest, offset
                           in (answer.get("partial") or {}).items()
                           if digest in missing)
        present = sum(end - start for digest, (_, start, end) in wanted.items()
                      if digest not in missing) + sum(partial.values())
        return missing, partial, present

    def send_missing(self, missing, partial, plans, progress):
        """Send each missing segment.  One whose digest the file only
        declared is read first: when its bytes have another digest, the
        plan is corrected instead (-> True) and it is left for later."""
        declared = {plan["pieces"][index][2]: (plan, index)
                    for plan in plans.values() for index in plan["declared"]}
        corrected = False
        for digest, (path, start, end) in missing.items():
            real = range_digest(path, start, end) if digest in declared else digest
            if real != digest:
                plan, index = declared[digest]
                plan["pieces"][index] = (start, end, real, None)
                corrected = True
                continue
            self.send_segment(digest, path, start, end, partial.get(digest, 0),
                              progress)
        return corrected


class Progress:
    """A progress bar on stderr: bytes, percent, rate, time left."""

    def __init__(self, total, stream):
        self.total = max(total, 1)
        self.stream = stream
        self.sent = 0
        self.started = self.shown = time.monotonic()
        self.note = ""

    def start(self, total, present=0):
        """A layer push (#16): total bytes to send besides present ones
        that the server has already (counted as done at once)."""
        self.total = max(total + present, 1)
        self.sent = present
        if present:
            self.note = "(%s already on the server) " % human_size(present)

    def advance(self, count):
        self.sent += count
        now = time.monotonic()
        if now - self.shown >= 0.1:
            self.shown = now
            self.show(now)

    def show(self, now):
        elapsed = max(now - self.started, 1e-6)
        rate = self.sent / elapsed
        left = (self.total - self.sent) / rate if rate else 0
        width = 30
        filled = int(width * self.sent / self.total)
        self.stream.write("\r[%s%s] %3d%% %s of %s %s%s/s %d:%02d left " % (
            "#" * filled, "." * (width - filled), 100 * self.sent // self.total,
            human_size(self.sent), human_size(self.total), self.note,
            human_size(rate), left // 60, left % 60))
        self.stream.flush()

    def done(self):
        self.show(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()


def pack_directory(folder):
    """A directory as a tar.gz (control.sh at its root) named after it, in a
    temporary folder: the upload, and the audit log, show 'deploy.tar.gz'."""
    stem = os.path.basename(os.path.abspath(folder)) or "package"
    path = os.path.join(tempfile.mkdtemp(prefix="ipd-package-"), stem + ".tar.gz")
    with open(path, "wb") as file, tarfile.open(fileobj=file, mode="w:gz") as tar:
        for name in sorted(os.listdir(folder)):
            tar.add(os.path.join(folder, name), name)
    return path


def netrc_login(host, user=None):
    """(login, password) for host from ~/.netrc, or None."""
    try:
        entry = netrc.netrc().authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    if entry and (user is None or entry[0] == user):
        return entry[0], entry[2]
    return None


def client_from_args(args):
    """A Client from --url/--user, else IPD_URL, IPD_USER, IPD_PASSWORD,
    else ~/.netrc; the password is never taken from the command line."""
    url = args.url or os.environ.get("IPD_URL")
    if not url:
        raise ClientError("set IPD_URL (e.g. https://host/deploy) or --url",
                          EXIT_USAGE)
    user = args.user or os.environ.get("IPD_USER") or None
    password = os.environ.get("IPD_PASSWORD") or None  # empty: not set
    if password is None or not user:
        login = netrc_login(urllib.parse.urlsplit(url).hostname or "", user)
        if login:
            user, password = login
    if not user:
        raise ClientError("set IPD_USER, --user or a ~/.netrc entry", EXIT_USAGE)
    if password is None:
        if not sys.stdin.isatty():
            raise ClientError("set IPD_PASSWORD or a ~/.netrc entry for %s" % user,
                              EXIT_USAGE)
        password = getpass.getpass("ipd password for %s: " % user)
    return Client(url, user, password, args.cacert)


def wait_for_result(client, project, deployment, timeout):
    """Follow the log to the end; exit status 0 for ok, 1 otherwise."""
    deadline = time.monotonic() + timeout if timeout else None
    out = getattr(sys.stdout, "buffer", sys.stdout)
    state = client.follow(project, deployment, out, deadline)
    print("ipd: deployment %s of %s: %s" % (deployment, project, state),
          file=sys.stderr)
    return EXIT_OK if state == "ok" else EXIT_FAILED


def sign_push(key, project, files):
    """(manifest, signature) for pushing files ({field: path}) to project,
    signed with the SSH key at path key."""
    described = {}
    for field, path in files.items():
        status = os.stat(path)
        described[field] = (file_digest(path, status), status.st_size)
    manifest = make_manifest(project, described)
    try:
        return manifest, sign_manifest(key, manifest)
    except ConfigError as error:
        raise ClientError(str(error), EXIT_USAGE)


def cmd_push(args):
    client = client_from_args(args)
    files, temporary = {}, None
    if args.image:
        files["image"] = args.image
    if args.package:
        if os.path.isdir(args.package):
            temporary = files["package"] = pack_directory(args.package)
        else:
            files["package"] = args.package
    if not files:
        raise ClientError("give --image, --package or both", EXIT_USAGE)
    for path in files.values():
        if not os.path.isfile(path):
            raise ClientError("no such file: %s" % path, EXIT_USAGE)
    try:
        signed = sign_push(args.sign, args.project, files) if args.sign else None
        total = sum(os.path.getsize(path) for path in files.values())
        progress = Progress(total, sys.stderr) if sys.stderr.isatty() else None
        if args.limit_rate:
            progress = Pacer(args.limit_rate, progress)
        deployment = None
        if not args.whole:  # layers the server lacks, then the recipe (#16)
            deployment = client.push_layers(
                args.project, files, signed, progress,
                sys.stderr if sys.stderr.isatty() else None)
        if deployment is None:
            if progress:
                progress.start(total)
            deployment = client.push(args.project, files, progress, signed)
    finally:
        if temporary:
            remove_quietly(os.path.dirname(temporary))
    print(deployment, flush=True)
    if args.wait:
        return wait_for_result(client, args.project, deployment, args.timeout)
    return EXIT_OK


def cmd_status(args):
    client = client_from_args(args)
    path = "/status/%s" % args.project + ("/%s" % args.deployment
                                          if args.deployment else "")
    if args.wait:
        path += "?wait=%g" % args.wait
    _, data = client.request("GET", path, timeout=(args.wait or 0) + 60)
    print(data.get("state"))
    return EXIT_OK if data.get("state") in ("ok", "await", "active") else EXIT_FAILED


def cmd_logs(args):
    client = client_from_args(args)
    if args.follow:
        return wait_for_result(client, args.project, args.deployment, args.timeout)
    sys.stdout.write(client.text("/log/%s/%s" % (args.project, args.deployment)))
    return EXIT_OK


def cmd_list(args):
    sys.stdout.write(client_from_args(args).text("/list"))
    return EXIT_OK


def cmd_info(args):
    sys.stdout.write(client_from_args(args).text("/info"))
    return EXIT_OK


def cmd_cancel(args):
    client = client_from_args(args)
    _, data = client.request("POST", "/cancel/%s/%s" % (args.project,
                                                        args.deployment))
    print(data.get("state"))
    return EXIT_OK


def cmd_redeploy(args):
    client = client_from_args(args)
    _, data = client.request("POST", "/redeploy/%s/%s" % (args.project,
                                                          args.deployment))
    print(data["deployment"], flush=True)
    if args.wait:
        return wait_for_result(client, args.project, data["deployment"],
                               args.timeout)
    return EXIT_OK


def add_client_commands(commands):
    """push, status, logs, list, info, cancel, redeploy: the API from a
    terminal or a CI job."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the API's base (default: $IPD_URL), "
                        "e.g. https://host/deploy")
    common.add_argument("--user", help="default: $IPD_USER or ~/.netrc; the "
                        "password comes from $IPD_PASSWORD, ~/.netrc or a prompt")
    common.add_argument("--cacert", help="CA certificate file for https")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", action="store_true", help="follow the log "
                         "to the end; exit 0 only when the deployment is ok")
    waiting.add_argument("--timeout", type=float, default=0,
                         help="give up waiting after this many seconds")
    push = commands.add_parser("push", parents=[common, waiting],
                               help="upload an image and/or package",
                               description="Upload an image, a package or both "
                               "for a project; prints the new deployment's ID.",
                               epilog=EXIT_STATUS_HELP)
    push.add_argument("--project", required=True, help="the project to deploy")
    push.add_argument("--image", help="image file, e.g. from docker save")
    push.add_argument("--package", help="package archive, or a directory "
                      "packed as tar.gz")
    push.add_argument("--sign", metavar="KEY", help="sign the push with this SSH "
                      "private key (ssh-keygen -Y sign; see ALLOWED_SIGNERS)")
    push.add_argument("--whole", action="store_true", help="send the whole "
                      "files in one multipart upload (as curl does), not only "
                      "the layers the server lacks")
    push.add_argument("--limit-rate", type=parse_rate, metavar="RATE",
                      help="send at most RATE bytes a second, like 10M")
    push.set_defaults(func=cmd_push)
    status = commands.add_parser("status", parents=[common],
                                 help="state of a deployment",
                                 description="Print the state of a deployment "
                                 "(of the project's latest one without an ID); "
                                 "exit 0 for ok, await and active.",
                                 epilog=EXIT_STATUS_HELP)
    status.add_argument("project", help="the project")
    status.add_argument("deployment", nargs="?", help="the deployment's ID "
                        "(default: the latest)")
    status.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="answer when it ends, or after SECONDS")
    status.set_defaults(func=cmd_status)
    logs = commands.add_parser("logs", parents=[common], help="what control.sh "
                               "printed", description="Print what control.sh "
                               "printed for a deployment, so far or (-f) to "
                               "the end.", epilog=EXIT_STATUS_HELP)
    logs.add_argument("project", help="the project")
    logs.add_argument("deployment", help="the deployment's ID")
    logs.add_argument("-f", "--follow", action="store_true", help="follow the "
                      "log to the end; exit 0 only when the deployment is ok")
    logs.add_argument("--timeout", type=float, default=0, help="with -f: give "
                      "up after this many seconds")
    logs.set_defaults(func=cmd_logs)
    for name, func, text in (("list", cmd_list, "the projects"),
                             ("info", cmd_info, "each project's latest deployment")):
        command = commands.add_parser(name, parents=[common], help=text,
                                      description="Print %s (ADMIN)." % text,
                                      epilog=EXIT_STATUS_HELP)
        command.set_defaults(func=func)
    cancel = commands.add_parser("cancel", parents=[common],
                                 help="stop a waiting or running deployment",
                                 description="Cancel a deployment: a waiting one "
                                 "never runs, a running one is stopped; prints "
                                 "its state.", epilog=EXIT_STATUS_HELP)
    cancel.add_argument("project", help="the project")
    cancel.add_argument("deployment", help="the deployment's ID")
    cancel.set_defaults(func=cmd_cancel)
    redeploy = commands.add_parser("redeploy", parents=[common, waiting],
                                   help="deploy the kept files of an earlier "
                                   "deployment again: a rollback",
                                   description="Deploy the kept files of an "
                                   "earlier deployment again (a rollback); "
                                   "prints the new deployment's ID.",
                                   epilog=EXIT_STATUS_HELP)
    redeploy.add_argument("project", help="the project")
    redeploy.add_argument("deployment", help="the ID of the deployment to "
                          "deploy again")
    redeploy.set_defaults(func=cmd_redeploy)


###############################################################################
# Command line ################################################################
###############################################################################

# The argparse commands, each calling the client, the daemon or the
# users file; main() is the entry point of ipd.py and of `ipd`.


DEMO_CONTROL_SH = """#!/bin/sh
# An example control.sh: ipd runs it with check, prepare and deploy.
# Exit status 1 means success (the original README's contract).
case "$1" in
  check)   echo "checking $PROJECT"; exit 1 ;;
  prepare) echo "preparing $PROJECT"; exit 1 ;;
  deploy)  echo "deploying $PROJECT, deployment $DEPLOY"
           [ -n "$IMAGE" ] && echo "image: $IMAGE ($(wc -c < "$IMAGE") bytes)"
           sleep 1; echo "done"; exit 1 ;;
esac
exit 2
"""


DEMO_IMAGE_TEXT = b"A stand-in for an image that `docker save` writes.\n"


def cmd_serve(args):
    settings = load_settings(args.config, warn=print_warning)
    return serve(settings, verbose=args.verbose)


def cmd_demo(args):
    """A daemon to try at once: folder ./ipd-demo, user demo:demo."""
    folder = os.path.abspath(args.dir)
    uploads = os.path.join(folder, "uploads")
    hello = os.path.join(uploads, "hello")
    os.makedirs(hello, exist_ok=True)
    users = os.path.join(folder, "users.txt")
    if not os.path.exists(users):
        set_user(users, "ADMIN", "demo", hashlib.sha256(b"demo").hexdigest())
        os.chmod(users, 0o600)
    control = os.path.join(hello, "control.sh")
    if not os.path.exists(control):
        with open(control, "w") as file:
            file.write(DEMO_CONTROL_SH)
        os.chmod(control, 0o755)
    # A file to upload as the image, wherever ipd came from (a wheel or
    # a .deb leaves no ipd.py in the current folder).
    image = os.path.join(folder, "image.tar")
    if not os.path.exists(image):
        with tarfile.open(image, "w") as tar:
            info = tarfile.TarInfo("hello.txt")
            info.size = len(DEMO_IMAGE_TEXT)
            tar.addfile(info, io.BytesIO(DEMO_IMAGE_TEXT))
    environ = {"UPLOAD_DIR": uploads, "LOG_DIR": folder, "AUTH_DB": users,
               "LISTEN": args.listen, "API_ROOT": "/deploy"}
    settings = load_settings(os.devnull, environ)

    def explain(url):
        print("demo: user demo, password demo, data in %s\n"
              "try:  curl -u demo:demo -F project=hello -F image=@%s %supload"
              % (folder, shlex.quote(image), url), file=sys.stderr, flush=True)
    return serve(settings, verbose=True, on_ready=explain)


def cmd_passwd(args):
    settings = load_settings(args.config, warn=print_warning)
    path = args.auth_db or settings.AUTH_DB
    if sys.stdin.isatty():
        password = getpass.getpass("password for %s: " % args.name)
        if password != getpass.getpass("again: "):
            raise ConfigError("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ConfigError("empty password")
    if args.projects and args.role != "USER":
        raise ConfigError("--projects is for USER only: an ADMIN may use every "
                          "project, a METRICS user reads only /metrics")
    projects = args.projects.split(",") if args.projects else None
    try:
        before = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        before = None
    set_user(path, args.role, args.name, hash_password(password), projects)
    print("%s %s written to %s" % (args.role, args.name, path), file=sys.stderr)
    if before is not None and before & 0o007:
        print("ipd: %s was readable by others (mode %04o), now %04o"
              % (path, before, before & ~0o007), file=sys.stderr)
    return 0


def cmd_token(args):
    """token create / list / revoke, on the server's TOKENS_DB."""
    settings = load_settings(args.config, warn=print_warning)
    path = args.tokens_db or tokens_path(settings)
    if args.action == "create":
        if not args.project:
            raise ConfigError("token create needs --project (one or more)")
        try:
            expires = time.time() + parse_duration(args.expires)
        except ValueError as error:
            raise ConfigError("--expires: %s" % error)
        creator = args.creator or os.environ.get("SUDO_USER") or getpass.getuser()
        secret = create_token(path, args.project, expires, creator)
        print(secret)
        print("token for %s, expires %s, written to %s: shown once, keep it in "
              "your CI's secrets" % (",".join(args.project), iso_time(expires), path),
              file=sys.stderr)
        return 0
    if args.action == "revoke":
        if not args.id:
            raise ConfigError("token revoke needs the token's id")
        found = []

        def revoke(tokens):
            for token in tokens:
                if token.id == args.id and not token.revoked:
                    token.revoked = int(time.time())
                    found.append(token)
        rewrite_tokens(path, revoke)
        if not found:
            raise ConfigError("no active token %s in %s" % (args.id, path))
        print("token %s revoked" % args.id, file=sys.stderr)
        return 0
    try:
        with open(path, encoding="utf-8") as file:
            tokens = parse_tokens(file.read())
    except FileNotFoundError:
        tokens = {}
    used = read_token_uses(path)
    for token in tokens.values():
        print("%s projects=%s expires=%s creator=%s created=%s last_use=%s%s" % (
            token.id, ",".join(token.projects), iso_time(token.expires) or "never",
            token.creator, iso_time(token.created), iso_time(used.get(token.id)) or "-",
            " " + token.refusal() if token.refusal() else ""))
    return 0


def cmd_version(args):
    print("ipd", __version__)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ipd", description="Image Push and Deploy: receive app images "
        "and packages over HTTP and run control.sh to deploy them.",
        epilog=EXIT_STATUS_HELP)
    config_help = "settings file (default: $IPD_CONFIG or %s)" % DEFAULT_CONFIG
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--version", action="version",
                        version="ipd %s" % __version__, help="print the version")
    # --config after the command too; SUPPRESS keeps one given before it
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    commands = parser.add_subparsers(dest="command")
    serve_parser = commands.add_parser(
        "serve", parents=[config], help="run the daemon (default)",
        description="Run the daemon with the settings of --config, "
        "$IPD_CONFIG or %s and the environment." % DEFAULT_CONFIG)
    serve_parser.add_argument("-v", "--verbose", action="store_true",
                              help="log to stderr too")
    serve_parser.set_defaults(func=cmd_serve)
    demo = commands.add_parser("demo", help="a local daemon to try: user "
                               "demo, password demo, project hello",
                               description="Run a daemon to try at once: data "
                               "in --dir, user demo, password demo, a project "
                               "hello whose control.sh prints what it deploys.")
    demo.add_argument("--dir", default="ipd-demo", help="its folder "
                      "(default: ./ipd-demo)")
    demo.add_argument("--listen", default="127.0.0.1:9955", help="host:port to "
                      "listen on (default: 127.0.0.1:9955)")
    demo.set_defaults(func=cmd_demo)
    passwd = commands.add_parser("passwd", parents=[config],
                                 help="add or replace a user in AUTH_DB",
                                 description="Add or replace a user in the "
                                 "users file (AUTH_DB) with a salted hash of a "
                                 "password read from the terminal or stdin.")
    passwd.add_argument("role", choices=ROLES, help="ADMIN (everything), USER "
                        "(upload and follow deployments) or METRICS (/metrics)")
    passwd.add_argument("name", help="the user name")
    passwd.add_argument("--projects", help="USER only: comma-separated projects "
                        "this user may use")
    passwd.add_argument("--auth-db", help="users file (default: AUTH_DB)")
    passwd.set_defaults(func=cmd_passwd)
    token = commands.add_parser("token", parents=[config], help="deploy tokens: create (shown "
                                "once), list, revoke", description="Deploy tokens "
                                "for CI: a token works as the password of a Basic "
                                "login or as a Bearer token, for its projects only, "
                                "until it expires or is revoked.")
    token.add_argument("action", choices=("create", "list", "revoke"),
                       help="create a token (printed once), list them, or "
                       "revoke one")
    token.add_argument("id", nargs="?", help="revoke: the token's id")
    token.add_argument("--project", action="append", help="create: a project the "
                       "token may deploy (repeat for more)")
    token.add_argument("--expires", default="30d", help="create: lifetime, like "
                       "30d, 12h, 90m (default: 30d)")
    token.add_argument("--creator", help="create: who asked for it (default: "
                       "$SUDO_USER or the login name)")
    token.add_argument("--tokens-db", help="tokens file (default: TOKENS_DB)")
    token.set_defaults(func=cmd_token)
    version = commands.add_parser("version", help="print the version",
                                  description="Print the version.")
    version.set_defaults(func=cmd_version)
    add_client_commands(commands)
    return parser


def main(argv=None):
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        argv = sys.argv[1:] if argv is None else list(argv)
        args = parser.parse_args(argv + ["serve"])
    try:
        return args.func(args)
    except ClientError as error:
        print("ipd: %s" % error, file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        return 130
    except ConfigError as error:
        for line in str(error).splitlines():
            print("ipd: %s" % line, file=sys.stderr)
        return 2
    except OSError as error:
        print("ipd: %s" % error, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
