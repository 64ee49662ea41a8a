#!/bin/sh
# examples/swarm/control.sh - an app as Docker Swarm services behind nginx.
# ipd runs it as
#
#     control.sh check | prepare | deploy [| verify]
#
# and, as the original ipd says, exit status 1 means success: anything else
# is the deployment's failure code.  It uses IMAGE (a `docker save` tar),
# PROJECT, DEPLOY and PROJECT_DIR (settings and proxy config are kept there).
#
# Each of the REPLICAS tasks runs as a service of one replica that publishes
# a fixed port in host mode, on 127.0.0.1 (PUBLISH_ADDRESS): slot i (from 1)
# of the blue version on PORT_BASE+2(i-1), of the green one on PORT_BASE+2i-1.
# deploy loads the image once, creates the services of the color that is
# not serving, checks from this host that every port answers HEALTH_PATH,
# points nginx at them and reloads it, and only then removes the old
# color's services.  The old version is never stopped before nginx left
# it: a new version that is not healthy, or an nginx that refuses the new
# config, leaves it serving.  When the swarm replaces a task (a crash, an
# engine restart) the new one gets the same port, so nginx stays right
# without a deploy.  REPLICAS is read on every deploy.
#
# Disk: the image is tagged ipd-<project>:<deployment ID> (no current or
# previous tag, unlike examples/docker), the uploaded image's own names are
# removed, the images of the last KEEP_IMAGES deployments are kept and
# every other tag of ipd-<project> is removed.
#
# verify (run by ipd after deploy where the project's VERIFY_SECONDS is not
# 0) watches each slot of the new version for VERIFY_SECONDS: a task the
# swarm had to replace (a crash loop), each slot's health path every
# second, and the share of 5xx answers nginx gave for the project (its
# access log, set up by the proxy config: NGINX_ACCESS_LOG).  The same
# thresholds as examples/docker: VERIFY_HEALTH_FAILURES in a row for one
# slot, over VERIFY_MAX_5XX_PERCENT of at least VERIFY_MIN_REQUESTS.
#
# Exit codes: 1 ok; 0 check found something missing (then prepare runs);
# 2 prepare failed; 3 no image; 4 docker load or push failed; 5 docker
# service create failed or a port stayed taken; 10 the new tasks did not
# answer their health check; 11 nginx refused the new config; verify: 12 a
# task was replaced or stopped; 13 a slot's health checks failed; 14 too
# many 5xx answers.
set -u
set -f

OK=1
ENV_FILE="$PROJECT_DIR/deploy.env"
RELOAD_DIR=/var/lib/ipd/nginx

say() { echo "[$PROJECT] $*"; }
fail() { code=$1; shift; say "FAILED: $*" >&2; exit "$code"; }

# Docker names are lower case: ipd-<project>, other signs as '-'.
repository() {
    printf 'ipd-%s' "$PROJECT" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]\{1,\}/-/g; s/-*$//'
}
SERVICE=$(repository | cut -c1-50)

listening() {
    hex=$(printf '%04X' "$1")
    grep -Eq "^ *[0-9]+: [0-9A-F]+:$hex [0-9A-F]+:[0-9A-F]+ 0A " \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# A PORT_BASE for this project: a multiple of 20 from 20000 to 29980 that no
# other project's deploy.env uses and where nothing listens.
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
    nginx=""
    [ "$(id -u)" = 0 ] && nginx=nginx
    cat <<EOF
# Settings of examples/swarm/control.sh for project $PROJECT (shell syntax).
APP_PORT=8080
# Tasks, 1 to 10, each a service of one replica on its own port: slot i of
# the blue version on PORT_BASE+2(i-1), of the green one on PORT_BASE+2i-1.
REPLICAS=1
PORT_BASE=$1
# Where tasks publish their port.  127.0.0.1 keeps them on this node and
# out of reach but through nginx; for several nodes see the README.
PUBLISH_ADDRESS=127.0.0.1
# Path every task answers with a 2xx when ready, asked from this host.
HEALTH_PATH=/health
HEALTH_TIMEOUT=60
# After nginx switched: seconds the old tasks still serve requests begun
# before; then the swarm's stop: signal (empty: the image's STOPSIGNAL)
# and seconds before it kills.  A crashed task is replaced after
# RESTART_DELAY.
DRAIN_SECONDS=2
STOP_TIMEOUT=10
STOP_SIGNAL=
RESTART_DELAY=1s
# Images of the last deployments kept for a rollback (a redeploy).
KEEP_IMAGES=3
# Registry the image is pushed to, for swarms of several nodes; empty: the
# image stays on this node.  E.g. registry.example.com/team; or ipd for an
# image pushed to ipd with docker push: every node pulls it from ipd itself
# (IMAGE_REF@IMAGE_DIGEST; the manager's docker login to ipd goes along).
REGISTRY=
# Extra options of docker service create, e.g. --env-file /srv/web.env
SERVICE_OPTS=
NGINX_LISTEN=80
NGINX_SERVER_NAME=$PROJECT
NGINX_CONF=$conf
# The nginx command to test and reload with; empty: ipd-nginx.path does it
# and reports in NGINX_STATUS (see the README).
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
    NGINX_CONF=${NGINX_CONF:-$PROJECT_DIR/nginx.conf}
    NGINX_STATUS=${NGINX_STATUS:-/run/ipd-nginx/status}
    if [ -z "${NGINX+set}" ]; then NGINX=""; [ "$(id -u)" = 0 ] && NGINX=nginx; fi
    RELOAD_TIMEOUT=${RELOAD_TIMEOUT:-30}
    PUBLISH_ADDRESS=${PUBLISH_ADDRESS:-127.0.0.1}
    HEALTH_PATH=${HEALTH_PATH:-/health} HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-60}
    DRAIN_SECONDS=${DRAIN_SECONDS:-2} STOP_TIMEOUT=${STOP_TIMEOUT:-10}
    STOP_SIGNAL=${STOP_SIGNAL:-} RESTART_DELAY=${RESTART_DELAY:-1s}
    KEEP_IMAGES=${KEEP_IMAGES:-3}
    # verify's thresholds (see the README), and where nginx logs for it.
    VERIFY_HEALTH_FAILURES=${VERIFY_HEALTH_FAILURES:-3}
    VERIFY_MAX_5XX_PERCENT=${VERIFY_MAX_5XX_PERCENT:-5}
    VERIFY_MIN_REQUESTS=${VERIFY_MIN_REQUESTS:-20}
    NGINX_ACCESS_LOG=${NGINX_ACCESS_LOG:-$PROJECT_DIR/access.log}
    [ -n "${PORT_BASE:-}" ] || fail 2 "no PORT_BASE in $ENV_FILE: prepare adds it"
    case "$REPLICAS" in [1-9]|10) ;; *) fail 2 "REPLICAS=$REPLICAS: 1 to 10" ;; esac
    image_repo=$(repository)
    [ -n "$REGISTRY" ] && [ "$REGISTRY" != ipd ] && image_repo="$REGISTRY/$image_repo"
    if [ "$REGISTRY" = ipd ] && { [ -z "${IMAGE_REF:-}" ] || [ -z "${IMAGE_DIGEST:-}" ]; }; then
        fail 3 "REGISTRY=ipd deploys images pushed to ipd (docker push): no IMAGE_REF"
    fi
    return 0
}

# Load $IMAGE, tag it for this deployment (and push it to REGISTRY), drop
# the names it came with; print the reference the services run.
load_image() {
    [ -n "$IMAGE" ] && [ -f "$IMAGE" ] || fail 3 "no image uploaded"
    loaded=$(docker load -i "$IMAGE") || fail 4 "docker load failed"
    echo "$loaded" >&2
    ref=$(echo "$loaded" | sed -n 's/^Loaded image: //p; s/^Loaded image ID: //p' | tail -n 1)
    [ -n "$ref" ] || fail 4 "docker load named no image"
    target="$image_repo:$DEPLOY"
    docker tag "$ref" "$target" || fail 4 "cannot tag $ref"
    for loaded_name in $(echo "$loaded" | sed -n 's/^Loaded image: //p'); do
        case "$loaded_name" in "$image_repo":*) ;; *) docker rmi "$loaded_name" >/dev/null ;; esac
    done
    if [ "$REGISTRY" = ipd ]; then  # the nodes pull what was pushed to ipd
        echo "${IMAGE_REF%:*}@$IMAGE_DIGEST"; return 0
    fi
    if [ -n "$REGISTRY" ]; then docker push "$target" >&2 || fail 4 "cannot push $target"; fi
    echo "$target"
}

# Addresses nginx and the health check reach the tasks at: this host, or
# with PUBLISH_ADDRESS not loopback, every node of the swarm.
node_addresses() {
    if [ "$PUBLISH_ADDRESS" = 127.0.0.1 ]; then echo 127.0.0.1; return; fi
    for node in $(docker node ls -q); do
        docker node inspect -f '{{.Status.Addr}}' "$node"
    done
}

# The color nginx sends requests to now: blue, green or "" (none yet).
serving_color() {
    port=$(sed -n 's/^ *server [^ ]*:\([0-9]*\);$/\1/p' "$NGINX_CONF" 2>/dev/null | head -n 1)
    [ -n "$port" ] || return 0
    if [ $(( (port - PORT_BASE) % 2 )) = 0 ]; then echo blue; else echo green; fi
}

# Ports of the REPLICAS slots of color $1.
slot_ports() {
    offset=0
    [ "$1" = green ] && offset=1
    i=1
    while [ "$i" -le "$REPLICAS" ]; do
        echo $((PORT_BASE + 2 * (i - 1) + offset)); i=$((i + 1))
    done
}

# The project's services of color $1 ("" for every one), one ID a line.
services() {
    if [ -n "$1" ]; then
        docker service ls -q --filter "label=ipd.project=$PROJECT" --filter "label=ipd.color=$1"
    else docker service ls -q --filter "label=ipd.project=$PROJECT"; fi
}

remove_services() {
    [ -z "$1" ] || docker service rm $1 >/dev/null
}

# The proxy config, for nginx's http { } block: an upstream of every task's
# address, or a placeholder before the first deploy.  $1: the ports.
write_nginx_config() {
    if [ -n "$1" ]; then
        servers=$(for address in $(node_addresses); do
            for port in $1; do echo "    server $address:$port;"; done; done)
    else servers="    server 127.0.0.1:9 down;  # no task yet"; fi
    cat > "$NGINX_CONF.tmp" <<EOF
# Written by control.sh of $PROJECT, deployment $DEPLOY, for nginx's
# http { } block.
upstream ipd-$PROJECT {
$servers
}
# What control.sh verify counts: when, and the status of each answer.
log_format ipd-$PROJECT-verify '\$msec \$status \$upstream_addr';
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

# As in examples/docker: test and reload nginx, or wait for ipd-nginx.path;
# on any error put the old config back.
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
        if [ "$now" -ge "$next_touch" ]; then touch "$NGINX_CONF"; next_touch=$((now + 3)); fi
        sleep 0.2
    done
}

http_ok() {
    if command -v curl >/dev/null; then curl -fsS -m 2 -o /dev/null "$1" 2>/dev/null
    else wget -q -T 2 -O /dev/null "$1" 2>/dev/null; fi
}

# Whether slot service $1 answers HEALTH_PATH on port $2 where its task runs.
slot_healthy() {
    docker service ps --filter desired-state=running --format '{{.CurrentState}}' "$1" |
        grep -q '^Running' || return 1
    if [ "$PUBLISH_ADDRESS" = 127.0.0.1 ]; then address=127.0.0.1
    else
        task=$(docker service ps -q --filter desired-state=running "$1" | head -n 1)
        [ -n "$task" ] || return 1
        address=$(docker node inspect -f '{{.Status.Addr}}' \
            "$(docker inspect -f '{{.NodeID}}' "$task")") || return 1
    fi
    http_ok "http://$address:$2$HEALTH_PATH"
}

prune_images() {
    keep=$(tail -n "$KEEP_IMAGES" "$PROJECT_DIR/images.list" 2>/dev/null)
    for tag in $(docker image ls --format '{{.Tag}}' "$image_repo"); do
        echo "$keep" | grep -qx "$tag" && continue
        docker rmi "$image_repo:$tag" >/dev/null 2>&1
    done
}

# A failed deployment leaves nothing: its services, their containers (the
# swarm removes them after the services), its image.
give_up() {
    remove_services "$(services "$color")"
    deadline=$(( $(date +%s) + STOP_TIMEOUT + 10 ))
    while [ -n "$(docker ps -aq --filter "label=ipd.project=$PROJECT" \
                  --filter "label=ipd.color=$color")" ] && [ "$(date +%s)" -lt "$deadline" ]; do
        sleep 0.5
    done
    docker rmi "$image_repo:$DEPLOY" >/dev/null 2>&1
    fail "$@"
}

network_ready() {
    docker network inspect "$SERVICE" >/dev/null 2>&1
}

check() {
    [ -f "$ENV_FILE" ] || { say "no settings yet"; exit 0; }
    warn_unknown_settings
    missing=$(missing_settings)
    [ -z "$missing" ] || { say "no" $missing "in $ENV_FILE yet"; exit 0; }
    load_settings
    network_ready || { say "no network yet"; exit 0; }
    [ -f "$NGINX_CONF" ] || { say "no proxy config yet"; exit 0; }
    say "ready"
    exit $OK
}

# The network of the tasks: a bridge on each node whose published ports
# bind PUBLISH_ADDRESS (a config-only network holds that option).
prepare() {
    [ -f "$ENV_FILE" ] || write_defaults
    add_missing_settings
    load_settings
    if ! network_ready; then
        docker network inspect "$SERVICE-config" >/dev/null 2>&1 ||
            docker network create --config-only \
                -o "com.docker.network.bridge.host_binding_ipv4=$PUBLISH_ADDRESS" \
                "$SERVICE-config" >/dev/null || fail 2 "cannot create network $SERVICE-config"
        docker network create --scope swarm --driver bridge \
            --config-from "$SERVICE-config" "$SERVICE" >/dev/null ||
            fail 2 "cannot create network $SERVICE"
    fi
    [ -f "$NGINX_CONF" ] || write_nginx_config ""
    say "prepared: network $SERVICE, $ENV_FILE, $NGINX_CONF"
    exit $OK
}

deploy() {
    load_settings
    ref=$(load_image) || exit $?
    if [ "$(serving_color)" = blue ]; then color=green; else color=blue; fi
    remove_services "$(services "$color")"  # leftovers of a failed deployment
    constraint=""
    [ "$PUBLISH_ADDRESS" = 127.0.0.1 ] &&
        constraint="--constraint=node.id==$(docker info -f '{{.Swarm.NodeID}}')"
    registry_auth=""
    [ -n "$REGISTRY" ] && registry_auth="--with-registry-auth"
    stop_signal=""
    [ -n "$STOP_SIGNAL" ] && stop_signal="--stop-signal=$STOP_SIGNAL"
    ports=$(slot_ports "$color")
    # Tasks of removed services may still hold a port while they stop.
    deadline=$(( $(date +%s) + STOP_TIMEOUT + 10 ))
    for port in $ports; do
        while listening "$port"; do
            [ "$(date +%s)" -lt "$deadline" ] ||
                give_up 5 "port $port stays taken; the previous version keeps serving"
            sleep 0.5
        done
    done
    say "starting $REPLICAS $color task(s) of $ref on port(s)" $ports
    i=1
    for port in $ports; do
        # (Its warning that the image has no registry digest is noise here.)
        created=$(docker service create --detach --quiet --name "$SERVICE-$color-$i" \
            --label "ipd.project=$PROJECT" --label "ipd.color=$color" \
            --label "ipd.deploy=$DEPLOY" --network "$SERVICE" \
            --container-label "ipd.project=$PROJECT" --container-label "ipd.color=$color" \
            --publish "mode=host,published=$port,target=$APP_PORT" $constraint \
            --restart-condition any --restart-delay "$RESTART_DELAY" \
            --stop-grace-period "${STOP_TIMEOUT}s" $stop_signal $registry_auth \
            $SERVICE_OPTS "$ref" 2>&1) || { echo "$created"
            give_up 5 "docker service create failed; the previous version keeps serving"; }
        i=$((i + 1))
    done

    # Every task must answer from this host; the old ones serve meanwhile.
    deadline=$(( $(date +%s) + HEALTH_TIMEOUT ))
    i=1
    for port in $ports; do
        until slot_healthy "$SERVICE-$color-$i" "$port"; do
            if [ "$(date +%s)" -ge "$deadline" ]; then
                docker service ps --no-trunc --format '{{.Name}} {{.CurrentState}} {{.Error}}' \
                    "$SERVICE-$color-$i" | head -n 5
                docker service logs --tail 20 "$SERVICE-$color-$i" 2>&1 | tail -n 20
                give_up 10 "nothing answers $HEALTH_PATH on port $port within" \
                    "${HEALTH_TIMEOUT}s; the previous version keeps serving"
            fi
            sleep 0.5
        done
        i=$((i + 1))
    done
    say "$color is healthy on port(s)" $ports

    write_nginx_config "$ports"
    reload_nginx || give_up 11 "nginx refused the new config; the previous version keeps serving"
    say "nginx now sends $NGINX_SERVER_NAME to $color"
    old=$(docker service ls --filter "label=ipd.project=$PROJECT" --format '{{.ID}} {{.Name}}' |
        grep -v " $SERVICE-$color-[0-9]*\$" | cut -d' ' -f1)
    if [ -n "$old" ]; then
        sleep "$DRAIN_SECONDS"
        remove_services "$old"
        say "removed the previous services"
    fi

    echo "$DEPLOY" >> "$PROJECT_DIR/images.list"
    tail -n "$KEEP_IMAGES" "$PROJECT_DIR/images.list" > "$PROJECT_DIR/images.list.tmp"
    mv "$PROJECT_DIR/images.list.tmp" "$PROJECT_DIR/images.list"
    prune_images
    say "deployed $ref"
    exit $OK
}

# "requests 5xx": the answers nginx logged for the project since byte $1
# of its access log, and how many of them were 5xx.
answers_since() {
    tail -c +$(($1 + 1)) "$NGINX_ACCESS_LOG" 2>/dev/null |
        awk '{ n++ } $2 ~ /^5/ { e++ } END { printf "%d %d\n", n, e }'
}

# Whether slot $1 (service $2, port $3) still holds: its first task runs
# (no task replaced) and HEALTH_PATH did not fail VERIFY_HEALTH_FAILURES
# times in a row (counted in failed_$1).  Exits 12 or 13 when it does not.
slot_holds() {
    tasks=$(docker service ps -q "$2" 2>/dev/null | wc -l)
    if [ "$tasks" != 1 ] || ! docker service ps --filter desired-state=running \
            --format '{{.CurrentState}}' "$2" | grep -q '^Running'; then
        docker service ps --no-trunc --format '{{.Name}} {{.CurrentState}} {{.Error}}' "$2" |
            head -n 5
        fail 12 "slot $1 ($2): a task was replaced or stopped ($tasks tasks)"
    fi
    eval "count=\${failed_$1:-0}"
    if slot_healthy "$2" "$3"; then count=0; else count=$((count + 1)); fi
    eval "failed_$1=$count"
    [ "$count" -lt "$VERIFY_HEALTH_FAILURES" ] ||
        fail 13 "slot $1 ($2): $HEALTH_PATH failed $count times in a row"
}

# Watch every slot of this deployment for VERIFY_SECONDS; exit 1 when it held.
verify() {
    load_settings
    seconds=${VERIFY_SECONDS:-60}
    first=$(docker service ls -q --filter "label=ipd.project=$PROJECT" \
        --filter "label=ipd.deploy=$DEPLOY" | head -n 1)
    [ -n "$first" ] || fail 12 "no service of deployment $DEPLOY"
    color=$(docker service inspect -f '{{index .Spec.Labels "ipd.color"}}' "$first")
    ports=$(slot_ports "$color")
    offset=$(stat -c %s "$NGINX_ACCESS_LOG" 2>/dev/null || echo 0)
    say "verifying $REPLICAS $color slot(s) for ${seconds}s"
    end=$(( $(date +%s%N) / 1000000 + seconds * 1000 ))  # in ms
    requests=0 errors=0
    while :; do
        i=1
        for port in $ports; do slot_holds "$i" "$SERVICE-$color-$i" "$port"; i=$((i + 1)); done
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
    say "$color held for ${seconds}s: $requests answers, $errors 5xx, no task replaced"
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
