#!/bin/sh
# examples/docker/control.sh - one app container on one host, behind nginx,
# upgraded with zero downtime.  ipd runs it as
#
#     control.sh check | prepare | deploy
#
# and, as the original ipd says, exit status 1 means success: anything else
# is the deployment's failure code.  It uses what ipd gives it:
#
#     IMAGE        the uploaded image: a `docker save` tar
#     PROJECT      the project name;  DEPLOY  the deployment's ID
#     PROJECT_DIR  a folder kept across deployments: settings, proxy config
#
# deploy loads the image, starts the new container beside the old one on a
# free port of 127.0.0.1, waits until it answers its health check, points
# the project's nginx upstream at it and reloads nginx, and only then stops
# the old container.  A new container that never becomes healthy is removed
# and the old one keeps serving.  Settings: $PROJECT_DIR/deploy.env.
#
# Exit codes: 1 ok; 0 check found something missing (then prepare runs);
# 2 prepare failed; 3 no image; 4 docker load failed; 5 docker run failed;
# 10 new container not healthy; 11 nginx refused the new config.
set -u
set -f  # DOCKER_RUN_OPTS is split on spaces, never globbed

OK=1
ENV_FILE="$PROJECT_DIR/deploy.env"
NGINX_FILE="$PROJECT_DIR/nginx.conf"
NETWORK="ipd-$PROJECT"

say() { echo "[$PROJECT] $*"; }
fail() { code=$1; shift; say "FAILED: $*" >&2; exit "$code"; }

# Docker repository names are lower case: ipd-<project>, other signs as '-'.
repository() {
    printf 'ipd-%s' "$PROJECT" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]\{1,\}/-/g; s/-*$//'
}

write_defaults() {
    cat > "$ENV_FILE.tmp" <<EOF
# Settings of examples/docker/control.sh for project $PROJECT (shell syntax).
# Port the app listens on inside its container.
APP_PORT=8080
# Path answered with a 2xx when the app is ready, and how long to wait.
HEALTH_PATH=/health
HEALTH_TIMEOUT=60
# After nginx switched: seconds the old container still serves requests
# begun before, then how long docker stop waits before it kills.
DRAIN_SECONDS=2
STOP_TIMEOUT=10
# Images of earlier deployments kept for a rollback (a redeploy).
KEEP_IMAGES=3
# Extra options of docker run, e.g. --env-file /srv/web.env --memory 512m
DOCKER_RUN_OPTS="--restart unless-stopped"
# The nginx server block of the app, and the nginx command (it must be
# allowed to reload nginx: see the README).
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

# The proxy config: an upstream named ipd-<project> and the app's server.
# $1 is the container's port on 127.0.0.1, or "" before the first deploy.
write_nginx_config() {
    if [ -n "$1" ]; then server="server 127.0.0.1:$1;"
    else server="server 127.0.0.1:9 down;  # no container yet"; fi
    cat > "$NGINX_FILE.tmp" <<EOF
# Written by control.sh of $PROJECT, deployment $DEPLOY.  nginx includes it
# with: include $(dirname "$PROJECT_DIR")/*/nginx.conf;
upstream ipd-$PROJECT {
    $server
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
}

# Reload nginx with the new config; on any error put the old one back.
reload_nginx() {
    if tested=$($NGINX -t 2>&1) && $NGINX -s reload; then return 0; fi
    echo "$tested"
    [ -f "$NGINX_FILE.previous" ] && mv "$NGINX_FILE.previous" "$NGINX_FILE"
    return 1
}

http_ok() {
    if command -v curl >/dev/null; then curl -fsS -m 2 -o /dev/null "$1" 2>/dev/null
    else wget -q -T 2 -O /dev/null "$1" 2>/dev/null; fi
}

check() {
    [ -f "$ENV_FILE" ] || { say "no settings yet"; exit 0; }
    [ -f "$NGINX_FILE" ] || { say "no proxy config yet"; exit 0; }
    docker network inspect "$NETWORK" >/dev/null 2>&1 || { say "no network yet"; exit 0; }
    say "ready"
    exit $OK
}

prepare() {
    [ -f "$ENV_FILE" ] || write_defaults
    load_settings
    docker network inspect "$NETWORK" >/dev/null 2>&1 ||
        docker network create "$NETWORK" || fail 2 "cannot create network $NETWORK"
    [ -f "$NGINX_FILE" ] || write_nginx_config ""
    say "prepared: network $NETWORK, $ENV_FILE, $NGINX_FILE"
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

    old=$(docker ps -q --filter "label=ipd.project=$PROJECT")
    name="ipd-$PROJECT-$(echo "$DEPLOY" | cut -c1-8)"
    docker rm -f "$name" >/dev/null 2>&1
    say "starting $name from $ref"
    docker run -d --name "$name" --network "$NETWORK" \
        --label "ipd.project=$PROJECT" --label "ipd.deploy=$DEPLOY" \
        -p "127.0.0.1::$APP_PORT" $DOCKER_RUN_OPTS "$repo:$DEPLOY" >/dev/null ||
        fail 5 "docker run failed"
    port=$(docker port "$name" "$APP_PORT/tcp" | head -n 1 | sed 's/.*://')

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
        docker rm -f "$name" >/dev/null
        fail 10 "$name is not healthy: $why; the previous version keeps serving"
    fi
    say "$name is healthy on 127.0.0.1:$port"

    # Switch traffic, then retire the old container.
    write_nginx_config "$port"
    if ! reload_nginx; then
        docker rm -f "$name" >/dev/null
        fail 11 "nginx refused the new config; the previous version keeps serving"
    fi
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
    total=$(wc -l < "$PROJECT_DIR/images.list")
    awk -v drop=$((total - KEEP_IMAGES)) 'NR <= drop' "$PROJECT_DIR/images.list" |
        while read -r tag; do docker rmi "$repo:$tag" >/dev/null 2>&1; done
    tail -n "$KEEP_IMAGES" "$PROJECT_DIR/images.list" > "$PROJECT_DIR/images.list.tmp"
    mv "$PROJECT_DIR/images.list.tmp" "$PROJECT_DIR/images.list"
    say "deployed $ref as $repo:$DEPLOY"
    exit $OK
}

case "${1:-}" in
    check) check ;;
    prepare) prepare ;;
    deploy) deploy ;;
esac
echo "usage: control.sh check|prepare|deploy"
exit 2
