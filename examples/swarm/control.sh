#!/bin/sh
# examples/swarm/control.sh - an app as a Docker Swarm service behind nginx.
# ipd runs it as
#
#     control.sh check | prepare | deploy
#
# and, as the original ipd says, exit status 1 means success: anything else
# is the deployment's failure code.  It uses IMAGE (a `docker save` tar),
# PROJECT, DEPLOY and PROJECT_DIR (settings and proxy config are kept there).
#
# prepare creates the service on the first deploy; deploy loads the image
# and runs `docker service update --image ... --update-order start-first
# --update-failure-action rollback`: the swarm starts the new task, waits
# for its health check, then stops the old one, and rolls back by itself
# when the new task fails.  A failed or rolled-back update is exit code 12.
#
# Tasks publish their port in host mode on a free port of their node (the
# ingress mesh is not needed); nginx is pointed at every running task, and
# re-pointed while an update moves them.  On several nodes, set REGISTRY in
# deploy.env: the image is pushed there so that every node can pull it.
#
# Exit codes: 1 ok; 0 check found something missing (then prepare runs);
# 2 prepare failed; 3 no image; 4 docker load or push failed; 11 nginx
# refused the new config; 12 the update failed or was rolled back.
set -u
set -f

OK=1
ENV_FILE="$PROJECT_DIR/deploy.env"
NGINX_FILE="$PROJECT_DIR/nginx.conf"

say() { echo "[$PROJECT] $*"; }
fail() { code=$1; shift; say "FAILED: $*" >&2; exit "$code"; }

# Docker names are lower case: ipd-<project>, other signs as '-'.
repository() {
    printf 'ipd-%s' "$PROJECT" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]\{1,\}/-/g; s/-*$//'
}
SERVICE=$(repository | cut -c1-63)

write_defaults() {
    cat > "$ENV_FILE.tmp" <<EOF
# Settings of examples/swarm/control.sh for project $PROJECT (shell syntax).
APP_PORT=8080
REPLICAS=1
# Run inside the container by the swarm: exit 0 when the app is healthy.
HEALTH_CMD="wget -q -O /dev/null http://127.0.0.1:8080/health"
HEALTH_INTERVAL=2s
HEALTH_RETRIES=3
# How long a new task is watched before the update counts as done, and
# how long the whole update may take.
UPDATE_MONITOR=5s
UPDATE_TIMEOUT=300
# Registry the image is pushed to, for swarms of several nodes; empty: the
# image stays on this node (a single-node swarm).  E.g. registry.example.com/team
REGISTRY=
# Extra options of docker service create, e.g. --env-file /srv/web.env
SERVICE_OPTS=
NGINX_LISTEN=80
NGINX_SERVER_NAME=$PROJECT
NGINX="nginx"
EOF
    mv "$ENV_FILE.tmp" "$ENV_FILE"
    say "wrote default settings to $ENV_FILE"
}

load_settings() {
    [ -f "$ENV_FILE" ] || fail 2 "no $ENV_FILE: prepare makes it"
    . "$ENV_FILE"
}

# Load $IMAGE, tag it for this deployment (and push it to REGISTRY);
# print the reference the service runs.
load_image() {
    [ -n "$IMAGE" ] && [ -f "$IMAGE" ] || fail 3 "no image uploaded"
    loaded=$(docker load -i "$IMAGE") || fail 4 "docker load failed"
    echo "$loaded" >&2
    ref=$(echo "$loaded" | sed -n 's/^Loaded image: //p; s/^Loaded image ID: //p' | tail -n 1)
    [ -n "$ref" ] || fail 4 "docker load named no image"
    target="$(repository):$DEPLOY"
    [ -n "$REGISTRY" ] && target="$REGISTRY/$target"
    docker tag "$ref" "$target" || fail 4 "cannot tag $ref"
    if [ -n "$REGISTRY" ]; then docker push "$target" >&2 || fail 4 "cannot push $target"; fi
    echo "$target"
}

# "address:port" of every running task, one a line.
task_addresses() {
    for task in $(docker service ps "$SERVICE" -q --filter desired-state=running); do
        docker inspect -f '{{.Status.State}} {{.NodeID}} {{range .Status.PortStatus.Ports}}{{.PublishedPort}} {{end}}' "$task"
    done | while read -r state node port more; do  # more: the same port, IPv6
        [ "$state" = running ] && [ -n "$port" ] || continue
        echo "$(docker node inspect -f '{{.Status.Addr}}' "$node"):$port"
    done | sort
}

# Point nginx at the running tasks when they changed; 1 when it failed.
update_nginx() {
    addresses=$(task_addresses)
    [ -n "$addresses" ] || return 0  # keep pointing where it did
    servers=$(echo "$addresses" | sed 's/^/    server /; s/$/;/')
    [ "$servers" = "$(grep '^    server ' "$NGINX_FILE" 2>/dev/null)" ] && return 0
    cat > "$NGINX_FILE.tmp" <<EOF
# Written by control.sh of $PROJECT, deployment $DEPLOY.  nginx includes it
# with: include $(dirname "$PROJECT_DIR")/*/nginx.conf;
upstream ipd-$PROJECT {
$servers
}
server {
    listen $NGINX_LISTEN;
    server_name $NGINX_SERVER_NAME;
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
    [ -f "$NGINX_FILE" ] && cp "$NGINX_FILE" "$NGINX_FILE.previous"
    mv "$NGINX_FILE.tmp" "$NGINX_FILE"
    if tested=$($NGINX -t 2>&1) && $NGINX -s reload; then
        say "nginx now sends $NGINX_SERVER_NAME to" $addresses
        return 0
    fi
    echo "$tested"
    [ -f "$NGINX_FILE.previous" ] && mv "$NGINX_FILE.previous" "$NGINX_FILE"
    return 1
}

update_status() {
    docker service inspect -f '{{if .UpdateStatus}}{{.UpdateStatus.State}} {{.UpdateStatus.StartedAt}}{{end}}' "$SERVICE"
}

# Follow the update until it is done; re-point nginx as tasks move.
# $1: the image it runs to; $2: update_status from before it began (that
# status is stale, not this update's).
follow_update() {
    ref=$1
    deadline=$(( $(date +%s) + UPDATE_TIMEOUT ))
    while :; do
        status=$(update_status)
        state=""
        [ "$status" = "$2" ] || state=${status%% *}
        update_nginx || fail 11 "nginx refused the new config"
        case "$state" in
            rollback_*|paused)
                message=$(docker service inspect -f '{{.UpdateStatus.Message}}' "$SERVICE")
                update_nginx
                fail 12 "update $state: $message; the previous version keeps serving" ;;
        esac
        images=$(docker service ps "$SERVICE" --filter desired-state=running --format '{{.Image}} {{.CurrentState}}')
        if [ "$state" != updating ] && [ -n "$images" ] &&
                ! echo "$images" | grep -qv "^$ref Running"; then
            update_nginx || fail 11 "nginx refused the new config"
            return 0
        fi
        [ "$(date +%s)" -lt "$deadline" ] ||
            fail 12 "update not done within ${UPDATE_TIMEOUT}s (state: ${state:-none})"
        sleep 0.5
    done
}

check() {
    [ -f "$ENV_FILE" ] || { say "no settings yet"; exit 0; }
    docker service inspect "$SERVICE" >/dev/null 2>&1 || { say "no service yet"; exit 0; }
    [ -f "$NGINX_FILE" ] || { say "no proxy config yet"; exit 0; }
    say "ready"
    exit $OK
}

prepare() {
    [ -f "$ENV_FILE" ] || write_defaults
    load_settings
    if ! docker service inspect "$SERVICE" >/dev/null 2>&1; then
        ref=$(load_image) || exit $?
        say "creating service $SERVICE from $ref"
        docker service create --detach --name "$SERVICE" --replicas "$REPLICAS" \
            --label "ipd.project=$PROJECT" \
            --publish "mode=host,target=$APP_PORT" \
            --health-cmd "$HEALTH_CMD" --health-interval "$HEALTH_INTERVAL" \
            --health-retries "$HEALTH_RETRIES" \
            --update-order start-first --update-failure-action rollback \
            --update-monitor "$UPDATE_MONITOR" --rollback-order start-first \
            $SERVICE_OPTS "$ref" >/dev/null || fail 2 "cannot create service $SERVICE"
        follow_update "$ref" ""
    fi
    update_nginx || fail 2 "nginx refused the proxy config"
    exit $OK
}

deploy() {
    load_settings
    ref=$(load_image) || exit $?
    say "updating service $SERVICE to $ref"
    registry_auth=""
    [ -n "$REGISTRY" ] && registry_auth="--with-registry-auth"
    before=$(update_status)
    docker service update --detach --image "$ref" $registry_auth \
        --update-order start-first --update-failure-action rollback \
        --update-monitor "$UPDATE_MONITOR" "$SERVICE" >/dev/null ||
        fail 12 "docker service update refused"
    follow_update "$ref" "$before"
    say "deployed $ref"
    exit $OK
}

case "${1:-}" in
    check) check ;;
    prepare) prepare ;;
    deploy) deploy ;;
esac
echo "usage: control.sh check|prepare|deploy"
exit 2
