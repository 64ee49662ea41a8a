# ipd - Image Push and Deploy
#   make test                 the tests, with $(PYTHON), in 4 processes a CPU
#   make test-system          the Docker, nginx, Chromium and packaging tests
#   make soak                 the long soaks at full size (CI runs them once)
#   make bench                the benchmark (README: Performance)
#   make install              the original README's installation, automated,
#                             and `ipd` on PATH ($(PREFIX)/bin/ipd)
#   make uninstall            undo it; uploads, logs, users and config stay
#   make wheel / sdist / deb  dist/ipd-<v>-py3-none-any.whl, .tar.gz, ipd_<v>_all.deb
#   make install-unit EXEC=/opt/ipd/bin/ipd   only the unit, for a virtualenv
#   make install-nginx-reload  only ipd-nginx.path: reloads nginx for the
#                              Docker examples (also part of make install)
#   make install-run-as       scripts under their own user RUN_USER (README)
# DESTDIR stages a tree (for packages): users, ownership and systemctl are
# then left out.  PREFIX is where ipd.py goes, under $(PREFIX)/lib/ipd.

PYTHON ?= python3
PREFIX ?= /usr/local
DESTDIR ?=
LIBDIR = $(PREFIX)/lib/ipd
# `ipd` on PATH: a link to $(LIBDIR)/ipd.py, relative (as the .deb's
# /usr/bin/ipd) so that it holds in a DESTDIR stage too.
BINDIR = $(PREFIX)/bin
IPD_LINK = $(patsubst $(PREFIX)/%,../%,$(LIBDIR))/ipd.py
UNITDIR ?= /etc/systemd/system
CONFIG ?= /etc/ipd.conf
AUTH_DB ?= /opt/ipd/users.txt
UPLOAD_DIR ?= /srv/upload
LOG_DIR ?= /var/log/ipd
USER_NAME ?= ipd
# Where the Docker examples write their nginx configs; ipd-nginx.path
# watches it and reloads nginx as root.
NGINX_DIR ?= /var/lib/ipd/nginx
# The user control.sh and notify.sh run as with make install-run-as.
RUN_USER ?= ipd-run
# The command the unit starts: the copied file, or a virtualenv's ipd.
DEFAULT_EXEC = /usr/bin/python3 $(LIBDIR)/ipd.py
EXEC ?= $(DEFAULT_EXEC)
# The unit's Documentation= names the README that `make install` copies
# beside ipd.py; another EXEC (a virtualenv) has none there, so it goes.
ifeq ($(EXEC),$(DEFAULT_EXEC))
DOC_SED = -e 's|/usr/local/lib/ipd|$(LIBDIR)|g'
else
DOC_SED = -e '/^Documentation=/d'
endif
DIST ?= dist
.PHONY: test test-system soak bench install uninstall install-user install-unit install-nginx-reload \
	install-run-as \
	wheel sdist deb

test:
	$(PYTHON) test_ipd.py

# The classes that need a Docker engine, nginx, Chromium, packaging tools or
# the system's Python: the same on every Python, so CI runs them once.
test-system:
	IPD_TEST_SET=system $(PYTHON) test_ipd.py

# The long soaks at full size (20,000 fuzzed requests, 50 uploads with
# kill -9, 1 GiB pushes, large logs): once per CI run, on one Python.
soak:
	IPD_SOAK=1 $(PYTHON) test_ipd.py -k Guarantee -k MemoryTests -k test_push_of_1_gib \
	    -k LargeAnswerTests -k RequestFuzzTests -k PackageBombTests \
	    -k test_zip_link_targets -k LayerJsonFuzzTests -k SegmentTakeoverTests

# Upload speed, memory and latency beside nginx, uvicorn and multipart
# (installs its peers into build/bench-venv; takes some minutes).
bench:
	$(PYTHON) bench_ipd.py

install:
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then \
	    echo "make install: run as root, or set DESTDIR" >&2; exit 1; fi
	@if [ -z "$(DESTDIR)" ]; then $(MAKE) --no-print-directory install-user; fi
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(UNITDIR) \
	    $(DESTDIR)$(dir $(CONFIG)) $(DESTDIR)$(dir $(AUTH_DB)) \
	    $(DESTDIR)$(UPLOAD_DIR) $(DESTDIR)$(LOG_DIR)
	install -m 0755 ipd.py $(DESTDIR)$(LIBDIR)/ipd.py
	@# Its bytecode, for the unit's Python and this one: the daemon starts
	@# from it (restart_from_bytecode) and may not write there itself.
	@if [ -z "$(DESTDIR)" ]; then for python in /usr/bin/python3 $(PYTHON); do \
	    command -v $$python >/dev/null && $$python -m py_compile $(LIBDIR)/ipd.py || true; \
	done; fi
	install -m 0644 README.md ipd.conf.example ipd-run-as.conf $(DESTDIR)$(LIBDIR)/
	install -d $(DESTDIR)$(LIBDIR)/docs
	install -m 0644 docs/*.md $(DESTDIR)$(LIBDIR)/docs/
	install -d $(DESTDIR)$(BINDIR)
	ln -sfn $(IPD_LINK) $(DESTDIR)$(BINDIR)/ipd
	$(MAKE) --no-print-directory install-unit install-nginx-reload
	@# The config and the users file are the operator's: never overwritten.
	@if [ ! -e $(DESTDIR)$(CONFIG) ]; then \
	    sed -e 's|^UPLOAD_DIR=.*|UPLOAD_DIR=$(UPLOAD_DIR)|' \
	        -e 's|^LOG_DIR=.*|LOG_DIR=$(LOG_DIR)|' \
	        -e 's|^AUTH_DB=.*|AUTH_DB=$(AUTH_DB)|' \
	        ipd.conf.example > $(DESTDIR)$(CONFIG); \
	    chmod 0644 $(DESTDIR)$(CONFIG); echo "created $(DESTDIR)$(CONFIG)"; fi
	@if [ ! -e $(DESTDIR)$(AUTH_DB) ]; then \
	    touch $(DESTDIR)$(AUTH_DB); chmod 0640 $(DESTDIR)$(AUTH_DB); \
	    echo "created $(DESTDIR)$(AUTH_DB): add users with" \
	         "'python3 $(LIBDIR)/ipd.py passwd ADMIN name'"; fi
	@if [ -z "$(DESTDIR)" ]; then \
	    chown $(USER_NAME):$(USER_NAME) $(UPLOAD_DIR) $(LOG_DIR) $(AUTH_DB) $(NGINX_DIR); \
	    if [ -d /run/systemd/system ]; then \
	        systemctl daemon-reload && systemctl enable --now ipd-nginx.path && \
	        systemctl enable ipd.service && \
	        echo "enabled ipd.service: start it with 'systemctl start ipd'"; \
	    else echo "no running systemd: start ipd with" \
	        "'IPD_CONFIG=$(CONFIG) python3 $(LIBDIR)/ipd.py serve'"; fi; fi

install-unit:
	install -d $(DESTDIR)$(UNITDIR)
	sed -e 's|^ExecStart=.*|ExecStart=$(EXEC) serve|' $(DOC_SED) \
	    -e 's|IPD_CONFIG=/etc/ipd.conf|IPD_CONFIG=$(CONFIG)|' \
	    -e 's|EnvironmentFile=-/etc/ipd.conf|EnvironmentFile=-$(CONFIG)|' \
	    -e 's|^User=ipd|User=$(USER_NAME)|' -e 's|^Group=ipd|Group=$(USER_NAME)|' \
	    ipd.service > $(DESTDIR)$(UNITDIR)/ipd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/ipd.service

# The root path unit that reloads nginx when a control.sh run by ipd
# wrote a proxy config (ipd itself cannot: NoNewPrivileges).
install-nginx-reload:
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(LIBDIR) $(DESTDIR)$(NGINX_DIR)
	install -m 0755 tools/nginx-reload $(DESTDIR)$(LIBDIR)/nginx-reload
	sed -e 's|/var/lib/ipd/nginx|$(NGINX_DIR)|' ipd-nginx.path \
	    > $(DESTDIR)$(UNITDIR)/ipd-nginx.path
	sed -e 's|^ExecStart=.*|ExecStart=$(LIBDIR)/nginx-reload|' ipd-nginx.service \
	    > $(DESTDIR)$(UNITDIR)/ipd-nginx.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/ipd-nginx.path $(DESTDIR)$(UNITDIR)/ipd-nginx.service

wheel:
	$(PYTHON) tools/wheel_backend.py wheel $(DIST)

sdist:
	$(PYTHON) tools/wheel_backend.py sdist $(DIST)

deb:
	sh tools/build_deb.sh $(DIST)

# The user of the original README (adduser ipd; addgroup ipd docker).
install-user:
	getent group docker >/dev/null || groupadd --system docker
	getent passwd $(USER_NAME) >/dev/null || useradd --system --user-group \
	    --home-dir /var/lib/$(USER_NAME) --create-home \
	    --shell /usr/sbin/nologin $(USER_NAME)
	[ -e $(UNITDIR)/ipd.service.d/run-as.conf ] || usermod -a -G docker $(USER_NAME)

# Scripts under their own user (README): RUN_USER in group docker, ipd out
# of it, the unit's drop-in with CAP_SETUID, CAP_SETGID, CAP_KILL, and
# RUN_AS=$(RUN_USER) in the config where RUN_AS is still empty.
install-run-as:
	getent group docker >/dev/null || groupadd --system docker
	getent passwd $(RUN_USER) >/dev/null || useradd --system --user-group \
	    --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin $(RUN_USER)
	usermod -a -G docker $(RUN_USER)
	-gpasswd -d $(USER_NAME) docker
	install -d $(UNITDIR)/ipd.service.d
	install -m 0644 ipd-run-as.conf $(UNITDIR)/ipd.service.d/run-as.conf
	if grep -q '^RUN_AS=' $(CONFIG); then \
	    sed -i 's|^RUN_AS=$$|RUN_AS=$(RUN_USER)|' $(CONFIG); \
	else echo 'RUN_AS=$(RUN_USER)' >> $(CONFIG); fi
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload && \
	    systemctl try-restart ipd.service; fi
	@echo "RUN_AS: $$(grep '^RUN_AS=' $(CONFIG))"

uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	    systemctl disable --now ipd.service ipd-nginx.path || true; fi
	rm -f $(DESTDIR)$(UNITDIR)/ipd.service $(DESTDIR)$(UNITDIR)/ipd-nginx.path \
	    $(DESTDIR)$(UNITDIR)/ipd-nginx.service $(DESTDIR)$(UNITDIR)/ipd.service.d/run-as.conf
	rm -rf $(DESTDIR)$(LIBDIR)
	@# the link only, never an `ipd` of another's
	if [ "$$(readlink $(DESTDIR)$(BINDIR)/ipd)" = $(IPD_LINK) ]; then \
	    rm -f $(DESTDIR)$(BINDIR)/ipd; fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	    systemctl daemon-reload; fi
	@echo "kept: $(UPLOAD_DIR), $(LOG_DIR), $(NGINX_DIR), $(CONFIG), $(AUTH_DB) and the" \
	      "user $(USER_NAME); remove them by hand if you want them gone"
