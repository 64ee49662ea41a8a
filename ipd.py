#!/usr/bin/env python3
"""ipd - Image Push and Deploy.

A small daemon that receives an app's container image and deploy package
over HTTP and switches the server to the new version by running the
project's ``control.sh``: ``check``, then ``prepare`` where the check
failed, then ``deploy`` (exit status 1 means success, as the original
README says; see SUCCESS_CODE); where VERIFY_SECONDS is set, ``verify``
watches the live release, and one that fails it is rolled back.

One file, standard library only, CPython 3.8 to 3.13:

    python3 ipd.py demo             # a local daemon to try, user demo:demo
    python3 ipd.py serve            # the daemon, configured by /etc/ipd.conf
    python3 ipd.py passwd ROLE NAME # add or replace a user in AUTH_DB

How it is built, top to bottom (each section opens with what it owns, and
refers only to names defined above it): errors; settings; helpers (file
locks, the bounded JSON decoder every JSON body goes through); users
and passwords; signed releases and deploy tokens; OpenID Connect ID
tokens (CI jobs that log in with no secret); the streaming multipart
parser (pure, no I/O); request bodies and uploads; safe unpacking of
packages; processes (who runs the scripts: RUN_AS, project.conf; stopping
what a step leaves); deployments (the Deployment type and the one owner of
their state: records on disk first, the queue, cancels, the counters); the
deploy worker that runs control.sh; segments (layers stored once,
recipes, resumable uploads); retention (pruning, the free-space floor,
segment collection); the registry (`docker push` as a deployment: the OCI
Distribution protocol's grammar, manifests, the docker-load tar, upload
sessions and tags); the service (one method per operation of the API:
the only door the HTTP layer uses); the status pages; HTTP (routes; the
HTTP edge of a connection: framing, bodies, answers; the registry's
requests; the API's handler; the server); running the daemon; the client (ipd.py
push, status, logs...); the command line.

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

and deployments/index.cache, what a start-up needs of the project: its
records that may still change or keep files, and figures of the others
(a cache, trusted only while the folder is as it saw it); and
UPLOAD_DIR/.ipd.lock, flock'ed by the one daemon that uses the folder;
UPLOAD_DIR/.segments/ holds the segments (sha256/ab/abcd...), each once,
and partial/ the segment uploads under way (registry uploads too);
UPLOAD_DIR/.registry/PROJECT.json the tags pushed to a project's repository;
UPLOAD_DIR/.oidc/ the keys of the OpenID Connect issuers that ipd fetched,
a file an issuer.
"""

__version__ = "1.0.0"

import argparse
import array
import base64
import binascii
import bisect
import bz2
import calendar
import codecs
import collections
import ctypes
import difflib
import email.errors
import errno
import fcntl
import fnmatch
import getpass
import grp
import gzip
import hashlib
import heapq
import hmac
import html
import http.client
import http.server
import importlib.machinery
import importlib.util
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
import textwrap
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
    """400: the request is malformed or names what cannot be; the
    message says what to fix."""

    http_status = 400


class Unauthorized(IpdError):
    """401: no credentials, or refused ones (the same answer for every
    reason, so that it tells a guesser nothing)."""

    http_status = 401


class Forbidden(IpdError):
    """403: a known user without the role or the project, or a push that
    must be signed and is not."""

    http_status = 403


class NotFound(IpdError):
    """404: no such endpoint, project or deployment ('no')."""

    http_status = 404


class MethodNotAllowed(IpdError):
    """405: the path exists for other methods (headers carry Allow)."""

    http_status = 405


class Conflict(IpdError):
    """409: the deployment has ended already, or the segment upload is
    elsewhere (headers may carry Upload-Offset)."""

    http_status = 409


class LengthRequired(IpdError):
    """411: a body with neither Content-Length nor chunked coding."""

    http_status = 411


class Gone(IpdError):
    """410: the files a redeploy needs were pruned."""

    http_status = 410


class TooLarge(IpdError):
    """413: a body or file over MAX_UPLOAD_SIZE (or another limit)."""

    http_status = 413


class TooManyRequests(IpdError):
    """429: too many failed logins from one address (Retry-After)."""

    http_status = 429


class DiskFull(IpdError):
    """507: UPLOAD_DIR has no room; nothing of the request is kept."""

    http_status = 507


class Unavailable(IpdError):
    """503: too many connections, or ipd is stopping (Retry-After)."""

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


# Every setting: its default (as text), its kind (which parse_setting
# turns into a value) and what it does, written once: the README's
# settings table and ipd.conf.example are made from here by
# `python3 ipd.py settings --markdown` and `--conf`, and a test holds
# them to it.  An example value, where the default suits no server, is
# what ipd.conf.example sets.
Setting = collections.namedtuple("Setting", "default kind text example")


def setting(default, kind, text, example=None):
    """A SETTINGS entry; text is folded into one line (Markdown)."""
    return Setting(default, kind, " ".join(text.split()), example)


SETTINGS = {
    "LISTEN": setting("127.0.0.1:9955", "address", """host:port to listen on
        (`[::1]:9955` for IPv6); the nginx `proxy_pass` target.  ipd speaks
        plain HTTP: put nginx with TLS in front of it."""),
    "API_ROOT": setting("/deploy", "root", """URL prefix of every endpoint:
        `/deploy/upload`, `/deploy/status/...`"""),
    "UPLOAD_DIR": setting(".", "path", """projects, their deployments and
        temporary uploads (one filesystem).  It must exist and be writable by
        ipd's user; one ipd at a time may use it.""", "/srv/upload"),
    "LOG_DIR": setting(".", "path", """where `ipd.log` and `audit.log` are
        written; reopened when logrotate moves them.  It must exist and be
        writable by ipd's user.""", "/var/log/ipd"),
    "AUTH_DB": setting("/opt/ipd/users.txt", "path", """users file:
        `ROLE:username:hash` lines (ROLE is ADMIN, USER or METRICS)"""),
    "SUCCESS_CODE": setting("1", "int", """exit status of control.sh that
        means success (the original README's: 1)"""),
    "STEP_TIMEOUT": setting("600", "seconds", """time limit of each control.sh
        step (check, prepare, deploy); past it the step's processes are
        stopped and the state is `timeout`"""),
    "KILL_GRACE": setting("10", "seconds", """seconds between SIGTERM and
        SIGKILL when a step is stopped"""),
    "SHUTDOWN_GRACE": setting("30", "seconds", """on SIGTERM (systemctl stop),
        how long running steps may go on before they are stopped and marked
        `interrupted`; keep the unit's TimeoutStopSec above it"""),
    "MAX_PARALLEL": setting("4", "count", """how many projects deploy at once
        (one project always deploys one at a time)"""),
    "VERIFY_SECONDS": setting("0", "window", """after deploy, `control.sh
        verify` watches the release this many whole seconds (0: no verify
        step); a failed verify ends `reverted` and redeploys the project's last
        ok deployment (see Verify and automatic rollback).  Per project in
        `UPLOAD_DIR/$PROJECT/project.conf`."""),
    "KEEP_DEPLOYMENTS": setting("10", "count", """deployments per project that
        keep their image and package; older ones keep only their state and
        log"""),
    "MAX_UPLOAD_SIZE": setting("0", "size", """largest request body (`512M`,
        `10G`), and largest file a layer push rebuilds (its recipe's pieces
        must add up to its declared size, checked before a byte is copied: 413
        over); 0 for no limit (nginx: `client_max_body_size 0`)"""),
    "MAX_UNPACKED_SIZE": setting("8G", "size", """largest unpacked package
        (stops decompression bombs); 0 for no limit"""),
    "READ_TIMEOUT": setting("60", "seconds", """seconds a request body may
        stall before the upload is dropped"""),
    "HEADER_TIMEOUT": setting("30", "seconds", """seconds a client has to send
        a request's line and headers, however slowly it trickles them; also
        how long a kept-alive connection may stay idle"""),
    "MAX_CONNECTIONS": setting("512", "count", """open connections at most;
        more are answered 503 at once"""),
    "MAX_CONNECTIONS_PER_ADDRESS": setting("64", "count", """open connections
        of one client address at most (behind a trusted proxy, the address it
        names in `X-Real-IP`); more are answered 503, so one client cannot
        take every connection"""),
    "TRUSTED_PROXIES": setting("127.0.0.0/8 ::1", "networks", """peers
        (addresses or networks) whose `X-Real-IP` / `X-Forwarded-For` are
        believed as the client's address: the nginx in front of ipd; anyone
        else's are ignored.  Empty when nothing proxies: then no local user
        can pose as another address to the login throttle or the audit
        log."""),
    "ALLOWED_SIGNERS": setting("", "file", """OpenSSH allowed-signers file of
        the keys that may sign pushes (`ipd.py push --sign KEY`); each key's
        principals are `WHO@PROJECT` patterns (`ci@web,ci@api`, `release@*`);
        options such as `valid-before="20270101"` apply.  Empty: none."""),
    "REQUIRE_SIGNATURE": setting("", "projects", """projects whose pushes must
        be signed by a key of ALLOWED_SIGNERS, `*` for all; an unsigned or
        badly signed push to them is refused with 403"""),
    "TOKENS_DB": setting("", "file", """deploy tokens file (`ipd.py token
        create --project web --expires 30d`), which keeps only the tokens'
        SHA-256; empty: `tokens.txt` beside AUTH_DB"""),
    "OIDC_TRUST": setting("", "file", """trust rules for CI jobs that log in
        with their OpenID Connect ID token, no secret stored (GitHub Actions,
        GitLab CI): one a line, `ISSUER AUDIENCE PROJECTS CLAIM=GLOB...
        [jwks=PATH]`, read again when the file changes (see Deploy from CI
        without secrets).  Empty: off."""),
    "OIDC_CA_FILE": setting("", "file", """CA certificates that the HTTPS
        fetch of an issuer's keys (`/.well-known/openid-configuration`, its
        `jwks_uri`) checks against; empty: the system's"""),
    "PUBLIC_ORIGIN": setting("", "origins", """the origin(s) browsers reach
        ipd's pages at, like `https://deploy.example.com` (several separated
        by spaces); a state-changing request a browser sends with another
        Origin is refused.  Empty: from the `Host` header, with the scheme of
        a trusted proxy's `X-Forwarded-Proto`."""),
    "PASS_ENV": setting("", "names", """variables of ipd's own environment
        passed on to control.sh, besides PATH, DEPLOY, PROJECT, IMAGE and
        PROJECT_DIR; e.g. `HOME DOCKER_HOST`"""),
    "NOTIFY_URL": setting("", "url", """where a JSON summary of each ended
        deployment is POSTed (3 tries); empty for none.
        `UPLOAD_DIR/$PROJECT/notify.sh`, where present, runs too."""),
    "NOTIFY_TIMEOUT": setting("30", "seconds", """time limit of `notify.sh`
        and of each NOTIFY_URL try"""),
    "SEGMENT_EXPIRY": setting("86400", "seconds", """layer pushes: partial
        segment uploads untouched this many seconds are removed, and so are
        stored segments that no kept deployment refers to and nobody sent or
        named for as long (see Layer pushes)"""),
    "DROP_REBUILT": setting("yes", "yesno", """`yes`: a deployment pushed as a
        recipe of segments loses its rebuilt image and package once its run
        ends (its recipe stays; a redeploy rebuilds them), so deployments
        sharing layers take about the unique bytes; `no`: keep them"""),
    "MIN_FREE_SPACE": setting("0", "size", """free space floor of UPLOAD_DIR
        (`5G`): below it, when a deployment ends, the files of its project's
        oldest prunable deployments go first (never a waiting or running one,
        nor the latest ok one; never another project's); a segment upload or
        a recipe push that would go below it is refused with 507 and prunes
        nothing; 0 for none"""),
    "SEGMENT_QUOTA": setting("20G", "size", """bytes one user (or token) may
        hold in partial segment uploads and in segments no kept deployment
        refers to (uploads not yet deployed); a segment upload over it is
        refused with 507; 0 for no bound"""),
    "SEGMENT_UPLOADS": setting("4", "count", """segment uploads one user (or
        token) may have under way at once; more get 429"""),
    "SCRIPTS": setting("package", "scripts", """who supplies the code that runs
        on this host (see Scripts and who runs them).  `package`: a package's
        own control.sh runs (the original), so whoever may upload runs code
        here; `server`: only the control.sh placed in `UPLOAD_DIR/$PROJECT/`
        runs, and a package carrying one is refused (400).  An administrator
        may set it per project in `UPLOAD_DIR/$PROJECT/project.conf`."""),
    "RUN_AS": setting("", "run_as", """the user control.sh and notify.sh run
        as: `user[:group[,group...]]`, names or numbers
        (`ipd-run:ipd-run,docker`); then PROJECT_DIR is
        `UPLOAD_DIR/$PROJECT/work`, and ipd-run-as.conf is needed (`make
        install-run-as`).  Empty: as ipd itself, which lets them read the
        users file and rewrite the logs."""),
    "MAX_MEMBERS": setting("50000", "count", """entries in a package (checked
        before anything is read into memory)"""),
    "MAX_HEADER_SIZE": setting("64K", "size", """headers of one tar entry, its
        pax records and GNU long name or link included"""),
    "MAX_NAME_SIZE": setting("4096", "size", """longest entry name and link
        target in a package"""),
    "MAX_TRAILING_SIZE": setting("1M", "size", """bytes after the end of a tar
        archive (padding); more is refused"""),
    "AUDIT_SYSLOG": setting("", "syslog", """also send each audit event to
        syslog, out of the deploy user's reach: `/dev/log` (the journal:
        `journalctl -t ipd-audit`) or `host:port` (UDP); empty for none"""),
}

CONF_HEAD = """\
# ipd settings: copy to /etc/ipd.conf (make install does).
# KEY=VALUE lines, '#' comments: the syntax of a systemd EnvironmentFile, so
# ipd.service loads this same file.  An environment variable of the same
# name overrides a line here.  Sizes take K, M, G, T; times are seconds.
# Made by `python3 ipd.py settings --conf` from the SETTINGS table.
"""


def settings_markdown():
    """The README's settings table, made from SETTINGS."""
    lines = ["| Name | Default | Description |", "| ------ | ------ | ------ |"]
    for key, entry in SETTINGS.items():
        default = "`%s`" % entry.default if entry.default else "(empty)"
        lines.append("| `%s` | %s | %s |" % (key, default, entry.text))
    return "\n".join(lines) + "\n"


def settings_conf():
    """ipd.conf.example, made from SETTINGS: each setting's text as a
    comment (wrapped, without Markdown's backticks), then KEY=VALUE."""
    parts = [CONF_HEAD]
    for key, entry in SETTINGS.items():
        text = entry.text.replace("`", "")
        text = text[:1].upper() + text[1:]
        comment = "\n".join("# " + line for line in textwrap.wrap(text, 74))
        value = entry.default if entry.example is None else entry.example
        parts.append("\n%s\n%s=%s\n" % (comment, key, value))
    return "".join(parts)


# A deployment is "await" or "active" until it ends in a final state: ok,
# changed, cancelled, timeout, interrupted, reverted (its verify failed and
# it was rolled back), or an exit code.
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


def did_you_mean(name, known):
    """' (did you mean X?)' for the known name closest to a mistyped one,
    or '' when none is close."""
    close = difflib.get_close_matches(name, list(known), 1, 0.6)
    return " (did you mean %s?)" % close[0] if close else ""


class UnknownSettings(ConfigError):
    """Names in a config file that no setting has: the daemon does not
    start (a typo would leave a setting at its default, such as UPLOAD_DIR
    at '.').  log_dir: the LOG_DIR the file or environment gave, else
    None (ipd.log's place is not known then)."""

    def __init__(self, lines, log_dir):
        super().__init__("\n".join(lines))
        self.log_dir = log_dir


def parse_whole(text, least=None):
    """A whole number (at least least, when given)."""
    if not re.fullmatch(r"-?\d+", text):
        raise ValueError("not a whole number")
    if least is not None and int(text) < least:
        raise ValueError("must be at least %d" % least)
    return int(text)


def parse_seconds(text):
    """A positive number of seconds (below 10,000,000)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if not 0 < value < 10 ** 7:
        raise ValueError("must be a positive number of seconds")
    return value


def parse_yes_no(text):
    """yes/no (or 1/0, true/false) -> bool."""
    if text.lower() not in ("yes", "no", "1", "0", "true", "false"):
        raise ValueError("must be yes or no")
    return text.lower() in ("yes", "1", "true")


def parse_words(text, check, what):
    """Words separated by spaces or commas, each passing check."""
    words = text.replace(",", " ").split()
    for word in words:
        if not check(word):
            raise ValueError("not %s: %r" % (what, word))
    return words


def parse_origins(text):
    """Origins (scheme://host[:port]), normalized, separated by spaces or
    commas."""
    origins = [normalize_origin(word) for word in text.replace(",", " ").split()]
    if None in origins:
        raise ValueError("each must be scheme://host[:port], like "
                         "https://deploy.example.com")
    return origins


def parse_matching(text, pattern, problem):
    """text, empty or matching pattern (else ValueError(problem))."""
    if text and not re.fullmatch(pattern, text):
        raise ValueError(problem)
    return text


def parse_root(text):
    """API_ROOT: a URL path, without its trailing slash."""
    if not text.startswith("/") or re.search(r"[\s?#%]", text):
        raise ValueError("must be a URL path starting with /")
    return text.rstrip("/")


def parse_window(text):
    """VERIFY_SECONDS: whole seconds from 0 to 86400 (a shell's $(( )))."""
    if not re.fullmatch(r"\d{1,6}", text) or int(text) > 86400:
        raise ValueError("must be a whole number of seconds from 0 to 86400")
    return int(text)


def parse_scripts_mode(text):
    """SCRIPTS: package or server."""
    if text not in ("package", "server"):
        raise ValueError("must be package or server")
    return text


def parse_path(text):
    """A path that must not be empty."""
    if not text:
        raise ValueError("must not be empty")
    return text


# Each kind of setting (SETTINGS' second field) and its parser: the text
# (stripped) -> the value, or ValueError saying what is wrong.  "run_as"
# is added by the Processes section, where RUN_AS's accounts are resolved.
SETTING_KINDS = {
    "int": parse_whole,
    "count": lambda text: parse_whole(text, least=1),
    "seconds": parse_seconds,
    "window": parse_window,
    "size": parse_size,
    "yesno": parse_yes_no,
    "names": lambda text: parse_words(text, re.compile(
        r"[A-Za-z_][A-Za-z0-9_]*\Z").match, "a variable name"),
    "projects": lambda text: parse_words(
        text, lambda word: word == "*" or is_project_name(word), "a project name"),
    "address": parse_listen,
    "file": lambda text: os.path.abspath(text) if text else "",
    "path": parse_path,
    "networks": lambda text: [ipaddress.ip_network(word, strict=False)
                              for word in text.replace(",", " ").split()],
    "origins": parse_origins,
    "url": lambda text: parse_matching(text, r"https?://[^\s/]+(/\S*)?",
                                       "must be an http:// or https:// URL"),
    "scripts": parse_scripts_mode,
    "syslog": lambda text: parse_matching(
        text, r"/.*|[^\s/:]+:\d+", "must be a socket path like /dev/log or host:port"),
    "root": parse_root,
}


def parse_setting(kind, text):
    """Turn the text of one setting of kind into its value.  Raises
    ValueError."""
    return SETTING_KINDS[kind](text.strip())


def load_settings(config_path=None, environ=None, warn=None):
    """Read settings: defaults, then the config file, then the environment.

    config_path None means IPD_CONFIG or /etc/ipd.conf, either of which
    may be absent; a path given explicitly must exist.  Returns Settings;
    raises ConfigError with a one-line reason naming file, line and key,
    UnknownSettings for names no setting has.  warn is kept for callers:
    nothing is only a warning any more.
    """
    environ = os.environ if environ is None else environ
    explicit = config_path or environ.get("IPD_CONFIG")
    path = explicit or DEFAULT_CONFIG
    sources = {key: (entry.default, "default") for key, entry in SETTINGS.items()}
    unknown = []
    if explicit or os.path.exists(path):
        for key, (value, number) in read_config_file(path).items():
            where = "%s:%d" % (path, number)
            if key not in SETTINGS:
                unknown.append("%s: unknown setting %s%s" % (
                    where, key, did_you_mean(key, SETTINGS)))
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
    if unknown:
        given = sources["LOG_DIR"][1] != "default"
        raise UnknownSettings(unknown, values["LOG_DIR"] if given else None)
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


def shut_quietly(sock, how):
    """sock.shutdown(how), to wake a read that waits on it; a socket
    closed already (or None) is fine."""
    if sock is not None:
        try:
            sock.shutdown(how)
        except OSError:
            pass


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
        """Hand a block to the hashing thread (at most two in flight)."""
        self.blocks.put(block)

    def close(self):
        """Wait for the hashing thread to take every block."""
        if self.thread.is_alive():
            self.blocks.put(None)
            self.thread.join()

    def hexdigest(self):
        """The SHA-256 of every block, once the thread has them all."""
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
        """The function's value once it has run; raises what it raised."""
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


def write_and_close(fd, data, mode=None, sync=False):
    """Write all of data to the open file fd, give it mode (when given),
    fsync it (with sync), and close it whatever happens."""
    try:
        write_all(fd, data)
        if mode is not None:
            os.fchmod(fd, mode)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path, data, mode=0o640):
    """Replace path with data: temporary file, fsync, rename, fsync folder."""
    folder = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                                     suffix=".tmp", dir=folder)
    try:
        write_and_close(fd, data, mode, sync=True)
        os.replace(temporary, path)
    except BaseException:
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
    """Bytes free for ipd's user on path's filesystem, or None."""
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


def json_structure(data):
    """The quotes, brackets and commas of JSON text (bytes), escaped
    quotes and backslashes dropped first: all that gives it its shape,
    with no object made per value, however hostile the text."""
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    return unescaped.translate(None, NOT_STRUCTURE)


def json_shape(marks):
    """(values, deepest nesting) of json_structure's marks, strings
    skipped: each array, object and comma counts as a value."""
    items = depth = deepest = 0
    in_string = False
    for mark in marks:
        if mark == QUOTE:
            in_string = not in_string
        elif in_string:
            continue
        elif mark in OPENING:
            depth += 1
            items += 1
            if depth > deepest:
                deepest = depth
        elif mark == COMMA:
            items += 1
        else:
            depth -= 1
    return items, deepest


def check_json_shape(data, what, max_items, max_depth=MAX_JSON_DEPTH):
    """Refuse JSON text (bytes) with more than max_items values or nested
    deeper than max_depth, before json.loads builds anything of it (only
    its json_structure is walked).  Raises BadRequest naming what."""
    marks = json_structure(data)
    if len(marks) > 8 * max_items + 64:  # a value has 2 quotes, a key 2 more
        raise BadRequest("%s has more than %d values" % (what, max_items))
    items, deepest = json_shape(marks)
    if deepest > max_depth:
        raise BadRequest("%s is nested more than %d deep" % (what, max_depth))
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


# The hashes a users file line may hold: the original's SHA-256 hex, and
# hash_password's PBKDF2 form.
KNOWN_HASH = re.compile(r"[0-9A-Fa-f]{64}\Z|pbkdf2_sha256\$[0-9]+\$[^$]+\$[0-9a-f]{64}\Z")


def hash_problem(name, password_hash):
    """What is wrong with a users file line's hash, or None: one neither
    form can match refuses every login of its user, silently (401)."""
    if KNOWN_HASH.match(password_hash):
        return None
    if KNOWN_HASH.match(password_hash.rstrip(" -")):
        return ("the hash of %s ends in ' -', as sha256sum prints it: cut "
                "it, keep the 64 hex digits" % name)
    return ("the hash of %s is neither 64 hex digits (sha256) nor "
            "pbkdf2_sha256$ITERATIONS$SALT$HASH: nobody can log in as %s; "
            "write it with 'ipd passwd'" % (name, name))


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
    return hash_problem(fields[1], fields[2])


class User:
    """One line of the users file."""

    def __init__(self, name, role, password_hash, projects=None):
        self.name = name
        self.role = role
        self.password_hash = password_hash
        self.projects = projects  # None: every project

    def may_use(self, project):
        """True when this user may deploy and follow project."""
        return (self.role == "ADMIN" or self.projects is None
                or project in self.projects)


def parse_users(text, source="users file"):
    """ROLE:username:hash[:project,...] lines -> ({name: User}, warnings)."""
    users, warnings = {}, []
    if text.startswith("\ufeff"):  # a byte order mark, as Windows' Notepad saves
        text = text[1:]
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


def logged(parsed):
    """The value of a parser's (value, warnings), each warning logged."""
    value, warnings = parsed
    for warning in warnings:
        log.warning("%s", warning)
    return value


class WatchedFile:
    """A small file ipd reads again whenever it changes on disk (its
    file_signature): the users file, the tokens file, OIDC_TRUST.

    read() -> (value, changed): parse(text) of the file as it now is, or
    missing() when it is gone or unreadable (logged, once a change, as
    what and what follows, when what is given); changed says it was read
    anew.  The lock guards the value and the signature it was read at, so
    a reload is seen whole or not at all.
    """

    def __init__(self, path, parse, missing, what=None, follows=""):
        self.path, self.parse, self.missing = path, parse, missing
        self.what, self.follows = what, follows
        self._lock = threading.Lock()
        self._signature = None
        self._value = missing()

    def read(self):
        signature = file_signature(self.path)
        with self._lock:
            if signature == self._signature:
                return self._value, False
            self._signature = signature
            self._value = self._parse_file() if signature else self._gone(
                "is missing")
            return self._value, True

    def _parse_file(self):
        try:
            with open(self.path, encoding="utf-8") as file:
                return self.parse(file.read())
        except (OSError, UnicodeDecodeError) as error:
            return self._gone("cannot be read: %s" % error)

    def _gone(self, why):
        if self.what:
            log.warning("%s %s %s: %s", self.what, self.path, why, self.follows)
        return self.missing()


class UserDB:
    """The users file, read again whenever it changes on disk.

    A verified password is remembered (as a keyed hash, never in clear) so
    that status polling does not pay PBKDF2 on every request.
    """

    def __init__(self, path):
        self.path = path
        self._file = WatchedFile(path, lambda text: logged(parse_users(text, path)),
                                 dict, "users file", "nobody can log in")
        self._lock = threading.Lock()  # guards the verified-password cache
        self._verified = {}
        self._cache_key = secrets.token_bytes(32)
        self._decoy = None

    def _current_users(self):
        """{name: User} as the file now says; a change empties the cache
        of verified passwords."""
        users, changed = self._file.read()
        if changed:
            with self._lock:
                self._verified = {}
        return users

    def decoy_hash(self):
        """A PBKDF2 hash of no one's password, checked for a login that
        fails before a PBKDF2 check of its own, so that every wrong login
        costs the same."""
        if self._decoy is None:
            self._decoy = hash_password(secrets.token_hex(16))
        return self._decoy

    def authenticate(self, name, password):
        """Return the User for a right name and password, else None."""
        user = self._current_users().get(name)
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
        self._lock = threading.Lock()  # guards _failures
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
        """Count a failed login from address."""
        with self._lock:
            now = time.monotonic()
            if len(self._failures) >= self.max_addresses:
                self._failures = {a: v for a, v in self._failures.items()
                                  if self._tokens(a, now) < self.burst}
            self._failures[address] = (self._tokens(address, now) - 1, now)


def check_name_for_config(project):
    """Raise ConfigError for a project name that cannot be in the users
    or tokens file."""
    if not is_project_name(project):
        raise ConfigError("bad project name %r" % project)


def rewrite_private(path, change, keep_mode=False):
    """Replace the file at path (the users or the tokens file) with
    change(its text, '' when there is none), atomically and under its
    FileLock: of two commands at once, each sees what the other wrote
    (issue 23).  Mode 0640, or with keep_mode the old file's less what
    others could read; root keeps its owner and group."""
    with FileLock(path):
        try:
            with open(path, encoding="utf-8") as file:
                text = file.read()
            info = os.stat(path)
        except FileNotFoundError:
            text, info = "", None
        mode = stat.S_IMODE(info.st_mode) & ~0o007 if info and keep_mode else 0o640
        write_file_atomic(path, change(text).encode(), mode)
        if info and os.geteuid() == 0:  # root edits it; the ipd user reads it
            os.chown(path, info.st_uid, info.st_gid)


def replace_user_line(text, name, record):
    """The users file's text with record instead of name's line."""
    kept = [line for line in text.splitlines()
            if line.strip().split(":")[1:2] != [name]
            or line.strip().startswith("#")]
    return "\n".join(kept + [record]) + "\n"


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
    rewrite_private(path, lambda text: replace_user_line(text, name, record),
                    keep_mode=True)  # under its lock: another passwd may be at it


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


def check_manifest_time(created, now=None):
    """Refuse a manifest dated ahead of this clock by more than a skew: it
    would be the project's newest signed release until that day, and
    every release signed before then would be refused as a rollback."""
    now = time.time() if now is None else now
    if created > now + MANIFEST_CLOCK_SKEW:
        raise Forbidden("the signed manifest is dated %s, more than %d s ahead of "
                        "this server's clock: check the signer's clock"
                        % (iso_time(created), MANIFEST_CLOCK_SKEW))


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
        """The token's line in the tokens file."""
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
    """The tokens file's text -> {id: Token}; lines that are not one are
    skipped."""
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
    """{token id: when last used} of the tokens file's .used beside it ({}
    when none)."""
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
        self._file = WatchedFile(path, parse_tokens, dict)  # none yet: quiet
        self._lock = threading.Lock()  # guards _used
        self._used = {}

    def authenticate(self, secret):
        """-> (User, None) for a good token; (None, reason) otherwise."""
        match = TOKEN_PATTERN.match(secret)
        tokens = self._file.read()[0]
        token = tokens.get(match.group(1)) if match else None
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
    at once, each sees what the other wrote (issue 23).  Raises ConfigError
    saying what to do when its folder is missing or not ours to write."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError("cannot write the tokens file %s: its folder %s does "
                          "not exist (create it, or give --tokens-db FILE or "
                          "set TOKENS_DB)" % (path, folder))

    def rewritten(text):
        tokens = list(parse_tokens(text).values())
        change(tokens)
        return "".join(token.line() + "\n" for token in tokens)
    try:
        rewrite_private(path, rewritten)
    except PermissionError:
        raise ConfigError("cannot write the tokens file %s: permission denied "
                          "(run this as the user ipd runs as, or as root)" % path)


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
# OpenID Connect ID tokens ####################################################
###############################################################################

# A CI job's ID token as a login, with no secret stored anywhere: GitHub
# Actions and GitLab CI give each job a JWT, signed RS256 by the CI, that
# says which repository, branch, workflow and environment it is.  The
# rules of OIDC_TRUST say which issuer, audience and claims may deploy
# which projects; the issuer's keys come from a JWKS file (jwks=PATH) or
# from its OpenID discovery over HTTPS, cached in UPLOAD_DIR/.oidc/.
# Verified by hand, strictly: RFC 7515 (compact JWS only), RFC 7518 3.3
# (RS256 is RSASSA-PKCS1-v1_5 with SHA-256), RFC 8017 8.2.2 and 9.2
# (EMSA-PKCS1-v1_5), RFC 7519 4.1 (exp, nbf, iat).

OIDC_MAX_TOKEN = 16384        # characters; GitHub's and GitLab's are ~1,200
OIDC_MAX_DEPTH = 8            # nesting of a token's header and claims JSON
OIDC_LEEWAY = 60              # seconds of clock skew on exp, nbf and iat
# An ID token that logged in to the registry before its exp stays good
# there this long past it, for the push it began: docker sends the one
# password of its login with each request and cannot ask for a fresh one.
# Verified whole each time but for exp; kept in memory, a token's hash.
OIDC_SESSION = 3600
OIDC_SESSIONS = 10000         # the most such tokens remembered at once
OIDC_MIN_BITS = 2048          # the smallest RSA key a token may be signed by
OIDC_REFETCH = 60             # an unknown kid fetches the keys at most this often
OIDC_FETCH_TIMEOUT = 5        # seconds for both fetches (discovery, then JWKS)
# Fetched keys are asked for again at a login once they are this old (an
# issuer withdraws a key that leaked); when that fetch fails they are
# still used until OIDC_KEYS_GRACE, then no more.
OIDC_KEYS_MAX_AGE = 3600
OIDC_KEYS_GRACE = 86400
OIDC_MAX_DOCUMENT = 1 << 20   # bytes of a discovery document or a JWKS
# RFC 8017 9.2, note 1: DER of the DigestInfo of SHA-256, before the hash.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
# Header parameters that would let a token choose its own key, or that
# ask for extensions ipd does not implement (RFC 7515 4.1): refused.
FORBIDDEN_HEADERS = ("jku", "jwk", "x5u", "x5c", "crit")
# The claims a deployment records (GitHub's, then GitLab's names).
OIDC_CLAIMS = ("repository", "ref", "sha", "workflow", "run_id", "run_attempt",
               "environment", "actor", "project_path", "pipeline_id", "job_id",
               "user_login")
# Short issuer names for the user name oidc:SHORT:SUB; any other issuer is
# its host name (and path).
SHORT_ISSUERS = {"https://token.actions.githubusercontent.com": "github",
                 "https://gitlab.com": "gitlab"}
CLAIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}\Z")
ISSUER_URL = re.compile(r"https://[A-Za-z0-9.-]+(:\d{1,5})?(/[^\s?#]*)?\Z")


class TokenRefused(Unauthorized):
    """An ID token that does not log in; the reason goes to the audit log
    only, the client gets the 401 of a wrong password."""


class LoginRefusal(str):
    """Why a login was refused (a str, as the other reasons), with the
    audit fields that come with it: for an ID token, its issuer."""

    def __new__(cls, reason, **audit):
        text = super().__new__(cls, reason)
        text.audit = audit
        return text


def looks_like_jwt(password):
    """True for what can only be a JWT: a base64url JSON header ('eyJ')
    and two dots; such a password is never taken as a user's."""
    return password.startswith("eyJ") and password.count(".") == 2


def short_issuer(issuer):
    """'github', 'gitlab', or the issuer's host and path (dots kept)."""
    if issuer in SHORT_ISSUERS:
        return SHORT_ISSUERS[issuer]
    parts = urllib.parse.urlsplit(issuer)
    return ((parts.hostname or "") + parts.path.rstrip("/")) or "issuer"


class TrustRule:
    """One line of OIDC_TRUST: tokens of issuer for audience whose claims
    match every glob may deploy projects (None: every project)."""

    def __init__(self, issuer, audience, projects, claims, jwks=None, line=0):
        self.issuer, self.audience, self.projects = issuer, audience, projects
        self.claims, self.jwks, self.line = claims, jwks, line

    def mismatch(self, claims):
        """None when claims match every CLAIM=GLOB, else which does not."""
        for name, pattern in self.claims:
            value = claims.get(name)
            if isinstance(value, (bool, int, float)):  # as JSON writes them
                value = json.dumps(value)
            if not isinstance(value, str):
                return "claim %s is missing" % name
            if not fnmatch.fnmatchcase(value, pattern):
                return "claim %s=%s does not match %s" % (
                    name, printable(value, 100), pattern)
        return None


def trust_line_rule(words, folder, number):
    """The TrustRule of one line's words; raises ValueError(why)."""
    if len(words) < 3:
        raise ValueError("expected ISSUER AUDIENCE PROJECTS CLAIM=GLOB... "
                         "[jwks=PATH]")
    issuer, audience, listed = words[:3]
    if not ISSUER_URL.match(issuer):
        raise ValueError("the issuer must be an https:// URL, not %r" % issuer[:80])
    projects = [p for p in listed.split(",") if p]
    for project in projects:
        if project != "*" and not is_project_name(project):
            raise ValueError("not a project name: %r" % project[:64])
    claims, jwks = [], None
    for word in words[3:]:
        name, equals, pattern = word.partition("=")
        if name == "jwks" and equals and pattern:
            jwks = os.path.join(folder, pattern)
        elif equals and CLAIM_NAME.match(name):
            claims.append((name, pattern))
        else:
            raise ValueError("expected CLAIM=GLOB or jwks=PATH, not %r" % word[:80])
    if not claims or not projects:
        # any job of GitHub or GitLab may ask for any audience: without a
        # claim to match, every repository there could deploy
        raise ValueError("a rule needs projects and at least one CLAIM=GLOB "
                         "(like repository=acme/web)")
    return TrustRule(issuer, audience, None if "*" in projects else frozenset(projects),
                     claims, jwks, number)


def parse_trust(text, source="OIDC_TRUST", folder="."):
    """OIDC_TRUST's text -> ([TrustRule], warnings); jwks paths are taken
    from folder (the file's own).  A bad line is one warning, ignored."""
    rules, warnings, sources = [], [], {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            rule = trust_line_rule(words, folder, number)
            # one source of keys an issuer: a test key file on a narrow rule
            # must not sign what a broader rule of the issuer admits
            if sources.setdefault(rule.issuer, rule.jwks) != rule.jwks:
                raise ValueError("its issuer's keys come from %s on an earlier "
                                 "line; give every rule of an issuer the same "
                                 "jwks=PATH, or none" % (
                                     sources[rule.issuer] or "discovery"))
            rules.append(rule)
        except ValueError as error:
            warnings.append("%s, line %d: %s; line ignored" % (source, number, error))
    return rules, warnings


class TrustDB:
    """The OIDC_TRUST file, read again whenever it changes (as the users
    file); a missing file trusts nobody."""

    def __init__(self, path):
        self.path = path
        folder = os.path.dirname(path)  # where its jwks=PATH are taken from
        self._file = WatchedFile(path, lambda text: logged(parse_trust(text, path, folder)),
                                 list, "OIDC_TRUST", "no ID token logs in")

    def rules(self):
        """The rules as the file now says."""
        return self._file.read()[0]


# --- keys: JSON Web Key Sets (RFC 7517), from a file or fetched

def no_constant(name):
    """parse_constant: NaN and Infinity are not JSON (RFC 8259 6)."""
    raise ValueError("%s is not a JSON number" % name)


def unique_keys(pairs):
    """object_pairs_hook: a JSON object naming a member twice is refused
    (RFC 7515 4: header parameter names must be unique)."""
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("a JSON object names a member twice")
    return data


def parse_json_bounded(data, depth=OIDC_MAX_DEPTH * 2):
    """UTF-8 JSON bytes -> value, nesting at most depth, no member named
    twice.  Raises ValueError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8")
    if json_shape(json_structure(data))[1] > depth:  # json.loads recurses
        raise ValueError("JSON nested deeper than %d" % depth)
    return json.loads(text, object_pairs_hook=unique_keys, parse_constant=no_constant)


def b64url_int(text):
    """A JWK's base64url big-endian number; raises ValueError."""
    if not isinstance(text, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,1400}", text):
        raise ValueError("not base64url")
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)),
                          "big")


def parse_jwks(data):
    """{kid: (n, e)} of the RSA signing keys of a JWKS (a dict); keys of
    other types, uses or algorithms are left out.  Raises ValueError."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JSON Web Key Set (no \"keys\" list)")
    keys = {}
    for key in data["keys"]:
        if not isinstance(key, dict) or key.get("kty") != "RSA":
            continue
        if key.get("use", "sig") != "sig" or key.get("alg", "RS256") != "RS256":
            continue
        kid = key.get("kid")
        try:
            n, e = b64url_int(key.get("n")), b64url_int(key.get("e"))
        except ValueError:
            continue
        if isinstance(kid, str) and e > 1 and e % 2 and n > e:
            keys[kid] = (n, e)
    return keys


def read_bounded(response):
    """The body of an http.client response, at most OIDC_MAX_DOCUMENT
    bytes.  Raises ValueError."""
    pieces, size = [], 0
    while True:
        piece = response.read1(65536)
        if not piece:
            return b"".join(pieces)
        size += len(piece)
        if size > OIDC_MAX_DOCUMENT:
            raise ValueError("larger than %d bytes" % OIDC_MAX_DOCUMENT)
        pieces.append(piece)


def fetch_json(url, context, deadline):
    """GET an https URL (no redirects) -> its JSON object, all of it
    before deadline (time.monotonic(); a server that trickles is cut off)
    and within OIDC_MAX_DOCUMENT bytes.  Raises ValueError(why)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError("%s is not an https:// URL" % printable(url, 200))
    left = max(0.1, deadline - time.monotonic())
    connection = http.client.HTTPSConnection(parts.hostname, parts.port,
                                             timeout=left, context=context)
    # time is up: end its socket, so that whatever read waits on it
    # (connect, TLS handshake, headers, body) ends now
    timer = threading.Timer(left, lambda: shut_quietly(connection.sock,
                                                       socket.SHUT_RDWR))
    timer.start()
    try:
        connection.request("GET", (parts.path or "/") + (
            "?" + parts.query if parts.query else ""), headers={
                "Accept": "application/json", "User-Agent": "ipd/" + __version__})
        response = connection.getresponse()
        if response.status != 200:
            raise ValueError("answered %d" % response.status)
        body = read_bounded(response)
    except (OSError, http.client.HTTPException, ValueError) as error:
        if time.monotonic() >= deadline:
            error = "no answer within %d s" % OIDC_FETCH_TIMEOUT
        raise ValueError("%s: %s" % (printable(url, 200), error))
    finally:
        timer.cancel()
        connection.close()
    if time.monotonic() >= deadline:
        raise ValueError("%s: no whole answer within %d s" % (
            printable(url, 200), OIDC_FETCH_TIMEOUT))
    data = parse_json_bounded(body)
    if not isinstance(data, dict):
        raise ValueError("%s is not a JSON object" % printable(url, 200))
    return data


class IssuerKeys:
    """The signing keys of each trusted issuer: from its rule's jwks=PATH
    (read again when the file changes), or fetched by OpenID discovery
    (ISSUER/.well-known/openid-configuration, then its jwks_uri) over
    HTTPS with certificate checks (OIDC_CA_FILE, else the system's CAs)
    and kept in cache_dir, one file an issuer, across restarts.

    A kid the keys lack fetches them again, at most once in OIDC_REFETCH
    seconds per issuer and daemon run: a flood of made-up kids costs the
    issuer one request a minute.  A fetch runs in the thread of the
    request that needs it, outside the lock, bounded by
    OIDC_FETCH_TIMEOUT: a hanging or garbage-answering issuer slows only
    logins with its tokens, and those at most that long.
    """

    def __init__(self, cache_dir, ca_file=""):
        self.cache_dir, self.ca_file = cache_dir, ca_file
        self._lock = threading.Lock()  # guards the four dicts below
        self._keys = {}       # issuer -> {kid: (n, e)}, as fetched or cached
        self._fetched = {}    # issuer -> time.time() when its keys were fetched
        self._attempted = {}  # issuer -> time.monotonic() of its last fetch
        self._fetching = {}   # issuer -> Event, set when its fetch ends
        self._files = {}      # jwks path -> (file_signature, {kid: (n, e)})
        self._context = None

    def key(self, issuer, kid, jwks=None):
        """(n, e) of issuer's key kid; raises TokenRefused."""
        keys = self._file_keys(jwks) if jwks else self._issuer_keys(issuer, kid)
        if not keys:
            raise TokenRefused("no keys of this issuer (see ipd.log: cannot fetch "
                               "the keys...)")
        if kid not in keys:
            raise TokenRefused("unknown kid %r" % printable(kid, 64))
        return keys[kid]

    def _file_keys(self, path):
        signature = file_signature(path)
        with self._lock:
            if path in self._files and self._files[path][0] == signature:
                return self._files[path][1]
        try:
            with open(path, "rb") as file:
                keys = parse_jwks(parse_json_bounded(file.read(OIDC_MAX_DOCUMENT)))
        except (OSError, ValueError) as error:
            log.error("cannot read the JWKS file %s: %s", path, error)
            raise TokenRefused("the issuer's JWKS file cannot be read")
        with self._lock:
            self._files[path] = (signature, keys)
        return keys

    def _issuer_keys(self, issuer, kid):
        """issuer's keys, fetched first when they lack kid and may be."""
        with self._lock:
            if issuer not in self._keys:
                self._keys[issuer], self._fetched[issuer] = self._read_cache(issuer)
            keys = self._usable(issuer)
            if kid in keys and time.time() - self._fetched[issuer] < OIDC_KEYS_MAX_AGE:
                return keys
            waiting = self._fetching.get(issuer)
            if waiting is None:
                last = self._attempted.get(issuer)
                if last is not None and time.monotonic() - last < OIDC_REFETCH:
                    return keys
                self._attempted[issuer] = time.monotonic()
                done = self._fetching[issuer] = threading.Event()
        if waiting is not None:  # another request fetches them: wait for it
            waiting.wait(OIDC_FETCH_TIMEOUT + 1)
            with self._lock:
                return self._usable(issuer)
        try:
            return self._fetch(issuer)
        finally:
            with self._lock:
                del self._fetching[issuer]
            done.set()

    def _usable(self, issuer):
        """issuer's keys, none once they are older than OIDC_KEYS_GRACE
        (held _lock)."""
        if time.time() - self._fetched.get(issuer, 0) >= OIDC_KEYS_GRACE:
            return {}
        return self._keys[issuer]

    def _fetch(self, issuer):
        """Fetch issuer's keys, keep them (memory and disk); -> the keys
        now usable: the old ones when the fetch fails (see _usable).  Both
        fetches share one OIDC_FETCH_TIMEOUT, and the key set must be on
        the issuer's own host."""
        deadline = time.monotonic() + OIDC_FETCH_TIMEOUT
        try:
            discovery = fetch_json(issuer.rstrip("/") +
                                   "/.well-known/openid-configuration",
                                   self.context(), deadline)
            if discovery.get("issuer") != issuer:
                raise ValueError("its discovery document names issuer %r"
                                 % printable(str(discovery.get("issuer")), 100))
            jwks_uri = str(discovery.get("jwks_uri", ""))
            if (urllib.parse.urlsplit(jwks_uri).hostname
                    != urllib.parse.urlsplit(issuer).hostname):
                raise ValueError("its jwks_uri %s is not on the issuer's host"
                                 % printable(jwks_uri, 200))
            jwks = fetch_json(jwks_uri, self.context(), deadline)
            keys = parse_jwks(jwks)
        except (ValueError, OSError) as error:  # OSError: OIDC_CA_FILE
            log.warning("cannot fetch the keys of OIDC issuer %s: %s", issuer, error)
            with self._lock:
                return self._usable(issuer)
        log.info("fetched %d key(s) of OIDC issuer %s: %s", len(keys), issuer,
                 ", ".join(sorted(keys))[:300])
        self._write_cache(issuer, jwks)
        with self._lock:
            self._keys[issuer], self._fetched[issuer] = keys, time.time()
        return keys

    def context(self):
        """The TLS context of the fetches: OIDC_CA_FILE, else the system's
        CAs; certificates and host names checked.  Raises OSError."""
        if self._context is None:
            self._context = ssl.create_default_context(cafile=self.ca_file or None)
        return self._context

    def cache_path(self, issuer):
        """Where issuer's fetched keys are kept: a name of its hash, as an
        issuer URL is no file name."""
        return os.path.join(self.cache_dir, hashlib.sha256(
            issuer.encode()).hexdigest()[:32] + ".json")

    def _read_cache(self, issuer):
        """(keys, when they were fetched) of issuer's cache file; ({}, 0)
        when there is none or it is not one."""
        try:
            with open(self.cache_path(issuer), "rb") as file:
                cached = parse_json_bounded(file.read(OIDC_MAX_DOCUMENT + 4096))
            fetched = cached.get("fetched")
            if cached.get("issuer") == issuer and isinstance(fetched, int):
                return parse_jwks(cached.get("jwks")), fetched
        except (OSError, ValueError, AttributeError):
            pass
        return {}, 0

    def _write_cache(self, issuer, jwks):
        try:
            os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
            write_file_atomic(self.cache_path(issuer), json.dumps(
                {"issuer": issuer, "fetched": int(time.time()), "jwks": jwks},
                sort_keys=True).encode(), 0o640)
        except OSError as error:
            log.warning("cannot cache the keys of OIDC issuer %s: %s", issuer, error)


# --- the token: compact JWS, RS256, claims

def b64url_bytes(text):
    """Bytes of unpadded base64url text (RFC 7515 2); raises TokenRefused."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise TokenRefused("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parse_compact_jws(token):
    """A compact JWS -> (header, claims, signing input, signature), both
    JSON objects bounded in size and nesting.  Raises TokenRefused."""
    if len(token) > OIDC_MAX_TOKEN:
        raise TokenRefused("token too large (%d characters, at most %d)"
                           % (len(token), OIDC_MAX_TOKEN))
    pieces = token.split(".")
    if len(pieces) != 3:
        raise TokenRefused("not a compact JWS (three parts)")
    try:
        header = parse_json_bounded(b64url_bytes(pieces[0]), OIDC_MAX_DEPTH)
        claims = parse_json_bounded(b64url_bytes(pieces[1]), OIDC_MAX_DEPTH)
    except ValueError as error:  # also binascii.Error
        raise TokenRefused("header or claims are not JSON: %s" % error)
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenRefused("header or claims are not JSON objects")
    return header, claims, (pieces[0] + "." + pieces[1]).encode(), \
        b64url_bytes(pieces[2])


def check_jws_header(header):
    """alg RS256, a kid, nothing that picks its own key; -> the kid.
    Raises TokenRefused."""
    if header.get("alg") != "RS256":
        raise TokenRefused("alg %r refused (only RS256)"
                           % printable(str(header.get("alg")), 20))
    for name in FORBIDDEN_HEADERS:
        if name in header:
            raise TokenRefused("header parameter %s refused" % name)
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenRefused("no kid in the header")
    return kid


def rsa_sha256_verify(n, e, message, signature):
    """True when signature is RSASSA-PKCS1-v1_5 with SHA-256 of message
    by key (n, e) (RFC 8017 8.2.2): the encoded message is rebuilt and
    compared whole, in constant time, so no parsing of it can be fooled."""
    size = (n.bit_length() + 7) // 8
    if len(signature) != size:
        return False
    number = int.from_bytes(signature, "big")
    if number >= n:
        return False
    encoded = pow(number, e, n).to_bytes(size, "big")
    digest_info = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    if size < len(digest_info) + 11:
        return False
    expected = (b"\x00\x01" + b"\xff" * (size - len(digest_info) - 3) + b"\x00" +
                digest_info)
    return hmac.compare_digest(encoded, expected)


def is_number(value):
    """True for a NumericDate ipd can compare and print: seconds since
    1970, before the year 5000 (a bool is no number)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and 0 <= value < 95617584000)


def check_token_times(claims, now):
    """exp required; exp, nbf and iat with OIDC_LEEWAY seconds of skew.
    Raises TokenRefused."""
    exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
    if not is_number(exp):
        raise TokenRefused("no exp claim")
    if now >= exp + OIDC_LEEWAY:
        raise TokenRefused("expired at %s" % iso_time(exp))
    for name, value in (("nbf", nbf), ("iat", iat)):
        if value is not None and not is_number(value):
            raise TokenRefused("%s is not a number" % name)
        if value is not None and value > now + OIDC_LEEWAY:
            raise TokenRefused("not valid yet (%s %s)" % (name, iso_time(value)))


def audience_matches(claims, audience):
    """aud equals audience, or is a list that holds it (RFC 7519 4.1.3)."""
    aud = claims.get("aud")
    return aud == audience or (isinstance(aud, list) and audience in aud)


class OidcUser(User):
    """A USER logged in by an ID token: scoped to its rules' projects,
    with the claims that say which job it is (oidc, for the record)."""

    def __init__(self, name, projects, oidc):
        super().__init__(name, "USER", "", projects)
        self.oidc = oidc


def oidc_fields(user):
    """{"oidc": claims} for a deployment made by an ID token, else {}."""
    oidc = getattr(user, "oidc", None)
    return {"oidc": dict(oidc)} if oidc else {}


def oidc_user(claims, rules):
    """The OidcUser of verified claims: named oidc:SHORT:SUB, scoped to
    the projects of every rule that admits it.  Raises TokenRefused."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise TokenRefused("no sub claim")
    admitting = [rule for rule in rules if audience_matches(claims, rule.audience)]
    if not admitting:
        raise TokenRefused("audience %s not trusted" % printable(
            json.dumps(claims.get("aud")), 100))
    mismatches = [rule.mismatch(claims) for rule in admitting]
    admitting = [rule for rule, why in zip(admitting, mismatches) if why is None]
    if not admitting:
        raise TokenRefused(mismatches[0])
    projects = None
    if all(rule.projects is not None for rule in admitting):
        projects = frozenset().union(*(rule.projects for rule in admitting))
    issuer = claims["iss"]
    recorded = {"issuer": issuer, "sub": printable(sub, 200)}
    recorded.update((name, printable(str(claims[name]), 200)) for name in OIDC_CLAIMS
                    if isinstance(claims.get(name), (str, int)))
    name = "oidc:%s:%s" % (short_issuer(issuer),
                           re.sub(r"[^A-Za-z0-9@._:/=+-]", "_", sub)[:200])
    return OidcUser(name, projects, recorded)


class OidcLogins:
    """ID tokens as logins: OIDC_TRUST's rules and the issuers' keys."""

    def __init__(self, trust_path, cache_dir, ca_file=""):
        self.trust = TrustDB(trust_path)
        self.keys = IssuerKeys(cache_dir, ca_file)
        self._lock = threading.Lock()  # guards _sessions
        self._sessions = {}  # SHA-256 of a token that logged in -> good until

    def _check_times(self, token, claims, now):
        """check_token_times, but a token that logged in before its exp is
        good until OIDC_SESSION past it (a push outlives its token)."""
        key = hashlib.sha256(token.encode()).digest()
        try:
            check_token_times(claims, now)
        except TokenRefused:
            with self._lock:
                if now < self._sessions.get(key, 0):
                    return
            raise
        with self._lock:
            if len(self._sessions) >= OIDC_SESSIONS:
                self._sessions = {k: until for k, until in self._sessions.items()
                                  if until > now}
            if len(self._sessions) < OIDC_SESSIONS:
                self._sessions[key] = claims["exp"] + OIDC_LEEWAY + OIDC_SESSION

    def authenticate(self, token, now=None, session=False):
        """-> (OidcUser, None), or (None, LoginRefusal with the issuer).
        session: a registry's request, for which a token that logged in
        (so) before its exp stays good OIDC_SESSION past it."""
        issuer = ""
        try:
            header, claims, signed, signature = parse_compact_jws(token)
            issuer = claims.get("iss") if isinstance(claims.get("iss"), str) else ""
            kid = check_jws_header(header)
            rules = [rule for rule in self.trust.rules() if rule.issuer == issuer]
            if not rules:
                raise TokenRefused("issuer not trusted (no rule in OIDC_TRUST)")
            jwks = next((rule.jwks for rule in rules if rule.jwks), None)
            n, e = self.keys.key(issuer, kid, jwks)
            if n.bit_length() < OIDC_MIN_BITS:
                raise TokenRefused("key %s has %d bits, fewer than %d" % (
                    printable(kid, 64), n.bit_length(), OIDC_MIN_BITS))
            if not rsa_sha256_verify(n, e, signed, signature):
                raise TokenRefused("bad signature")
            now = time.time() if now is None else now
            if session:
                self._check_times(token, claims, now)
            else:
                check_token_times(claims, now)
            return oidc_user(claims, rules), None
        except TokenRefused as error:
            return None, LoginRefusal("ID token refused: %s" % error,
                                      issuer=printable(issuer, 200))


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


class RequestBody:
    """What LengthBody and ChunkedBody share: pieces(), the one loop that
    reads a body, and on_first_read, the one place a client that waits
    (Expect: 100-continue) is told to send its body: at the first read,
    so that every check an endpoint makes before reading refuses the
    request before a byte of the body is sent (RFC 9110 10.1.1)."""

    on_first_read = None

    def _starting(self):
        if self.on_first_read is not None:
            tell, self.on_first_read = self.on_first_read, None
            tell()

    def pieces(self):
        """The body piece by piece, as (buffer, count): the buffer is
        reused, its first count bytes are the piece until the next one.
        Raises what readinto raises."""
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        while True:
            count = self.readinto(view)
            if not count:
                return
            yield buffer, count


class LengthBody(RequestBody):
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
        self._starting()
        # readinto1: what has arrived, at most one read of the socket, so
        # the parser sees data (and refuses bad input) as soon as it comes.
        count = self.rfile.readinto1(view[:min(len(view), self.remaining)])
        if not count:
            raise ClientGone("the body ended %d bytes early" % self.remaining)
        self.remaining -= count
        self.received += count
        return count


class ChunkedBody(RequestBody):
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
        """Fill view from the body; 0 at its end.  Raises ClientGone,
        BadRequest for a malformed one, TooLarge past the limit."""
        if self.finished:
            return 0
        self._starting()
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
        """Append data (bytes, or a buffer when not parallel) to the file
        and its hash."""
        self.sha256.update(data)
        try:
            write_all(self.fd, data)
        except OSError as error:
            raise disk_errors(error)
        self.size += len(data)

    def close(self):
        """Flush the file to disk and close it (it stays, for the commit to
        move)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self):
        """Close and remove the file: nothing of it is left."""
        self.close()
        if isinstance(self.sha256, ParallelHash):
            self.sha256.close()
        remove_quietly(self.path)

    def describe(self):
        """{name, size, sha256} of what was written."""
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
        """{name, size, sha256} of the earlier deployment's file."""
        return dict(self.meta)

    def discard(self):
        """Remove the link (or copy) made for the redeploy."""
        remove_quietly(self.path)


class LaterFile:
    """A file the worker builds from the deployment's recipe before the
    first step, of which only the name and size are known at the commit:
    a docker push's $IMAGE (#24), so that the manifest's PUT is answered
    without copying the image's bytes (DeployWorker.build_files)."""

    path = None  # nothing to move in

    def __init__(self, name, size):
        self.meta = {"name": name, "size": size}

    def describe(self):
        """{name, size}: no SHA-256 until it is built."""
        return dict(self.meta)

    def discard(self):
        """Nothing to remove: it is not written yet."""
        pass


class RecipeFile:
    """A pushed recipe in a temporary file, moved in beside the deployment's
    files like them (#16)."""

    def __init__(self, data, folder):
        fd, self.path = tempfile.mkstemp(prefix=".upload-", suffix=".recipe",
                                         dir=folder)
        write_and_close(fd, data, sync=True)

    def discard(self):
        """Remove the recipe's temporary file."""
        remove_quietly(self.path)


class FieldSink:
    """A text field kept in memory, with a small limit."""

    def __init__(self, field, limit=1024):
        self.field = field
        self.value = bytearray()
        self.limit = limit

    def write(self, data):
        """Append a text field's bytes; BadRequest past its limit."""
        self.value += data
        if len(self.value) > self.limit:
            raise BadRequest("form field %r is too long" % self.field)

    def close(self):
        """Nothing to close: the field is in memory."""

    def discard(self):
        """Nothing to remove: the field is in memory."""

    def text(self):
        """The field's value as text (UTF-8); BadRequest when it is not."""
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
        self.record = {}  # fields of its deployment's record (#24: image_ref)

    def discard(self):
        """Remove every temporary file of the upload (its files and recipe)."""
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
    sink = None
    try:
        for buffer, count in body.pieces():
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

    def _entry(self, name, what=None, target=""):
        """One more entry; -> its path components (member_parts).  Refuses
        an entry over MAX_MEMBERS, a name (or a link's target) over
        MAX_NAME_SIZE, and a what ('file', 'link') without a name."""
        self.members += 1
        if self.members > self.limits.MAX_MEMBERS:
            raise BadRequest("package has more than MAX_MEMBERS (%d) entries"
                             % self.limits.MAX_MEMBERS)
        if len(name.encode("utf-8", "surrogateescape")) > self.limits.MAX_NAME_SIZE:
            raise BadRequest("package entry %r...: name longer than "
                             "MAX_NAME_SIZE (%d bytes)"
                             % (name[:60], self.limits.MAX_NAME_SIZE))
        if len(target.encode("utf-8", "surrogateescape")) > self.limits.MAX_NAME_SIZE:
            raise BadRequest("package entry %r: link target longer than "
                             "MAX_NAME_SIZE" % name)
        parts = member_parts(name)
        if what and not parts:
            raise BadRequest("package entry %r: a %s without a name" % (name, what))
        return parts

    def _mkdir(self, parts):
        os.mkdir(self._path(parts), 0o755)
        os.chmod(self._path(parts), 0o755)  # whatever the umask: readable
        self.kinds[tuple(parts)] = "dir"

    def _prepare_parent(self, name, parts, over_file=True):
        """Make the folders above entry name (its parts) and refuse one
        given twice: over a folder or link, or (unless over_file: a file
        again replaces it) over a file."""
        for depth in range(1, len(parts)):
            prefix = tuple(parts[:depth])
            kind = self.kinds.get(prefix)
            if kind is None:
                self._mkdir(prefix)
            elif kind != "dir":
                raise BadRequest("package entry %r: goes through a %s"
                                 % (name, "symlink" if kind == "link" else "file"))
        existing = self.kinds.get(tuple(parts))
        if existing in ("dir", "link") or (existing and not over_file):
            raise BadRequest("package entry %r: given twice" % name)

    def directory(self, name, mode):
        """Make a folder of the package (mode given), inside the
        destination."""
        parts = self._entry(name)
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
        parts = self._entry(name, "file")
        self._prepare_parent(name, parts)
        path = self._path(parts)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        fd = os.open(path, flags, 0o600)
        try:
            for data in iter(lambda: source.read(CHUNK_SIZE), b""):
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
        """Make a symbolic link whose target stays inside the destination."""
        parts = self._entry(name, "link", target)
        if not target or target.startswith("/") or "\0" in target:
            raise BadRequest("package entry %r: link to an absolute path" % name)
        if tuple(parts) in self.traversed:
            raise BadRequest("package entry %r: a link where an earlier link's "
                             "target passes" % name)
        passed = self.resolve_link(name, parts[:-1], target)
        self._prepare_parent(name, parts, over_file=False)
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
        """Make a hard link to a file this package wrote earlier."""
        parts = self._entry(name)
        target_parts = member_parts(target)
        if self.kinds.get(tuple(target_parts)) != "file":
            raise BadRequest("package entry %r: hard link to %r, which is not "
                             "a file of the package" % (name, target))
        self._prepare_parent(name, parts, over_file=False)
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
        """Read up to size bytes of the decompressed stream."""
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
        """How many decompressed bytes were read."""
        return self.position

    def seek(self, offset, whence=os.SEEK_SET):
        """Go forward to offset by reading (the stream cannot go back)."""
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


# A '#!' line saved with Windows line ends: the kernel looks for the
# interpreter '/bin/sh\r' and the step fails with 'No such file or directory'.
CRLF_HINT = ("its #! line ends in CR (Windows line ends): convert it with "
             "dos2unix %s or sed -i 's/\\r$//' %s")


def has_crlf_shebang(path):
    """True when the file at path starts with a '#!' line ending in CR."""
    try:
        with open(path, "rb") as file:
            first = file.readline(256)
    except OSError:
        return False
    return first.startswith(b"#!") and first.rstrip(b"\n").endswith(b"\r")


# A script with no '#!' line: a shell would run it, but the kernel's exec
# does not (ENOEXEC, 'Exec format error'); an ELF program has no '#!'.
NO_SHEBANG_HINT = "it has no #! line: make its first line #!/bin/sh"


BOM_HINT = ("it starts with a byte order mark, which hides its #! line: save it "
            "without one (sed -i '1s/^\\xEF\\xBB\\xBF//' %s)")


def shebang_problem(path, shown="control.sh"):
    """Why exec would refuse the file at path though a shell runs it, with
    the fix, or None: neither a '#!' script nor an ELF program (a UTF-8
    byte order mark before '#!', as Windows editors save, is one)."""
    try:
        with open(path, "rb") as file:
            start = file.read(5)
    except OSError:
        return None
    if start.startswith(b"#!") or start.startswith(b"\x7fELF"):
        return None
    return BOM_HINT % shown if start.startswith(b"\xef\xbb\xbf#!") else NO_SHEBANG_HINT


def control_script_problem(path, shown="control.sh"):
    """Why the kernel would not run the script at path, with the fix, or
    None: a CRLF '#!' line, or no exec bit.  shown: how the fix names it."""
    if has_crlf_shebang(path):
        return CRLF_HINT % (shown, shown)
    problem = shebang_problem(path, shown)
    if problem:
        return problem
    try:
        if not os.stat(path).st_mode & 0o111:
            return "it is not executable: chmod +x %s" % shown
    except OSError:
        pass
    return None


def cannot_run_line(path, step, error):
    """The step log's line for a control.sh at path that the kernel would
    not start (error, from Popen), with the fix when it is known."""
    problem = control_script_problem(path)
    return ("ipd: cannot run control.sh %s: %s%s\n" % (
        step, getattr(error, "strerror", None) or error,
        "; " + problem if problem else "")).encode()


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
        if not os.path.isfile(real):
            raise BadRequest("control.sh of the %s is not an executable file"
                             % where)
        shown = "control.sh" if folder == unpacked else path
        if has_crlf_shebang(real):
            raise BadRequest("control.sh of the %s cannot run: %s"
                             % (where, CRLF_HINT % (shown, shown)))
        if not os.access(real, os.X_OK):
            raise BadRequest("control.sh of the %s is not an executable file: "
                             "chmod +x %s" % (where, shown))
        return path
    raise BadRequest("no control.sh: put one at the package's root, or in "
                     "the project folder on the server")


###############################################################################
# Processes: who runs the scripts, and what they leave ########################
###############################################################################

# RUN_AS and project.conf: the user, groups and capabilities the scripts
# run with; finding and stopping the processes a step leaves behind.


# UPLOAD_DIR/$PROJECT/project.conf: an administrator's SCRIPTS, RUN_AS and
# VERIFY_SECONDS for one project (KEY=VALUE lines, as /etc/ipd.conf).
PROJECT_CONF = "project.conf"
PROJECT_KEYS = ("SCRIPTS", "RUN_AS", "VERIFY_SECONDS")
# With RUN_AS, PROJECT_DIR is this folder of the project's: the one place
# its scripts may write.  The project folder itself, where control.sh,
# notify.sh and project.conf lie, stays the daemon's.
WORK_DIR = "work"
CAP_KILL, CAP_SETGID, CAP_SETUID = 5, 6, 7


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


def parse_run_as_setting(text):
    """RUN_AS: empty, or user[:group[,group...]] of existing accounts."""
    if text:
        resolve_run_as(text)  # raises ValueError naming what is unknown
    return text


# load_settings and project_settings check RUN_AS's accounts with the rest
SETTING_KINDS["run_as"] = parse_run_as_setting


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
    """{SCRIPTS, RUN_AS, VERIFY_SECONDS} of a project: the global settings,
    overridden by the project folder's project.conf.  Only a file an
    administrator could have placed counts: a regular file owned by root
    or ipd's user and not writable by group or others.  Raises IpdError (500) for another one,
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
                raise ConfigError("%s:%d: unknown setting %s%s: only %s may be "
                                  "set here" % (path, number, key,
                                                did_you_mean(key, PROJECT_KEYS),
                                                ", ".join(PROJECT_KEYS[:-1]) + " and "
                                                + PROJECT_KEYS[-1]))
            try:  # say where, as for an unknown name
                values[key] = parse_setting(SETTINGS[key][1], text)
            except ValueError as error:
                raise ConfigError("%s:%d: %s: %s" % (path, number, key, error))
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


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command's name (state, parent,
    process group, session, ...: the one reader of that file), or None
    when there is no such process."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
        return fields if len(fields) > 19 else None
    except (OSError, IndexError):
        return None


def process_start(pid):
    """Start time of a process in clock ticks since boot, or None."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None


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
    write_and_close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                            0o640), data)


def list_pids():
    """The pids of every process this one may see."""
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


def process_running(pid):
    """True while pid is a process that has not ended (a zombie has)."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != b"Z"


def session_members(session, field=3):
    """The pids running in session (zombies left out), whichever process
    group they moved to: what setsid() alone would take them out of.
    With field=2 (proc_stat's process group), those of a process group."""
    found = []
    for pid in list_pids():
        fields = proc_stat(pid)
        if fields and int(fields[field]) == session and fields[0] != b"Z":
            found.append(pid)
    return found


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


def leftovers_of(records, step_identity):
    """{deployment id: [pid, ...]} of what is left running of each record's
    step after ipd stopped (the one finder): the processes whose
    environment says DEPLOY=id (our own user's) and those of the session
    its step started (step_identity(record): another user's too)."""
    found = processes_of_deployments([record.id for record in records])
    for record in records:
        left = set(found.get(record.id, [])) | set(
            processes_of_session(step_identity(record)))
        found[record.id] = sorted(left)
    return found


def stop_processes(pids, grace):
    """SIGTERM pids, SIGKILL those still running after grace seconds, and
    return once they have ended: SIGKILL is not instant on a busy machine
    (a process in the kernel, state D, ends when it leaves it), so what
    comes next (a state that says they were stopped) waits for it, up to
    a minute more."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, max(grace, 60))):
        for pid in pids:
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while any(process_running(pid) for pid in pids):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
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
    return bool(session_members(group, field=2))


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
# Deployments: the type and the one owner of their state #####################
###############################################################################

# What a deployment is (Deployment), and the one object that owns every
# deployment's state (DeploymentStore): records on disk first, the queue of
# waiting and running ones, cancel requests, and the counters (Counters).


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
        """What the API tells of a deployment (times as ISO 8601); of one
        pushed with an ID token, its claims (oidc); of a reverted one, its
        rollback's ID (rollback), and of a rollback, what it undoes
        (rollback_of)."""
        duration = None
        if self.started and self.ended:
            duration = round(self.ended - self.started, 3)
        public = {
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
        # an ID token's claims; verify's rollback (#25)
        for name in ("oidc", "rollback", "rollback_of"):
            if name in self.others:
                public[name] = self.others[name]
        return public

    def files_to_build(self):
        """The names of its files that the worker is still to build (a
        docker push's $IMAGE, LaterFile: no SHA-256 until then)."""
        return [name for name, meta in sorted(self.files.items()) if "sha256" not in meta]

    def copy(self):
        """A copy that shares nothing changeable with this one."""
        return self.replace()

    def replace(self, **changes):
        """A copy with changes (any field, named or not); what it holds in
        lists and dicts is copied too, so that no change to it reaches
        the store's own."""
        deployment = Deployment.__new__(Deployment)
        for key in self.FIELDS:  # then a copy of each list and dict
            setattr(deployment, key, getattr(self, key))
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


def summarize(values):
    """count, mean, median, max of a sorted list of seconds."""
    if not values:
        return {"count": 0, "mean": None, "median": None, "max": None}
    return {"count": len(values),
            "mean": round(sum(values) / len(values), 3),
            "median": round(values[len(values) // 2], 3),
            "max": round(values[-1], 3)}


def escape_label(value):
    """A Prometheus label value, escaped for the text format."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


STEP_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


def observe_step(steps, step, seconds):
    """Count a step's time into steps ({step: [per bucket (not yet
    cumulative)..., +Inf, sum]})."""
    if seconds is None:
        return
    counts = steps.setdefault(step, [0] * (len(STEP_BUCKETS) + 2))
    counts[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1
    counts[-1] += seconds


class Counters:
    """The figures behind /stat and /metrics.

    It has no lock of its own: only DeploymentStore changes and reads it,
    under the store's _lock and in the same step as the state it counts,
    so that no figure is ever behind a state a reader can see.
    """

    def __init__(self):
        self.deployments = collections.Counter()  # (project, state) -> number
        self.steps = {}           # step -> [per bucket..., +Inf, sum]
        self.last_success = {}    # project -> end time of its latest ok
        self.durations = []       # seconds of the latest finished deployments
        self.uploads = 0          # uploads accepted (not redeploys)
        self.bytes_received = 0   # their bytes, as received

    def count(self, old, new):
        """Count new, and old no more (old is None for a new or loaded
        record): states, the steps new has run since old, its end."""
        project = new.project
        if old is not None:
            self.deployments[(project, old.state)] -= 1
        self.deployments[(project, new.state)] += 1
        for step in new.steps[len(old.steps) if old else 0:]:
            observe_step(self.steps, step["step"], step.get("seconds"))
        if new.state == "ok" and new.ended:
            self.last_success[project] = max(new.ended,
                                             self.last_success.get(project, 0))
        if (old is None or old.ended is None) and new.ended and new.started:
            self.durations.append(new.ended - new.started)
            del self.durations[:-1000]

    def add_cold(self, project, cold):
        """Count a loaded project's cold records (ColdFigures) in, but for
        their durations (the store takes the newest of all)."""
        for state, count in cold.states.items():
            self.deployments[(project, state)] += count
        for step, counts in cold.steps.items():
            mine = self.steps.setdefault(step, [0] * (len(STEP_BUCKETS) + 2))
            self.steps[step] = [a + b for a, b in zip(mine, counts)]
        if cold.last_success:
            self.last_success[project] = max(cold.last_success,
                                             self.last_success.get(project, 0))

    def statistics(self):
        """{'deployments': how many, 'states': {state: how many},
        'durations': summarize() of the latest 1000 that ended, 'uploads',
        'bytes_received'}."""
        states = {}
        for (_, state), count in self.deployments.items():
            states[state] = states.get(state, 0) + count
        return {"deployments": sum(states.values()),
                "states": {state: count for state, count
                           in sorted(states.items()) if count},
                "durations": summarize(sorted(self.durations)),
                "uploads": self.uploads, "bytes_received": self.bytes_received}

    def render(self, gauges, counters):
        """Prometheus text format (version 0.0.4): these figures, then the
        gauges and counters given ({name: (help text, value)})."""
        lines = []

        def family(name, kind, text, samples):
            """One metric family: samples are (name suffix, labels, value)."""
            lines.append("# HELP %s %s\n# TYPE %s %s\n" % (name, text, name, kind))
            for suffix, labels, value in samples:
                label_text = ",".join('%s="%s"' % (key, escape_label(str(v)))
                                      for key, v in labels)
                lines.append("%s%s%s %s\n" % (name, suffix, "{%s}" % label_text
                                              if label_text else "", value))
        family("ipd_deployments", "gauge", "Deployments by project and state.",
               [("", (("project", p), ("state", st)), n)
                for (p, st), n in sorted(self.deployments.items()) if n])
        histogram = []
        for step, counts in sorted(self.steps.items()):
            cumulative = list(itertools.accumulate(counts[:-1]))  # +Inf last
            histogram += [("_bucket", (("step", step), ("le", bound)), count)
                          for bound, count in zip(STEP_BUCKETS + ("+Inf",), cumulative)]
            histogram += [("_sum", (("step", step),), "%.3f" % counts[-1]),
                          ("_count", (("step", step),), cumulative[-1])]
        family("ipd_step_duration_seconds", "histogram", "Time control.sh steps took.",
               histogram)
        family("ipd_last_success_timestamp_seconds", "gauge",
               "When the latest successful deployment of a project ended.",
               [("", (("project", p),), "%.3f" % t)
                for p, t in sorted(self.last_success.items())])
        for name, (text, value) in sorted(gauges.items()):
            family(name, "gauge", text, [("", (), value)])
        for name, (text, value) in sorted(counters.items()):
            family(name, "counter", text, [("", (), value)])
        return "".join(lines)


# A project's records fall in two kinds.  Hot ones may still change or keep
# files: unfinished, not pruned, or the project's latest; the store holds
# them whole (at most KEEP_DEPLOYMENTS and a few a project).  Cold ones are
# finished and pruned and never change again: the store keeps only figures
# of them (how many, their sequence numbers, the newest success, signed
# manifests' nonces) and reads one's state file when it is asked for.
def is_cold(record):
    """True for a record that can change no more and holds no files."""
    return record.pruned and record.state not in UNFINISHED


# Each project's deployments/index.cache holds what a start-up needs of it:
# its hot records, each with its state file's mtime, and the cold ones'
# figures (ColdFigures).  It is a cache, never trusted over the files: it is
# given the folder's mtime when written and set to 0 before the first change
# after a start, so a start-up reads it alone only while the folder is as
# it saw it, and otherwise every state file it cannot vouch for.
INDEX_FILE = "index.cache"
INDEX_FORMAT = 2


def read_index(folder):
    """(index dict, fresh) of a deployments folder: fresh when the folder
    is as the index saw it; (None, False) when there is none or a torn
    one; only 'hot' of an older ipd's index (all its records)."""
    try:
        with open(os.path.join(folder, INDEX_FILE), encoding="utf-8") as file:
            mtime = os.fstat(file.fileno()).st_mtime_ns
            data = json.load(file)
        if isinstance(data, dict) and data.get("version") == 1:
            # an older ipd's: its records, by mtime, save reading their files
            return {"hot": data.get("records")}, False
        if (not isinstance(data, dict) or data.get("version") != INDEX_FORMAT
                or data.get("buckets") != list(STEP_BUCKETS)):
            return None, False
        return data, mtime != 0 and mtime == os.stat(folder).st_mtime_ns
    except (OSError, ValueError):
        return None, False


def write_index(folder, hot, mtimes, cold):
    """Write folder's index (no fsync: a torn one is ignored), then give it
    the folder's mtime, which vouches for it until the folder changes."""
    path = os.path.join(folder, INDEX_FILE)
    temporary = os.path.join(folder, ".%s.%d.part" % (INDEX_FILE, os.getpid()))
    try:
        text = json.dumps({  # dumps: the C encoder
            "version": INDEX_FORMAT, "buckets": STEP_BUCKETS, "cold": cold.to_disk(),
            "hot": {record.id: [mtimes[record.id], record.to_disk()] for record in hot},
        }, separators=(",", ":"))
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
        mtime = os.stat(folder).st_mtime_ns
        os.utime(path, ns=(mtime, mtime))
    except OSError as error:
        log.warning("cannot write %s: %s", path, error)
        remove_quietly(temporary)


def file_stamp(info):
    """What the index keeps of a state file's os.stat: [mtime_ns, size,
    inode]; None for one written in the last 2 s, whose mtime a later
    rewrite in the same clock tick could leave as it is."""
    if time.time() - info.st_mtime < 2:
        return None
    return [info.st_mtime_ns, info.st_size, info.st_ino]


def stamp_matches(stamp, info):
    """True when a state file (its os.stat) is as the index saw it: its
    stamp, or the mtime alone that an older ipd's index kept."""
    if isinstance(stamp, int):
        return stamp == info.st_mtime_ns
    return stamp is not None and stamp == [info.st_mtime_ns, info.st_size, info.st_ino]


def mark_index_stale(folder):
    """The folder is about to change: its index vouches for it no more."""
    try:
        os.utime(os.path.join(folder, INDEX_FILE), ns=(0, 0))
    except OSError:
        pass


def cached_deployment(data):
    """The Deployment of an index entry, or None when it is not one."""
    try:
        return Deployment.from_disk(data)
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


class ColdFigures:
    """What a start-up learns of a project's cold records, kept in its index:
    their ids and sequence numbers, counts by state, step times (as
    Counters keeps them), the latest success, the latest ok one's sequence
    number, the newest signed manifest time among the ok ones, the nonces,
    and the newest 1,000 durations as [seq, seconds]."""

    FIELDS = ("ids", "seqs", "states", "steps", "last_success", "last_ok_seq",
              "signed_newest", "nonces", "durations")

    def __init__(self, data=None):
        """Empty, or from an index's dict; raises TypeError, KeyError or
        ValueError for one that is not of this form."""
        self.seqs, self.nonces, self.durations = [], [], []
        self.states, self.steps = {}, {}
        self.last_success = self.last_ok_seq = None
        self.signed_newest = 0
        self._ids, self._id_text = [], ""
        if data is not None:
            for key in self.FIELDS[1:]:
                setattr(self, key, data[key])
            # the ids as one string: a start-up that trusts the index
            # makes no object of each (see ids)
            self._ids, self._id_text = None, data["ids"]
            if not (all(isinstance(getattr(self, key), list) for key in
                        ("seqs", "nonces", "durations"))
                    and isinstance(self.states, dict) and isinstance(self.steps, dict)
                    and isinstance(self._id_text, str)):
                raise TypeError("not the cold figures of an index")

    @property
    def ids(self):
        """The cold records' ids, in the order of seqs."""
        if self._ids is None:
            self._ids = self._id_text.split()
        return self._ids

    def fold(self, record):
        """Count a cold record in."""
        self.ids.append(record.id)
        self.seqs.append(record.seq)
        self.states[record.state] = self.states.get(record.state, 0) + 1
        for step in record.steps:
            observe_step(self.steps, step["step"], step.get("seconds"))
        if record.state == "ok":
            self.last_ok_seq = max(record.seq, self.last_ok_seq or 0)
            if record.ended:
                self.last_success = max(record.ended, self.last_success or 0)
            if record.signer:
                self.signed_newest = max(self.signed_newest,
                                         record.signer.get("created", 0))
        if record.signer and record.signer.get("nonce"):
            self.nonces.append(record.signer["nonce"])
        if record.started and record.ended:
            self.durations.append([record.seq, record.ended - record.started])

    def to_disk(self):
        """The figures as the index keeps them (the newest durations)."""
        self.durations = sorted(self.durations)[-1000:]
        return dict({key: getattr(self, key) for key in self.FIELDS[1:]},
                    ids=" ".join(self.ids))


class ProjectLedger:
    """What the store keeps of one project: its hot records' ids in upload
    order and its latest's; of its cold ones only how many, their sequence
    numbers (sorted), the latest ok one's, the newest signed manifest time
    among the ok ones; the nonces of all its signed manifests; whether its
    index still vouches for its folder."""

    __slots__ = ("hot", "latest", "cold_count", "cold_seqs", "cold_last_ok_seq",
                 "cold_signed_newest", "nonces", "index_fresh")

    def __init__(self, cold=None):
        self.hot = {}  # id -> None, in upload order (a dict: removal in O(1))
        self.latest = None
        cold = cold or ColdFigures()
        self.cold_count = len(cold.seqs)
        self.cold_seqs = array.array("q", sorted(cold.seqs))
        self.cold_last_ok_seq = cold.last_ok_seq
        self.cold_signed_newest = cold.signed_newest
        self.nonces = set(cold.nonces)
        self.index_fresh = False

    def count(self):
        """How many deployments the project has, hot and cold."""
        return self.cold_count + len(self.hot)

    def cold_newer_than(self, seq):
        """How many cold records came after seq."""
        return len(self.cold_seqs) - bisect.bisect_right(self.cold_seqs, seq)

    def make_cold(self, record):
        """record (hot until now) can change no more: count it as cold."""
        del self.hot[record.id]
        self.cold_count += 1
        bisect.insort(self.cold_seqs, record.seq)
        if record.state == "ok":
            self.cold_last_ok_seq = max(record.seq, self.cold_last_ok_seq or 0)
            if record.signer:
                self.cold_signed_newest = max(self.cold_signed_newest,
                                              record.signer.get("created", 0))


def upload_identity(files, others):
    """What makes an upload the same as a waiting or running deployment
    (then it is not queued twice: a retried push): a docker push's
    manifest and the name it was pushed as (#24; its $IMAGE is built by
    the worker, so no SHA-256 is known yet), else its files' SHA-256s."""
    if "image_digest" in others:
        return others["image_digest"], others.get("image_ref")
    return {name: meta.get("sha256") for name, meta in files.items()}


class DeploymentStore:
    """The one owner of deployment state: every deployment's record (on
    disk first), which ones wait and which run, the cancel requests of
    running ones, and the counters of /stat and /metrics.

    Records are Deployments; callers get copies, never the store's own.
    Every change of a deployment goes through _change() (or commit() for
    a new one), which does, in this order and one change at a time:

    1. write ID.json atomically: a state once answered survives any crash;
    2. log it and append its audit event: the audit log has every change
       before anyone can see it, in the order they were made;
    3. under _lock, at once: the record, the queue (waiting and running
       follow the state) and the counters; then wake the waiters.  A
       reader therefore never sees a state without all that follows from
       it (no /stat behind a state, no cancel of what has ended);
    4. after both locks are let go: a final state is handed to after_final
       (notify.sh, NOTIFY_URL), which may be slow or fail and can stop
       nothing.

    Per project at most one deployment waits (a newer upload supersedes
    it: 'changed') and one runs; claim() gives the worker the oldest
    waiting one of a project that runs none.  Memory holds the hot records
    whole and figures of the cold ones (see is_cold): a cold record is
    read from its state file when asked for.
    """

    def __init__(self, upload_dir, keep, after_final=None):
        self.upload_dir = upload_dir
        self.keep = keep                # KEEP_DEPLOYMENTS
        self.after_final = after_final  # called with a copy of each final state
        # One change at a time, from writing its file to showing it, so
        # that the disk, the audit log and memory see changes in the same
        # order.  Taken before _lock, never while _lock is held; it also
        # guards _next_seq and the ledgers' index_fresh.
        self._change_lock = threading.Lock()
        # Guards everything in memory below; held only to read or apply a
        # change, never for I/O.  wait_final() and claim() wait on it.
        self._lock = threading.Condition()
        self._hot = {}            # id -> Deployment, of the hot records
        self._ledgers = {}        # project -> ProjectLedger
        self._next_seq = 1
        self._waiting = {}        # project -> id of its waiting deployment
        self._running = {}        # project -> id of its running deployment
        self._cancels = {}        # id of a claimed deployment -> Event
        self._stopping = False
        self._counters = Counters()

    # --- paths

    def project_dir(self, project):
        """UPLOAD_DIR/PROJECT: the administrator's control.sh, notify.sh,
        project.conf, and deployments/."""
        return os.path.join(self.upload_dir, project)

    def deployments_dir(self, project):
        """Where project's deployments' folders, files and states are."""
        return os.path.join(self.upload_dir, project, "deployments")

    def path(self, record, suffix=""):
        """Folder of a deployment, or its file with suffix ('.log', ...)."""
        return os.path.join(self.deployments_dir(record.project),
                            record.id + suffix)

    # --- loading

    def load(self, kill_grace=10):
        """Rebuild state from UPLOAD_DIR after a start, a crash or kill -9.

        Torn uploads are removed; what waited waits again, in upload order
        (of a project's several, the older are superseded: 'changed'); a
        deployment that was running becomes 'interrupted' and what is left
        of its control.sh is stopped, so that it never overlaps the
        project's next deployment.  Returns the number of deployments.
        Called once, before any other thread uses the store.
        """
        os.makedirs(self.upload_dir, exist_ok=True)
        hot, durations = [], []
        for entry in os.scandir(self.upload_dir):
            if entry.name.startswith(".upload-"):
                log.info("removing torn upload %s", entry.name)
                remove_quietly(entry.path)
            elif is_project_name(entry.name) and entry.is_dir():
                records, cold = self._load_project(entry.name)
                if records:
                    self._add_project(entry.name, cold)
                    hot.extend(records)
                    durations.extend(cold.durations)
        hot.sort(key=lambda r: r.seq)
        superseded = self._queue_loaded(hot)
        durations.extend([r.seq, r.ended - r.started] for r in hot
                         if r.started and r.ended)
        self._counters.durations = [seconds for _, seconds in sorted(durations)[-1000:]]
        for older, newer in superseded:
            self.update(older, state="changed", ended=time.time(),
                        superseded_by=newer)
        self._interrupt([r for r in hot if r.state == "active"], kill_grace)
        return sum(ledger.count() for ledger in self._ledgers.values())

    def _add_project(self, project, cold):
        """Take a loaded project's cold figures into its ledger and counters."""
        ledger = self._ledgers[project] = ProjectLedger(cold)
        ledger.index_fresh = True  # fresh, or written anew just now (it has records)
        self._counters.add_cold(project, cold)
        if cold.seqs:
            self._next_seq = max(self._next_seq, max(cold.seqs) + 1)

    def _queue_loaded(self, records):
        """Apply the loaded hot records in upload order; -> [(older, newer)]
        of the waiting ones a newer one supersedes."""
        superseded = []
        with self._lock:
            for record in records:
                older = self._waiting.get(record.project)
                if record.state == "await" and older is not None:
                    superseded.append((older, record.id))
                self._next_seq = max(self._next_seq, record.seq + 1)
                self._apply(None, record)
        return superseded

    def _interrupt(self, records, kill_grace):
        """Stop what is left of each deployment that ran at a stop, and
        record it 'interrupted'."""
        leftovers = leftovers_of(records, lambda record: read_step_identity(
            self.path(record, ".step")))
        for record in records:
            pids = leftovers[record.id]
            if pids:
                log.warning("stopping what was left running of deployment %s",
                            record.id)
                stop_processes(pids, kill_grace)
            # One stopped in verify is live but was never judged: it is
            # not taken as holding (the Daemon then queues its rollback).
            unjudged = "verify_started" in record.others and not record.others.get(
                "verified")
            state = "reverted" if unjudged else "interrupted"
            self.update(record.id, state=state, ended=time.time())
            log.info("deployment %s of %s was running at a stop: %s",
                     record.id, record.project, state)

    def _load_project(self, project):
        """-> (hot records, ColdFigures) of project: from its index
        alone while it vouches for the folder; otherwise from every state
        file it cannot vouch for, the index then written anew."""
        folder = self.deployments_dir(project)
        index, fresh = read_index(folder)
        try:
            cold = ColdFigures(index.get("cold") if index else None)
            cached = dict(index["hot"]) if index else {}
            if fresh and self._unchanged(project, cached):
                records = [cached_deployment(entry[1]) for entry in cached.values()]
                if records and None not in records:
                    return records, cold
        except (KeyError, TypeError, ValueError, IndexError):
            cold, cached = ColdFigures(), {}
        return self._scan_project(project, cold, cached)

    def _unchanged(self, project, cached):
        """True when each of the index's hot records' state files is as it
        was (its stamp): a file rewritten in place leaves the folder's
        mtime as it was."""
        folder = self.deployments_dir(project)
        for deployment_id, (stamp, _) in cached.items():
            try:
                info = os.stat(os.path.join(folder, deployment_id + ".json"))
            except OSError:
                return False
            if not stamp_matches(stamp, info):
                return False
        return True

    def _scan_project(self, project, cold, cached):
        """_load_project's slow way: read the state files that neither cold
        (the index's figures) nor cached (its hot records, by mtime) vouch
        for; remove torn writes and the files of uploads that never got a
        state file; write the index anew."""
        folder = self.deployments_dir(project)
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return [], cold
        names = {entry.name for entry in entries}
        if not all(deployment_id + ".json" in names for deployment_id in cold.ids):
            cold = ColdFigures()  # a state file it counted is gone: count anew
        counted = set(cold.ids)
        records, mtimes = [], {}
        for entry in entries:
            stem, dot, suffix = entry.name.partition(".")
            if entry.name.startswith("."):  # a torn atomic write
                remove_quietly(entry.path)
            elif suffix == "json" and DEPLOYMENT_ID.match(stem) and stem not in counted:
                info = entry.stat()
                mtimes[stem] = file_stamp(info)
                cached_stamp, cached_record = cached.get(stem, (None, None))
                record = (cached_deployment(cached_record)
                          if stamp_matches(cached_stamp, info) else None)
                record = record or self._read_record(entry.path, project, stem)
                if record:
                    records.append(record)
            elif stem + ".json" not in names and DEPLOYMENT_ID.match(stem):
                # Files moved in by an upload that died before its record
                # was written: that deployment never existed.
                remove_quietly(entry.path)
        if counted and not records:  # the latest must be hot: count anew
            return self._scan_project(project, ColdFigures(), {})
        records.sort(key=lambda r: r.seq)
        hot = []
        for record in records[:-1]:
            if is_cold(record):
                cold.fold(record)
            else:
                hot.append(record)
        hot += records[-1:]  # the latest stays hot
        if hot:
            write_index(folder, hot, mtimes, cold)
        return hot, cold

    def _read_record(self, path, project, deployment_id):
        """The Deployment of a state file, or None (logged) for one that is
        unreadable, not this deployment's, or written by a newer ipd."""
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

    def _read_cold(self, project, deployment_id):
        """A cold record of project from its state file, or None."""
        if not DEPLOYMENT_ID.match(deployment_id or ""):
            return None
        path = os.path.join(self.deployments_dir(project), deployment_id + ".json")
        if not os.path.exists(path):
            return None
        return self._read_record(path, project, deployment_id)

    # --- the one place a change is made

    def _apply(self, old, new):
        """Make new the record (old: what it was, None for a new or loaded
        one): the queue and the counters follow its state, a record that
        can change no more turns cold, and the waiters wake.  Called with
        _lock held."""
        project = new.project
        ledger = self._ledgers.get(project) or self._ledgers.setdefault(
            project, ProjectLedger())
        self._hot[new.id] = new
        if old is None:
            ledger.hot[new.id] = None
            previous, ledger.latest = ledger.latest, new.id
            if previous and is_cold(self._hot[previous]):
                ledger.make_cold(self._hot.pop(previous))
        if new.signer and new.signer.get("nonce"):
            ledger.nonces.add(new.signer["nonce"])
        if old is None or old.state != new.state:
            if new.state == "await":
                self._waiting[project] = new.id
            elif self._waiting.get(project) == new.id:
                del self._waiting[project]
            if new.state == "active":
                self._running[project] = new.id
            elif self._running.get(project) == new.id:
                del self._running[project]  # ended: the next one may run
        if new.id != ledger.latest and is_cold(new):
            ledger.make_cold(self._hot.pop(new.id))
        self._counters.count(old, new)
        self._lock.notify_all()

    def _before_change(self, project):
        """Called with _change_lock held before project's folder changes:
        its index vouches for it no more."""
        ledger = self._ledgers.get(project)
        if ledger is not None and ledger.index_fresh:
            mark_index_stale(self.deployments_dir(project))
            ledger.index_fresh = False

    def _tell(self, old, new):
        """Step 2 of a change: the daemon's log and the audit log."""
        if new.state != old.state:
            log.info("deployment %s of %s: %s -> %s", new.id, new.project,
                     old.state, new.state)
            audit_event("state", project=new.project, deployment=new.id,
                        previous=old.state, state=new.state)

    def _change(self, deployment_id, **changes):
        """Steps 1-3 of a change (see the class) of a hot record: -> (old,
        new).  Called with _change_lock held; what is on disk is never
        behind memory."""
        with self._lock:
            old = self._hot[deployment_id]
        new = old.replace(**changes)
        self._before_change(new.project)
        write_file_atomic(self.path(new, ".json"), new.encode())
        self._tell(old, new)
        with self._lock:
            self._apply(old, new)
        return old, new

    def _after(self, old, new):
        """Step 4: a final state's side effects, outside the locks.  Whatever
        they raise is logged: they can never stop a deployment."""
        if (self.after_final and new.state != old.state
                and new.state not in UNFINISHED):
            try:
                self.after_final(new.copy())
            except Exception:
                log.exception("telling the end of deployment %s failed", new.id)

    def update(self, deployment_id, **changes):
        """Change a deployment's fields (see the class for what follows);
        -> a copy of the new record.  KeyError for one that is cold (it
        can change no more) or unknown."""
        with self._change_lock:
            old, new = self._change(deployment_id, **changes)
        self._after(old, new)
        return new.copy()

    def mark_pruned(self, deployment_id):
        """Record that a deployment's files are gone; -> False when it was
        so already (two retention runs may pick the same one)."""
        with self._change_lock:
            with self._lock:
                record = self._hot.get(deployment_id)
            if record is None or record.pruned:
                return False
            self._change(deployment_id, pruned=True)
        return True

    def commit(self, record, folder, files, audit=None, message=None, received=0,
               yield_to_waiting=False):
        """Move an upload's folder and files ({suffix: path}) into place and
        write its record ('await', the next sequence number): it waits as it
        shows, the project's waiting one superseded ('changed') in the same
        step (with yield_to_waiting, that one wins: Conflict).  message (a
        log line) and audit ((event, {fields})) are written once it is on
        disk, before its states; received bytes count as an upload as it
        shows.  -> a copy.  All or nothing: what was moved goes on an error."""
        moved = []
        with self._change_lock:
            try:
                record = self._move_in(record, folder, files, moved)
                with self._lock:
                    older = self._hot.get(self._waiting.get(record.project))
                if older and yield_to_waiting:
                    raise Conflict("deployment %s waits: it is newer" % older.id)
                replaced = older and older.replace(
                    state="changed", ended=time.time(), superseded_by=record.id)
                if replaced:
                    write_file_atomic(self.path(replaced, ".json"), replaced.encode())
            except BaseException:
                for path in moved:
                    remove_quietly(path)
                raise
            self._next_seq += 1  # it exists now: the record is on disk
            if message:
                log.info("%s", message)
            if audit:
                audit_event(audit[0], **audit[1])
            if replaced:
                self._tell(older, replaced)
            with self._lock:
                if replaced:
                    self._apply(older, replaced)
                self._apply(None, record)
                if received:
                    self._counters.uploads += 1
                    self._counters.bytes_received += received
        if replaced:
            self._after(older, replaced)
        return record.copy()

    def _move_in(self, record, folder, files, moved):
        """Step 1 of a commit (called with _change_lock held): move folder
        and files in, make its log, write its state file with the next
        sequence number; -> the record.  Each path made is added to moved,
        for the commit to remove on an error."""
        self._before_change(record.project)
        os.makedirs(self.deployments_dir(record.project), exist_ok=True)
        for suffix, source in [("", folder)] + sorted(files.items()):
            os.rename(source, self.path(record, suffix))
            moved.append(self.path(record, suffix))
        moved.append(self.path(record, ".log"))
        open(moved[-1], "ab").close()
        record = record.replace(seq=self._next_seq, state="await")
        moved.append(self.path(record, ".json"))
        write_file_atomic(moved[-1], record.encode())
        return record

    def cancel(self, deployment_id, who, address):
        """Cancel a waiting deployment (it never runs) or ask the worker to
        stop a running one; who cancelled is written to its log, the
        daemon's log and the audit log first (when that fails, nothing is
        cancelled).  Returns its record; raises NotFound when there is no
        such deployment, Conflict when it has ended already."""
        with self._change_lock:
            with self._lock:
                record = self._hot.get(deployment_id)
                waiting = record and self._waiting.get(record.project) == deployment_id
                stop = self._cancels.get(deployment_id)
            if record is None:  # cold: ended long ago, or none
                record = self.get(deployment_id)
            if record is None:
                raise NotFound("no deployment %s" % deployment_id)
            if record.state not in UNFINISHED:
                raise Conflict("deployment %s has ended already: %s"
                               % (deployment_id, record.state))
            if not waiting and stop is None:  # loaded as running, being interrupted
                raise Conflict("deployment %s has ended already: interrupted"
                               % deployment_id)
            with open(self.path(record, ".log"), "ab") as file:
                file.write(("ipd: cancelled by %s from %s at %s\n" % (
                    who, address, iso_time(time.time()))).encode())
            log.info("deployment %s of %s: cancel asked by %s", record.id,
                     record.project, who)
            audit_event("cancel", project=record.project, deployment=record.id,
                        user=who, address=address)
            if not waiting:
                stop.set()
                return record.copy()
            old, new = self._change(deployment_id, state="cancelled",
                                    ended=time.time())
        self._after(old, new)
        return new.copy()

    # --- as the worker sees it

    def _ready(self):
        """The id of the oldest waiting deployment of a project that runs
        none, or None (held _lock)."""
        ready = [self._hot[deployment_id] for project, deployment_id
                 in self._waiting.items() if project not in self._running]
        return min(ready, key=lambda r: r.seq).id if ready else None

    def claim(self):
        """Block until a waiting deployment may run; -> it, now 'active',
        with its cancel Event (cancel_requested) made; None once stop()
        was called."""
        while True:
            with self._lock:
                while not self._stopping and self._ready() is None:
                    self._lock.wait()
                if self._stopping:
                    return None
            with self._change_lock:
                with self._lock:  # again: a cancel may have come in between
                    deployment_id = self._ready()
                    if deployment_id is not None:
                        self._cancels[deployment_id] = threading.Event()
                if deployment_id is not None:
                    return self._change(deployment_id, state="active",
                                        started=time.time())[1].copy()

    def cancel_requested(self, deployment_id):
        """The Event the worker watches while deployment_id runs."""
        with self._lock:
            return self._cancels[deployment_id]

    def release(self, record):
        """The worker is done with record: its cancel Event goes, and its
        project's next deployment may run even if no final state could be
        written (a disk error)."""
        with self._lock:
            self._cancels.pop(record.id, None)
            if self._running.get(record.project) == record.id:
                del self._running[record.project]
                self._lock.notify_all()

    def stop(self):
        """Let claim() return None to every worker."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()

    # --- reading

    def get(self, deployment_id):
        """A copy of the deployment, or None; a cold one read from disk."""
        with self._lock:
            record = self._hot.get(deployment_id)
            if record:
                return record.copy()
            projects = list(self._ledgers)
        for project in projects:
            record = self._read_cold(project, deployment_id)
            if record:
                return record
        return None

    def find(self, project, deployment_id=None):
        """The deployment of project with deployment_id, or its latest."""
        with self._lock:
            ledger = self._ledgers.get(project)
            if ledger is None:
                return None
            if deployment_id is None:
                deployment_id = ledger.latest
            record = self._hot.get(deployment_id)
            if record is not None:
                return record.copy() if record.project == project else None
        return self._read_cold(project, deployment_id)

    def holding(self, project, identity):
        """The waiting or running deployment of project that an upload of
        this upload_identity repeats, or None."""
        with self._lock:
            for deployment_id in (self._waiting.get(project),
                                  self._running.get(project)):
                record = self._hot.get(deployment_id)
                if record and record.state in UNFINISHED and identity == \
                        upload_identity(record.files, record.others):
                    return record.copy()
        return None

    def wait_final(self, deployment_id, timeout, project=None):
        """Wait up to timeout seconds for the deployment to end; return a
        copy of its record, ended or not (None when there is none).  A
        cold one is read from disk: from project's folder when given,
        else looked for in each project's."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                record = self._hot.get(deployment_id)
                remaining = deadline - time.monotonic()
                if record is None:
                    break  # cold: ended long ago
                if record.state not in UNFINISHED or remaining <= 0:
                    return record.copy()
                self._lock.wait(remaining)
        if project is not None:
            return self._read_cold(project, deployment_id)
        return self.get(deployment_id)

    def statistics(self):
        """Counters.statistics() plus 'queue' (deployments waiting) and
        'running': all as of the same moment as every state shown."""
        with self._lock:
            stats = self._counters.statistics()
            stats.update(queue=len(self._waiting), running=len(self._running))
        return stats

    def metrics_text(self, gauges, counters):
        """/metrics' text (Counters.render) as of one moment."""
        with self._lock:
            return self._counters.render(gauges, counters)

    def deployments_of(self, project, limit=None):
        """Copies of the project's records, oldest first: the cold ones read
        from their state files; with limit, only about the newest limit
        (the cold ones chosen by their files' mtimes, which is when they
        ended), so that a long history costs a page no more than that."""
        with self._lock:
            ledger, hot = self._hot_of(project)
            records = {record.id: record.copy() for record in hot}
            cold_count = ledger.cold_count if ledger else 0
        if cold_count:
            for stem in self._cold_files(project, records, limit):
                record = self._read_cold(project, stem)
                if record and is_cold(record):
                    records[stem] = record
        found = sorted(records.values(), key=lambda r: r.seq)
        return found[-limit:] if limit else found

    def _cold_files(self, project, hot, limit=None):
        """The ids of project's state files that are not of hot records:
        with limit, the limit most recently written."""
        try:
            entries = [entry for entry in os.scandir(self.deployments_dir(project))
                       if entry.name.endswith(".json")
                       and entry.name[:-5] not in hot]
        except OSError:
            return []
        if limit:
            entries = heapq.nlargest(limit, entries,
                                     key=lambda entry: entry.stat().st_mtime_ns)
        return [entry.name[:-5] for entry in entries]

    def live_deployment(self, project):
        """A copy of the project's newest deployment that ended ok (the one
        live), or None.  It is hot but when more than KEEP_DEPLOYMENTS
        deployments failed after it: then it is looked for among the cold
        ones' state files."""
        with self._lock:
            ledger = self._ledgers.get(project)
            if ledger is None:
                return None
            hot = [self._hot[i] for i in ledger.hot if self._hot[i].state == "ok"]
            newest = max(hot, key=lambda record: record.seq) if hot else None
            if newest is not None and newest.seq >= (ledger.cold_last_ok_seq or 0):
                return newest.copy()
            if ledger.cold_last_ok_seq is None:
                return None
        return next((record for record in reversed(self.deployments_of(project, 1000))
                     if record.state == "ok"), None)  # among the newest 1000

    def projects(self):
        """{project: (latest record, number of deployments)}."""
        with self._lock:
            return {project: (self._hot[ledger.latest].copy(), ledger.count())
                    for project, ledger in sorted(self._ledgers.items())
                    if ledger.latest}

    def kept_files(self):
        """(record, has a recipe) of each deployment that keeps its files;
        the records are the store's own: read them, do not change them."""
        with self._lock:
            return [(record, record.recipe) for record in self._hot.values()
                    if not record.pruned and record.files]

    def signed_history(self, project):
        """(the newest manifest time of project's signed deployments that
        wait, run or succeeded, the nonces of all its signed ones)."""
        with self._lock:
            ledger, hot = self._hot_of(project)
            if ledger is None:
                return 0, set()
            newest = max([ledger.cold_signed_newest] + [
                r.signer.get("created", 0) for r in hot
                if r.signer and r.state in UNFINISHED + ("ok",)])
            return newest, set(ledger.nonces)

    def rollback_target(self, project, before_seq):
        """A copy of project's newest deployment uploaded before before_seq
        that ended 'ok' and keeps its files (a hot one: a pruned one has
        none), or None: what a rollback redeploys."""
        with self._lock:
            found = [r for r in self._hot_of(project)[1] if r.state == "ok"
                     and r.seq < before_seq and not r.pruned and r.files]
            return max(found, key=lambda r: r.seq).copy() if found else None

    def rollbacks_unrecorded(self):
        """[(reverted record, the rollback committed for it or None)] of each
        'reverted' deployment with no 'rollback' field yet: one that was in
        verify when ipd stopped (kill -9 included), whose rollback may have
        been committed just before."""
        with self._lock:
            reverted = [r for r in self._hot.values()
                        if r.state == "reverted" and "rollback" not in r.others]
            made = {r.others["rollback_of"]: r for r in self._hot.values()
                    if r.others.get("rollback_of")}
            return [(r.copy(), made[r.id].copy() if r.id in made else None)
                    for r in sorted(reverted, key=lambda r: r.seq)]

    # --- what retention asks

    def prunable(self, project, ending=None):
        """Copies of project's finished deployments beyond the newest
        KEEP_DEPLOYMENTS that still have their files.  ending: a deployment
        whose final state its worker writes next, taken as written."""
        with self._lock:
            ledger, hot = self._hot_of(project)
            found = []
            for number, record in enumerate(hot):
                newer = len(hot) - number - 1 + ledger.cold_newer_than(record.seq)
                if (newer >= self.keep and not record.pruned
                        and self._state_of(record, ending) not in UNFINISHED):
                    found.append(record.copy())
            return found

    def rebuilt_files(self, project, ending=None):
        """Copies of project's finished recipe deployments that keep their
        files (which can be rebuilt from segments: DROP_REBUILT)."""
        with self._lock:
            return [r.copy() for r in self._hot_of(project)[1] if r.recipe and not
                    r.pruned and self._state_of(r, ending) not in UNFINISHED]

    def oldest_prunable(self, project, ending=None):
        """A copy of project's oldest deployment that may be pruned to make
        room: never a waiting or running one, nor its latest ok one; or
        None."""
        with self._lock:
            ledger, hot = self._hot_of(project)
            done = [r.seq for r in hot if self._state_of(r, ending) == "ok"]
            latest_ok = max(done + [ledger and ledger.cold_last_ok_seq or 0])
            candidates = [r for r in hot if r.seq != latest_ok and not r.pruned
                          and self._state_of(r, ending) not in UNFINISHED]
            return min(candidates, key=lambda r: r.seq).copy() if candidates else None

    def _hot_of(self, project):
        """(ledger, its hot records in upload order) of project, (None, [])
        for one the store does not know (held _lock)."""
        ledger = self._ledgers.get(project)
        return ledger, [self._hot[i] for i in ledger.hot] if ledger else []

    @staticmethod
    def _state_of(record, ending):
        """A record's state; ending's coming one for ending."""
        if ending is not None and record.id == ending.id:
            return ending.state
        return record.state


###############################################################################
# The deploy worker ###########################################################
###############################################################################

# The thread that runs waiting deployments: control.sh check, prepare,
# deploy (and verify, which may end it 'reverted' and queue a rollback),
# each step logged and timed; notify.sh and NOTIFY_URL at the end.


class DeployWorker:
    """Runs waiting deployments, MAX_PARALLEL projects at once.

    Each thread claims a deployment from the store as soon as one may run,
    and runs its control.sh steps as the original README says: check;
    prepare where check did not succeed; deploy; then, where the project's
    VERIFY_SECONDS is not 0, verify (issue 25).  A failed verify ends
    'reverted', and rollback (the service's: given a reverted record and
    why, -> (the rollback queued or None, a line saying what was done))
    queues the project's last ok deployment again.  Before the final
    state it runs retention (a Retention, or None), so that whoever sees
    the end sees the files it let go already gone.  Before the first
    step, build (the service's: given a record and wanted(), -> the
    record) makes the files its commit left to the worker (LaterFile).
    """

    def __init__(self, settings, store, retention=None, rollback=None, build=None):
        self.settings = settings
        self.store = store
        self.retention = retention
        self.rollback = rollback
        self.build = build
        self.threads = []
        self.kill_event = threading.Event()  # set when the grace period ends

    def start(self):
        """Start the MAX_PARALLEL worker threads."""
        for number in range(self.settings.MAX_PARALLEL):
            thread = threading.Thread(target=self._loop, name="deploy-%d" % number,
                                      daemon=True)
            thread.start()
            self.threads.append(thread)

    def alive(self):
        """True while every worker thread runs (the watchdog asks)."""
        return all(thread.is_alive() for thread in self.threads)

    def stop(self, grace):
        """Stop taking deployments; give running ones grace seconds, then
        stop their steps (state 'interrupted')."""
        self.store.stop()
        deadline = time.monotonic() + grace
        for thread in self.threads:
            thread.join(max(0, deadline - time.monotonic()))
        self.kill_event.set()
        for thread in self.threads:
            thread.join(self.settings.KILL_GRACE + 5)

    def _loop(self):
        while True:
            record = self.store.claim()
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
                self.store.release(record)

    def run(self, record):
        """Run the steps of one deployment and record its final state."""
        success = self.settings.SUCCESS_CODE
        cancel = self.store.cancel_requested(record.id)
        steps = []
        with open(self.store.path(record, ".log"), "ab") as log_file:
            record, outcome = self.build_files(record, log_file, cancel)
            run_as = self.scripts_user(record.project)
            if run_as and outcome is None:
                open_to_scripts(self.store.project_dir(record.project),
                                self.store.path(record), self.store.path(record, ".image")
                                if "image" in record.files else None, run_as)
            for step in ("check", "prepare", "deploy") if outcome is None else ():
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
            fields = {}
            if outcome is None and self.verify_seconds(record.project):
                outcome, fields = self.verify(record, steps, log_file, cancel, run_as)
        self.end(record, outcome or "ok", **fields)

    def build_files(self, record, log_file, cancel):
        """Build the files record's commit left to the worker (see build);
        -> (the record, None), or (it, its final state) when they cannot
        be made (the reason in its log), it was cancelled meanwhile, or
        ipd stops past its grace (as a step is stopped then: a build of a
        large image must not hold up the stop, nor leave half a file)."""
        if self.build is None or not record.files_to_build():
            return record, None
        try:
            return self.build(record, lambda: not (cancel.is_set() or
                                                   self.kill_event.is_set())), None
        except ClientGone:
            if not self.kill_event.is_set():
                return record, "cancelled"
            why = "ipd stopped"
        except (IpdError, OSError) as error:
            why = str(error)
        log_file.write(("ipd: the deployment's files cannot be built from the "
                        "pushed blobs: %s\n" % why).encode())
        log.error("deployment %s of %s: its files cannot be built: %s", record.id,
                  record.project, why)
        return record, "interrupted"

    def end(self, record, state, **fields):
        """Run retention, then write the final state (and fields): whoever
        sees the end sees the files that it let go already gone."""
        ended = time.time()
        try:
            if self.retention:
                self.retention.before_final(record.project,
                                            ending=record.replace(state=state))
        except Exception:
            log.exception("pruning %s after deployment %s failed",
                          record.project, record.id)
        self.store.update(record.id, state=state, ended=ended, **fields)

    def verify_seconds(self, project):
        """The project's VERIFY_SECONDS (project.conf, else the setting)."""
        return project_settings(self.settings,
                                self.store.project_dir(project))["VERIFY_SECONDS"]

    def verify(self, record, steps, log_file, cancel, run_as):
        """Run control.sh verify after a deploy that succeeded; -> (None
        when the release holds, else its final state, the record's fields).
        Its time limit is VERIFY_SECONDS plus STEP_TIMEOUT: the window,
        then a step's usual time to judge it.  'verify_started' is on disk
        before it runs and 'verified' once it held, so that a restart knows
        a release stopped before it was judged (DeploymentStore._interrupt)."""
        seconds = self.verify_seconds(record.project)
        self.store.update(record.id, verify_started=time.time())
        started = time.monotonic()
        code, outcome = self.run_step(record, "verify", log_file, cancel, run_as,
                                      seconds + self.settings.STEP_TIMEOUT,
                                      {"VERIFY_SECONDS": str(seconds)})
        steps.append({"step": "verify", "code": code,
                      "seconds": round(time.monotonic() - started, 3)})
        held = outcome is None and code == self.settings.SUCCESS_CODE
        self.store.update(record.id, steps=list(steps), **({"verified": True} if held else {}))
        if held or outcome == "cancelled":  # who cancels keeps what is live
            return outcome, {}
        why = ("ran over its time limit (VERIFY_SECONDS + STEP_TIMEOUT)"
               if outcome == "timeout" else "was stopped with ipd"
               if outcome == "interrupted" else "exited %d" % code)
        outcome = "reverted"  # the release did not hold: undo it
        return outcome, self.revert(record, log_file, "control.sh verify " + why)

    def revert(self, record, log_file, why):
        """Queue the rollback of record (reverted: why), saying in its log
        what was done; -> the fields of its final state: rollback (the ID
        of the deployment queued, or None)."""
        rollback, done = (self.rollback(record, why) if self.rollback
                          else (None, "no rollback: ipd has no service"))
        log_file.write(("ipd: reverted: %s; %s\n" % (why, done)).encode())
        log_file.flush()
        log.warning("deployment %s of %s reverted: %s; %s", record.id,
                    record.project, why, done)
        return {"rollback": rollback.id if rollback else None}

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
        # none: no image, or a docker push's not built (it ended first)
        has_image = "image" in record.files and "image" not in record.files_to_build()
        env.update({
            "PATH": os.environ.get("PATH", os.defpath),
            "DEPLOY": record.id,
            "PROJECT": record.project,
            "IMAGE": image if has_image else "",
            "PROJECT_DIR": self.store.project_dir(record.project),
        })
        if run_as:
            env["PROJECT_DIR"] = os.path.join(env["PROJECT_DIR"], WORK_DIR)
        for field, name in (("image_ref", "IMAGE_REF"), ("image_digest", "IMAGE_DIGEST")):
            if field in record.others:  # a docker push (#24)
                env[name] = record.others[field]
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

    def run_step(self, record, step, log_file, cancel, run_as=None, timeout=None,
                 extra_env=None):
        """Run 'control.sh STEP' in its own session (as run_as, when given),
        with extra_env, for timeout (STEP_TIMEOUT) seconds; return (code,
        outcome): 'timeout', 'cancelled' or 'interrupted' when stopped."""
        log_file.flush()
        started = time.monotonic()
        if step == "check" and self.refused_script(record, log_file):
            return 126, "126"  # cannot execute, as a shell says
        try:
            process = subprocess.Popen(
                [record.control, step], cwd=self.store.path(record),
                env=dict(self.environment(record, run_as), **(extra_env or {})),
                stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True, **credentials(run_as))
        except (OSError, subprocess.SubprocessError) as error:
            # A broken "#!" line or a vanished file: end as a shell would
            # (127 not found, 126 cannot execute), saying why in the log.
            code = 127 if isinstance(error, FileNotFoundError) else 126
            log_file.write(cannot_run_line(record.control, step, error))
            log_file.flush()
            log.warning("deployment %s: cannot run control.sh %s: %s",
                        record.id, step, error)
            return code, None
        # Recorded at once (no fsync: it must outlive ipd, not the machine)
        # so that a restart after kill -9 finds what is left of the step.
        write_step_identity(self.store.path(record, ".step"), process.pid)
        outcome = self.wait_step(record, step, process, cancel,
                                 started + (timeout or self.settings.STEP_TIMEOUT))
        # Children it left behind belong to the step: none may outlive it.
        stop_process_group(process, self.settings.KILL_GRACE)
        code = process.returncode
        if code < 0:
            code = 128 - code  # killed by a signal, as a shell reports it
        log.info("deployment %s of %s: control.sh %s exited %d after %.3fs",
                 record.id, record.project, step, code,
                 time.monotonic() - started)
        return code, outcome

    def wait_step(self, record, step, process, cancel, deadline):
        """Wait for a step's process to end; -> None, or the outcome for
        which it was stopped: 'interrupted' (ipd stops past its grace),
        'cancelled', or 'timeout' at deadline (time.monotonic())."""
        while True:
            try:
                process.wait(timeout=min(0.1, max(0.01, deadline - time.monotonic())))
                return None
            except subprocess.TimeoutExpired:
                outcome = None
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
                    return outcome


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

    def deployment_ended(self, record):
        """Tell of record's final state, on a thread of its own (the store's
        after_final: called after the state shows, outside its locks)."""
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
        """notify.sh, with control.sh's environment plus STATE (and for a
        reverted one ROLLBACK, the ID of its rollback), as the user
        control.sh runs as."""
        run_as = self.scripts_user(record.project)
        env = dict(self.environment(record, run_as), STATE=record.state)
        if record.others.get("rollback"):
            env["ROLLBACK"] = record.others["rollback"]
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
            if attempt + 1 < self.ATTEMPTS:  # a pause between tries, none after the last
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


def entries_below(root, ignored=FileNotFoundError):
    """The entries of each folder in the folder root (sha256/ab/...,
    partial/USER/...); [] when listing root raises ignored."""
    try:
        folders = list(os.scandir(root))
    except ignored:
        return []
    return [entry for folder in folders if folder.is_dir()
            for entry in os.scandir(folder.path)]


def check_pieces_add_up(field, pieces, size):
    """A recipe's pieces of a file must add up to its declared size, so
    that the size checked against the limits is what would be copied
    (issue 23).  Raises BadRequest."""
    total = sum(len(piece["data"]) if "data" in piece else piece["size"]
                for piece in pieces)
    if total != size:
        raise BadRequest("recipe of %s: its pieces add up to %d bytes, not the "
                         "%d it declares" % (field, total, size))


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


def decode_recipe(data):
    """The files of a recipe as stored beside a deployment (encode_recipe's
    bytes), inline pieces decoded.  Raises ValueError (or KeyError,
    TypeError) for a file that is not one."""
    files = json.loads(data.decode())
    for meta in files.values():
        meta["segments"] = [{"data": base64.b64decode(piece["data"])}
                            if "data" in piece else piece for piece in meta["segments"]]
    return files


def recipe_digests(files):
    """The SHA-256s of the segments a recipe's files name."""
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
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for buffer, count in ([] if self.superseded else body.pieces()):
                if self.superseded:
                    break
                try:
                    write_all(fd, memoryview(buffer)[:count])
                except OSError as error:
                    raise disk_errors(error)
                self.offset += count
                self.progress = time.monotonic()
                if self.superseded:
                    break
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
        shut_quietly(self.connection, socket.SHUT_RD)

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
        """Let another request write to this segment upload."""
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
        # guards the dicts and the busy set below (never held for I/O but
        # the renames and removals that must agree with them)
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
        """Where a stored segment lies."""
        return os.path.join(self.root, "sha256", digest[:2], digest)

    def partial_path(self, user_name, digest):
        """Where user_name's upload under way of a segment lies."""
        folder = hashlib.sha256(user_name.encode()).hexdigest()[:16]
        return os.path.join(self.root, "partial", folder, digest)

    def uploaders_path(self):
        """The file of who sent which segment (a line a digest and user)."""
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
        # sha256/ is made with the first segment
        for entry in entries_below(os.path.join(self.root, "sha256")):
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

    def refer_recipe(self, record, path):
        """Refer record to the segments its recipe file at path names (before
        it is committed: see forget).  Raises OSError or ValueError."""
        with open(path, "rb") as file:
            self.refer(record, json.loads(file.read().decode()))

    def read_refs(self, store, record):
        """Refer record (a kept recipe deployment) to the segments its
        recipe names."""
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
            own = self._referred(user)
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
        """How many bytes of user's upload of digest have come, or None."""
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
            referred = self._referred()
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
            new = self._note_sender(user, digest)
        if new:
            self._write_sender(user, digest)
        return size

    def _note_sender(self, user, digest):
        """Note user as a sender of the stored digest, seen now; -> True
        when user was not one yet (held lock)."""
        self.recent[digest] = time.time()
        names = self.uploaders.setdefault(digest, set())
        new = user.name not in names
        names.add(user.name)
        return new

    def _write_sender(self, user, digest):
        """Append a new sender to the uploaders file."""
        with open(self.uploaders_path(), "a", encoding="utf-8") as file:
            file.write(json.dumps([digest, user.name]) + "\n")

    # --- recipes

    def rebuild(self, user, field, meta, sink, wanted=None, block=REBUILD_BLOCK):
        """Write the file of a recipe into sink (a FileSink) byte for byte
        and check its size and SHA-256 (where the recipe has one).  Every
        named segment's presence and size is checked before the first byte
        is copied; wanted (a request's client still there?) is asked
        between blocks, and when it says no the copy stops (ClientGone).
        block: the bytes a read takes (for a copy nobody waits for,
        CHUNK_SIZE: less memory).  Raises BadRequest."""
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
                    for data in iter(lambda: file.read(block), b""):
                        sink.write(data)
                        copied += 1
                        if wanted and copied % 16 == 0 and not wanted():
                            raise ClientGone("the client left during the rebuild")
            except FileNotFoundError:
                raise BadRequest("recipe of %s names segment %s, which the server "
                                 "does not have: send it first"
                                 % (field, piece["sha256"]))
            if sink.size > meta["size"]:
                break
        found = sink.describe()  # meta's sha256 is None for a LaterFile
        if found["size"] != meta["size"] or meta["sha256"] not in (None, found["sha256"]):
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
        """Refer record's deployment to the segments of a recipe's files."""
        with self.lock:
            self.refs[record.id] = (record.project, recipe_digests(files))

    def _referred(self, user=None):
        """The digests some kept deployment refers to (of a project user
        may use, when given; held lock)."""
        return set().union(*(digests for project, digests in self.refs.values()
                             if user is None or user.may_use(project)))

    def forget(self, deployment_id):
        """A deployment no longer refers to any segment (pruned, or never
        made)."""
        with self.lock:
            self.refs.pop(deployment_id, None)

    def collect(self, now=None):
        """Remove partial uploads untouched for SEGMENT_EXPIRY, and segments
        no kept deployment refers to that nobody sent or named for as
        long.  Returns the bytes freed."""
        now = now or time.time()
        self.collected = time.monotonic()
        freed = 0
        for entry in entries_below(os.path.join(self.root, "partial"), OSError):
            try:
                if now - entry.stat().st_mtime > self.expiry:
                    with self.lock:
                        busy = any(entry.name == digest for _, digest in self.busy)
                    if not busy:
                        remove_quietly(entry.path)
            except OSError:
                pass
        with self.lock:
            referred = self._referred()
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
        """Write the uploaders file anew from memory (after a collection)."""
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

    # --- registry blobs (#24): uploads named by a session, segments read

    def session_path(self, owner, session_id):
        """The partial file of a registry upload session (collected like a
        segment's partial upload, after SEGMENT_EXPIRY untouched)."""
        path = self.partial_path(owner, session_id)
        self.make_folder(os.path.dirname(path))
        return path

    def stored_size(self, digest):
        """The size of the stored segment digest, or None."""
        with self.lock:
            return self.sizes.get(digest)

    def link(self, user, digest):
        """Note user (a registry_principal) as a sender of the stored
        segment digest: a blob mounted or found in a repository; False
        when it is not stored."""
        with self.lock:
            if digest not in self.sizes:
                return False
            new = self._note_sender(user, digest)
        if new:
            self._write_sender(user, digest)
        return True

    def add_bytes(self, user, digest, data):
        """Store data (a pushed manifest, whose SHA-256 is digest) as a
        segment sent by user."""
        path = self.session_path(user.name, "bytes-" + uuid.uuid4().hex)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_and_close(fd, data, sync=True)
        except OSError as error:
            remove_quietly(path)
            raise disk_errors(error)
        return self.add(user, digest, path)

    def open_segment(self, digest):
        """The stored segment digest open for reading (it stays readable
        if a collection removes it meanwhile), or None."""
        with self.lock:
            if digest not in self.sizes:
                return None
            try:
                return open(self.path(digest), "rb")
            except FileNotFoundError:
                return None

    def read_segment(self, digest, limit):
        """The bytes of a stored segment of at most limit bytes, or None."""
        file = self.open_segment(digest)
        if file is None:
            return None
        with file:
            data = file.read(limit + 1)
        return data if len(data) <= limit else None


###############################################################################
# Retention: what the disk keeps ##############################################
###############################################################################

# One job, run by the worker before each final state (and by the service
# before a segment is written): prune beyond KEEP_DEPLOYMENTS, drop rebuilt
# files (DROP_REBUILT), collect unreferenced segments, keep MIN_FREE_SPACE.
# It asks the deployment store and the segment store; neither calls it.


class Retention:
    """Removes the files deployments no longer keep; states and logs stay."""

    def __init__(self, settings, store, segments):
        self.settings = settings
        self.store = store
        self.segments = segments

    def before_final(self, project, ending=None):
        """Prune project's deployments beyond KEEP_DEPLOYMENTS, drop its
        ended recipe deployments' rebuilt files (DROP_REBUILT), collect
        segments no kept deployment refers to, then make room.  ending: a
        deployment whose final state its worker writes next, taken as
        written."""
        for record in self.store.prunable(project, ending):
            self.prune(record)
        if self.settings.DROP_REBUILT:
            for record in self.store.rebuilt_files(project, ending):
                for name in record.files:
                    remove_quietly(self.store.path(record, "." + name))
        self.segments.collect()
        self.make_room(project, ending)

    def prune(self, record):
        """Remove a deployment's folder, image, package and recipe; it is
        'pruned' from then on, and its segments no longer referred to."""
        for suffix in ("", ".image", ".package", ".step", ".recipe"):
            remove_quietly(self.store.path(record, suffix))
        self.store.mark_pruned(record.id)  # once, whoever else prunes it too
        self.segments.forget(record.id)

    def make_room(self, project, ending=None):
        """Below MIN_FREE_SPACE: prune project's oldest deployments that may
        be pruned (see DeploymentStore.oldest_prunable) until there is room
        or none is left.  Only project's own: no project pays for another's
        use of the disk."""
        while self.settings.MIN_FREE_SPACE:
            free = free_space(self.settings.UPLOAD_DIR)
            if free is None or free >= self.settings.MIN_FREE_SPACE:
                return
            oldest = self.store.oldest_prunable(project, ending)
            if oldest is None:
                log.warning("free space below MIN_FREE_SPACE and nothing left "
                            "to prune")
                return
            log.info("free space below MIN_FREE_SPACE: pruning deployment %s of %s",
                     oldest.id, oldest.project)
            self.prune(oldest)
            self.segments.collect()


###############################################################################
# Registry: the OCI Distribution push and pull protocol (issue #24) ###########
###############################################################################

# `docker push HOST/PROJECT:TAG` as a deployment: the grammar of names,
# references and digests (OCI Distribution Specification v1.1), the
# manifests ipd takes (Docker v2 schema 2 and OCI, images and indexes,
# checked whole before anything is kept), the docker-load tar built from a
# pushed image as a recipe of its blobs (so a kept deployment refers to
# them and they are stored once, in the segment store), and the upload
# sessions and tags (Registry).  The service (Daemon.registry_*) does the
# rest; the handler parses and answers.

REGISTRY_DIR = ".registry"   # in UPLOAD_DIR: PROJECT.json, its tags
REGISTRY_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
REGISTRY_MANIFEST_LIMIT = 4 << 20  # a manifest or index body (distribution's)
REGISTRY_MANIFEST_ITEMS = 100000   # JSON values in one (annotations and all)
REGISTRY_CONFIG_LIMIT = 4 << 20    # an image config a manifest names
REGISTRY_MAX_LAYERS = 256          # layers of one image (overlayfs takes 128)
REGISTRY_MAX_CHILDREN = 256        # manifests of one index
REGISTRY_MAX_SESSIONS = 256        # upload sessions open on the server
REGISTRY_MAX_USER_SESSIONS = 32    # ... of one user
REGISTRY_MAX_TAGS = 1000           # tags a project keeps (the oldest go)
# A repository name component and a tag (distribution-spec, "Pulling").
REGISTRY_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*\Z")
REGISTRY_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
REGISTRY_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+\Z")
REGISTRY_SESSION = re.compile(r"[0-9a-f]{32}\Z")
REGISTRY_PATH = re.compile(
    r"/v2/(?P<name>.+?)/(?:(?P<uploads>blobs/uploads)/?(?P<session>[^/]*)"
    r"|blobs/(?P<blob>[^/]+)|manifests/(?P<manifest>[^/]+)|(?P<tags>tags/list))\Z")

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE_MANIFESTS = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_MANIFESTS = (DOCKER_MANIFEST_LIST, OCI_INDEX)
IMAGE_CONFIGS = ("application/vnd.docker.container.image.v1+json",
                 "application/vnd.oci.image.config.v1+json")
# What docker load reads as a layer: tar, gzip (and zstd: Docker 23+).
LOADABLE_LAYERS = ("application/vnd.docker.image.rootfs.diff.tar.gzip",
                   "application/vnd.docker.image.rootfs.diff.tar",
                   "application/vnd.oci.image.layer.v1.tar",
                   "application/vnd.oci.image.layer.v1.tar+gzip",
                   "application/vnd.oci.image.layer.v1.tar+zstd")
# The spec's error codes of the statuses an IpdError carries.
REGISTRY_CODES = {400: "UNSUPPORTED", 401: "UNAUTHORIZED", 403: "DENIED",
                  404: "NAME_UNKNOWN", 405: "UNSUPPORTED", 409: "BLOB_UPLOAD_INVALID",
                  411: "SIZE_INVALID", 413: "SIZE_INVALID", 416: "BLOB_UPLOAD_INVALID",
                  429: "TOOMANYREQUESTS"}


class RegistryError(IpdError):
    """An error of the registry protocol: an HTTP status and the spec's
    code (BLOB_UNKNOWN, DIGEST_INVALID, MANIFEST_BLOB_UNKNOWN...)."""

    def __init__(self, status, code, message, headers=None):
        super().__init__(message, headers)
        self.http_status = status
        self.code = code


def registry_project(name):
    """The project of a repository name; raises RegistryError NAME_INVALID
    for a name that is not one component of the spec's grammar and a
    project name (a multi-level name such as team/web is refused)."""
    if "/" in name:
        raise RegistryError(400, "NAME_INVALID", "repository %s: ipd takes one-level "
                            "names, the project: push to HOST/%s" % (
                                printable(name, 100), printable(name.rsplit("/", 1)[-1], 64)))
    if not (REGISTRY_COMPONENT.match(name) and is_project_name(name)):
        raise RegistryError(400, "NAME_INVALID", "repository %s is not a project name "
                            "in lower case (1-64 of a-z, 0-9, '.', '_', '-')"
                            % printable(name, 100))
    return name


def registry_digest(text):
    """The 64 hex digits of a 'sha256:HEX' digest; RegistryError
    DIGEST_INVALID for anything else."""
    if (text.startswith("sha256:") and SHA256_HEX.match(text[7:])):
        return text[7:]
    if REGISTRY_DIGEST.match(text):
        raise RegistryError(400, "DIGEST_INVALID", "digest %s: ipd takes sha256 "
                            "digests only" % printable(text, 100))
    raise RegistryError(400, "DIGEST_INVALID", "%s is not a digest (sha256:64 lower "
                        "case hex digits)" % printable(text, 100))


def registry_reference(text):
    """A manifest reference -> ('tag', TAG) or ('digest', HEX); raises
    RegistryError (MANIFEST_INVALID for a bad tag)."""
    if ":" in text:
        return "digest", registry_digest(text)
    if not REGISTRY_TAG.match(text):
        raise RegistryError(400, "MANIFEST_INVALID", "tag %s: 1-128 of letters, "
                            "digits, '_', '.', '-', not led by '.' or '-'"
                            % printable(text, 100))
    return "tag", text


def is_registry_path(path):
    """True for /v2 and the paths under it: the registry's, not API_ROOT's."""
    return path == "/v2" or path.startswith("/v2/")


def parse_registry_path(path):
    """A path under /v2/ -> (kind, project, argument): ('base', None, None),
    ('blob', project, HEX), ('uploads', project, ''), ('upload', project,
    SESSION),
    ('manifest', project, (kind, value)), ('tags', project, None).
    Raises RegistryError (404 NAME_UNKNOWN for a path that is none)."""
    if path in ("/v2", "/v2/"):
        return "base", None, None
    match = REGISTRY_PATH.match(path)
    if not match:
        raise RegistryError(404, "NAME_UNKNOWN", "not found: %s" % printable(path, 200))
    project = registry_project(urllib.parse.unquote(match.group("name")))
    if match.group("uploads"):
        session = urllib.parse.unquote(match.group("session"))
        if session and not REGISTRY_SESSION.match(session):
            raise RegistryError(404, "BLOB_UPLOAD_UNKNOWN", "no such upload")
        return ("upload" if session else "uploads"), project, session
    if match.group("blob"):
        return "blob", project, registry_digest(urllib.parse.unquote(match.group("blob")))
    if match.group("manifest"):
        return "manifest", project, registry_reference(
            urllib.parse.unquote(match.group("manifest")))
    return "tags", project, None


def parse_content_range(text):
    """A PATCH's Content-Range 'START-END' (or 'bytes START-END') ->
    (start, end); RegistryError 416 for anything else."""
    match = re.fullmatch(r"\s*(?:bytes[ =])?(\d{1,19})-(\d{1,19})(?:/\S+)?\s*", text)
    if not match or int(match.group(1)) > int(match.group(2)):
        raise RegistryError(416, "BLOB_UPLOAD_INVALID", "Content-Range must be "
                            "START-END: %s" % printable(text, 60))
    return int(match.group(1)), int(match.group(2))


def blob_range(text, size):
    """The (start, end) bytes a blob GET's Range header asks of a blob of
    size bytes (RFC 9110 14.1.2: bytes=A-B, A- or the suffix -N, the end
    capped at the blob's last byte), or None for the whole blob (no
    header, or several ranges: a server may answer those whole, and
    ipd does not build multipart answers).  RegistryError 416
    RANGE_INVALID, with Content-Range bytes */SIZE, for any other Range
    or one that starts past the end."""
    if text is None or "," in text:
        return None
    match = re.fullmatch(r"\s*bytes=(\d{0,19})-(\d{0,19})\s*", text, re.IGNORECASE)
    start = end = None
    if match and match.group(1):  # A-B or A-
        start = int(match.group(1))
        end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
        if match.group(2) and int(match.group(2)) < start:
            start = None  # a last byte before the first: invalid
    elif match and match.group(2):  # -N: the last N bytes
        start, end = max(size - int(match.group(2)), 0), size - 1
    if start is None or start >= size or start > end:
        raise RegistryError(416, "RANGE_INVALID", "Range %s cannot be served from "
                            "this blob of %d bytes" % (printable(text, 60), size),
                            {"Content-Range": "bytes */%d" % size})
    return start, end


def blob_answer(digest, size, range_text):
    """(status, headers, first byte, length) of a blob GET or HEAD of
    blob HEX of size bytes with Range range_text (see blob_range): 200
    and the whole blob, or 206 and the range's bytes."""
    headers = dict(REGISTRY_HEADERS, **{
        "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
        "Docker-Content-Digest": "sha256:" + digest})
    part = blob_range(range_text, size)
    if part is None:
        return 200, headers, 0, size
    headers["Content-Range"] = "bytes %d-%d/%d" % (part[0], part[1], size)
    return 206, headers, part[0], part[1] - part[0] + 1


def registry_descriptor(item, where):
    """A descriptor {mediaType, digest, size[, platform]} checked -> a dict
    with digest as HEX; RegistryError MANIFEST_INVALID."""
    if (not isinstance(item, dict) or not isinstance(item.get("mediaType"), str)
            or not isinstance(item.get("digest"), str)
            or not isinstance(item.get("size"), int) or isinstance(item["size"], bool)
            or item["size"] < 0):
        raise RegistryError(400, "MANIFEST_INVALID", "%s: a descriptor needs "
                            "mediaType, digest and size" % where)
    try:
        digest = registry_digest(item["digest"])
    except RegistryError as error:
        raise RegistryError(400, "MANIFEST_INVALID", "%s: %s" % (where, error))
    platform = item.get("platform")
    return {"mediaType": item["mediaType"], "digest": digest, "size": item["size"],
            "platform": platform if isinstance(platform, dict) else {}}


def manifest_media_type(manifest, content_type):
    """The media type of a parsed manifest: its mediaType field, which
    must agree with a manifest Content-Type; without one, what its fields
    say (an OCI image or index).  Raises RegistryError MANIFEST_INVALID."""
    declared = manifest.get("mediaType")
    content_type = (content_type or "").split(";")[0].strip().lower()
    known = IMAGE_MANIFESTS + INDEX_MANIFESTS
    if declared is not None and declared not in known:
        raise RegistryError(400, "MANIFEST_INVALID", "manifest type %s is not taken: "
                            "push a Docker v2 schema 2 or OCI manifest or index"
                            % printable(str(declared), 100))
    if content_type in known and declared and declared != content_type:
        raise RegistryError(400, "MANIFEST_INVALID", "the manifest says it is %s but "
                            "was sent as %s" % (declared, content_type))
    media_type = declared or (content_type if content_type in known else None)
    if media_type is None:
        media_type = OCI_INDEX if "manifests" in manifest else OCI_MANIFEST
    return media_type


def parse_registry_manifest(data, content_type=None):
    """A manifest's bytes -> {mediaType, index (bool), config, layers,
    manifests} with its descriptors checked (see registry_descriptor);
    raises RegistryError MANIFEST_INVALID for anything else."""
    if len(data) > REGISTRY_MANIFEST_LIMIT:
        raise RegistryError(413, "SIZE_INVALID", "manifest larger than %d bytes"
                            % REGISTRY_MANIFEST_LIMIT)
    try:  # the bounded decoder: no deep nesting, no million values
        manifest = load_json_object(data, "the manifest", REGISTRY_MANIFEST_ITEMS)
    except BadRequest as error:
        raise RegistryError(400, "MANIFEST_INVALID", str(error))
    if manifest.get("schemaVersion") != 2:
        raise RegistryError(400, "MANIFEST_INVALID", "a manifest is a JSON object "
                            "with schemaVersion 2 (schema 1 is not taken)")
    media_type = manifest_media_type(manifest, content_type)
    parsed = {"mediaType": media_type, "index": media_type in INDEX_MANIFESTS,
              "config": None, "layers": [], "manifests": []}
    if parsed["index"]:
        children = manifest.get("manifests")
        if not isinstance(children, list) or len(children) > REGISTRY_MAX_CHILDREN:
            raise RegistryError(400, "MANIFEST_INVALID", "an index needs a list of at "
                                "most %d manifests" % REGISTRY_MAX_CHILDREN)
        parsed["manifests"] = [registry_descriptor(item, "manifests[%d]" % number)
                               for number, item in enumerate(children)]
        return parsed
    layers = manifest.get("layers")
    if not isinstance(layers, list) or len(layers) > REGISTRY_MAX_LAYERS:
        raise RegistryError(400, "MANIFEST_INVALID", "an image manifest needs a list "
                            "of at most %d layers" % REGISTRY_MAX_LAYERS)
    parsed["config"] = registry_descriptor(manifest.get("config"), "config")
    if parsed["config"]["size"] > REGISTRY_CONFIG_LIMIT:
        raise RegistryError(400, "MANIFEST_INVALID", "the image config is larger "
                            "than %d bytes" % REGISTRY_CONFIG_LIMIT)
    parsed["layers"] = [registry_descriptor(item, "layers[%d]" % number)
                        for number, item in enumerate(layers)]
    return parsed


def host_platform():
    """(os, architecture) of this server in OCI's words: linux/amd64 on x86_64."""
    machine = os.uname().machine
    return "linux", {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm",
                     "i686": "386"}.get(machine, machine)


def choose_platform(index):
    """The descriptor of the image an index holds for this server: the one
    for its platform (linux/amd64 on x86_64), else the only image in it
    (attestations, platform unknown, do not count).  RegistryError
    MANIFEST_INVALID when there is none."""
    system, architecture = host_platform()
    images = [child for child in index["manifests"]
              if child["mediaType"] in IMAGE_MANIFESTS and
              child["platform"].get("os") != "unknown"]
    for child in images:
        if (child["platform"].get("os") == system and
                child["platform"].get("architecture") == architecture):
            return child
    if len(images) == 1:
        return images[0]
    raise RegistryError(400, "MANIFEST_INVALID", "the index holds no %s/%s image "
                        "to deploy" % (system, architecture))


def check_loadable(image):
    """Raise RegistryError MANIFEST_INVALID unless docker load can read the
    image of a parsed manifest: a container image config, tar layers."""
    if image["config"]["mediaType"] not in IMAGE_CONFIGS:
        raise RegistryError(400, "MANIFEST_INVALID", "ipd deploys container images: "
                            "config type %s is not one" % printable(
                                image["config"]["mediaType"], 100))
    for layer in image["layers"]:
        if layer["mediaType"] not in LOADABLE_LAYERS:
            raise RegistryError(400, "MANIFEST_INVALID", "layer type %s cannot be "
                                "deployed (docker load reads tar, gzip and zstd "
                                "layers)" % printable(layer["mediaType"], 100))


def tar_header(name, size, directory=False):
    """The tar header block(s) of a member (PAX where a size needs it)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o755 if directory else 0o644
    if directory:
        info.type = tarfile.DIRTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def archive_pieces(members):
    """The recipe pieces (see parse_recipe) of a tar of members: (name,
    bytes) inline, (name, (HEX, size)) a stored segment, (name, None) a
    folder.  Neighbouring inline bytes are joined."""
    pieces = []

    def inline(data):
        if not data:
            return
        if pieces and "data" in pieces[-1]:
            pieces[-1]["data"] += data
        else:
            pieces.append({"data": data})
    for name, content in members:
        if content is None:
            inline(tar_header(name, 0, directory=True))
            continue
        size = len(content) if isinstance(content, bytes) else content[1]
        inline(tar_header(name, size))
        if isinstance(content, bytes):
            inline(content)
        else:
            pieces.append({"sha256": content[0], "size": size})
        inline(b"\0" * (-size % 512))
    inline(b"\0" * 1024)  # the end of the archive
    return pieces


def docker_load_members(image_ref, tag, image, image_digest, image_size, extra=()):
    """The members of a tar that `docker load -i` reads (docker save's
    layout since Docker 25: an OCI image layout, blobs/sha256/HEX, and its
    manifest.json naming the config and the layers, tagged image_ref):
    the image's manifest, config and layers as segments, and extra
    [(HEX, size)] blobs (a pushed index) beside them."""
    def blob(digest):
        return "blobs/sha256/" + digest
    load = [{"Config": blob(image["config"]["digest"]), "RepoTags": [image_ref],
             "Layers": [blob(layer["digest"]) for layer in image["layers"]]}]
    layout_index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{
        "mediaType": image["mediaType"], "digest": "sha256:" + image_digest,
        "size": image_size, "annotations": {"io.containerd.image.name": image_ref,
                                            "org.opencontainers.image.ref.name": tag}}]}
    blobs = collections.OrderedDict()
    for digest, size in [(image_digest, image_size)] + list(extra) + [
            (d["digest"], d["size"]) for d in [image["config"]] + image["layers"]]:
        blobs.setdefault(digest, size)
    return ([("blobs/", None), ("blobs/sha256/", None)] +
            [(blob(digest), (digest, size)) for digest, size in blobs.items()] +
            [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
             ("index.json", json.dumps(layout_index, sort_keys=True).encode()),
             ("manifest.json", json.dumps(load, sort_keys=True).encode())])


def registry_principal(project):
    """Who a project's repository is to the segment store: a blob pushed
    to it is 'sent' by this name (no user's: AUTH_DB names have no ':'),
    and it may see what a kept deployment of project refers to."""
    return User("registry:" + project, "USER", None, frozenset([project]))


def registry_fields(record):
    """The image_ref and image_digest of a pushed deployment (a redeploy
    of it keeps them), or {}."""
    return {key: record.others[key] for key in ("image_ref", "image_digest")
            if key in record.others}


# A blob is fsynced before its PUT is answered (a stored segment is
# trusted by its name from then on).  So that this fsync does not wait for
# the whole layer, the disk is set writing while the layer still comes.
REGISTRY_WRITEBACK = 32 << 20  # bytes appended between two such writes


class Writeback:
    """A file's appended bytes written to disk while more come: a
    background fdatasync each REGISTRY_WRITEBACK bytes, one at a time.
    The first error one meets stops them and is kept for finish(): the
    kernel tells a write error once, to whoever asks first."""

    def __init__(self, fd, offset):
        self.fd, self.mark = fd, offset
        self.running = None  # the Background fdatasync under way, or None
        self.error = None

    def wrote(self, offset):
        """The file has offset bytes: start a write when enough are new."""
        if offset - self.mark < REGISTRY_WRITEBACK or self.error is not None:
            return
        if self.running is not None and self.running.thread.is_alive():
            return  # one at a time: the next starts when it is done
        self.wait()
        if self.error is None:
            self.running, self.mark = Background(os.fdatasync, self.fd), offset

    def wait(self):
        """Wait for the write under way, noting its error."""
        running, self.running = self.running, None
        if running is not None:
            try:
                running.result()
            except OSError as error:
                self.error = self.error or error

    def finish(self):
        """Wait for the last write (before fd is closed or cut); -> the
        OSError one met, or None."""
        self.wait()
        return self.error


class BlobUpload:
    """One upload session of a blob: its partial file in the segment
    store, the bytes so far and their SHA-256, taken as they arrive (so a
    digest is never trusted, and never read twice).  guard: held by the
    one request writing to it (others are refused, see Registry.take)."""

    def __init__(self, session_id, project, owner, path):
        self.id, self.project, self.owner, self.path = session_id, project, owner, path
        self.offset = 0
        self.sha256 = hashlib.sha256()
        self.written_back = 0  # where the last Writeback began (over requests)
        self.touched = time.time()
        self.guard = threading.Lock()

    def receive(self, body, length=None):
        """Append the whole body; with length (a Content-Range's), anything
        else is refused and the session left as it was (RegistryError
        416).  A client gone mid-body keeps what came (a resume goes on
        from GET's Range).  -> the offset."""
        start, before = self.offset, self.sha256.copy()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:  # expired and collected meanwhile
            raise RegistryError(404, "BLOB_UPLOAD_UNKNOWN", "no such upload: start "
                                "it again")
        writeback = Writeback(fd, self.written_back)  # chunks add up to a step
        try:
            for buffer, count in body.pieces():
                view = memoryview(buffer)
                if length is not None and self.offset + count - start > length:
                    break
                try:
                    write_all(fd, view[:count])
                except OSError as error:
                    os.ftruncate(fd, self.offset)
                    raise disk_errors(error)
                self.sha256.update(view[:count])
                self.offset += count
                writeback.wrote(self.offset)
            if length is not None and self.offset - start != length:
                raise RegistryError(416, "BLOB_UPLOAD_INVALID", "the body is not the "
                                    "%d bytes its Content-Range says" % length)
        except BaseException:
            if length is not None:  # a ranged chunk lands whole or not at all
                os.ftruncate(fd, start)
                self.offset, self.sha256 = start, before
            raise
        finally:
            failed, self.written_back = writeback.finish(), writeback.mark
            if failed is not None:  # bytes the disk may not hold: all go
                self.restart(fd)
            os.close(fd)
            self.touched = time.time()
        if failed is not None:
            raise disk_errors(failed)
        return self.offset

    def restart(self, fd):
        """Empty the upload (fd: its file): the client sends it again from
        its start; when even that fails, its file goes (then the upload is
        unknown: the client starts another)."""
        self.offset, self.sha256, self.written_back = 0, hashlib.sha256(), 0
        try:
            os.ftruncate(fd, 0)
        except OSError:
            remove_quietly(self.path)

    def headers(self):
        """Location, Range (0-N: N the last byte received, 0-0 for none,
        as clients count) and Docker-Upload-UUID of the session."""
        return {"Location": "/v2/%s/blobs/uploads/%s" % (self.project, self.id),
                "Range": "0-%d" % max(self.offset - 1, 0),
                "Docker-Upload-UUID": self.id}


class Registry:
    """The registry's own state: the open upload sessions (in memory; a
    restart forgets them, their partial files go after SEGMENT_EXPIRY) and
    each project's tags (UPLOAD_DIR/.registry/PROJECT.json).  Blobs and
    manifests themselves are segments.  lock guards sessions and the tag
    files' read-change-write."""

    def __init__(self, upload_dir, segments, expiry):
        self.folder = os.path.join(upload_dir, REGISTRY_DIR)
        self.segments = segments
        self.expiry = expiry
        self.lock = threading.Lock()
        self.sessions = {}  # id -> BlobUpload
        self.received = {}  # project -> blob bytes received since its last tag

    def start(self, user, project):
        """A new BlobUpload of user to project.  Beyond the bounds (after
        forgetting expired sessions) user's least recently used idle one
        goes (a push that failed leaves its uploads behind); RegistryError
        429 when none is idle."""
        session_id = uuid.uuid4().hex
        owner = registry_principal(project).name
        path = self.segments.session_path(owner, session_id)
        with self.lock:
            self.expire()
            mine = [s for s in self.sessions.values() if s.owner == user.name]
            if (len(self.sessions) >= REGISTRY_MAX_SESSIONS or
                    len(mine) >= REGISTRY_MAX_USER_SESSIONS):
                idle = [s for s in mine if not s.guard.locked()]
                if not idle:
                    raise RegistryError(429, "TOOMANYREQUESTS", "too many blob "
                                        "uploads under way: finish some")
                oldest = min(idle, key=lambda s: s.touched)
                del self.sessions[oldest.id]
                remove_quietly(oldest.path)
            session = self.sessions[session_id] = BlobUpload(
                session_id, project, user.name, path)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as error:
            self.drop(session)
            raise disk_errors(error)
        return session

    def expire(self):
        """Forget sessions untouched for SEGMENT_EXPIRY or whose file the
        segment store collected (under lock)."""
        now = time.time()
        for session_id, session in list(self.sessions.items()):
            if now - session.touched > self.expiry or not os.path.exists(session.path):
                if not session.guard.locked():
                    del self.sessions[session_id]
                    remove_quietly(session.path)

    def find(self, user, project, session_id):
        """user's session session_id of project; RegistryError 404
        BLOB_UPLOAD_UNKNOWN for any other (nothing said of others')."""
        with self.lock:
            session = self.sessions.get(session_id)
        if (session is None or session.owner != user.name or session.project != project
                or not os.path.exists(session.path)):
            raise RegistryError(404, "BLOB_UPLOAD_UNKNOWN", "no such upload: start "
                                "it again")
        return session

    def take(self, session):
        """Hold session for one request; RegistryError 409 while another
        request writes to it (its bytes would interleave)."""
        if not session.guard.acquire(blocking=False):
            raise RegistryError(409, "BLOB_UPLOAD_INVALID", "another request is "
                                "writing to this upload", session.headers())

    def drop(self, session):
        """End session: forgotten, its partial file removed."""
        with self.lock:
            self.sessions.pop(session.id, None)
        remove_quietly(session.path)

    def count_received(self, project, count):
        """Count blob bytes received for project (an upload's figure)."""
        with self.lock:
            self.received[project] = self.received.get(project, 0) + count

    def take_received(self, project):
        """The blob bytes received for project since the last call."""
        with self.lock:
            return self.received.pop(project, 0)

    # --- tags

    def tag_path(self, project):
        """PROJECT.json, of a checked project name."""
        return os.path.join(self.folder, project + ".json")

    def tags(self, project):
        """{tag: HEX} of project, oldest first."""
        try:
            with open(self.tag_path(project), "rb") as file:
                tags = json.loads(file.read().decode()).get("tags", {})
        except (OSError, ValueError, AttributeError):
            return {}
        return {tag: digest for tag, digest in tags.items()
                if REGISTRY_TAG.match(tag) and SHA256_HEX.match(str(digest))}

    def set_tag(self, project, tag, digest):
        """Point project's tag at the manifest HEX, written atomically; the
        oldest tags beyond REGISTRY_MAX_TAGS are forgotten."""
        with self.lock:
            tags = self.tags(project)
            tags.pop(tag, None)
            tags[tag] = digest
            while len(tags) > REGISTRY_MAX_TAGS:
                tags.pop(next(iter(tags)))
            os.makedirs(self.folder, 0o700, exist_ok=True)
            write_file_atomic(self.tag_path(project), json.dumps(
                {"tags": tags}, indent=1).encode(), 0o600)


###############################################################################
# The service: what uploads, redeploys and cancels do #########################
###############################################################################

# One object the HTTP layer calls: users, tokens, the deployment store, the
# segments, retention, the worker and the notifier; signatures, uploads,
# redeploy, cancel, statistics, with their log and audit.


def parse_credentials(scheme, credentials):
    """Authorization 'Basic base64(name:password)' or 'Bearer TOKEN' ->
    (name, password); ('', '') when malformed."""
    if scheme.lower() == "bearer":
        return "token", credentials.strip()
    try:
        name, colon, password = base64.b64decode(
            credentials.strip(), validate=True).decode("utf-8").partition(":")
    except ValueError:  # binascii.Error, UnicodeDecodeError, and non-ASCII
        return "", ""   # text (a header's Latin-1 bytes) that b64decode refuses
    return (name, password) if colon else ("", "")


# The most deployments a project's status page lists (the newest): the
# older ones stay on disk, each reachable by its ID.
HISTORY_LIMIT = 1000


def deployment_message(record, event):
    """The daemon's log line of a new deployment: an upload or a redeploy."""
    if event == "redeploy":
        return "deployment %s of %s: redeploy of %s by %s" % (
            record.id, record.project, record.others.get("redeploy_of"), record.user)
    if event == "rollback":
        return "deployment %s of %s: rollback of %s, a redeploy of %s" % (
            record.id, record.project, record.others.get("rollback_of"),
            record.others.get("redeploy_of"))
    return "deployment %s of %s uploaded by %s: %s" % (
        record.id, record.project, record.user, ", ".join(
            "%s %s (%d bytes)" % (name, meta["name"], meta["size"])
            for name, meta in record.files.items()))


def login_refusal(scheme, password, id_tokens=False):
    """The 401's reason for credentials that were given but refused: what
    they are, never which half of a login was wrong (names stay secret).
    id_tokens: OIDC_TRUST is set, so an eyJ... password is an ID token."""
    if not password:
        return "malformed credentials: expected Basic base64(user:password)"
    if id_tokens and looks_like_jwt(password):  # as a wrong password: see
        return "wrong user name or password"   # README, ID tokens
    if password.startswith("ipd_") or scheme.lower() == "bearer":
        return "deploy token refused: unknown, expired or revoked"
    return "wrong user name or password"


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


class Daemon:
    """What the handlers share: settings, users, deployments, counters."""

    def __init__(self, settings):
        self.settings = settings
        self.users = UserDB(settings.AUTH_DB)
        self.tokens = TokenDB(tokens_path(settings))
        self.oidc = OidcLogins(settings.OIDC_TRUST, os.path.join(
            settings.UPLOAD_DIR, ".oidc"), settings.OIDC_CA_FILE) \
            if settings.OIDC_TRUST else None  # ID tokens: off
        self.login_throttle = LoginThrottle()
        self.store = DeploymentStore(settings.UPLOAD_DIR, settings.KEEP_DEPLOYMENTS,
                                     after_final=self.tell_the_end)
        self.segments = SegmentStore(settings.UPLOAD_DIR, settings.SEGMENT_EXPIRY)
        self.retention = Retention(settings, self.store, self.segments)
        self.worker = DeployWorker(settings, self.store, self.retention,
                                   rollback=self.roll_back, build=self.build_later_files)
        self.notifier = Notifier(settings, self.store, self.worker.environment,
                                 self.worker.scripts_user)
        self.registry = Registry(settings.UPLOAD_DIR, self.segments,
                                 settings.SEGMENT_EXPIRY)  # docker push (#24)
        self.started = time.time()

    def tell_the_end(self, record):
        """The store's after_final: notify.sh and NOTIFY_URL, on a thread.
        A 'reverted' one whose rollback is not yet recorded (stopped in
        verify) is told by finish_rollbacks, with its rollback's ID."""
        if record.state == "reverted" and "rollback" not in record.others:
            return
        self.notifier.deployment_ended(record)

    def load(self, kill_grace):
        """Read UPLOAD_DIR at a start: deployments and their queue
        (DeploymentStore.load), then the segments; then queue the rollbacks
        of releases stopped in verify.  Returns the number of deployments."""
        count = self.store.load(kill_grace)
        if self.oidc:
            self.oidc.trust.rules()  # read now: its warnings come at the start
        self.segments.load(self.store)
        self.finish_rollbacks()
        return count

    # --- verify's rollback (issue 25)

    # Who an automatic rollback is made by: ipd itself, as an ADMIN could
    # (a signed project's older release included: it was live and ok).
    ROLLBACK_USER = User("ipd", "ADMIN", None)

    def roll_back(self, reverted, why):
        """Queue a redeploy of the last deployment of reverted's project
        that ended ok (the worker's rollback, after a failed verify): as
        POST /redeploy does, audited as 'rollback' with why.  Never of a
        rollback (no loops), nor over a newer upload that waits (it wins).
        -> (the rollback's record or None, a line saying what was done)."""
        if reverted.others.get("rollback_of"):
            return None, ("it is itself the rollback of %s: not rolled back "
                          "again" % reverted.others["rollback_of"])
        earlier = self.store.rollback_target(reverted.project, reverted.seq)
        if earlier is None:
            audit_event("rollback", project=reverted.project, reverted=reverted.id,
                        deployment=None, redeploy_of=None, reason=why)
            return None, ("nothing to roll back to: no earlier deployment of %s "
                          "that ended ok keeps its files" % reverted.project)
        try:
            rollback = self.redeploy(earlier, self.ROLLBACK_USER, None,
                                     rollback_of=reverted.id, reason=why)
        except Conflict as error:
            return None, "no rollback: %s and runs instead" % error
        except (IpdError, OSError) as error:
            log.warning("rollback of %s to %s failed: %s", reverted.id,
                        earlier.id, error)
            return None, "cannot roll back to %s: %s" % (earlier.id, error)
        return rollback, "rolled back: deployment %s redeploys %s" % (
            rollback.id, earlier.id)

    def finish_rollbacks(self):
        """At a start: for each release reverted because ipd stopped while
        it was in verify, queue its rollback (unless it was committed just
        before the stop), record it, say so in its log, and tell its end."""
        for reverted, made in self.store.rollbacks_unrecorded():
            why = "ipd stopped while control.sh verify ran: it was never judged"
            if made is None:
                made, done = self.roll_back(reverted, why)
            else:
                done = "rolled back: deployment %s redeploys %s" % (
                    made.id, made.others.get("redeploy_of"))
            try:
                with open(self.store.path(reverted, ".log"), "ab") as file:
                    file.write(("\nipd: reverted: %s; %s\n" % (why, done)).encode())
            except OSError as error:
                log.warning("cannot write to the log of %s: %s", reverted.id, error)
            log.warning("deployment %s of %s reverted: %s; %s", reverted.id,
                        reverted.project, why, done)
            self.notifier.deployment_ended(self.store.update(
                reverted.id, rollback=made.id if made else None))

    def statistics(self):
        """Deployments, states, queue, running, durations, uploads and
        bytes received (DeploymentStore.statistics): as of one moment."""
        return self.store.statistics()

    def login(self, scheme, credentials, role, address, path):
        """The User of an Authorization header's scheme and credentials
        (Basic, or Bearer for a token), with role; raises TooManyRequests
        while address is throttled (checked before any password is hashed),
        Unauthorized for none or refused ones (logged and audited, never the
        password), Forbidden for another role."""
        user, refusal = None, "authentication required"
        if scheme.lower() in ("basic", "bearer"):
            wait = self.login_throttle.retry_after(address)
            if wait:
                raise TooManyRequests("too many failed logins from %s: retry in "
                                      "%d s" % (address, wait),
                                      {"Retry-After": str(wait)})
            name, password = parse_credentials(scheme, credentials)
            user, reason = (self.check_login(name, password, is_registry_path(path))
                            if password else (None, "malformed credentials"))
            if user is None:
                refusal = login_refusal(scheme, password, bool(self.oidc))
                self.login_throttle.failed(address)
                log.warning("failed login as %r from %s", name[:64], address)
                audit_event("login_refused", user=name[:64], address=address,
                            path=path, reason=reason, **getattr(reason, "audit", {}))
        if user is None:  # the registry's challenge exactly as issue 24 names it
            raise Unauthorized(refusal, {"WWW-Authenticate": 'Basic realm="ipd"' if
                                         is_registry_path(path) else
                                         'Basic realm="ipd", charset="UTF-8"'})
        if user.role not in ADMITTED[role]:
            raise Forbidden("forbidden: this needs the %s role"
                            % " or ".join(ADMITTED[role]))
        return user

    def check_login(self, name, password, registry=False):
        """-> (User, None), or (None, why) for a refused login.  A deploy
        token (ipd_...) is taken as the password, whatever the name, and
        so is an ID token (eyJ...) when OIDC_TRUST is set; on a registry
        request (docker sends one password all its push long) an ID token
        that logged in there before its exp is good OIDC_SESSION past it."""
        if self.oidc and looks_like_jwt(password):
            user, reason = self.oidc.authenticate(password, session=registry)
            if user is None:  # as slow as a wrong password
                check_password(password[:256], self.users.decoy_hash())
            return user, reason
        if password.startswith("ipd_"):
            user, reason = self.tokens.authenticate(password)
            if user is None:  # as slow as a wrong password
                check_password(password, self.users.decoy_hash())
            return user, reason
        user = self.users.authenticate(name, password)
        return user, None if user else "wrong user or password"

    def signature_required(self, project):
        """True when project's pushes must be signed (REQUIRE_SIGNATURE)."""
        rule = self.settings.REQUIRE_SIGNATURE
        return "*" in rule or project in rule

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
        newest, nonces = self.store.signed_history(project)
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

    # --- reading, for the API (one method per row of the README's table)

    def check_access(self, user, project):
        """Raise Forbidden unless user may use project."""
        if not user.may_use(project):
            raise Forbidden("forbidden: user %s may not use project %s"
                            % (user.name, project))

    def find(self, user, project, deployment_id=None):
        """project's deployment (its latest without deployment_id), or None;
        Forbidden when user may not use project.  Names that cannot exist
        are looked up too (never used as paths), so every miss is None."""
        self.check_access(user, project)
        return self.store.find(project, deployment_id)

    def find_or_404(self, user, project, deployment_id):
        """find(), or NotFound ('no', as the original README answers)."""
        record = self.find(user, project, deployment_id)
        if record is None:
            raise NotFound("no")
        return record

    def wait_final(self, record, timeout):
        """record once it has ended, or as it is after timeout seconds."""
        return self.store.wait_final(record.id, timeout, record.project)

    def project_names(self):
        """Projects with deployments or a control.sh placed on the server."""
        projects = set(self.store.projects())
        try:
            for entry in os.scandir(self.settings.UPLOAD_DIR):
                if (is_project_name(entry.name) and
                        os.path.isfile(os.path.join(entry.path, "control.sh"))):
                    projects.add(entry.name)
        except OSError:
            pass
        return sorted(projects)

    def project_latest(self, user=None):
        """[(project, latest record, number of deployments)], by name: every
        project's, or those user may use."""
        return [(project, latest, count) for project, (latest, count)
                in self.store.projects().items()
                if user is None or user.may_use(project)]

    def live_deployment(self, project):
        """project's deployment that is live (its last ok), or None."""
        return self.store.live_deployment(project)

    def history(self, user, project):
        """project's deployments, oldest first, the newest HISTORY_LIMIT of
        them; NotFound for none."""
        self.check_access(user, project)
        records = self.store.deployments_of(project, HISTORY_LIMIT)
        if not records:
            raise NotFound("no")
        return records

    def open_log(self, record):
        """record's log, open for reading in binary (empty when gone)."""
        try:
            return open(self.store.path(record, ".log"), "rb")
        except FileNotFoundError:
            return io.BytesIO()

    def log_tail(self, record, limit):
        """(bytes left out, the last limit bytes of record's log)."""
        return read_log_tail(self.store.path(record, ".log"), limit)

    def audit_events(self, project, since):
        """The audit log's events, oldest first (see read_audit)."""
        return read_audit(os.path.join(self.settings.LOG_DIR, "audit.log"),
                          project, since)

    def full_statistics(self):
        """/stat's figures: version, uptime, the store's (statistics) and
        the segments'."""
        stats = dict({"version": __version__,
                      "uptime": round(time.time() - self.started, 3)},
                     **self.statistics())
        stats.update(self.segments.statistics(self.store))
        return stats

    def metrics_text(self):
        """/metrics in Prometheus' text format (version 0.0.4)."""
        stats = self.full_statistics()
        gauges = {
            "ipd_queue_length": ("Deployments waiting to run.", stats["queue"]),
            "ipd_running_deployments": ("Deployments whose control.sh runs.",
                                        stats["running"]),
            "ipd_start_time_seconds": ("When ipd started.", "%.3f" % self.started),
            "ipd_segments": ("Segments stored, each once.", stats["segments"]),
            "ipd_unique_bytes": ("Bytes of the stored segments.", stats["unique_bytes"]),
            "ipd_stored_bytes": ("Bytes the kept deployments' images and packages "
                                 "take: segments and files.", stats["stored_bytes"]),
            "ipd_saved_bytes": ("Bytes full copies of the kept deployments' files "
                                "would take beyond the stored bytes.",
                                stats["saved_bytes"]),
        }
        counters = {
            "ipd_uploads_total": ("Uploads accepted.", stats["uploads"]),
            "ipd_upload_bytes_total": ("Bytes of accepted uploads.",
                                       stats["bytes_received"]),
        }
        return self.store.metrics_text(gauges, counters)

    # --- changes, for the API

    def cancel_for(self, user, address, project, deployment_id):
        """POST /cancel: cancel project's deployment for user, and wait for
        a running one to stop (KILL_GRACE and some); -> its record."""
        record = self.find_or_404(user, project, deployment_id)
        self.cancel(record, user, address)
        return self.store.wait_final(record.id, self.settings.KILL_GRACE + 10,
                                     record.project)

    def redeploy_for(self, user, address, project, deployment_id):
        """POST /redeploy: a new deployment of an earlier one's files."""
        return self.redeploy(self.find_or_404(user, project, deployment_id),
                             user, address)

    # --- layer pushes and segments (#16)

    def push(self, user, address, recipe, project, received, client_waits):
        """POST /push: a deployment of project from a parsed recipe (see
        parse_recipe), its files rebuilt from inline bytes and user's
        segments while client_waits() says its client is still there, then
        exactly as an upload (create_deployment: -> (record, created)).
        The pieces must add up, within MAX_UPLOAD_SIZE and the free space,
        before a byte is copied.  Raises IpdError."""
        check_recipe_size(recipe["files"], self.settings)
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
                sink = upload.files[field] = FileSink(
                    self.settings.UPLOAD_DIR, field, meta["name"], parallel=True)
                self.segments.rebuild(user, field, meta, sink, client_waits)
                sink.close()
            upload.recipe = RecipeFile(encode_recipe(recipe["files"]),
                                       self.settings.UPLOAD_DIR)
            return self.create_deployment(project, upload, user, address, received)
        finally:
            upload.discard()

    def segment_state(self, user, digest):
        """HEAD /segments/SHA256: (offset, complete) of user's view of the
        segment: its size and True once stored and visible to user, else
        how much of user's own upload of it has come.  NotFound for none."""
        stored = self.stored_segment_size(user, digest)
        if stored is not None:
            return stored, True
        offset = self.segments.partial_offset(user, digest)
        if offset is None:
            raise NotFound("no such segment on the server")
        return offset, False

    def stored_segment_size(self, user, digest):
        """The size of a stored segment user may know of, or None."""
        if self.segments.visible(user, [digest]):
            return self.segments.sizes.get(digest)
        return None

    def segment_room(self, user, offset, needed):
        """The most a segment request's body may add (0: no bound) at
        offset, needed its declared length: refused before a byte is read
        past MAX_UPLOAD_SIZE (TooLarge), over user's SEGMENT_QUOTA or below
        MIN_FREE_SPACE (DiskFull, 507: nothing of any project is pruned for
        a segment)."""
        limit = self.settings.MAX_UPLOAD_SIZE  # of the whole segment
        if limit and offset >= limit:
            raise TooLarge("segment larger than MAX_UPLOAD_SIZE (%d bytes)" % limit)
        limit = limit - offset if limit else 0
        check_room(self.settings.UPLOAD_DIR, self.settings.MIN_FREE_SPACE, needed,
                   "the segment")
        quota = self.settings.SEGMENT_QUOTA
        if not quota:
            return limit
        left = max(0, quota - self.segments.usage(user))
        if needed > left:
            raise DiskFull("segment uploads of %s not yet in a deployment would "
                           "hold more than SEGMENT_QUOTA (%d bytes): %d bytes left"
                           % (user.name, quota, left))
        return min(limit, left) if limit else max(left, 1)

    def receive_segment(self, user, digest, offset, restart, complete, body,
                        connection):
        """POST or PATCH /segments/SHA256: append body to user's upload of
        digest at offset (restart: from nothing), and with complete verify
        and store it; -> the offset it reached.  connection is the one it
        comes on, shut when a retry takes the upload over.  Raises Conflict
        (Upload-Offset), BadRequest for bytes of another digest."""
        writer = self.segments.begin(user, digest, offset, restart, connection,
                                     self.settings.SEGMENT_UPLOADS)
        try:
            offset = writer.receive(body)
            if complete:
                writer.finish()
        finally:
            writer.release()
        if complete:
            log.info("segment %s (%d bytes) stored, sent by %s", digest, offset,
                     user.name)
        return offset

    def missing_segments(self, user, digests):
        """POST /segments/missing: (the digests the server lacks for user,
        {digest: bytes of user's partial upload of it}); the ones it has
        are kept from collection for SEGMENT_EXPIRY."""
        segments = self.segments
        segments.collect_now_and_then()
        present = segments.visible(user, digests)
        segments.touch(present)  # only what exists and this user may see
        missing = [digest for digest in digests if digest not in present]
        partial = {}
        for digest in missing:
            offset = segments.partial_offset(user, digest)
            if offset:
                partial[digest] = offset
        return missing, partial

    def cancel(self, record, user, address):
        """Cancel a deployment for user (see DeploymentStore.cancel: who
        cancelled is logged and audited before its state can say so)."""
        return self.store.cancel(record.id, user.name, address)

    def redeploy(self, earlier, user, address, rollback_of=None, reason=None):
        """A new deployment from the kept files of an earlier one: the
        rollback.  Raises Gone when they were pruned.  rollback_of: the
        reverted deployment this one undoes (verify's rollback, audited
        as 'rollback' with reason); it yields to a waiting deployment of
        the project (Conflict)."""
        if earlier.pruned or not earlier.files:
            raise Gone("the files of deployment %s were pruned "
                       "(KEEP_DEPLOYMENTS): upload them again" % earlier.id)
        if self.signature_required(earlier.project) and user.role != "ADMIN":
            if not earlier.signer:
                raise Forbidden("project %s takes signed releases only: deployment "
                                "%s was not signed (an ADMIN may redeploy it)"
                                % (earlier.project, earlier.id))
            if earlier.signer["created"] < self.store.signed_history(earlier.project)[0]:
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

        if rollback_of:
            return self.deploy_upload(earlier.project, upload, user, "rollback",
                                      {"redeploy_of": earlier.id, "reverted": rollback_of,
                                       "reason": reason}, yield_to_waiting=True,
                                      redeploy_of=earlier.id, signer=earlier.signer,
                                      rollback_of=rollback_of, **registry_fields(earlier))
        return self.deploy_upload(earlier.project, upload, user, "redeploy",
                                  dict({"redeploy_of": earlier.id, "address": address},
                                       **oidc_fields(user)),
                                  redeploy_of=earlier.id, signer=earlier.signer,
                                  **dict(oidc_fields(user), **registry_fields(earlier)))

    def kept_recipe(self, earlier, name):
        """The recipe of the file name of a recipe deployment, as kept
        beside it (decode_recipe's); Gone when it is gone."""
        try:
            with open(self.store.path(earlier, ".recipe"), "rb") as file:
                return decode_recipe(file.read())[name]
        except (OSError, ValueError, KeyError, TypeError):
            raise Gone("the recipe of deployment %s is gone" % earlier.id)

    def rebuild_kept(self, earlier, name, user, wanted=None, block=REBUILD_BLOCK,
                     meta=None):
        """(#16) The file name of a recipe deployment, rebuilt from its kept
        recipe (meta, when read already: kept_recipe) into a FileSink
        (checked against the SHA-256 its record has); Gone when its
        segments are gone.  wanted, block: see Segments.rebuild."""
        meta = meta or self.kept_recipe(earlier, name)
        meta["sha256"] = meta["sha256"] or earlier.files[name].get("sha256")
        sink = FileSink(self.settings.UPLOAD_DIR, name, meta["name"], parallel=True)
        try:
            self.segments.rebuild(user, name, meta, sink, wanted, block)
        except BadRequest as error:
            sink.discard()
            raise Gone("the files of deployment %s cannot be rebuilt: %s"
                       % (earlier.id, error))
        except BaseException:
            sink.discard()
            raise
        sink.close()
        return sink

    def build_later_file(self, record, name, wanted):
        """One file of build_later_files, built and moved in: -> its {name,
        size, sha256}.  The free space is checked again (it was at the
        push, but others may have written since): DiskFull below
        MIN_FREE_SPACE, nothing pruned for it, as at the push.  A blob
        gone is named as a docker push knows it (Gone)."""
        check_room(self.settings.UPLOAD_DIR, self.settings.MIN_FREE_SPACE,
                   record.files[name]["size"], "the image's tar")
        recipe = self.kept_recipe(record, name)
        for piece in recipe["segments"]:
            digest = piece.get("sha256")
            if digest and not os.path.exists(self.segments.path(digest)):
                raise Gone("blob sha256:%s is gone: push the image again" % digest)
        sink = self.rebuild_kept(record, name, registry_principal(record.project), wanted,
                                 CHUNK_SIZE, recipe)
        try:
            os.rename(sink.path, self.store.path(record, "." + name))
        except OSError:
            sink.discard()  # nothing of it left in UPLOAD_DIR
            raise
        return sink.describe()

    def build_later_files(self, record, wanted):
        """The worker's first task for a deployment whose commit left files
        to it (LaterFile: a docker push's $IMAGE, #24, so that the push is
        answered as soon as its manifest is kept): build each from the
        recipe as a redeploy rebuilds a dropped one, move it in
        (build_later_file), and -> the record with their SHA-256s.
        Raises Gone, DiskFull, OSError; ClientGone when wanted() says stop
        (a cancel, or ipd stops)."""
        names = record.files_to_build()
        if not names:
            return record
        files = dict(record.files)
        for name in names:
            files[name] = self.build_later_file(record, name, wanted)
        return self.store.update(record.id, files=files)

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
        if upload.fields.get("force", "0") not in ("1", "true", "yes"):
            earlier = self.store.holding(project, upload_identity(
                {name: sink.describe() for name, sink in upload.files.items()},
                upload.record))
            if earlier:
                log.info("deployment %s of %s: the same files again, from %s; "
                         "not queued twice", earlier.id, project, user.name)
                return earlier, False
        if signer:
            self.check_not_replayed(project, signer, user, address)
        extra = dict(oidc_fields(user), **upload.record)
        record = self.deploy_upload(project, upload, user, "upload",
                                    dict({"address": address, "signer": signer},
                                         **extra),
                                    received=received, signer=signer, **extra)
        return record, True

    def deploy_upload(self, project, upload, user, event, fields, received=0,
                      yield_to_waiting=False, **extra):
        """Unpack the package, find control.sh, and commit the deployment:
        audited as event ('upload', 'redeploy', 'rollback': fields, who,
        which deployment, its files) and counted (received bytes, an
        upload) as it shows (DeploymentStore.commit; yield_to_waiting for
        a rollback); extra: its record's fields.

        Returns its record; on any error nothing of the upload is left.
        """
        staging = tempfile.mkdtemp(prefix=".upload-", suffix=".dir",
                                   dir=self.settings.UPLOAD_DIR)
        record = None
        try:
            control = self.unpack_upload(project, upload, staging)
            files = {name: sink.describe() for name, sink in upload.files.items()}
            record = Deployment(str(uuid.uuid4()), project, None, user.name,
                                files, control, recipe=upload.recipe is not None,
                                **extra)
            if control.startswith(staging + os.sep):
                record.control = os.path.join(self.store.path(record), "control.sh")
            moves = {"." + name: sink.path for name, sink in upload.files.items()
                     if sink.path is not None}  # not a LaterFile
            if upload.recipe is not None:
                moves[".recipe"] = upload.recipe.path
                # its segments referred to before it can run, end and let a
                # collection take them (forgotten again if the commit fails)
                self.segments.refer_recipe(record, upload.recipe.path)
            fields = dict(fields, project=project, deployment=record.id,
                          user=user.name, files=record.files)
            record = self.store.commit(record, staging, moves, (event, fields),
                                       deployment_message(record, event), received,
                                       yield_to_waiting)
        except BaseException as error:
            if record is not None:
                self.segments.forget(record.id)
            remove_quietly(staging)
            raise disk_errors(error)
        finally:
            upload.discard()
        return record

    def unpack_upload(self, project, upload, staging):
        """Unpack upload's package (if any) into staging, and -> the path of
        the control.sh that is to run: the package's own, where the
        project's SCRIPTS allows it, else the one on the server.  Raises
        BadRequest for a package that carries a control.sh it may not."""
        project_dir = self.store.project_dir(project)
        own_script = "package" in upload.files and project_settings(
            self.settings, project_dir)["SCRIPTS"] == "package"
        if "package" in upload.files:
            unpack_package(upload.files["package"].path, staging,
                           self.settings.MAX_UNPACKED_SIZE,
                           PackageLimits(self.settings))
            if not own_script and os.path.lexists(os.path.join(staging, "control.sh")):
                raise BadRequest(
                    "the package carries a control.sh, and project %s runs "
                    "only the one an administrator placed on the server "
                    "(SCRIPTS=server): leave it out of the package" % project)
        return find_control_script(staging if own_script else None, project_dir)

    # --- the registry (#24): docker push and pull; RegistryRequest

    def registry_project(self, user, project, push=False):
        """Check that user may use project's repository (to push to, with
        push); raises RegistryError DENIED (the signed route named for a
        project that takes signed releases only)."""
        if not user.may_use(project):
            raise RegistryError(403, "DENIED", "user %s may not use repository %s"
                                % (user.name, project))
        if push and self.signature_required(project):
            raise RegistryError(403, "DENIED", "project %s takes signed releases only "
                                "(REQUIRE_SIGNATURE): push with ipd.py push --sign "
                                "KEY, not a registry push" % project)

    def registry_blob_size(self, user, project, digest):
        """The size of blob HEX in project's repository: pushed to it,
        referred to by a kept deployment of it, or stored and visible to
        user (then linked to it).  RegistryError BLOB_UNKNOWN otherwise."""
        principal = registry_principal(project)
        if not self.segments.visible(principal, [digest]):
            if not (self.segments.visible(user, [digest]) and
                    self.segments.link(principal, digest)):
                raise RegistryError(404, "BLOB_UNKNOWN", "blob sha256:%s is not in "
                                    "repository %s" % (digest, project))
        return self.segments.stored_size(digest)

    def registry_open_blob(self, user, project, digest):
        """(open file, size) of a blob of project's repository (see
        registry_blob_size); RegistryError BLOB_UNKNOWN."""
        size = self.registry_blob_size(user, project, digest)
        file = self.segments.open_segment(digest)
        if file is None or size is None:
            raise RegistryError(404, "BLOB_UNKNOWN", "blob sha256:%s is gone" % digest)
        return file, size

    def registry_mount(self, user, project, digest, source):
        """Mount blob HEX from repository source (a project user may use)
        into project: True when done, False when it is to be uploaded."""
        try:
            source = registry_project(source)
        except RegistryError:
            return False
        if not user.may_use(source):
            return False
        principal = registry_principal(source)
        if self.segments.visible(principal, [digest]):
            return self.segments.link(registry_principal(project), digest)
        try:
            return self.registry_blob_size(user, project, digest) is not None
        except RegistryError:
            return False

    def registry_start_upload(self, user, project):
        """A new upload session (BlobUpload) of user to project (507 below
        MIN_FREE_SPACE: nothing is pruned for a push, see check_room)."""
        check_room(self.settings.UPLOAD_DIR, self.settings.MIN_FREE_SPACE, 0,
                   "a blob upload")
        self.segments.collect_now_and_then()
        return self.registry.start(user, project)

    def registry_session(self, user, project, session_id):
        """user's upload session; RegistryError BLOB_UPLOAD_UNKNOWN."""
        return self.registry.find(user, project, session_id)

    def registry_room(self, session, needed):
        """The most a request may add to session (0: no bound): within
        MAX_UPLOAD_SIZE for the whole blob (413), SEGMENT_QUOTA for what the
        project's repository holds undeployed, and above MIN_FREE_SPACE
        (507), needed bytes (a Content-Length) checked at once."""
        limit = self.settings.MAX_UPLOAD_SIZE
        if limit and session.offset + needed > limit or limit and session.offset >= limit:
            raise RegistryError(413, "SIZE_INVALID", "blob larger than MAX_UPLOAD_SIZE "
                                "(%d bytes)" % limit)
        limit = limit - session.offset if limit else 0
        check_room(self.settings.UPLOAD_DIR, self.settings.MIN_FREE_SPACE, needed,
                   "the blob")
        quota = self.settings.SEGMENT_QUOTA
        if not quota:
            return limit
        left = max(0, quota - self.segments.usage(registry_principal(session.project)))
        if needed > left or not left:
            raise DiskFull("blobs pushed to %s and not yet deployed would hold more "
                           "than SEGMENT_QUOTA (%d bytes): %d bytes left"
                           % (session.project, quota, left))
        return min(limit, left) if limit else left

    def registry_receive(self, session, open_body, content_range=None, needed=0):
        """Append a request body (open_body(limit) opens it, once the request
        passed its checks, within registry_room) to session, at
        content_range's (start, end) when given: the start must be where it
        ends, else 416 with the current Range.  Raises RegistryError."""
        self.registry.take(session)
        try:
            length = None
            if content_range is not None:
                if content_range[0] != session.offset:
                    raise RegistryError(416, "BLOB_UPLOAD_INVALID", "Content-Range "
                                        "starts at %d but the upload has %d bytes"
                                        % (content_range[0], session.offset),
                                        session.headers())
                length = content_range[1] - content_range[0] + 1
            before = session.offset
            room = self.registry_room(session, needed)
            try:
                session.receive(open_body(room), length)
            except RegistryError as error:
                error.headers = dict(session.headers(), **error.headers)
                raise
            finally:
                self.registry.count_received(session.project,
                                             max(session.offset - before, 0))
        finally:
            session.guard.release()
        return session

    def registry_finish_upload(self, user, session, digest, open_body=None, needed=0):
        """The last bytes (open_body()) of session, then its SHA-256 checked against
        digest (HEX) and the blob stored in project's repository; the session
        ends either way.  RegistryError DIGEST_INVALID on a mismatch."""
        try:
            if open_body is not None:
                self.registry_receive(session, open_body, needed=needed)
            self.registry.take(session)
            try:
                found = session.sha256.hexdigest()
                if found != digest:
                    raise RegistryError(400, "DIGEST_INVALID", "the blob's bytes have "
                                        "digest sha256:%s, not sha256:%s" % (found, digest))
                try:
                    with open(session.path, "rb+") as file:
                        os.fsync(file.fileno())
                    self.segments.add(registry_principal(session.project), digest,
                                      session.path)
                except FileNotFoundError:  # expired and collected meanwhile
                    raise RegistryError(404, "BLOB_UPLOAD_UNKNOWN", "no such upload: "
                                        "start it again")
            finally:
                session.guard.release()
        finally:
            self.registry.drop(session)
        log.info("blob sha256:%s (%d bytes) pushed to %s by %s", digest,
                 session.offset, session.project, user.name)

    def registry_cancel_upload(self, session):
        """DELETE of an upload: its bytes go."""
        self.registry.take(session)
        session.guard.release()
        self.registry.drop(session)

    def registry_manifest(self, user, project, reference):
        """(media type, bytes, HEX) of a manifest of project's repository by
        ('tag', TAG) or ('digest', HEX); RegistryError MANIFEST_UNKNOWN."""
        kind, value = reference
        digest = self.registry.tags(project).get(value) if kind == "tag" else value
        data = None
        if digest and self.segments.visible(registry_principal(project), [digest]):
            data = self.segments.read_segment(digest, REGISTRY_MANIFEST_LIMIT)
        try:
            manifest = parse_registry_manifest(data) if data is not None else None
        except RegistryError:
            manifest = None
        if manifest is None:
            raise RegistryError(404, "MANIFEST_UNKNOWN", "manifest %s is not in "
                                "repository %s" % (printable(value, 100), project))
        return manifest["mediaType"], data, digest

    def registry_tags(self, user, project):
        """The tags of project's repository, by name."""
        return sorted(self.registry.tags(project))

    def registry_check_manifest(self, user, project, manifest):
        """Every blob (or child manifest) a parsed manifest names is in
        project's repository with the size it says; RegistryError
        MANIFEST_BLOB_UNKNOWN for one that is not."""
        named = manifest["manifests"] or [manifest["config"]] + manifest["layers"]
        self.segments.touch([item["digest"] for item in named])
        for item in named:
            try:
                size = self.registry_blob_size(user, project, item["digest"])
            except RegistryError:
                raise RegistryError(400, "MANIFEST_BLOB_UNKNOWN", "the manifest names "
                                    "sha256:%s, which repository %s does not have: "
                                    "push it first" % (item["digest"], project))
            if size != item["size"]:
                raise RegistryError(400, "MANIFEST_INVALID", "sha256:%s has %s bytes, "
                                    "not the %d the manifest says"
                                    % (item["digest"], size, item["size"]))

    def registry_put_manifest(self, user, project, reference, content_type, data,
                              address, host):
        """Store a pushed manifest byte for byte (checked: see
        parse_registry_manifest, registry_check_manifest); by tag, deploy
        it (registry_deploy) and tag it.  -> (HEX, deployment record or
        None).  Raises RegistryError or IpdError."""
        kind, value = reference
        digest = hashlib.sha256(data).hexdigest()
        if kind == "digest" and value != digest:
            raise RegistryError(400, "DIGEST_INVALID", "the manifest's digest is "
                                "sha256:%s, not sha256:%s" % (digest, value))
        manifest = parse_registry_manifest(data, content_type)
        self.registry_check_manifest(user, project, manifest)
        image = None
        if kind == "tag":  # what it deploys, checked before anything is kept
            image = self.registry_image(project, digest, manifest, len(data))
            check_loadable(image[0])
        self.segments.add_bytes(registry_principal(project), digest, data)
        record = None
        if kind == "tag":
            record = self.registry_deploy(user, project, value, digest, image,
                                          address, host, len(data))
            self.registry.set_tag(project, value, digest)
        audit_event("registry_push", project=project, user=user.name, address=address,
                    reference=value, digest="sha256:" + digest,
                    deployment=record.id if record else None)
        return digest, record

    def registry_image(self, project, digest, manifest, size):
        """(image manifest, its HEX, its size, extra blobs [(HEX, size)]) that
        a push of manifest (HEX, size bytes) deploys: itself, or an index's
        image for this platform (then the index is the extra blob)."""
        if not manifest["index"]:
            return manifest, digest, size, ()
        child = choose_platform(manifest)
        data = self.segments.read_segment(child["digest"], REGISTRY_MANIFEST_LIMIT)
        if data is None:
            raise RegistryError(400, "MANIFEST_BLOB_UNKNOWN", "the index's image "
                                "sha256:%s is not in repository %s" % (
                                    child["digest"], project))
        image = parse_registry_manifest(data)
        if image["index"]:
            raise RegistryError(400, "MANIFEST_INVALID", "an index in an index is "
                                "not deployed")
        return image, child["digest"], len(data), [(digest, size)]

    def registry_deploy(self, user, project, tag, digest, image, address, host,
                        received):
        """A deployment of manifest HEX pushed by tag (image: registry_image's),
        through create_deployment as an upload: $IMAGE a docker-load tar of
        its image (docker_load_members), a LaterFile that the worker builds
        from the recipe that refers to the stored blobs (build_later_files);
        IMAGE_REF and IMAGE_DIGEST in its record.  -> the record."""
        image, image_digest, image_size, extra = image
        image_ref = "%s/%s:%s" % (host, project, tag)
        pieces = archive_pieces(docker_load_members(image_ref, tag, image, image_digest,
                                                    image_size, extra))
        size = sum(len(piece["data"]) if "data" in piece else piece["size"]
                   for piece in pieces)
        limit = self.settings.MAX_UPLOAD_SIZE  # of $IMAGE, as for a layer push
        if limit and size > limit:
            raise RegistryError(413, "SIZE_INVALID", "the image's tar would have %d "
                                "bytes, over MAX_UPLOAD_SIZE (%d)" % (size, limit))
        check_room(self.settings.UPLOAD_DIR, self.settings.MIN_FREE_SPACE, size,
                   "the image's tar")
        upload = Upload()
        try:
            upload.fields["project"] = project
            upload.files["image"] = LaterFile("image.tar", size)
            upload.recipe = RecipeFile(encode_recipe({"image": {
                "name": "image.tar", "size": size, "sha256": None,
                "segments": pieces}}), self.settings.UPLOAD_DIR)
            upload.record = {"image_ref": image_ref, "image_digest": "sha256:" + digest}
            record, _ = self.create_deployment(
                project, upload, user, address,
                received + self.registry.take_received(project))
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
    "background:#6b6b6b;white-space:nowrap}"
    # one colour a state (issue #27): await and active, the failures apart
    ".ok{background:#2a7d2e}.active{background:#1f5fa8}.await{background:#8a6100}"
    ".failed{background:#b3261e}.timeout{background:#a34400}"
    ".interrupted{background:#7b3fa0}.cancelled{background:#5c5c5c}"
    ".changed{background:#0f6e69}.reverted{background:#a14a00}"
    ".mark{display:inline-block;margin-left:.4em;padding:0 .45em;font-size:.8em;"
    "border:1px solid #2a7d2e;border-radius:.6em;color:#2a7d2e}"
    ".mark.newest{border-color:#6b6b6b;color:#555}tr.live{background:#f1f8f1}"
    "time,code[title],a code{white-space:nowrap}code{font-size:.85em}"
    "pre{background:#111;color:#eee;padding:.8em;white-space:pre-wrap;"
    "word-break:break-all;min-height:3em}form{display:inline}"
    "button{font:inherit;padding:.15em .8em;margin-right:.4em}"
    # a narrow screen: one row a block, each value after its label
    "@media(max-width:40em){th,td{display:block;border:0}tr{display:block;"
    "border-bottom:1px solid #ddd}tr.head{display:none}"
    "td[data-label]::before{content:attr(data-label);display:inline-block;"
    "min-width:7em;color:#555;font-size:.85em}}")


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


def short_digest(value, keep=12):
    """A digest or fingerprint as its first keep characters, the whole
    value in the title (shown on hover)."""
    shown = value if len(value) <= keep + 1 else value[:keep] + "\u2026"
    return '<code title="%s">%s</code>' % (html.escape(value), html.escape(shown))


def signed_by(record):
    """', signed by WHO@PROJECT (SHA256:...)' for a signed release."""
    signer = record.signer
    if not signer:
        return ""
    return "<br>signed by %s %s" % (html.escape(signer["principal"]),
                                    short_digest(signer["fingerprint"], 19))


def oidc_by(record):
    """'ID token of ISSUER: repository ..., ref ...' for a deployment
    pushed with an ID token."""
    oidc = record.others.get("oidc")
    if not isinstance(oidc, dict):
        return ""
    shown = [(name, oidc[name]) for name in OIDC_CLAIMS if name in oidc]
    return "<br>ID token of %s: %s" % (html.escape(str(oidc.get("issuer"))), ", ".join(
        "%s <code>%s</code>" % (name, html.escape(str(value))) for name, value in shown))


# The states with a badge of their own; any other (an exit code) is a
# failure.  Each has its own colour in PAGE_STYLE.
BADGE_STATES = ("await", "active", "ok", "timeout", "cancelled", "interrupted",
                "changed", "reverted")


def state_badge(state, word=None):
    """The badge of a state: its colour, and word (default: the state)."""
    kind = state if state in BADGE_STATES else "failed"
    return '<span class="badge %s">%s</span>' % (kind, html.escape(word or state))


def state_words(record):
    """The state as people read it: 'deploy failed: 5' for one that ended
    with a step's exit code (from its steps), else the state."""
    if record.state in BADGE_STATES:
        return record.state
    for step in reversed(record.steps):
        if str(step.get("code")) == record.state:
            return "%s failed: %s" % (step.get("step"), record.state)
    return "failed: %s" % record.state


def record_badge(record):
    """The badge of a deployment: its state's colour, state_words' words."""
    return state_badge(record.state, state_words(record))


def full_time(timestamp):
    """'2026-12-04 18:21:18 UTC': a time for people, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def time_ago(seconds):
    """'12 s ago', '3 min ago', '5 h ago', '2 d ago'."""
    seconds = max(0, int(seconds))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return "%d %s ago" % (seconds // size, unit)
    return "%d s ago" % seconds


def page_time(timestamp, now=None, word="", title=None):
    """A time as 'WORD 3 min ago' (now: the page's time), the full time (or
    title) on hover and in datetime: computed here, no script needed."""
    if not timestamp:
        return "-"
    now = time.time() if now is None else now
    return '<time datetime="%s" title="%s">%s%s</time>' % (
        html.escape(iso_time(timestamp)), html.escape(title or full_time(timestamp)),
        word + " " if word else "", time_ago(now - timestamp))


def record_time(record, now=None):
    """A deployment's latest time ('ended 3 min ago', else started, else
    uploaded), its three full times in the title."""
    times = [(word, value) for word, value in (
        ("uploaded", record.created), ("started", record.started),
        ("ended", record.ended)) if value]
    if not times:
        return "-"
    word, value = times[-1]
    return page_time(value, now, word, "; ".join(
        "%s %s" % (name, full_time(when)) for name, when in times))


def human_duration(seconds):
    """'0.4 s', '12 s', '3 min 5 s', '2 h 10 min'."""
    if seconds < 10:
        return "%.1f s" % seconds
    seconds = int(seconds)
    if seconds < 60:
        return "%d s" % seconds
    if seconds < 3600:
        return "%d min %d s" % (seconds // 60, seconds % 60)
    return "%d h %d min" % (seconds // 3600, seconds % 3600 // 60)


def page_duration(record, now=None):
    """How long a deployment ran, or runs so far; '-' before it starts."""
    if record.started and record.ended:
        return human_duration(record.ended - record.started)
    if record.started and record.state in UNFINISHED:
        now = time.time() if now is None else now
        return human_duration(max(0, now - record.started)) + " so far"
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
    """The buttons that apply to record: cancel while it waits or runs,
    redeploy once it ended with its files kept."""
    actions = []
    if record.state in UNFINISHED:
        actions.append("cancel")
    elif record.files and not record.pruned:
        actions.append("redeploy")
    return "".join('<form method="post" action="%s"><button>%s</button></form>'
                   % (ui_link(root, record.project, record.id, action), action)
                   for action in actions)


def table_row(cells, css=""):
    """A row of (label, html) cells; each label shows beside its value on a
    narrow screen (data-label, see PAGE_STYLE)."""
    return "<tr%s>%s</tr>" % (' class="%s"' % css if css else "", "".join(
        '<td data-label="%s">%s</td>' % (html.escape(label), value)
        for label, value in cells))


def render_table(labels, rows):
    """The pieces of a table: its head row of labels (hidden on a narrow
    screen), then rows (see table_row), as they come."""
    return itertools.chain(['<table><tr class="head">%s</tr>' % "".join(
        "<th>%s</th>" % html.escape(label) for label in labels)], rows, ["</table>"])


def deployment_link(root, project, deployment_id):
    """A link to a deployment's page, its ID cut to 8 characters."""
    return '<a href="%s"><code>%s</code></a>' % (ui_link(root, project, deployment_id),
                                                 html.escape(deployment_id[:8]))


def marks(words):
    """Small labels after a deployment's ID: 'live', 'newest'."""
    return "".join('<span class="mark %s">%s</span>' % (word, word) for word in words)


DEPLOYMENT_LABELS = ("deployment", "state", "when", "took", "by",
                     "files (SHA-256)", "")


def deployment_row(root, record, now=None, marked=()):
    """A deployment's row on its project's page; marked: 'live' (its last
    ok) and/or 'newest'."""
    files = "".join("<div>%s: %s, {:,} bytes %s</div>".format(meta.get("size", 0)) % (
        html.escape(name), html.escape(meta.get("name") or "-"),
        short_digest(meta.get("sha256", "")))
        for name, meta in sorted(record.files.items()))
    values = (
        deployment_link(root, record.project, record.id) + marks(marked),
        record_badge(record), record_time(record, now), page_duration(record, now),
        html.escape(record.user or "-") + signed_by(record) + oidc_by(record),
        files + ("<div>(pruned)</div>" if record.pruned else ""),
        buttons(root, record))
    return table_row(zip(DEPLOYMENT_LABELS, values),
                     "live" if "live" in marked else "")


def last_activity(record):
    """When a deployment last changed: its end, start or upload time."""
    return record.ended or record.started or record.created or 0


def project_row(root, project, latest, count, live, now):
    """A project's row: its newest deployment, the one live, how many."""
    live_cell = "-"
    if live is not None:
        live_cell = "%s %s" % (deployment_link(root, project, live.id),
                               page_time(live.ended, now))
    return table_row((
        ("project", '<a href="%s">%s</a>' % (
            ui_link(root, project), html.escape(project))),
        ("newest", record_badge(latest)), ("when", record_time(latest, now)),
        ("took", page_duration(latest, now)),
        ("by", html.escape(latest.user or "-")), ("live", live_cell),
        ("deployments", "%d" % count)))


def render_projects(root, projects, live=None, now=None):
    """The body of the projects page: projects is a list of (project, its
    latest Deployment, its number of deployments), shown by last activity,
    newest first; live: {project: its last ok Deployment or None}."""
    if not projects:
        return "<p>No deployments yet.</p>"
    live = live or {}
    rows = (project_row(root, project, latest, count, live.get(project), now)
            for project, latest, count in sorted(
                projects, key=lambda entry: -last_activity(entry[1])))
    return render_table(("project", "newest", "when", "took", "by", "live",
                         "deployments"), rows)


def render_project(root, records, now=None):
    """The body of a project's page: its deployments (records, oldest
    first), newest first, the live one (its last ok) marked."""
    live = next((record.id for record in reversed(records) if record.state == "ok"),
                None)
    newest = records[-1].id if records else None

    def row(record):
        marked = tuple(word for word, deployment_id in (("live", live),
                                                        ("newest", newest))
                       if record.id == deployment_id)
        return deployment_row(root, record, now, marked)
    return render_table(DEPLOYMENT_LABELS, (row(record) for record in reversed(records)))


def render_deployment(root, record, skipped, text, now=None, live=False):
    """The body of a deployment's page: its state, times, buttons and the
    end of its log (text, the log's bytes after the first skipped); live:
    it is its project's last ok."""
    project, deployment_id = record.project, record.id
    follow = "%s/log/%s/%s?follow=1&offset=%d" % (
        root, project, deployment_id, skipped + len(text))
    whole = ("<p>The first %d bytes of the log are left out here: "
             "<a href=\"%s/log/%s/%s\">the whole log</a> (text).</p>" % (
                 skipped, html.escape(root),
                 html.escape(urllib.parse.quote(project, safe="")),
                 html.escape(deployment_id))) if skipped else ""
    return ("<p>%s%s of <a href=\"%s\">%s</a> by %s &middot; uploaded %s, "
            "started %s, ended %s, took %s</p><p>%s</p>" % (
                record_badge(record), marks(("live",) if live else ()),
                ui_link(root, project), html.escape(project),
                html.escape(record.user or "-") + signed_by(record) + oidc_by(record),
                page_time(record.created, now), page_time(record.started, now),
                page_time(record.ended, now), page_duration(record, now),
                buttons(root, record)) + whole +
            "<pre id=\"log\" data-follow=\"%s\">%s</pre>" % (
                html.escape(follow), html.escape(text.decode("utf-8", "replace"))))


###############################################################################
# HTTP: routes, the request handler and the server ############################
###############################################################################

# Parse, call the service, answer: the route table and the cross-origin
# check; one Handler (the API) per connection, on HttpEdge (framing,
# bodies, answers), with RegistryRequest for the registry's /v2/.


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

# The registry's endpoints under /v2/ (#24): (method, kind of path, see
# parse_registry_path) -> RegistryRequest.NAME; every one needs a login.
REGISTRY_ROUTES = {
    ("GET", "base"): "base", ("HEAD", "base"): "base",
    ("GET", "blob"): "blob", ("HEAD", "blob"): "blob",
    ("POST", "uploads"): "upload_start",
    ("PATCH", "upload"): "upload_patch", ("PUT", "upload"): "upload_put",
    ("GET", "upload"): "upload_status", ("HEAD", "upload"): "upload_status",
    ("DELETE", "upload"): "upload_delete",
    ("GET", "manifest"): "manifest", ("HEAD", "manifest"): "manifest",
    ("PUT", "manifest"): "manifest_put",
    ("GET", "tags"): "tags", ("HEAD", "tags"): "tags",
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


def referer_origin(referer):
    """The origin of a Referer URL (see normalize_origin), or None: a
    browser older than the Origin header on every POST (Firefox before 70)
    still names the page that sent it."""
    match = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*", referer.strip())
    return normalize_origin(match.group()) if match else None


# Methods that change nothing, so a browser may send them from any page.
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def check_origin(method, headers, own_origins):
    """Refuse a state-changing request that a page of another origin made a
    browser send.  Browsers attach remembered Basic credentials to every
    request to this server, even one that a foreign page's form or fetch()
    starts, so a login alone proves nothing about who asked.  Sec-Fetch-Site
    (sent by current browsers) must say same-origin or none; an Origin, when
    present, must be exactly one of own_origins; with neither, a Referer
    must be a page of one of them.  A request with none of the three (curl,
    CI, ipd.py push) is no browser's and passes.  Raises Forbidden."""
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
    referer = headers.get("Referer")
    if site is None and origin is None and referer is not None and \
            referer_origin(referer) not in own_origins:  # a browser before Origin
        raise Forbidden("cross-origin request refused: Referer %s is not a page "
                        "of this server (see PUBLIC_ORIGIN)" % printable(referer, 100))


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
        self._lock = threading.Lock()  # guards the three dicts and the reaper
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
        """A connection closed: it counts no more."""
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
        """A request's head is to come on connection within HEADER_TIMEOUT."""
        with self._lock:
            self._deadlines[connection] = time.monotonic() + self.head_timeout

    def head_done(self, connection):
        """The request's head came: no more deadline for it."""
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


def request_head_fault(headers):
    """What makes a request's head one that RFC 9112 says to refuse with
    400, or None: a header line that is not NAME: VALUE (5.1: whitespace
    before the colon MUST be refused, as one parser would read a
    Content-Length there and another not; and http.server, at a line with
    no colon, silently drops every header after it), or two Host headers
    (3.2; the origin check reads it).  A request without Host is served
    (HTTP/1.0's way): nothing of ipd depends on it."""
    if any(isinstance(defect, (email.errors.MissingHeaderBodySeparatorDefect,
                               email.errors.FirstHeaderLineIsContinuationDefect))
           for defect in headers.defects):
        return "a header line that is not NAME: VALUE"
    if len(headers.get_all("Host") or []) > 1:
        return "more than one Host header"
    return None


class HttpEdge(http.server.BaseHTTPRequestHandler):
    """The HTTP side of one connection, below the API: the request's
    framing and head deadline, the client's address and origin, the body
    reader, and every answer's status line, headers and body bytes.  It
    knows no endpoint: a subclass (Handler) gives route(method), which
    maps a request to its method, and authenticate(role)."""

    protocol_version = "HTTP/1.1"
    server_version = "ipd/" + __version__

    # --- plumbing

    def setup(self):
        """The connection's settings: READ_TIMEOUT, the daemon it serves."""
        self.timeout = self.server.ipd.settings.READ_TIMEOUT
        self.ipd = self.server.ipd
        super().setup()

    def finish(self):
        """After the last answer: drain what a refused request still sends."""
        super().finish()  # the answer flushed
        if self.close_connection and self.has_unread_body():
            drain_before_close(self.connection)

    def handle_one_request(self):
        """One request, its head within HEADER_TIMEOUT."""
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
        self.status_sent = None
        self.bytes_sent = 0
        self.started = time.monotonic()

    def handle_expect_100(self):
        # Answer 100 Continue only once the request passed its checks
        # (see api_upload), so a refused upload sends no body.
        """Note that the client waits: the body's first read sends 100
        Continue."""
        self.expects_continue = True
        return True

    def do_request(self):
        """Route a request, whatever its method (HEAD as GET, without the
        body): one entrance for all, see dispatch."""
        self.dispatch(self.command)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_request

    def dispatch(self, method):
        """Check framing, the client's connections, the origin and the
        login, then call the route's method; every error is answered
        here."""
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
        except (ClientGone, socket.timeout, ConnectionError) as error:
            how = "client gone" if isinstance(error, ClientGone) else "connection lost"
            log.info("%s %s: %s: %s", method, self.path[:200], how, error)
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
        reason = reason or request_head_fault(self.headers)
        if reason:
            self.close_connection = True
            raise BadRequest("malformed request: %s" % reason)

    def count_against_client(self):
        """A proxied request's connection counts against the client the
        proxy names (MAX_CONNECTIONS_PER_ADDRESS); over it, 503 and close."""
        if not self.server.guard.attribute(self.connection, self.client_ip()):
            self.close_connection = True
            raise Unavailable("too many connections from %s, try again"
                              % self.client_ip(), {"Retry-After": "1"})

    # --- the client: its address, its origin, what it asks for

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
        """True when the peer is one of TRUSTED_PROXIES."""
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

    def check_same_origin(self):
        """A button's POST comes from a browser, which says where from:
        besides check_origin (done for every request), one with neither
        Origin nor Sec-Fetch-Site needs a Referer of this server's origin."""
        if "Origin" in self.headers or "Sec-Fetch-Site" in self.headers:
            return
        if referer_origin(self.headers.get("Referer", "")) not in self.own_origins():
            raise Forbidden("cross-origin request refused: a button's POST "
                            "must name its origin")

    def wants_json(self):
        # headers is None before a request's head is read (begin_request)
        """True when the client asks for JSON (Accept)."""
        return (self.headers is not None and
                "application/json" in self.headers.get("Accept", ""))

    def wants_html(self):
        """True when a browser asks for a page (Accept: text/html)."""
        return (self.headers is not None and not self.wants_json()
                and "text/html" in self.headers.get("Accept", ""))

    def query_value(self, name, default=None):
        """The last ?name= of the query, or default when it has none."""
        values = self.query.get(name)
        return values[-1] if values else default

    def query_number(self, name):
        """?name=N as a whole number of ASCII digits (0 when absent)."""
        text = self.query_value(name, "0")
        if not re.fullmatch(r"[0-9]{1,18}", text):
            raise BadRequest("%s must be a whole number" % name)
        return int(text)

    def query_seconds(self, name, limit=3600):
        """?name=SECONDS as a number from 0 to limit (0 when absent)."""
        text = self.query_value(name, "0")
        try:
            value = float(text)
        except ValueError:
            raise BadRequest("%s must be a number of seconds" % name)
        if not 0 <= value <= limit:
            raise BadRequest("%s must be from 0 to %d seconds" % (name, limit))
        return value

    # --- the request body

    def content_length(self):
        """The request's Content-Length (0 when absent or not a number)."""
        length = (self.headers.get("Content-Length") or "0").strip()
        return int(length) if length.isdigit() and len(length) < 20 else 0

    def has_unread_body(self):
        """True when the request announced a body that was not read to its
        end: whatever is left of it must not be parsed as a request."""
        if self.headers is None:
            return False
        if self.body is not None:
            return not self.body.finished
        return ("Transfer-Encoding" in self.headers or
                self.headers.get("Content-Length", "0").strip() not in ("", "0"))

    def open_body(self, limit):
        """The request body as a LengthBody or ChunkedBody, checked against
        limit before any of it is read.  A client that waits for it to be
        asked for (Expect: 100-continue) is told at the first read: an
        endpoint refuses before it reads, and no body byte is sent then."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = ChunkedBody(self.rfile, limit)
        else:
            length = self.headers.get("Content-Length")
            if length is None:
                raise LengthRequired("a Content-Length or chunked body is required")
            if not re.fullmatch(r"\s*\d{1,19}\s*", length):
                raise BadRequest("bad Content-Length: %r" % length[:40])
            length = int(length)
            if limit and length > limit:
                raise TooLarge("upload larger than MAX_UPLOAD_SIZE (%d bytes)" % limit)
            body = LengthBody(self.rfile, length)
        if self.expects_continue:
            body.on_first_read = self.send_continue
        return body

    def send_continue(self):
        """100 Continue, once (see open_body)."""
        self.expects_continue = False
        self.send_response_only(100)
        self.end_headers()

    def read_json_body(self, limit, max_items, what):
        """The whole (small) request body, read through LengthBody or
        ChunkedBody, at most limit bytes; refused (BadRequest) as soon as
        it holds more than about max_items JSON values, so that a body of
        millions of {} is not even kept (issue 23)."""
        try:
            self.body = body = self.open_body(limit)
        except TooLarge:
            raise TooLarge("%s is larger than %d bytes" % (what, limit))
        data = bytearray()
        items = 0
        for buffer, count in body.pieces():
            view = memoryview(buffer)
            data += view[:count]
            self.large_body = self.large_body or len(data) > (64 << 10)
            if len(data) > limit:
                raise TooLarge("body larger than %d bytes" % limit)
            items += json_items(view[:count].tobytes())
            if items > max_items + 4096:  # a few commas in strings counted too
                raise BadRequest("%s has more than %d values" % (what, max_items))
        return data

    # --- answers: every status line, header and body byte goes out here

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
        elif self.request_version == "HTTP/1.0":
            # http.server keeps an HTTP/1.0 connection that asked for
            # keep-alive; such a client (ab -k) reuses it only when the
            # answer says so, and would wait for the close otherwise
            self.send_header("Connection", "keep-alive")

    def start_answer(self, status, headers, length=None, stream=False):
        """Every answer's status line and headers go out here: the
        Connection header (see send_response), then headers ({name: value}),
        then how its body ends: Content-Length when length is known; for a
        stream, chunked on HTTP/1.1 and the connection's end on HTTP/1.0.
        Returns whether the body is to be chunked (see write_body)."""
        chunked = stream and self.request_version == "HTTP/1.1"
        if stream and not chunked:
            self.close_connection = True  # decided before the status line
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        return chunked

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

    def send_whole(self, status, content_type, body, headers=None):
        """An answer whose body (bytes) is known beforehand."""
        self.start_answer(status, dict({"Content-Type": content_type}, **(headers or {})),
                          len(body))
        self.write_body(body)

    def answer(self, status, text, data=None, headers=None):
        """Send text (or data as JSON, when the client asks for JSON)."""
        if data is not None and self.wants_json():
            body = (json.dumps(data, indent=1) + "\n").encode()
            content_type = "application/json"
        else:
            body = text.encode()
            content_type = "text/plain; charset=utf-8"
        self.send_whole(status, content_type, body, headers)

    def send_file(self, file):
        """A 200 answer of a file's bytes, as long as it was when asked."""
        size = file.seek(0, io.SEEK_END)
        file.seek(0)
        self.start_answer(200, {"Content-Type": "text/plain; charset=utf-8"}, size)
        self.write_file_body(file, size)

    def write_file_body(self, file, left, what=None):
        """The next left bytes of file as the body (none for HEAD).  A file
        that ends sooner raises ClientGone saying what ended early, or
        without what (a log: it cannot shrink) is made up with newlines:
        never a short body."""
        while left > 0 and self.command != "HEAD":
            data = file.read(min(left, CHUNK_SIZE))
            if not data and what:
                raise ClientGone("%s ended early" % what)
            data = data or b"\n" * left
            self.write_body(data)
            left -= len(data)

    def send_stream(self, content_type, pieces, headers=None):
        """A 200 answer whose size is not known beforehand, sent as pieces
        (text) come, in batches of about 64 KiB: chunked on HTTP/1.1, to
        the connection's end on HTTP/1.0.  Memory: one batch."""
        chunked = self.start_answer(200, dict({"Content-Type": content_type},
                                              **(headers or {})), stream=True)
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

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, header too long...)
        answered like ours: one line of text, or JSON.  An unknown method
        is routed (405 with Allow, or 404) and a version we do not speak is
        400: bad input never gets a 5xx (README, Guarantees)."""
        if code == http.HTTPStatus.NOT_IMPLEMENTED and self.headers is not None:
            return self.dispatch(self.command)
        if code == http.HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            code = http.HTTPStatus.BAD_REQUEST
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

    def send_error_answer(self, error):
        """Answer an IpdError as one line (or JSON), unless an answer has
        begun."""
        if self.status_sent is not None:  # too late for a clean answer
            self.close_connection = True
            return
        message = str(error).splitlines()[0] if str(error) else "error"
        try:
            self.send_error_body(error, message)
        except OSError:
            self.close_connection = True

    def send_error_body(self, error, message):
        """The answer to error: its message (one line) as text, or JSON."""
        self.answer(error.http_status, message + "\n", {"error": message},
                    error.headers)

    # --- the access log

    def log_access(self, method):
        """One line of ipd.log per request: who, what, status, bytes, time."""
        path = re.sub(r"[\x00-\x20\x7f]", "?", self.path[:200])
        if len(self.path) > 200:
            path += "...(%d bytes)" % len(self.path)
        log.info('%s "%s %s" %s user=%s in=%d out=%d %.3fs', self.client_ip(), method,
                 path, self.status_sent or "-",
                 self.user.name if self.user else "-",
                 self.body.received if self.body else 0,
                 self.bytes_sent, time.monotonic() - self.started)

    def log_message(self, format, *args):
        """http.server's own messages, into ipd.log."""
        log.info("%s %s", self.address_string(), format % args)

    def log_request(self, code="-", size="-"):
        """Nothing: log_access writes one line per request, with more in it."""


class RegistryRequest:
    """One request of the registry (#24), the OCI Distribution endpoints
    under /v2/: its path's kind (REGISTRY_ROUTES) picks the method of the
    same name, which calls the service and answers through the
    connection's HttpEdge (self.http), once serve has checked the
    project (and found the upload session)."""

    def __init__(self, http, user):
        self.http = http
        self.ipd = http.ipd
        self.user = user
        self.headers = http.headers

    def serve(self, method, path):
        """Parse the path, pick its endpoint, check that the user may use
        the project (push to it: an upload, a PUT), then run it with the
        path's argument (an upload's: its session); RegistryError (405)
        for a method the path has not."""
        kind, project, argument = parse_registry_path(path)
        name = REGISTRY_ROUTES.get((method, kind))
        if name is None:  # 405 names what is (RFC 9110 15.5.6)
            allowed = sorted(m for (m, k) in REGISTRY_ROUTES if k == kind)
            raise RegistryError(405, "UNSUPPORTED", "%s is not supported here" % method,
                                {"Allow": ", ".join(allowed)} if allowed else None)
        if kind != "base":
            self.ipd.registry_project(self.user, project, push=kind in (
                "uploads", "upload") or method == "PUT")
        if kind == "upload":
            argument = self.ipd.registry_session(self.user, project, argument)
        getattr(self, name)(project, argument)

    def answer(self, status, headers, body=b"", content_type=None):
        """An answer of the registry, with its version header."""
        headers = dict(REGISTRY_HEADERS, **headers)
        if content_type:
            headers["Content-Type"] = content_type
        self.http.start_answer(status, headers, len(body))
        self.http.write_body(body)

    def open_upload_body(self, limit):
        """The request body of an upload, at most limit bytes (0: no bound;
        see Daemon.registry_room); an absent one is empty."""
        if self.http.content_length() == 0 and "Transfer-Encoding" not in self.headers:
            self.http.body = LengthBody(self.http.rfile, 0)
            return self.http.body
        try:
            self.http.body = self.http.open_body(limit)
        except TooLarge:
            raise RegistryError(413, "SIZE_INVALID", "blob larger than MAX_UPLOAD_SIZE, "
                                "or SEGMENT_QUOTA: at most %d more bytes" % limit)
        return self.http.body

    def host(self):
        """The Host the client pushed to (for IMAGE_REF), if well-formed."""
        host = (self.headers.get("Host") or "").strip()
        if re.fullmatch(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])"
                        r"(?::[0-9]{1,5})?", host):
            return host
        return "localhost"

    def base(self, project, argument):
        """GET /v2/: the login holds (the version header says v2)."""
        self.answer(200, {}, b"{}\n", "application/json")

    def blob(self, project, digest):
        """HEAD or GET of a blob of the project's repository."""
        file, size = self.ipd.registry_open_blob(self.user, project, digest)
        with file:
            status, headers, start, left = blob_answer(digest, size,
                                                       self.headers.get("Range"))
            file.seek(start)
            self.http.start_answer(status, headers, left)
            self.http.write_file_body(file, left, "blob sha256:" + digest)

    def blob_created(self, project, digest, session=None):
        """201: the blob is in the project's repository; with session, once
        the request's body (if any) has ended it, checked and stored."""
        if session is not None:
            self.ipd.registry_finish_upload(self.user, session, digest,
                                            self.open_upload_body,
                                            self.http.content_length())
        self.answer(201, {"Location": "/v2/%s/blobs/sha256:%s" % (project, digest),
                          "Docker-Content-Digest": "sha256:" + digest})

    def upload_start(self, project, argument):
        """POST .../blobs/uploads/: a session (202), a monolithic upload
        (?digest=, 201) or a mount (?mount=&from=, 201, else a session)."""
        mount, digest = self.http.query_value("mount"), self.http.query_value("digest")
        if mount is not None:
            mount = registry_digest(mount)
            if self.ipd.registry_mount(self.user, project, mount,
                                       self.http.query_value("from") or ""):
                return self.blob_created(project, mount)
        if digest is not None:
            digest = registry_digest(digest)
        session = self.ipd.registry_start_upload(self.user, project)
        if digest is None:
            return self.answer(202, session.headers())
        self.blob_created(project, digest, session)

    def upload_patch(self, project, session):
        """PATCH: a chunk (Content-Range) or the rest of the stream."""
        content_range = self.headers.get("Content-Range")
        if content_range is not None:
            content_range = parse_content_range(content_range)
            length = self.headers.get("Content-Length")
            if (length is not None and length.strip().isdigit() and
                    int(length) != content_range[1] - content_range[0] + 1):
                raise RegistryError(400, "BLOB_UPLOAD_INVALID", "Content-Range names "
                                    "%d bytes but Content-Length %s" % (
                                        content_range[1] - content_range[0] + 1,
                                        length.strip()), session.headers())
        self.ipd.registry_receive(session, self.open_upload_body, content_range,
                                  self.http.content_length())
        self.answer(202, session.headers())

    def upload_status(self, project, session):
        """GET of an upload: where it ends, for a resume."""
        self.answer(204, session.headers())

    def upload_put(self, project, session):
        """PUT ...?digest=: the last bytes, if any; the blob checked, stored."""
        digest = self.http.query_value("digest")
        if digest is None:
            raise RegistryError(400, "DIGEST_INVALID", "PUT of an upload needs ?digest=")
        digest = registry_digest(digest)
        self.blob_created(project, digest, session)

    def upload_delete(self, project, session):
        """DELETE of an upload: abandoned, its bytes removed."""
        self.ipd.registry_cancel_upload(session)
        self.answer(204, {})

    def manifest(self, project, reference):
        """HEAD or GET of a manifest, by tag or digest, byte for byte."""
        media_type, data, digest = self.ipd.registry_manifest(self.user, project,
                                                              reference)
        self.answer(200, {"Docker-Content-Digest": "sha256:" + digest},
                    data, media_type)

    def manifest_put(self, project, reference):
        """PUT .../manifests/REFERENCE: stored; by tag, a deployment."""
        if self.http.content_length() > REGISTRY_MANIFEST_LIMIT:
            raise RegistryError(413, "SIZE_INVALID", "manifest larger than %d bytes"
                                % REGISTRY_MANIFEST_LIMIT)
        data = self.http.read_json_body(REGISTRY_MANIFEST_LIMIT,
                                        REGISTRY_MANIFEST_ITEMS, "the manifest")
        digest, record = self.ipd.registry_put_manifest(
            self.user, project, reference, self.headers.get("Content-Type"), data,
            self.http.client_ip(), self.host())
        headers = {"Location": "/v2/%s/manifests/sha256:%s" % (project, digest),
                   "Docker-Content-Digest": "sha256:" + digest}
        if record is not None:
            headers["Ipd-Deployment"] = record.id
            headers["Ipd-Status"] = "%s/status/%s/%s" % (
                self.ipd.settings.API_ROOT, project, record.id)
        self.answer(201, headers)

    def tags(self, project, argument):
        """GET .../tags/list."""
        self.answer(200, {}, json.dumps(
            {"name": project, "tags": self.ipd.registry_tags(self.user, project)}
        ).encode(), "application/json")


class Handler(HttpEdge):
    """The API: each request is routed to a method that parses it, calls
    the service (Daemon) and answers through HttpEdge; it touches no
    store of its own."""

    # --- routing and login

    def begin_request(self):
        """HttpEdge's fresh start, and no project announced yet."""
        super().begin_request()
        self.announced_project = None

    def route(self, method):
        """Map the request to (bound method, required role, arguments)."""
        try:  # a target like http://[ is no URL at all
            path, query = urllib.parse.urlsplit(self.path)[2:4]
        except ValueError:
            raise BadRequest("malformed request target")
        self.query = urllib.parse.parse_qs(query)
        if is_registry_path(path):  # docker push (#24)
            return self.api_registry, None, [method, path]
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
        """Return the User of the request's credentials (see Daemon.login),
        or raise."""
        scheme, _, credentials = self.headers.get("Authorization", "").partition(" ")
        return self.ipd.login(scheme, credentials, role, self.client_ip(),
                              self.path[:200])

    # --- the API, as in the README's table

    def api_welcome(self):
        """GET /: the name and version."""
        self.answer(200, "ipd %s: Image Push and Deploy\n" % __version__,
                    {"name": "ipd", "version": __version__})

    def api_list_projects(self):
        """GET /list: the projects."""
        names = self.ipd.project_names()
        self.answer(200, "".join(name + "\n" for name in names),
                    {"projects": names})

    def api_info(self):
        """GET /info: each project's latest deployment."""
        rows, lines = [], []
        for project, latest, count in self.ipd.project_latest():
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
        """GET /stat: the figures (Daemon.full_statistics)."""
        stats = self.ipd.full_statistics()
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
        """GET /status/P[/ID][?wait=S]: the state, 'no' (404) for none."""
        record = self.ipd.find(self.user, project, deployment_id)
        if record is None:
            return self.answer(404, "no\n", {"project": project,
                                             "deployment": deployment_id, "state": "no"})
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
            record = self.ipd.wait_final(record, min(1.0, remaining))
            if record.state not in UNFINISHED or remaining <= 1.0:
                return record
            if peer_closed(self.connection):
                raise ClientGone("gave up waiting")

    def api_deployment_log(self, project, deployment_id):
        """GET /log/P/ID[?follow=1]: the log, whole or followed."""
        record = self.ipd.find_or_404(self.user, project, deployment_id)
        with self.ipd.open_log(record) as file:
            if self.query_value("follow", "0") not in ("", "0", "false", "no"):
                self.follow_log(record, file)
            elif self.wants_json():
                head = json.dumps({"project": project, "deployment": deployment_id,
                                   "state": record.state})
                self.send_stream("application/json", itertools.chain(
                    [head[:-1] + ', "log": "'], json_string_pieces(file), ['"}\n']))
            else:
                self.send_file(file)

    def follow_log(self, record, file):
        """Stream the log as control.sh writes it, chunked, until the
        deployment ends; the last line names its final state.  Followers
        read the log file, never the script: many of them cost it nothing."""
        offset = self.query_number("offset")
        chunked = self.start_answer(200, {
            "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no"}, stream=True)  # nginx: pass it on at once
        if self.command == "HEAD":
            return
        file.seek(offset)
        last, current = b"\n", None  # current: the record once looked at
        quiet_since = time.monotonic()
        while True:
            data = file.read(CHUNK_SIZE)
            if data:
                self.write_body(data, chunked)
                last = data[-1:]
            elif current is not None and current.state not in UNFINISHED:
                break  # it ended, and what it printed last is sent
            else:
                current = self.ipd.wait_final(record, 0.2)
                if time.monotonic() - quiet_since >= 1:  # still anybody there?
                    if peer_closed(self.connection):
                        raise ClientGone("stopped following the log")
                    quiet_since = time.monotonic()
        ending = b"" if last == b"\n" else b"\n"
        self.write_body(ending + ("ipd: state: %s\n" % current.state).encode(),
                        chunked)
        if chunked:
            self.write_body(b"", chunked)

    def api_cancel(self, project, deployment_id):
        """POST /cancel/P/ID: cancel it; its state once it has stopped."""
        record = self.ipd.cancel_for(self.user, self.client_ip(), project,
                                     deployment_id)
        self.answer(200, record.state + "\n", record.public())

    def api_redeploy(self, project, deployment_id):
        """POST /redeploy/P/ID: a new deployment of its kept files."""
        self.answer_deployment(self.ipd.redeploy_for(self.user, self.client_ip(),
                                                     project, deployment_id))

    def api_audit(self):
        """GET /audit?project=P&since=T: the audit log's events, oldest first
        (T: seconds since the epoch, or ISO 8601 like 2026-11-25T10:00:00Z)."""
        project = self.query_value("project")
        since = parse_since(self.query_value("since", ""))
        events = self.ipd.audit_events(project, since)
        lines = (json.dumps(event, sort_keys=True) for event in events)
        if self.wants_json():
            self.send_stream("application/json", json_array_pieces("events", lines))
        else:
            self.send_stream("text/plain; charset=utf-8",
                             (line + "\n" for line in lines))

    def api_metrics(self):
        """GET /metrics: Prometheus' text format."""
        self.send_whole(200, "text/plain; version=0.0.4; charset=utf-8",
                        self.ipd.metrics_text().encode())

    # --- status pages (rendered by the functions of the pages section)

    def send_page(self, title, body, script=None, refresh=False):
        """An HTML page (see render_page), sent as it is rendered."""
        nonce = secrets.token_urlsafe(16)
        self.send_stream("text/html; charset=utf-8", render_page(
            self.ipd.settings.API_ROOT, title, body, nonce, script, refresh),
            page_headers(nonce))

    def api_ui_projects(self):
        """GET /ui: the projects' page."""
        projects = self.ipd.project_latest(self.user)
        live = {project: self.ipd.live_deployment(project) for project, _, _ in projects}
        self.send_page("projects", render_projects(self.ipd.settings.API_ROOT,
                                                   projects, live))

    def api_ui_project(self, project):
        """GET /ui/P: a project's deployments."""
        records = self.ipd.history(self.user, project)
        self.send_page(project, render_project(self.ipd.settings.API_ROOT, records))

    def api_ui_deployment(self, project, deployment_id):
        """GET /ui/P/ID: a deployment and its log."""
        record = self.ipd.find_or_404(self.user, project, deployment_id)
        skipped, text = self.ipd.log_tail(record, PAGE_LOG_TAIL)
        running = record.state in UNFINISHED
        live = self.ipd.live_deployment(project)
        self.send_page("%s %s" % (project, deployment_id[:8]),
                       render_deployment(self.ipd.settings.API_ROOT, record,
                                         skipped, text, live=live is not None
                                         and live.id == record.id),
                       FOLLOW_SCRIPT if running else None, refresh=running)

    def api_ui_action(self, project, deployment_id, action):
        """POST from a button: same origin only (no cross-site requests)."""
        self.check_same_origin()
        record = self.ipd.find_or_404(self.user, project, deployment_id)
        if action == "cancel":
            self.ipd.cancel(record, self.user, self.client_ip())
            target = record
        elif action == "redeploy":
            target = self.ipd.redeploy(record, self.user, self.client_ip())
        else:
            raise NotFound("no such action: %s" % action)
        self.start_answer(303, {"Location": "%s/ui/%s/%s" % (
            self.ipd.settings.API_ROOT, project, target.id)}, 0)

    # --- upload

    def api_upload(self):
        """POST /upload: the multipart upload, checked before its body is
        asked for, then a deployment (Daemon.create_deployment)."""
        settings = self.ipd.settings
        self.body = body = self.open_body(settings.MAX_UPLOAD_SIZE)
        boundary = self.multipart_boundary()
        self.announce_project()
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

    def multipart_boundary(self):
        """The upload's multipart boundary; BadRequest for another body."""
        kind, params = parse_header_params(self.headers.get("Content-Type", ""))
        if kind != "multipart/form-data":
            raise BadRequest("the upload must be multipart/form-data")
        boundary = params.get("boundary", "")
        if not BOUNDARY_CHARS.match(boundary):
            raise BadRequest("multipart/form-data without a valid boundary")
        return boundary

    def announce_project(self):
        """Keep the project named before the body (?project= or the
        X-Ipd-Project header), checked as check_field does, as
        announced_project (None when none is).  A push that names one it
        may not use is refused before it sends a file byte."""
        announced = self.query_value("project") or self.headers.get("X-Ipd-Project")
        if announced is not None:  # none announced yet (begin_request)
            self.check_field("project", announced)
        self.announced_project = announced

    def check_field(self, name, value):
        """Check a text field as it completes: a project must be one the
        user may use, and the one announced before the body."""
        if name == "project":
            check_project_name(value)
            self.ipd.check_access(self.user, value)
            announced = self.announced_project
            if announced is not None and value != announced:
                raise BadRequest("the project field (%s) differs from the project "
                                 "named before the body (%s)" % (value, announced))

    # --- recipe pushes and segments (#16)

    def api_push(self):
        """A deployment from a recipe: its files rebuilt from inline bytes
        and stored segments, then exactly as an upload (Daemon.push)."""
        self.announce_project()
        recipe = parse_recipe(self.read_json_body(RECIPE_LIMIT, RECIPE_MAX_ITEMS,
                                                  "the recipe"))
        project = recipe["project"] or self.announced_project
        if project is None:
            raise BadRequest("missing recipe field 'project'")
        self.check_field("project", project)
        record, created = self.ipd.push(
            self.user, self.client_ip(), recipe, project, self.body.received,
            lambda: not peer_closed(self.connection))
        self.answer_deployment(record, 202 if created else 200)

    def segment_digest(self, name):
        """A segment's name as its SHA-256; NotFound for another."""
        if not SHA256_HEX.match(name):
            raise NotFound("not found: a segment is named by its SHA-256 "
                           "(64 lower case hex digits)")
        return name

    def api_segment(self, name):
        """HEAD (or GET) of a segment: its Upload-Offset, Upload-Complete."""
        offset, complete = self.ipd.segment_state(self.user, self.segment_digest(name))
        self.send_upload_state(204 if self.command == "HEAD" else 200, offset,
                               complete)

    def send_upload_state(self, status, offset, complete):
        """An answer with Upload-Offset and Upload-Complete (no body for
        204)."""
        headers = {"Upload-Offset": str(offset),
                   "Upload-Complete": "?1" if complete else "?0",
                   "Cache-Control": "no-store"}
        if status == 204:
            return self.start_answer(204, headers)
        self.answer(status, "%d%s\n" % (offset, " complete" if complete else ""),
                    {"offset": offset, "complete": complete}, headers)

    def api_segment_post(self, name):
        """POST /segments/SHA256 (start a segment's upload) or
        /segments/missing."""
        if name == "missing":
            return self.api_segments_missing()
        self.receive_segment(self.segment_digest(name), 0, restart=True)

    def api_segment_patch(self, name):
        """PATCH /segments/SHA256: append at Upload-Offset."""
        digest = self.segment_digest(name)
        offset = self.headers.get("Upload-Offset")
        if offset is None or not re.fullmatch(r"\s*\d{1,19}\s*", offset):
            raise BadRequest("PATCH needs an Upload-Offset: the byte it starts at")
        self.receive_segment(digest, int(offset))

    def receive_segment(self, digest, offset, restart=False):
        """Append the body to the user's partial segment at offset; with
        Upload-Complete: ?1 (the default) verify and store it."""
        complete = parse_upload_complete(self.headers.get("Upload-Complete"), True)
        stored = self.ipd.stored_segment_size(self.user, digest)
        if self.expects_continue and stored is not None:
            # stored already (a retry whose first try completed it while
            # it was taken over): the client that asked need send nothing
            return self.send_upload_state(200, stored, True)
        limit = self.ipd.segment_room(self.user, offset, self.content_length())
        self.body = self.open_body(limit)
        offset = self.ipd.receive_segment(self.user, digest, offset, restart,
                                          complete, self.body, self.connection)
        self.send_upload_state(201 if complete else 204, offset, complete)

    def api_segments_missing(self):
        """Which of the listed segments the server lacks, for this user;
        and how much of each it has as a partial upload."""
        self.announce_project()  # a push it may not make sends nothing
        digests = parse_missing_request(self.read_json_body(
            MISSING_LIMIT, MISSING_MAX_SEGMENTS * 3, "the list of segments"))
        missing, partial = self.ipd.missing_segments(self.user, digests)
        self.answer(200, "".join(digest + "\n" for digest in missing),
                    {"missing": missing, "partial": partial})

    # --- the registry (#24): the OCI Distribution endpoints under /v2/

    def api_registry(self, method, path):
        """A registry request: the login first (every path, HEAD too, so a
        client that never asked /v2/ gets the challenge), then its endpoint
        (RegistryRequest); errors in the spec's JSON form."""
        self.user = self.authenticate("USER")
        RegistryRequest(self, self.user).serve(method, path)

    def send_error_body(self, error, message):
        """Under /v2/, the spec's error JSON, {"errors": [{"code",
        "message"}]}: docker push prints the message; elsewhere HttpEdge's
        one line."""
        if not is_registry_path(self.path.split("?", 1)[0]):
            return super().send_error_body(error, message)
        status = error.http_status
        code = getattr(error, "code", None) or REGISTRY_CODES.get(status, "UNKNOWN")
        body = json.dumps({"errors": [{"code": code, "message": message,
                                       "detail": {}}]}) + "\n"
        self.send_whole(status, "application/json", body.encode(),
                        dict(REGISTRY_HEADERS, **error.headers))


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
        """The serve loop's sign of life, for the systemd watchdog."""
        self.last_loop = time.monotonic()  # the watchdog's sign of life

    def process_request(self, request, client_address):
        """Admit a connection (MAX_CONNECTIONS and per address) or answer
        503 at once."""
        exceeded = self.guard.admit(request, client_address[0])
        if exceeded:
            log.warning("refusing a connection from %s: %s reached",
                        client_address[0], exceeded)
            answer_busy(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        """Serve a connection on its thread; it counts no more once closed."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.guard.release(request)

    def handle_error(self, request, client_address):
        """Log an error of a connection with its traceback; serve on."""
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
        """The message on one line: what a client sent cannot forge another."""
        record.message = printable(record.message, 4096)
        return super().formatMessage(record)


# extra= of a log line that ipd prints on stderr itself: serve -v and the
# demo, which copy ipd.log to stderr, show it once.
PRINTED_TOO = {"printed": True}


def log_to_stderr():
    """ipd.log's lines on stderr too (serve -v, the demo), but for those
    printed there already (PRINTED_TOO)."""
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
    console.addFilter(lambda record: not getattr(record, "printed", False))
    log.addHandler(console)


def startup_error(lines, logged=True):
    """A StartupError of these lines, each logged first when ipd.log is open
    (main prints them on stderr)."""
    if logged:
        for line in lines:
            log.error("not started: %s", line, extra=PRINTED_TOO)
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
    """host:port of an address, [host]:port for IPv6."""
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
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(message)s"))
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


def explain_scripts_mode(settings):
    """Say once, at start, who supplies the code that runs and as whom."""
    try:
        me = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid with no account of this host
        me = str(os.geteuid())
    if settings.SCRIPTS == "package":
        log.warning("SCRIPTS=package: a USER who may upload to a project runs "
                    "the control.sh in its package on this host, as %s; where "
                    "that user is in the docker group, that is root. "
                    "SCRIPTS=server runs only scripts placed on the server",
                    settings.RUN_AS or me)
    problem = keep_scripts_without_capabilities()  # also for a project.conf's RUN_AS
    if settings.RUN_AS:
        if problem:
            raise ConfigError(problem)
        run_as = resolve_run_as(settings.RUN_AS)
        log.info("RUN_AS=%s: control.sh and notify.sh run as %r with no "
                 "capabilities; PROJECT_DIR is each project's %s/ folder",
                 settings.RUN_AS, run_as, WORK_DIR)
        keep_from_scripts(settings, run_as)
    else:
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
        """Send a state line to systemd's notify socket (nothing without
        one)."""
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
    url = "http://%s%s/" % (listen_text(server.server_address[:2]), settings.API_ROOT)
    daemon.worker.start()
    # the loop looks for shutdown() once a poll: at SIGTERM it stops within
    # a tenth of a second, not half a second
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                     name="http", daemon=True).start()
    log.info("ipd %s listening on %s (%d deployment%s on disk)", __version__, url,
             count, "" if count == 1 else "s", extra=PRINTED_TOO)
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
    users, warnings = parse_users(text, where)
    if mode & stat.S_IROTH:
        warnings.insert(0, "%s is readable by everyone: chmod o-r %s" % (where, path))
    if not users:
        warnings.append("%s has no users: every login is refused (401); %s"
                        % (where, add_user))
    return warnings


def project_conf_problems(settings):
    """At start: each project.conf in UPLOAD_DIR that its project's next
    upload would refuse (an unknown name, a bad value, a file not an
    administrator's), one line each; ipd does not start on them."""
    problems = []
    for name in sorted(os.listdir(settings.UPLOAD_DIR)):
        folder = os.path.join(settings.UPLOAD_DIR, name)
        if is_project_name(name) and os.path.isfile(os.path.join(folder,
                                                                 PROJECT_CONF)):
            try:
                project_settings(settings, folder)
            except IpdError as error:
                problems.append(str(error))
    return problems


def trust_file_warnings(path):
    """What is wrong with the OIDC_TRUST file at start, one line each with
    its line number, for the terminal as for the users file (issue 26: "as
    for the users file"; the daemon logs them as it reads the file)."""
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        return ["OIDC_TRUST=%s cannot be read (%s): no ID token logs in" % (
            path, getattr(error, "strerror", None) or "not UTF-8 text")]
    return parse_trust(text, path, os.path.dirname(path))[1]


def print_warning(message):
    """A warning on stderr, as 'ipd: warning: ...'."""
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
        problems = project_conf_problems(settings)
        if problems:
            raise startup_error(problems)
        close_to_others(settings)
        explain_scripts_mode(settings)
        for warning in users_file_warnings(settings.AUTH_DB):
            log.warning("%s", warning)
            print_warning(warning)
        for warning in trust_file_warnings(settings.OIDC_TRUST):
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
EXIT_REVERTED = 10  # its verify failed and it was rolled back (issue 25)
# The exit status of a command that waited for a deployment, by its end
# state; any other state is EXIT_FAILED.
EXIT_FOR_STATE = {"ok": EXIT_OK, "reverted": EXIT_REVERTED}
EXIT_STATUS_HELP = (
    "exit status of the client commands: 0 ok; 1 the deployment ended in "
    "another state; 2 usage; 3 network error; 4 wrong login (401); 5 "
    "forbidden (403); 6 too large (413); 7 disk full (507); 8 another HTTP "
    "error; 9 --timeout passed; 10 the deployment was reverted (its verify "
    "failed)")


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
    """--limit-rate: a size like 10M, more than 0; ArgumentTypeError."""
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


def range_chunks(path, start, end, doing="read"):
    """The bytes start..end of path, in chunks of CHUNK_SIZE at most; a
    shorter file is a ClientError: it changed while it was read (doing)."""
    with open(path, "rb") as file:
        file.seek(start)
        left = end - start
        while left:
            block = file.read(min(CHUNK_SIZE, left))
            if not block:
                raise ClientError("%s changed while it was %s" % (path, doing),
                                  EXIT_USAGE)
            left -= len(block)
            yield block


def range_digest(path, start, end):
    """The SHA-256 (hex) of the bytes start..end of path."""
    digest = hashlib.sha256()
    for block in range_chunks(path, start, end):
        digest.update(block)
    return digest.hexdigest()


def range_bytes(path, start, end):
    """The bytes start..end of path (a small inline piece)."""
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
        """As Progress.start."""
        if self.progress:
            self.progress.start(total, present)

    def advance(self, count):
        """count more bytes sent: wait until the rate allows them."""
        if self.started is None:
            self.started = time.monotonic()
        self.sent += count
        ahead = self.sent / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)
        if self.progress:
            self.progress.advance(count)

    def done(self):
        """As Progress.done."""
        if self.progress:
            self.progress.done()


def field_part(boundary, name, value):
    """A multipart text field, its boundary line first."""
    return ('--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
            % (boundary, name, value)).encode()


def digest_part(boundary, name, hexdigest):
    """The end of a file's part, then the field with its SHA-256."""
    return b"\r\n" + field_part(boundary, name + "_sha256", hexdigest)


def file_part_head(boundary, name, filename):
    """The head of a multipart file part; its bytes follow."""
    filename = re.sub(r'[\\"\r\n]', "_", filename)  # nothing that ends the quoted name
    return ('--%s\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
            'Content-Type: application/octet-stream\r\n\r\n'
            % (boundary, name, filename)).encode("utf-8")


def send_segments(connection, segments, boundary, progress):
    """Send the multipart body: bytes as they are, files ((name, path,
    size)) from disk in 1 MiB pieces through one reused buffer, each
    followed by its digest's field (digest_part)."""
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    for segment in segments:
        if isinstance(segment, bytes):
            connection.send(segment)
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
            connection.send(digest_part(boundary, name, hasher.hexdigest()))
    if progress:
        progress.done()


def parse_json(body):
    """An answer's JSON object, or {} for anything else."""
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
    reader = sock.makefile("rb", buffering=0)  # unbuffered: no byte after the head
    status_line = reader.readline(65537)
    headers = http.client.parse_headers(reader)
    status = int(status_line.split()[1]) if len(status_line.split()) > 1 else 0
    if status == 100:
        return None
    length = int(headers.get("Content-Length") or 0)
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
    """The ClientError of an HTTP error answer: its first line, and the
    exit status for status (EXIT_FOR_STATUS, else EXIT_HTTP)."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    message = (str(message).strip().splitlines() or [""])[0]
    return ClientError("HTTP %d: %s" % (status, message or "error"),
                       EXIT_FOR_STATUS.get(status, EXIT_HTTP))


def network_error(url, error):
    """The ClientError (exit 3) of a server that cannot be reached."""
    return ClientError("cannot reach %s: %s" % (url, error), EXIT_NETWORK)


def timed_out(what):
    """The ClientError (exit 9) of a wait for what that passed its --timeout."""
    return ClientError("timed out waiting for %s" % what, EXIT_TIMEOUT)


def read_by(connection, response, deadline, what):
    """The next bytes of response, or b"" at its end; raises timed_out at
    the deadline (None: none) however steadily the server keeps sending:
    each read may block only for the time that is left."""
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise timed_out(what)
        if connection.sock is not None:
            connection.sock.settimeout(min(remaining, 3600))
    return response.read1(65536)


def human_size(count):
    """'512 B', '1.5 KiB', '3.2 MiB', '2.0 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (count, unit)
        count /= 1024.0


def send_range(connection, path, start, end, progress=None):
    """Send bytes start..end of the file at path on connection; ClientError
    when the file is shorter now."""
    for block in range_chunks(path, start, end, "sent"):
        connection.send(block)
        if progress:
            progress.advance(len(block))


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
        """A new connection to the server (not yet open)."""
        timeout = timeout or self.timeout
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=self.context)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def headers(self, **extra):
        """The headers of every request (the login, JSON answers), and extra."""
        return dict({"Authorization": self.authorization, "Accept": "application/json",
                     "User-Agent": "ipd/" + __version__}, **extra)

    def open(self, method, path, body=None, headers=None, timeout=None):
        """Send a request on a connection of its own: -> (the connection,
        its response, whose body is still to be read).  Raises OSError and
        HTTPException."""
        connection = self.connection(timeout)
        try:
            connection.request(method, self.root + path, body=body,
                               headers=self.headers(**(headers or {})))
            return connection, connection.getresponse()
        except BaseException:
            connection.close()
            raise

    def send_head(self, connection, method, path, headers):
        """The head of a request whose body follows (headers say Expect:
        100-continue): -> None when the body may go, else (status, body)
        of the server's early answer (see await_continue)."""
        connection.putrequest(method, self.root + path)
        for name, value in self.headers(**headers).items():
            connection.putheader(name, value)
        connection.endheaders()
        return await_continue(connection)

    def exchange(self, method, path, body=None, headers=None, deadline=None,
                 what=None):
        """One request on a connection of its own: -> (status, body bytes).
        With a deadline (time.monotonic()) the answer must be whole by
        then, however steadily the server sends, else timed_out(what).
        Raises ClientError when the network fails."""
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        try:
            connection, response = self.open(method, path, body, headers, timeout)
            try:
                if deadline is None:
                    return response.status, response.read()
                return response.status, b"".join(iter(
                    lambda: read_by(connection, response, deadline, what), b""))
            finally:
                connection.close()
        except (OSError, http.client.HTTPException) as error:
            if deadline is not None and isinstance(error, socket.timeout):
                raise timed_out(what)
            raise network_error(self.url, error)

    def request(self, method, path, deadline=None, what=None):
        """-> (status, parsed JSON), by the deadline if any (see exchange);
        raises ClientError for errors, but for the 404 of a state 'no'."""
        status, body = self.exchange(method, path, deadline=deadline, what=what)
        data = parse_json(body)
        if status >= 400 and not (status == 404 and data.get("state") == "no"):
            raise http_error(status, data.get("error") or body)
        return status, data

    def text(self, path):
        """The plain text answer of a GET."""
        status, body = self.exchange("GET", path, headers={"Accept": "text/plain"})
        if status >= 400:
            raise http_error(status, body)
        return body.decode("utf-8", "replace")

    def follow(self, project, deployment, out, deadline=None):
        """Print the deployment's log as it is written; return its final
        state.  A broken stream (a proxy's read timeout) is resumed where
        it stopped; after FOLLOW_RETRIES tries in a row that bring nothing,
        the server is taken as unreachable (ClientError, exit 3)."""
        offset = 0
        failures = 0
        what = "deployment " + deployment
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise timed_out(what)
            path = "/log/%s/%s?follow=1&offset=%d" % (project, deployment, offset)
            progress = offset
            try:
                connection, response = self.open("GET", path, None, {
                    "Accept": "text/plain"}, min(remaining or 3600, 3600))
                if response.status >= 400:
                    raise http_error(response.status, response.read())
                offset, final = self.follow_stream(connection, response, deadline,
                                                   what, out, offset)
                if final:
                    return final
            except socket.timeout:
                raise timed_out(what)
            except (OSError, http.client.HTTPException) as error:
                problem = error
            else:
                problem = ConnectionError("the log stream ended early")
            failures = 0 if offset > progress else failures + 1
            if failures >= FOLLOW_RETRIES:
                raise network_error(self.url, problem)
            time.sleep(min(1, max(0, deadline - time.monotonic())) if deadline else 1)

    def follow_stream(self, connection, response, deadline, what, out, offset):
        """Copy one follow stream's lines to out; -> (the offset reached,
        the final state when the stream ended with the server's 'ipd:
        state:' line, else None).  The last line so far is held back while
        it is such a line: once another follows, it was a script's own,
        and is printed."""
        state_line = re.compile(rb"ipd: state: (\S+)\Z")
        pending, held = b"", None
        while True:
            data = read_by(connection, response, deadline, what)
            if not data:
                break
            *lines, pending = (pending + data).split(b"\n")
            lines = ([held] if held else []) + lines
            held = lines.pop() if lines and state_line.match(lines[-1]) else None
            for line in lines:
                out.write(line + b"\n")
                offset += len(line) + 1
            out.flush()
        final = state_line.match(held) if held and not pending else None
        return offset, (final.group(1).decode() if final else None)

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
        segments.append(("--%s--\r\n" % boundary).encode())
        length = sum(len(seg) if isinstance(seg, bytes) else
                     seg[2] + len(digest_part(boundary, seg[0], "0" * 64))
                     for seg in segments)
        try:
            connection = self.connection()
            early = self.send_head(connection, "POST", "/upload", {
                "Content-Type": "multipart/form-data; boundary=" + boundary,
                "Content-Length": str(length), "Expect": "100-continue",
                "X-Ipd-Project": project})
            if early:
                raise http_error(*early)
            send_segments(connection, segments, boundary, progress)
            response = connection.getresponse()
            body = response.read()
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

    def post_json(self, path, data, project):
        """-> (status, parsed JSON answer) of a POST of data (JSON) for
        project (X-Ipd-Project); raises ClientError only for the network."""
        status, answer = self.exchange("POST", path, json.dumps(data).encode(), {
            "Content-Type": "application/json", "X-Ipd-Project": project})
        parsed = parse_json(answer)
        if status >= 400 and not parsed.get("error"):
            parsed["error"] = answer.decode("utf-8", "replace")
        return status, parsed

    def segment_offset(self, digest):
        """How many bytes of the segment the server has (HEAD); raises
        OSError and HTTPException for the network (send_segment retries)."""
        connection, response = self.open("HEAD", "/segments/" + digest)
        connection.close()  # the answer to a HEAD has no body
        if response.status == 404:
            return 0
        if response.status >= 400:
            raise http_error(response.status, "HEAD of segment %s" % digest)
        return int(response.getheader("Upload-Offset", "0"))

    def send_segment(self, digest, path, start, end, offset, progress, attempts=4):
        """Send bytes start..end of path as segment digest, from offset on
        (resumable: POST from 0, else PATCH with Upload-Offset); a broken
        connection, or a 409 (another upload holds it), is resumed where
        the server's HEAD says."""
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                if offset is None:
                    offset = self.segment_offset(digest)
                connection = self.connection()
                answer = self.send_head(
                    connection, "POST" if offset == 0 else "PATCH", "/segments/" + digest,
                    {"Content-Length": str(end - start - offset),
                     "Content-Type": "application/partial-upload",
                     "Upload-Complete": "?1", "Upload-Offset": str(offset),
                     "Expect": "100-continue"})
                if answer is None:  # no early answer (200: it has the segment)
                    send_range(connection, path, start + offset, end, progress)
                    response = connection.getresponse()
                    body = response.read()
                    answer = response.status, parse_json(body).get("error") or body
                connection.close()
            except (OSError, http.client.HTTPException) as error:
                if last:
                    raise network_error(self.url, error)
                time.sleep(1)
                answer = None, None
            if answer[0] in (200, 201, 204):
                return
            if answer[0] not in (None, 409) or last:
                raise http_error(*answer)
            offset = None

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
        missing, partial, present, to_send = answer
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
        if progress:
            progress.start(to_send + body_size, present)
        to_send += self.send_layers(project, plans, files, progress, missing, partial)
        recipe = make_recipe(project, files, plans, signed, force)
        status, answer = self.post_json("/push", recipe, project)
        if progress:
            progress.advance(body_size)
            progress.done()
        if status >= 400:
            raise http_error(status, answer.get("error"))
        if out:
            out.write("ipd: sent %s, %s already on the server\n"
                      % (human_size(to_send + body_size), human_size(present)))
        return answer["deployment"]

    def send_layers(self, project, plans, files, progress, missing, partial):
        """Send the missing segments (see send_missing).  A digest the file
        only declared is named by the recipe when the bytes have it: one
        that does not is corrected, and what the server then lacks is sent
        too (also when corrected already).  -> the bytes sent besides
        those of missing."""
        corrected = self.send_missing(missing, partial, plans, progress)
        for plan in plans.values():
            for index, digest in plan["check"].result().items():
                if plan["pieces"][index][2] != digest:
                    start, end, _, _ = plan["pieces"][index]
                    plan["pieces"][index] = (start, end, digest, None)
                    corrected = True
        if not corrected:
            return 0
        answer = self.missing_segments(project, plans, files)
        if answer is None:
            raise ClientError("the server stopped taking segments during the "
                              "push", EXIT_NETWORK)
        missing, partial, _, sent = answer
        self.send_missing(missing, partial, plans, progress)
        return sent

    def missing_segments(self, project, plans, files):
        """Ask the server which of the plans' segments it lacks: ({digest:
        (path, start, end)} to send, {digest: bytes it has of them}, bytes it
        has of all, bytes to send), or None when it takes no recipes."""
        wanted = {}
        for field, plan in plans.items():
            for start, end, digest, _ in plan["pieces"]:
                if digest:
                    wanted.setdefault(digest, (files[field], start, end))
        listed, missing, partial = list(wanted), {}, {}
        for first in range(0, max(1, len(listed)), MISSING_MAX_SEGMENTS):
            status, answer = self.post_json("/segments/missing", {
                "segments": listed[first:first + MISSING_MAX_SEGMENTS]}, project)
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
        left = sum(end - start - partial.get(digest, 0)
                   for digest, (_, start, end) in missing.items())
        return missing, partial, present, left

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
        """count more bytes sent; the bar redrawn ten times a second."""
        self.sent += count
        now = time.monotonic()
        if now - self.shown >= 0.1:
            self.shown = now
            self.show(now)

    def show(self, now):
        """Draw the bar as of now."""
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
        """The bar at its end, and a new line."""
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


# --- ID tokens (OIDC_TRUST on the server): the CI's own, no stored secret

def token_expiry(token):
    """The exp of a JWT, read without verifying it (the server does), or
    None."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
        return None


def github_id_token(audience, environ=None, timeout=30):
    """An ID token for audience from GitHub Actions: GET
    $ACTIONS_ID_TOKEN_REQUEST_URL&audience=... with the bearer
    $ACTIONS_ID_TOKEN_REQUEST_TOKEN (the job needs permissions: id-token:
    write).  Raises ClientError."""
    environ = os.environ if environ is None else environ
    url = environ.get("ACTIONS_ID_TOKEN_REQUEST_URL")
    secret = environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    if not url or not secret:
        raise ClientError("--oidc: ACTIONS_ID_TOKEN_REQUEST_URL and "
                          "ACTIONS_ID_TOKEN_REQUEST_TOKEN are not set (GitHub "
                          "Actions sets them for a job with permissions: id-token: "
                          "write; elsewhere use --oidc-env NAME)", EXIT_USAGE)
    url += ("&" if "?" in url else "?") + "audience=" + urllib.parse.quote(audience,
                                                                           safe="")
    request = urllib.request.Request(url, headers={
        "Authorization": "Bearer " + secret, "Accept": "application/json",
        "User-Agent": "ipd/" + __version__})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            value = json.loads(response.read(1 << 20).decode())["value"]
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException) as error:
        raise ClientError("--oidc: cannot get an ID token from GitHub Actions: %s"
                          % error, EXIT_NETWORK)
    if not isinstance(value, str) or not value:
        raise ClientError("--oidc: GitHub Actions gave no ID token", EXIT_NETWORK)
    return value


class IdTokenSource:
    """The ID token each request carries: from GitHub Actions for
    audience, asked for again once less than REFRESH seconds of it are
    left (so a push of many requests outlasts any one token), or from the
    environment variable variable (GitLab's id_tokens, which live as long
    as the job)."""

    REFRESH = 60

    def __init__(self, audience=None, variable=None, environ=None):
        self.audience, self.variable = audience, variable
        self.environ = os.environ if environ is None else environ
        self.token, self.expires = None, None

    def current(self):
        """The token to send now; raises ClientError."""
        if self.variable:
            token = self.environ.get(self.variable, "").strip()
            if not token:
                raise ClientError("--oidc-env: the variable %s is empty or not set"
                                  % self.variable, EXIT_USAGE)
            return token
        if self.token is None or (self.expires is not None and
                                  self.expires - time.time() < self.REFRESH):
            self.token = github_id_token(self.audience, self.environ)
            self.expires = token_expiry(self.token)
        return self.token


class OidcClient(Client):
    """A Client that logs in with the CI's ID token (Bearer), not a
    password: each request is authenticated as it starts, and one that
    started goes on to its end however long its body takes."""

    def __init__(self, url, source, cacert=None, timeout=60):
        super().__init__(url, "oidc", "", cacert, timeout)
        self.source = source

    def headers(self, **extra):
        """Client's headers, but for the login: the current ID token."""
        return super().headers(**dict(extra, Authorization="Bearer " +
                                      self.source.current()))


def client_from_args(args):
    """A Client from --url/--user, else IPD_URL, IPD_USER, IPD_PASSWORD,
    else ~/.netrc; the password is never taken from the command line."""
    url = args.url or os.environ.get("IPD_URL")
    if not url:
        raise ClientError("set IPD_URL (e.g. https://host/deploy) or --url",
                          EXIT_USAGE)
    if args.oidc or args.oidc_env:
        return OidcClient(url, IdTokenSource(args.oidc, args.oidc_env), args.cacert)
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
    """Follow the log to the end; exit status 0 for ok, 10 for reverted
    (undone by its verify), 1 otherwise."""
    deadline = time.monotonic() + timeout if timeout else None
    out = getattr(sys.stdout, "buffer", sys.stdout)
    state = client.follow(project, deployment, out, deadline)
    print("ipd: deployment %s of %s: %s" % (deployment, project, state),
          file=sys.stderr)
    return EXIT_FOR_STATE.get(state, EXIT_FAILED)


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


def check_push_file(field, path):
    """Raise ClientError (exit 2) saying what to give instead when path
    is no file to push as field ('image' or 'package')."""
    if os.path.isdir(path) and field == "image":
        raise ClientError("--image %s is a directory: give the image's file, "
                          "e.g. from docker save -o web.tar IMAGE (a directory "
                          "is packed for --package only)" % path, EXIT_USAGE)
    if not os.path.isfile(path):
        raise ClientError("no such file: %s" % path, EXIT_USAGE)


def report_deployment(client, args, deployment):
    """Print a new deployment's ID (push, redeploy); with --wait, follow it
    to its end.  Returns the exit status (see wait_for_result)."""
    print(deployment, flush=True)
    if args.wait:
        return wait_for_result(client, args.project, deployment, args.timeout)
    return EXIT_OK


def cmd_push(args):
    """Upload an image, a package or both; print the deployment's ID
    (see report_deployment)."""
    client = client_from_args(args)
    files = {field: path for field, path in (("image", args.image),
                                             ("package", args.package)) if path}
    if not files:
        raise ClientError("give --image, --package or both", EXIT_USAGE)
    temporary = None
    if os.path.isdir(files.get("package", "")):  # a folder: packed as tar.gz
        temporary = files["package"] = pack_directory(args.package)
    for field, path in files.items():
        check_push_file(field, path)
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
    return report_deployment(client, args, deployment)


def cmd_status(args):
    """Print a deployment's state; the exit status says it too."""
    client = client_from_args(args)
    path = "/status/%s" % args.project + ("/%s" % args.deployment
                                          if args.deployment else "")
    if args.wait:
        path += "?wait=%g" % args.wait
    # --timeout bounds the whole answer; without it, a minute past --wait
    deadline = time.monotonic() + (args.timeout or (args.wait or 0) + 60)
    _, data = client.request("GET", path, deadline, "deployment %s" % (
        args.deployment or "of " + args.project))
    print(data.get("state"))
    # as push --wait and logs -f (issue 25), and 0 for one waiting or running
    exits = dict(EXIT_FOR_STATE, **{"await": EXIT_OK, "active": EXIT_OK})
    return exits.get(data.get("state"), EXIT_FAILED)


def cmd_logs(args):
    """Print what control.sh printed, so far or (-f) to the end."""
    client = client_from_args(args)
    if args.follow:
        return wait_for_result(client, args.project, args.deployment, args.timeout)
    sys.stdout.write(client.text("/log/%s/%s" % (args.project, args.deployment)))
    return EXIT_OK


def cmd_text(args):
    """list and info: print the plain text answer of GET /list or /info."""
    sys.stdout.write(client_from_args(args).text("/" + args.command))
    return EXIT_OK


def cmd_cancel(args):
    """Cancel a deployment; print its state once it has stopped."""
    client = client_from_args(args)
    _, data = client.request("POST", "/cancel/%s/%s" % (args.project, args.deployment))
    print(data.get("state"))
    return EXIT_OK


def cmd_redeploy(args):
    """Deploy an earlier deployment's kept files again (see
    report_deployment)."""
    client = client_from_args(args)
    _, data = client.request("POST", "/redeploy/%s/%s" % (args.project, args.deployment))
    return report_deployment(client, args, data["deployment"])


def client_parents():
    """(common, waiting): the options every client command takes (where
    the API is, who logs in), and those of a command that may wait for
    the end (--wait, --timeout)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the API's base (default: $IPD_URL), "
                        "e.g. https://host/deploy")
    common.add_argument("--user", help="default: $IPD_USER or ~/.netrc; the "
                        "password comes from $IPD_PASSWORD, ~/.netrc or a prompt")
    common.add_argument("--cacert", help="CA certificate file for https")
    common.add_argument("--oidc", metavar="AUDIENCE", help="log in with GitHub "
                        "Actions' ID token for AUDIENCE (the job needs "
                        "permissions: id-token: write), not a password")
    common.add_argument("--oidc-env", metavar="NAME", help="log in with the ID "
                        "token in the environment variable NAME (GitLab CI's "
                        "id_tokens), not a password")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", action="store_true", help="follow the log "
                         "to the end; exit 0 only when the deployment is ok")
    waiting.add_argument("--timeout", type=float, default=0,
                         help="give up waiting after this many seconds")
    return common, waiting


def add_command(commands, name, func, **options):
    """The parser of command name (options: add_parser's, such as help,
    description and parents), whose arguments main passes to func."""
    parser = commands.add_parser(name, **options)
    parser.set_defaults(func=func)
    return parser


def add_push_command(commands, common, waiting):
    """push: an upload from a terminal or a CI job."""
    push = add_command(commands, "push", cmd_push, parents=[common, waiting],
                       help="upload an image and/or package",
                       description="Upload an image, a package or both for a "
                       "project; prints the new deployment's ID.",
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


def add_reading_commands(commands, common):
    """status, logs, list and info: what the client reads."""
    status = add_command(commands, "status", cmd_status, parents=[common],
                         help="state of a deployment",
                         description="Print the state of a deployment (of the "
                         "project's latest one without an ID); exit 0 for ok, "
                         "await and active, 10 for reverted.",
                         epilog=EXIT_STATUS_HELP)
    status.add_argument("project", help="the project")
    status.add_argument("deployment", nargs="?", help="the deployment's ID "
                        "(default: the latest)")
    status.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="answer when it ends, or after SECONDS")
    status.add_argument("--timeout", type=float, default=0, help="give up after "
                        "this many seconds (exit 9; default: --wait plus 60)")
    logs = add_command(commands, "logs", cmd_logs, parents=[common],
                       help="what control.sh printed", description="Print what "
                       "control.sh printed for a deployment, so far or (-f) to "
                       "the end.", epilog=EXIT_STATUS_HELP)
    logs.add_argument("project", help="the project")
    logs.add_argument("deployment", help="the deployment's ID")
    logs.add_argument("-f", "--follow", action="store_true", help="follow the "
                      "log to the end; exit 0 only when the deployment is ok")
    logs.add_argument("--timeout", type=float, default=0, help="with -f: give "
                      "up after this many seconds")
    for name, text in (("list", "the projects"),
                       ("info", "each project's latest deployment")):
        add_command(commands, name, cmd_text, parents=[common], help=text,
                    description="Print %s (ADMIN)." % text, epilog=EXIT_STATUS_HELP)


def add_changing_commands(commands, common, waiting):
    """cancel and redeploy."""
    cancel = add_command(commands, "cancel", cmd_cancel, parents=[common],
                         help="stop a waiting or running deployment",
                         description="Cancel a deployment: a waiting one never "
                         "runs, a running one is stopped; prints its state.",
                         epilog=EXIT_STATUS_HELP)
    cancel.add_argument("project", help="the project")
    cancel.add_argument("deployment", help="the deployment's ID")
    redeploy = add_command(commands, "redeploy", cmd_redeploy,
                           parents=[common, waiting], help="deploy the kept "
                           "files of an earlier deployment again: a rollback",
                           description="Deploy the kept files of an earlier "
                           "deployment again (a rollback); prints the new "
                           "deployment's ID.", epilog=EXIT_STATUS_HELP)
    redeploy.add_argument("project", help="the project")
    redeploy.add_argument("deployment", help="the ID of the deployment to "
                          "deploy again")


def add_client_commands(commands):
    """push, status, logs, list, info, cancel, redeploy: the API from a
    terminal or a CI job."""
    common, waiting = client_parents()
    add_push_command(commands, common, waiting)
    add_reading_commands(commands, common)
    add_changing_commands(commands, common, waiting)


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


def settings_to_serve(config_path, environ=None):
    """load_settings for a daemon about to start: an unknown setting's
    lines also go to ipd.log when the settings name a LOG_DIR ipd may
    write.  Returns Settings; raises ConfigError."""
    try:
        return load_settings(config_path, environ)
    except UnknownSettings as error:
        lines = str(error).splitlines()
        logged = bool(error.log_dir and os.path.isdir(error.log_dir)
                      and os.access(error.log_dir, os.W_OK | os.X_OK))
        if logged:
            setup_logging(error.log_dir)
        raise startup_error(lines, logged)


def cmd_serve(args):
    """Run the daemon with the settings it is given."""
    return serve(settings_to_serve(args.config), verbose=args.verbose)


# The demo's hints name its options, not the settings they stand for.
DEMO_HINTS = ((r"\bLISTEN=", "--listen "), (r"another LISTEN\b", "another --listen"),
              (r"\bUPLOAD_DIR=(\S+)/uploads\b", r"--dir \1"),
              (r"its own UPLOAD_DIR\b", "its own --dir"))


def demo_hint(text):
    """A start-up problem's text as the demo's user can act on it."""
    for pattern, replacement in DEMO_HINTS:
        text = re.sub(pattern, replacement, text)
    return text


def demo_settings(args, folder):
    """The settings serve would read (--config, $IPD_CONFIG or
    /etc/ipd.conf, the environment), with the demo's folder, users file and
    --listen over them.  Returns Settings; raises ConfigError."""
    environ = dict(os.environ, UPLOAD_DIR=os.path.join(folder, "uploads"),
                   LOG_DIR=folder, AUTH_DB=os.path.join(folder, "users.txt"),
                   LISTEN=args.listen)
    return settings_to_serve(getattr(args, "config", None), environ)


def cmd_demo(args):
    """A daemon to try at once: folder ./ipd-demo, user demo:demo."""
    folder = os.path.abspath(args.dir)
    hello = os.path.join(folder, "uploads", "hello")
    os.makedirs(hello, exist_ok=True)
    users = os.path.join(folder, "users.txt")
    if not os.path.exists(users):
        set_user(users, "ADMIN", "demo", hashlib.sha256(b"demo").hexdigest())
        os.chmod(users, 0o600)
    control = os.path.join(hello, "control.sh")
    if not os.path.exists(control):
        write_file_atomic(control, DEMO_CONTROL_SH.encode(), 0o755)
    # A file to upload as the image, wherever ipd came from (a wheel or
    # a .deb leaves no ipd.py in the current folder).
    image = os.path.join(folder, "image.tar")
    if not os.path.exists(image):
        with tarfile.open(image, "w") as tar:
            info = tarfile.TarInfo("hello.txt")
            info.size = len(DEMO_IMAGE_TEXT)
            tar.addfile(info, io.BytesIO(DEMO_IMAGE_TEXT))
    settings = demo_settings(args, folder)

    def explain(url):
        print("demo: user demo, password demo, data in %s\n"
              "try:  curl -u demo:demo -F project=hello -F image=@%s %supload"
              % (folder, shlex.quote(image), url), file=sys.stderr, flush=True)
    try:
        return serve(settings, verbose=True, on_ready=explain)
    except StartupError as error:
        raise StartupError(demo_hint(str(error)))


def cmd_passwd(args):
    """Add or replace a user in the users file, its password read from
    the terminal (twice) or stdin."""
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
    if not tokens:  # stdout stays empty for scripts; exit 0: none is no error
        print("ipd: no tokens yet in %s: create one with 'ipd token create "
              "--project PROJECT'" % path, file=sys.stderr)
    used = read_token_uses(path)
    for token in tokens.values():
        print("%s projects=%s expires=%s creator=%s created=%s last_use=%s%s" % (
            token.id, ",".join(token.projects), iso_time(token.expires) or "never",
            token.creator, iso_time(token.created), iso_time(used.get(token.id)) or "-",
            " " + token.refusal() if token.refusal() else ""))
    return 0


def cmd_version(args):
    """Print the version."""
    print("ipd", __version__)
    return 0


def cmd_settings(args):
    """Print the settings as ipd.conf.example or the README's table."""
    sys.stdout.write(settings_markdown() if args.markdown else settings_conf())
    return 0


DEMO_DESCRIPTION = (
    "Run a daemon to try at once: data in --dir, user demo, password demo, a "
    "project hello whose control.sh prints what it deploys.  It takes the "
    "same settings as serve (--config, $IPD_CONFIG or %s, and the "
    "environment, e.g. ALLOWED_SIGNERS=... REQUIRE_SIGNATURE=hello), but for "
    "UPLOAD_DIR, LOG_DIR and AUTH_DB, which are in --dir, and LISTEN, which "
    "is --listen." % DEFAULT_CONFIG)


def add_daemon_commands(commands, config):
    """serve and demo: the daemon, configured or to try."""
    serve_parser = add_command(
        commands, "serve", cmd_serve, parents=[config], help="run the daemon "
        "(default)", description="Run the daemon with the settings of --config, "
        "$IPD_CONFIG or %s and the environment." % DEFAULT_CONFIG)
    serve_parser.add_argument("-v", "--verbose", action="store_true",
                              help="log to stderr too")
    demo = add_command(commands, "demo", cmd_demo, parents=[config], help="a local "
                       "daemon to try: user demo, password demo, project hello",
                       description=DEMO_DESCRIPTION)
    demo.add_argument("--dir", default="ipd-demo", help="its folder "
                      "(default: ./ipd-demo)")
    demo.add_argument("--listen", default="127.0.0.1:9955", help="host:port to "
                      "listen on (default: 127.0.0.1:9955)")


def add_admin_commands(commands, config):
    """passwd and token: the users file and the deploy tokens."""
    passwd = add_command(commands, "passwd", cmd_passwd, parents=[config],
                         help="add or replace a user in AUTH_DB",
                         description="Add or replace a user in the users file "
                         "(AUTH_DB) with a salted hash of a password read from "
                         "the terminal or stdin.")
    passwd.add_argument("role", choices=ROLES, help="ADMIN (everything), USER "
                        "(upload and follow deployments) or METRICS (/metrics)")
    passwd.add_argument("name", help="the user name")
    passwd.add_argument("--projects", help="USER only: comma-separated projects "
                        "this user may use")
    passwd.add_argument("--auth-db", help="users file (default: AUTH_DB)")
    token = add_command(commands, "token", cmd_token, parents=[config],
                        help="deploy tokens: create (shown once), list, revoke",
                        description="Deploy tokens for CI: a token works as the "
                        "password of a Basic login or as a Bearer token, for its "
                        "projects only, until it expires or is revoked.")
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


def add_telling_commands(commands):
    """version and settings: what this ipd is and takes."""
    add_command(commands, "version", cmd_version, help="print the version",
                description="Print the version.")
    described = add_command(
        commands, "settings", cmd_settings, help="print every setting: the "
        "README's table or ipd.conf.example", description="Print every setting "
        "with its default and what it does, as the README's table (--markdown) "
        "or as ipd.conf.example (--conf, the default).")
    described.add_argument("--markdown", action="store_true",
                           help="the README's table instead")


def build_parser():
    """The command line's argparse parser, every command in it."""
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
    add_daemon_commands(commands, config)
    add_admin_commands(commands, config)
    add_telling_commands(commands)
    add_client_commands(commands)
    return parser


# `python3 ipd.py serve` compiles this whole file in the daemon's memory
# before its first line runs, and the C library cannot give most of that
# back (measured: 68 MiB against 47 MiB over 100,000 deployments); run as
# `python3 -m ipd` from the bytecode cache (__pycache__) it compiles
# nothing.  -m searches the working folder first: the restart runs in
# this file's folder, and the child goes back to the one it was given.
START_DIR_VARIABLE = "IPD_START_DIR"


def restart_from_bytecode():
    """Replace this process (the same PID, arguments, flags and
    environment) by `python3 -m ipd`, run from this file's folder.
    Returns only where that cannot be: run as a module already, a file
    name that is not a module's, another module of that name first in
    its folder, or no bytecode to be had (none cached, and none may be
    written: PYTHONDONTWRITEBYTECODE, or a read-only folder such as
    ProtectSystem=full makes of /usr)."""
    main_module = sys.modules.get("__main__")
    path = getattr(main_module, "__file__", None)
    if getattr(main_module, "__spec__", None) is not None or not path \
            or not sys.executable:
        return
    path = os.path.realpath(path)  # the `ipd` link on PATH: the file it names
    if not path.endswith(".py"):
        return
    folder, name = os.path.split(path[:-3])
    spec = name.isidentifier() and importlib.machinery.PathFinder.find_spec(name, [folder])
    if not spec or spec.origin != path:
        return
    cache = importlib.util.cache_from_source(path)
    cache_dir = os.path.dirname(cache)
    writable = not sys.dont_write_bytecode and os.access(
        cache_dir if os.path.isdir(cache_dir) else folder, os.W_OK)
    if not (os.path.exists(cache) or writable):
        return  # it would be compiled again, in memory (make install compiles it)
    try:
        start_dir = os.getcwd()
    except OSError:  # a working folder removed meanwhile: as it was
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[START_DIR_VARIABLE] = start_dir
    os.chdir(folder)
    os.execv(sys.executable, [sys.executable] + subprocess._args_from_interpreter_flags()
             + ["-m", name] + sys.argv[1:])


def back_to_start_dir():
    """In a process restart_from_bytecode started: back to the working
    folder it was started in (relative paths in the arguments and the
    settings mean what they meant), and the variable gone."""
    start_dir = os.environ.pop(START_DIR_VARIABLE, None)
    if start_dir is not None and getattr(sys.modules.get("__main__"), "__spec__", None):
        os.chdir(start_dir)


def main(argv=None):
    """Run the command line; returns the exit status.  The daemon's
    commands, run as a script, start again from bytecode first."""
    from_command_line = argv is None
    if from_command_line:
        back_to_start_dir()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        argv = sys.argv[1:] if argv is None else list(argv)
        args = parser.parse_args(argv + ["serve"])
    if from_command_line and args.func in (cmd_serve, cmd_demo):
        restart_from_bytecode()
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
