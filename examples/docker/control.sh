#!/bin/sh
# examples/docker/control.sh - one app container on one host, behind nginx,
# upgraded with zero downtime.  ipd runs it as
#
#     control.sh check | prepare | deploy [| verify]
#
# and, as the original ipd says, exit status 1 means success: anything else
# is the deployment's failure code.  It uses what ipd gives it:
#
#     IMAGE        the uploaded image: a `docker save` tar
#     PROJECT      the project name;  DEPLOY  the deployment's ID
#     PROJECT_DIR  a folder kept across deployments: settings, proxy config
#
# The app is reached at one of two fixed loopback ports of the project,
# blue (PORT_BASE) and green (PORT_BASE+1).  deploy loads the image, starts
# the new container on the port that is not serving, waits until it answers
# its health check, points the project's nginx upstream at that port and
# reloads nginx, and only then stops the old container.  Because the port is
# part of the container's settings, Docker gives it back when it restarts
# the container (a crash) or itself (an engine restart): nginx stays right
# without a deploy.  A new container that never becomes healthy is removed
# and the old one keeps serving.
#
# Disk: the names the uploaded image came with are removed once it is
# tagged ipd-<project>:<deployment>; the images of the last KEEP_IMAGES
# deployments stay for a rollback (a redeploy), every other image of the
# project, failed deployments' included, is removed, and so are stopped
# containers.  Settings: $PROJECT_DIR/deploy.env.
#
# verify (run by ipd after deploy where the project's VERIFY_SECONDS is not
# 0) watches the new container for VERIFY_SECONDS: a restart of it (a
# crash loop), its health path every second, and the share of 5xx answers
# nginx gave for the project, from the access log the proxy config sets up
# (NGINX_ACCESS_LOG, format "$msec $status").  It fails on a restart, on
# VERIFY_HEALTH_FAILURES failed health checks in a row, or when more than
# VERIFY_MAX_5XX_PERCENT of at least VERIFY_MIN_REQUESTS answers were 5xx;
# ipd then marks the deployment reverted and redeploys the last good one.
#
# Exit codes: 1 ok; 0 check found something missing (then prepare runs);
# 2 prepare failed; 3 no image; 4 docker load failed; 5 docker run failed;
# 10 new container not healthy; 11 nginx refused the new config; verify:
# 12 the container restarted or stopped; 13 its health checks failed; 14
# too many 5xx answers.
set -u
set -f  # DOCKER_RUN_OPTS is split on spaces, never globbed

OK=1
ENV_FILE="$PROJECT_DIR/deploy.env"
NETWORK="ipd-$PROJECT"
# The folder that `make install` and the .deb make for ipd-nginx.path.
RELOAD_DIR=/var/lib/ipd/nginx

say() { echo "[$PROJECT] $*"; }
fail() { code=$1; shift; say "FAILED: $*" >&2; exit "$code"; }

# Docker repository names are lower case: ipd-<project>, other signs as '-'.
repository() {
    printf 'ipd-%s' "$PROJECT" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]\{1,\}/-/g; s/-*$//'
}

# Whether something listens on TCP port $1 of this host.
listening() {
    hex=$(printf '%04X' "$1")
    grep -Eq "^ *[0-9]+: [0-9A-F]+:$hex [0-9A-F]+:[0-9A-F]+ 0A " \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# A PORT_BASE for this project: a multiple of 20 from 20000 to 29980 that no
# other project's deploy.env uses and where nothing listens; it starts from
# a hash of the name, so a project keeps finding the same one.
pick_port_base() {
    sum=$(printf '%s' "$PROJECT" | cksum | cut -d' ' -f1)
    slot=$((sum % 500))
    taken=$(cat "$(dirname "$PROJECT_DIR")"/*/deploy.env 2>/dev/null |
        sed -n 's/^PORT_BASE=\([0-9]*\).*/\1/p')
    tries=0
    while [ $tries -lt 500 ]; do
        base=$((20000 + slot * 20))
        if ! echo "$taken" | grep -qx "$base" && ! listening "$base" &&
                ! listening $((base + 1)); then
            echo "$base"; return 0
        fi
        slot=$(((slot + 1) % 500)); tries=$((tries + 1))
    done
    return 1
}

# Every setting with its default, PORT_BASE=$1: deploy.env as prepare
# first writes it, and the lines it adds to one that lacks some.
default_settings() {
    # a deploy.env of before, which lacks NGINX_CONF, keeps its proxy config
    if [ -f "$ENV_FILE" ] && [ -f "$PROJECT_DIR/nginx.conf" ]; then conf="$PROJECT_DIR/nginx.conf"
    elif [ -d "$RELOAD_DIR" ] && [ -w "$RELOAD_DIR" ]; then conf="$RELOAD_DIR/$PROJECT.conf"
    else conf="$PROJECT_DIR/nginx.conf"; fi
    # As root nginx is reloaded directly; otherwise ipd-nginx.path does it.
    nginx=""
    [ "$(id -u)" = 0 ] && nginx=nginx
    cat <<EOF
# Settings of examples/docker/control.sh for project $PROJECT (shell syntax).
# Port the app listens on inside its container.
APP_PORT=8080
# nginx reaches the app at 127.0.0.1:PORT_BASE (blue) or PORT_BASE+1
# (green); a deployment starts on the one that is not serving.
PORT_BASE=$1
# Path answered with a 2xx when the app is ready, and how long to wait.
HEALTH_PATH=/health
HEALTH_TIMEOUT=60
# After nginx switched: seconds the old container still serves requests
# begun before, then how long docker stop waits before it kills, and the
# signal it sends first (empty: the image's STOPSIGNAL, else SIGTERM).
DRAIN_SECONDS=2
STOP_TIMEOUT=10
STOP_SIGNAL=
# Images of the last deployments kept for a rollback (a redeploy).
KEEP_IMAGES=3
# Docker's restart policy of the container (a crash, an engine restart).
RESTART=unless-stopped
# Extra options of docker run, e.g. --env-file /srv/web.env --memory 512m
DOCKER_RUN_OPTS=
# The nginx server block of the app, and the file it is written to; nginx
# includes it inside http { }.
NGINX_LISTEN=80
NGINX_SERVER_NAME=$PROJECT
NGINX_CONF=$conf
# The nginx command to test and reload with (nginx as root, or
# "sudo -n /usr/sbin/nginx"); empty: ipd-nginx.path reloads nginx when
# NGINX_CONF changes and reports in NGINX_STATUS (see the README).
NGINX="$nginx"
NGINX_STATUS=/run/ipd-nginx/status
RELOAD_TIMEOUT=30
EOF
}

write_defaults() {
    base=$(pick_port_base) || fail 2 "no free PORT_BASE from 20000 to 29999"
    default_settings "$base" > "$ENV_FILE.tmp"
    mv "$ENV_FILE.tmp" "$ENV_FILE"
    say "wrote default settings to $ENV_FILE"
}

# The names of the settings deploy.env lacks, one a line.
missing_settings() {
    default_settings 0 | sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' |
        while read -r key; do grep -Eq "^(export +)?$key=" "$ENV_FILE" || echo "$key"; done
}

# Say which names in deploy.env no setting has (a typo leaves the setting
# at its default), with the closest one (at most 2 letters apart); the file
# is shell, so a name of the user's own may be meant: a warning only.
warn_unknown_settings() {
    known=$(default_settings 0 | sed -n 's/^\([A-Z_][A-Z0-9_]*\)=.*/\1/p' | tr '\n' ' ')
    sed -n 's/^\(export  *\)\{0,1\}\([A-Za-z_][A-Za-z0-9_]*\)=.*/\2/p' "$ENV_FILE" |
        awk -v known="$known" -v file="$ENV_FILE" -v project="$PROJECT" '
        function distance(a, b,    i, j, n, m, d, cost) {
            n = length(a); m = length(b)
            for (i = 0; i <= n; i++) d[i, 0] = i
            for (j = 0; j <= m; j++) d[0, j] = j
            for (i = 1; i <= n; i++)
                for (j = 1; j <= m; j++) {
                    cost = substr(a, i, 1) != substr(b, j, 1)
                    d[i, j] = d[i - 1, j - 1] + cost
                    if (d[i - 1, j] + 1 < d[i, j]) d[i, j] = d[i - 1, j] + 1
                    if (d[i, j - 1] + 1 < d[i, j]) d[i, j] = d[i, j - 1] + 1
                }
            return d[n, m]
        }
        BEGIN { count = split(known, names, " ") }
        {
            best = ""; score = 3
            for (k = 1; k <= count; k++) {
                if ($0 == names[k]) next
                s = distance($0, names[k]); if (s < score) { score = s; best = names[k] }
            }
            hint = best != "" ? " (did you mean " best "?)" : " (see the README)"
            printf "[%s] warning: %s: unknown setting %s%s\n", project, file, $0, hint
        }'
}

# Add each setting deploy.env lacks with its default (a deploy.env written
# by hand with a few settings, or by an earlier version of this script),
# so that every one has a value and the file shows them all.
add_missing_settings() {
    missing=$(missing_settings)
    [ -n "$missing" ] || return 0
    base=0
    if echo "$missing" | grep -qx PORT_BASE; then
        base=$(pick_port_base) || fail 2 "no free PORT_BASE from 20000 to 29999"
    fi
    [ -z "$(tail -c 1 "$ENV_FILE")" ] || echo >> "$ENV_FILE"
    default_settings "$base" | while IFS= read -r line; do
        case "$line" in
            [A-Z_]*=*) if echo "$missing" | grep -qx "${line%%=*}"; then
                           printf '%s\n' "$line"; fi ;;
        esac
    done >> "$ENV_FILE" || fail 2 "cannot add settings to $ENV_FILE"
    say "added to $ENV_FILE:" $missing
}

load_settings() {
    [ -f "$ENV_FILE" ] || fail 2 "no $ENV_FILE: prepare makes it"
    . "$ENV_FILE"
    # Settings a deploy.env of an earlier version of this script lacks.
    NGINX_CONF=${NGINX_CONF:-$PROJECT_DIR/nginx.conf}
    NGINX_STATUS=${NGINX_STATUS:-/run/ipd-nginx/status}
    if [ -z "${NGINX+set}" ]; then NGINX=""; [ "$(id -u)" = 0 ] && NGINX=nginx; fi
    RELOAD_TIMEOUT=${RELOAD_TIMEOUT:-30}
    RESTART=${RESTART:-unless-stopped}
    STOP_SIGNAL=${STOP_SIGNAL:-}
    # verify's thresholds (see the README), and where nginx logs for it.
    VERIFY_HEALTH_FAILURES=${VERIFY_HEALTH_FAILURES:-3}
    VERIFY_MAX_5XX_PERCENT=${VERIFY_MAX_5XX_PERCENT:-5}
    VERIFY_MIN_REQUESTS=${VERIFY_MIN_REQUESTS:-20}
    NGINX_ACCESS_LOG=${NGINX_ACCESS_LOG:-$PROJECT_DIR/access.log}
    [ -n "${PORT_BASE:-}" ] || fail 2 "no PORT_BASE in $ENV_FILE: prepare adds it"
}

# The proxy config: an upstream named ipd-<project> and the app's server,
# both for nginx's http { } block.  $1 is the app's port on 127.0.0.1, or ""
# before the first deploy.
write_nginx_config() {
    if [ -n "$1" ]; then server="server 127.0.0.1:$1;"
    else server="server 127.0.0.1:9 down;  # no container yet"; fi
    cat > "$NGINX_CONF.tmp" <<EOF
# Written by control.sh of $PROJECT, deployment $DEPLOY, for nginx's
# http { } block.
upstream ipd-$PROJECT {
    $server
}
# What control.sh verify counts: when, and the status of each answer.
log_format ipd-$PROJECT-verify '\$msec \$status';
server {
    listen $NGINX_LISTEN;
    server_name $NGINX_SERVER_NAME;
    access_log $NGINX_ACCESS_LOG ipd-$PROJECT-verify;
    location / {
        proxy_pass http://ipd-$PROJECT;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host \$host;
        proxy_set_header X-Real-IP \$remote_addr;
        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto \$scheme;
        proxy_next_upstream error timeout;
    }
}
EOF
    [ -f "$NGINX_CONF" ] && cp "$NGINX_CONF" "$NGINX_CONF.previous"
    mv "$NGINX_CONF.tmp" "$NGINX_CONF"
}

# The port nginx sends the app's requests to now, or "".
serving_port() {
    sed -n 's/^ *server 127\.0\.0\.1:\([0-9]*\);$/\1/p' "$NGINX_CONF" 2>/dev/null | head -n 1
}

# Test and reload nginx with the new config; on any error put the old one
# back.  With NGINX empty, ipd-nginx.path does it as root: wait for its
# report in NGINX_STATUS ("<start, ns> <status> <message>") of a run that
# began after the config was written.
reload_nginx() {
    if [ -n "$NGINX" ]; then
        if tested=$($NGINX -t 2>&1) && $NGINX -s reload; then return 0; fi
        echo "$tested"
    elif wait_for_reload "$(date +%s%N)"; then
        return 0
    fi
    [ -f "$NGINX_CONF.previous" ] && mv "$NGINX_CONF.previous" "$NGINX_CONF"
    return 1
}

wait_for_reload() {
    deadline=$(( $(date +%s) + RELOAD_TIMEOUT ))
    next_touch=$(( $(date +%s) + 3 ))
    while :; do
        if read -r started status message < "$NGINX_STATUS" 2>/dev/null &&
                [ "$started" -ge "$1" ] 2>/dev/null; then
            [ "$status" = 0 ] && return 0
            echo "nginx: $message"; return 1
        fi
        now=$(date +%s)
        if [ "$now" -ge "$deadline" ]; then
            echo "no reload reported in $NGINX_STATUS within ${RELOAD_TIMEOUT}s:" \
                 "is ipd-nginx.path enabled?"; return 1
        fi
        # A change made while a reload ran may not start another one.
        if [ "$now" -ge "$next_touch" ]; then touch "$NGINX_CONF"; next_touch=$((now + 3)); fi
        sleep 0.2
    done
}

http_ok() {
    if command -v curl >/dev/null; then curl -fsS -m 2 -o /dev/null "$1" 2>/dev/null
    else wget -q -T 2 -O /dev/null "$1" 2>/dev/null; fi
}

# Remove the project's containers that match the docker ps filter $1.
remove_containers() {
    ids=$(docker ps -aq --filter "label=ipd.project=$PROJECT" --filter "$1")
    [ -z "$ids" ] || docker rm -f $ids >/dev/null
}

# Remove the image tags of the project but current, previous and the last
# KEEP_IMAGES deployments; an image goes with its last tag.
prune_images() {
    keep=$(tail -n "$KEEP_IMAGES" "$PROJECT_DIR/images.list" 2>/dev/null)
    for tag in $(docker image ls --format '{{.Tag}}' "$repo"); do
        case "$tag" in current|previous) continue ;; esac
        echo "$keep" | grep -qx "$tag" && continue
        docker rmi "$repo:$tag" >/dev/null 2>&1
    done
    for state in exited created dead; do remove_containers "status=$state"; done
}

# A failed deployment leaves nothing: its container, its image, its tag.
give_up() {
    docker rm -f "$name" >/dev/null 2>&1
    docker rmi "$repo:$DEPLOY" >/dev/null 2>&1
    fail "$@"
}

check() {
    [ -f "$ENV_FILE" ] || { say "no settings yet"; exit 0; }
    warn_unknown_settings
    missing=$(missing_settings)
    [ -z "$missing" ] || { say "no" $missing "in $ENV_FILE yet"; exit 0; }
    load_settings
    [ -f "$NGINX_CONF" ] || { say "no proxy config yet"; exit 0; }
    docker network inspect "$NETWORK" >/dev/null 2>&1 || { say "no network yet"; exit 0; }
    say "ready"
    exit $OK
}

prepare() {
    [ -f "$ENV_FILE" ] || write_defaults
    add_missing_settings
    load_settings
    docker network inspect "$NETWORK" >/dev/null 2>&1 ||
        docker network create "$NETWORK" >/dev/null || fail 2 "cannot create network $NETWORK"
    [ -f "$NGINX_CONF" ] || write_nginx_config ""
    say "prepared: network $NETWORK, $ENV_FILE, $NGINX_CONF"
    exit $OK
}

deploy() {
    load_settings
    [ -n "$IMAGE" ] && [ -f "$IMAGE" ] || fail 3 "no image uploaded"
    repo=$(repository)
    loaded=$(docker load -i "$IMAGE") || fail 4 "docker load failed"
    echo "$loaded"
    ref=$(echo "$loaded" | sed -n 's/^Loaded image: //p; s/^Loaded image ID: //p' | tail -n 1)
    [ -n "$ref" ] || fail 4 "docker load named no image"
    docker tag "$ref" "$repo:$DEPLOY" || fail 4 "cannot tag $ref"
    # The names it came with would keep it on disk for ever.
    for loaded_name in $(echo "$loaded" | sed -n 's/^Loaded image: //p'); do
        case "$loaded_name" in "$repo":*) ;; *) docker rmi "$loaded_name" >/dev/null ;; esac
    done

    # Blue or green: the port that is not serving; whatever holds it is a
    # leftover (a stopped or failed deployment).
    if [ "$(serving_port)" = "$PORT_BASE" ]; then port=$((PORT_BASE + 1)); else port=$PORT_BASE; fi
    remove_containers "label=ipd.port=$port"
    old=$(docker ps -aq --filter "label=ipd.project=$PROJECT")
    name="ipd-$PROJECT-$(echo "$DEPLOY" | cut -c1-8)"
    docker rm -f "$name" >/dev/null 2>&1
    stop_signal=""
    [ -n "$STOP_SIGNAL" ] && stop_signal="--stop-signal=$STOP_SIGNAL"
    say "starting $name from $ref on 127.0.0.1:$port"
    docker run -d --name "$name" --network "$NETWORK" \
        --label "ipd.project=$PROJECT" --label "ipd.deploy=$DEPLOY" --label "ipd.port=$port" \
        -p "127.0.0.1:$port:$APP_PORT" --restart "$RESTART" $stop_signal \
        $DOCKER_RUN_OPTS "$repo:$DEPLOY" >/dev/null ||
        give_up 5 "docker run failed (is 127.0.0.1:$port taken by something else?)"

    # Wait for the health check; the old container serves meanwhile.
    deadline=$(( $(date +%s) + HEALTH_TIMEOUT ))
    why=""
    until http_ok "http://127.0.0.1:$port$HEALTH_PATH"; do
        if [ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
            why="the container stopped"; break; fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            why="no answer from $HEALTH_PATH within ${HEALTH_TIMEOUT}s"; break; fi
        sleep 0.5
    done
    if [ -n "$why" ]; then
        say "last lines of its log:"; docker logs --tail 20 "$name" 2>&1
        give_up 10 "$name is not healthy: $why; the previous version keeps serving"
    fi
    say "$name is healthy on 127.0.0.1:$port"

    # Switch traffic, then retire the old container.
    write_nginx_config "$port"
    reload_nginx || give_up 11 "nginx refused the new config; the previous version keeps serving"
    say "nginx now sends $NGINX_SERVER_NAME to $name"
    if [ -n "$old" ]; then
        sleep "$DRAIN_SECONDS"
        for container in $old; do
            docker stop -t "$STOP_TIMEOUT" "$container" >/dev/null
            docker rm "$container" >/dev/null
        done
        say "stopped the previous container"
    fi

    # current and previous name the last two; the images of the last
    # KEEP_IMAGES deployments stay for a rollback (a redeploy).
    docker image inspect "$repo:current" >/dev/null 2>&1 &&
        docker tag "$repo:current" "$repo:previous"
    docker tag "$repo:$DEPLOY" "$repo:current"
    echo "$DEPLOY" >> "$PROJECT_DIR/images.list"
    tail -n "$KEEP_IMAGES" "$PROJECT_DIR/images.list" > "$PROJECT_DIR/images.list.tmp"
    mv "$PROJECT_DIR/images.list.tmp" "$PROJECT_DIR/images.list"
    prune_images
    say "deployed $ref as $repo:$DEPLOY"
    exit $OK
}

# "requests 5xx": the answers nginx logged for the project since byte $1
# of its access log, and how many of them were 5xx.
answers_since() {
    tail -c +$(($1 + 1)) "$NGINX_ACCESS_LOG" 2>/dev/null |
        awk '{ n++ } $2 ~ /^5/ { e++ } END { printf "%d %d\n", n, e }'
}

# Watch this deployment's container for VERIFY_SECONDS; exit 1 when it held.
verify() {
    load_settings
    seconds=${VERIFY_SECONDS:-60}
    name=$(docker ps -aq --filter "label=ipd.project=$PROJECT" \
        --filter "label=ipd.deploy=$DEPLOY" | head -n 1)
    [ -n "$name" ] || fail 12 "no container of deployment $DEPLOY"
    port=$(docker inspect -f '{{index .Config.Labels "ipd.port"}}' "$name")
    offset=$(stat -c %s "$NGINX_ACCESS_LOG" 2>/dev/null || echo 0)
    say "verifying $name on 127.0.0.1:$port for ${seconds}s"
    end=$(( $(date +%s%N) / 1000000 + seconds * 1000 ))  # in ms
    failed=0 requests=0 errors=0
    while :; do
        state=$(docker inspect -f '{{.RestartCount}} {{.State.Running}}' "$name" 2>/dev/null)
        if [ "$state" != "0 true" ]; then
            say "last lines of its log:"; docker logs --tail 20 "$name" 2>&1
            fail 12 "$name restarted or stopped (restarts, running: ${state:-gone})"
        fi
        if http_ok "http://127.0.0.1:$port$HEALTH_PATH"; then failed=0
        else
            failed=$((failed + 1))
            [ "$failed" -lt "$VERIFY_HEALTH_FAILURES" ] ||
                fail 13 "$HEALTH_PATH failed $failed times in a row"
        fi
        # a log rotated meanwhile is read from its start
        [ "$(stat -c %s "$NGINX_ACCESS_LOG" 2>/dev/null || echo 0)" -ge "$offset" ] || offset=0
        set -- $(answers_since "$offset")
        requests=$1 errors=$2
        if [ "$requests" -ge "$VERIFY_MIN_REQUESTS" ] &&
                [ $((errors * 100)) -gt $((VERIFY_MAX_5XX_PERCENT * requests)) ]; then
            fail 14 "$errors of $requests answers were 5xx (over ${VERIFY_MAX_5XX_PERCENT}%)"
        fi
        [ $(( $(date +%s%N) / 1000000 )) -lt "$end" ] || break
        sleep 1
    done
    say "$name held for ${seconds}s: $requests answers, $errors 5xx, no restart"
    exit $OK
}

case "${1:-}" in
    check) check ;;
    prepare) prepare ;;
    deploy) deploy ;;
    verify) verify ;;
esac
echo "usage: control.sh check|prepare|deploy|verify"
exit 2
