#!/usr/bin/env bash
# quantmesh native local stack: Kafka (KRaft, single node) + PostgreSQL + Redis.
# No Docker. Installs what it needs (apt / Maven Central) and runs everything as
# plain background processes with their data under $QM_STACK_DIR.
#
#   deploy/local/stack.sh install   install packages, resolve the Kafka jars (no start)
#   deploy/local/stack.sh up        install if needed, start all three, print env lines
#   deploy/local/stack.sh down      stop all three (idempotent)
#   deploy/local/stack.sh status    one line per component; non-zero if any is down
#   deploy/local/stack.sh logs [kafka|postgres|redis] [-f] [-n N]
#   deploy/local/stack.sh reset     down + delete the data dirs (the jar cache stays)
#
# Progress and errors go to stderr; `up` prints only the env lines on stdout
# (also written to $QM_STACK_DIR/env), so `deploy/local/stack.sh up > .env` works.
# See deploy/local/README.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---------------------------------------------------------------- settings --
KAFKA_VERSION=4.1.1
KAFKA_PORT=${QM_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${QM_KAFKA_CONTROLLER_PORT:-} # default: KAFKA_PORT + 1 (set in main)
PG_PORT=${QM_PG_PORT:-15432}
REDIS_PORT=${QM_REDIS_PORT:-16379}
HOST=127.0.0.1

CACHE_DIR=${QM_CACHE_DIR:-${HOME:-/root}/.cache/quantmesh}
STACK_DIR=${QM_STACK_DIR:-$SCRIPT_DIR/.stack}
case $CACHE_DIR in /*) ;; *) CACHE_DIR=$PWD/$CACHE_DIR ;; esac
case $STACK_DIR in /*) ;; *) STACK_DIR=$PWD/$STACK_DIR ;; esac

KAFKA_HEAP_OPTS=${QM_KAFKA_HEAP_OPTS:--Xms256m -Xmx1G}
KAFKA_START_TIMEOUT=${QM_KAFKA_START_TIMEOUT:-90}
KAFKA_STOP_TIMEOUT=30
PG_START_TIMEOUT=${QM_PG_START_TIMEOUT:-60}
REDIS_START_TIMEOUT=15

DB_USER=quantmesh
DB_PASSWORD=quantmesh
DB_NAME=quantmesh
DB_TEST_NAME=quantmesh_test
PG_OS_USER=postgres # only used when running as root (postgres refuses root)

KAFKA_HOME=$CACHE_DIR/kafka-$KAFKA_VERSION
KAFKA_LIBS=$KAFKA_HOME/libs
KAFKA_STAMP=$KAFKA_HOME/.complete
KAFKA_POM=$SCRIPT_DIR/kafka/pom.xml
MAVEN_REPO=${QM_MAVEN_REPO:-$CACHE_DIR/m2}

KAFKA_DIR=$STACK_DIR/kafka
KAFKA_CONF=$KAFKA_DIR/server.properties
KAFKA_LOG4J=$KAFKA_DIR/log4j2.properties
KAFKA_DATA=$KAFKA_DIR/data
KAFKA_LOGS=$KAFKA_DIR/logs
KAFKA_LOG=$KAFKA_LOGS/server.log
KAFKA_OUT=$KAFKA_LOGS/kafka.out
KAFKA_PIDFILE=$KAFKA_DIR/kafka.pid

PG_DIR=$STACK_DIR/postgres
PG_DATA=$PG_DIR/data
PG_SOCKET_DIR=$PG_DIR/run
PG_LOG=$PG_DIR/log/postgres.log

REDIS_DIR=$STACK_DIR/redis
REDIS_CONF=$REDIS_DIR/redis.conf
REDIS_DATA=$REDIS_DIR/data
REDIS_LOG=$REDIS_DIR/redis.log
REDIS_PIDFILE=$REDIS_DIR/redis.pid

ENV_FILE=$STACK_DIR/env

# ----------------------------------------------------------------- helpers --
say() { printf '%s\n' "$*" >&2; }
die() {
    printf 'stack.sh: ERROR: %s\n' "$*" >&2
    exit 1
}

# die with the last lines of one or more log files appended
die_with_logs() {
    local msg=$1 f shown=0
    shift
    {
        printf 'stack.sh: ERROR: %s\n' "$msg"
        for f in "$@"; do
            if [[ -s $f ]]; then
                printf -- '--- last log lines of %s ---\n' "$f"
                tail -n 25 "$f" | sed 's/^/    /'
                shown=1
            fi
        done
        ((shown)) || printf -- '--- no log output yet (looked in: %s) ---\n' "$*"
    } >&2
    exit 1
}

check_port_number() {
    local name=$1 value=$2
    if ! [[ $value =~ ^[0-9]+$ ]] || ((value < 1 || value > 65535)); then
        die "$name must be a TCP port number, got '$value'"
    fi
}

now() { date +%s; }

# true if something accepts TCP connections on $HOST:$1
tcp_open() {
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# describe who listens on a port (best effort, for error messages)
port_owner() {
    local out=""
    if command -v ss >/dev/null 2>&1; then
        out=$(ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*users:(\(.*\))/\1/p' | head -n 1)
    fi
    printf '%s' "${out:-unknown process}"
}

require_port_free() {
    local component=$1 port=$2
    if tcp_open "$port"; then
        die "$component: port $HOST:$port is already in use by $(port_owner "$port") (not started by this stack); stop it or choose another port (see README: QM_*_PORT)"
    fi
}

pid_alive() {
    [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null
}

cmdline_of() {
    { tr '\0' ' ' <"/proc/$1/cmdline"; } 2>/dev/null || true
}

# wait until pid $1 is gone, up to $2 seconds; returns non-zero on timeout
wait_pid_gone() {
    local pid=$1 deadline=$(($(now) + $2))
    while pid_alive "$pid"; do
        (($(now) >= deadline)) && return 1
        sleep 0.2
    done
    return 0
}

# run a command as root (sudo when not root)
as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*' (not root and no sudo); install it manually or rerun as root"
    fi
}

APT_UPDATED=0
APT_LOCK_WAIT=${QM_APT_LOCK_WAIT:-600}

# run an apt-get command as root; waits while another apt/dpkg holds the lock
apt_run() {
    local what=$1 log deadline
    shift
    log=$(mktemp /tmp/quantmesh-apt.XXXXXX)
    deadline=$(($(now) + APT_LOCK_WAIT))
    until as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=60 "$@" >"$log" 2>&1; do
        if grep -q 'Could not get lock\|Unable to lock\|Unable to acquire the dpkg frontend lock' "$log" && (($(now) < deadline)); then
            say "apt: another apt/dpkg holds the lock; waiting"
            sleep 5
            continue
        fi
        die_with_logs "apt: '$what' failed" "$log"
    done
    rm -f "$log"
}

apt_install() {
    if ((APT_UPDATED == 0)); then
        say "apt: apt-get update"
        apt_run "apt-get update" update
        APT_UPDATED=1
    fi
    say "apt: installing $*"
    apt_run "apt-get install $*" install -y --no-install-recommends "$@"
}

lock_stack() {
    mkdir -p "$STACK_DIR"
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>"$STACK_DIR/.lock"
    flock -w 300 9 || die "another stack.sh is running on $STACK_DIR for more than 300 s (lock $STACK_DIR/.lock)"
}

# ------------------------------------------------------------------ install --
pg_bindir() {
    local want="" d
    if [[ -n ${QM_PG_BINDIR:-} ]]; then
        printf '%s' "$QM_PG_BINDIR"
        return 0
    fi
    # an existing data dir pins the major version
    [[ -f $PG_DATA/PG_VERSION ]] && want=$(<"$PG_DATA/PG_VERSION")
    if [[ -n $want ]]; then
        d=/usr/lib/postgresql/$want/bin
        [[ -x $d/postgres ]] && printf '%s' "$d"
        return 0
    fi
    d=$(printf '%s\n' /usr/lib/postgresql/*/bin/postgres | grep -v '\*' | sort -V | tail -n 1 || true)
    [[ -n $d ]] && printf '%s' "${d%/postgres}"
    return 0
}

install_packages() {
    local pkgs=() installed_pg=0 installed_redis=0
    if ! command -v java >/dev/null 2>&1; then pkgs+=(openjdk-17-jre-headless); fi
    if ! command -v mvn >/dev/null 2>&1; then pkgs+=(maven); fi
    if [[ -z $(pg_bindir) ]]; then
        if [[ -f $PG_DATA/PG_VERSION ]]; then
            pkgs+=("postgresql-$(<"$PG_DATA/PG_VERSION")") # the version the data dir needs
        else
            pkgs+=(postgresql)
        fi
        installed_pg=1
    fi
    if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
        pkgs+=(redis-server)
        installed_redis=1
    fi
    if ((${#pkgs[@]} > 0)); then
        apt_install "${pkgs[@]}"
        # the Debian packages start system services on 5432/6379 when installed;
        # this stack runs its own instances, so stop what the install just started.
        if ((installed_redis)); then
            as_root service redis-server stop >/dev/null 2>&1 || true
        fi
        if ((installed_pg)); then
            as_root service postgresql stop >/dev/null 2>&1 || true
        fi
    fi
    command -v java >/dev/null 2>&1 || die "install: java not found after install"
    local jv
    jv=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)
    if [[ -z $jv ]] || ((jv < 17)); then
        die "install: Kafka $KAFKA_VERSION needs Java 17+, found '$(java -version 2>&1 | head -n 1)'"
    fi
    [[ -n $(pg_bindir) ]] || die "install: no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (data dir wants version '$(cat "$PG_DATA/PG_VERSION" 2>/dev/null || echo any)')"
    command -v redis-server >/dev/null 2>&1 || die "install: redis-server not found after install"
}

kafka_libs_complete() {
    [[ -f $KAFKA_STAMP && -f $KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar ]] &&
        [[ $(<"$KAFKA_STAMP") == "$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)" ]]
}

install_kafka_libs() {
    if kafka_libs_complete; then
        return 0
    fi
    mkdir -p "$KAFKA_HOME"
    (
        # one resolver at a time per cache dir
        if command -v flock >/dev/null 2>&1; then
            exec 8>"$KAFKA_HOME/.lock"
            flock -w 600 8 || die "kafka: timed out waiting for another resolve of $KAFKA_HOME"
        fi
        kafka_libs_complete && exit 0
        command -v mvn >/dev/null 2>&1 || die "kafka: mvn not found"
        say "kafka: resolving Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS"
        local tmp=$KAFKA_HOME/libs.tmp.$$ start
        start=$(now)
        rm -rf "$tmp"
        # run on a copy of the pom so nothing is written into the repository
        cp "$KAFKA_POM" "$KAFKA_HOME/pom.xml"
        if ! mvn -B -q -f "$KAFKA_HOME/pom.xml" \
            -Dmaven.repo.local="$MAVEN_REPO" \
            dependency:copy-dependencies -DoutputDirectory="$tmp" >"$KAFKA_HOME/mvn.log" 2>&1; then
            rm -rf "$tmp"
            die_with_logs "kafka: 'mvn dependency:copy-dependencies' failed (is Maven Central reachable?)" "$KAFKA_HOME/mvn.log"
        fi
        [[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar && -f $tmp/kafka-tools-$KAFKA_VERSION.jar ]] ||
            die_with_logs "kafka: mvn finished but kafka_2.13-$KAFKA_VERSION.jar / kafka-tools-$KAFKA_VERSION.jar are missing in $tmp" "$KAFKA_HOME/mvn.log"
        rm -rf "$KAFKA_LIBS"
        mv "$tmp" "$KAFKA_LIBS"
        sha256sum "$KAFKA_POM" | cut -d' ' -f1 >"$KAFKA_STAMP"
        say "kafka: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars resolved in $(($(now) - start)) s"
    )
}

cmd_install() {
    install_packages
    install_kafka_libs
    say "install: ok (postgres $(pg_bindir), $(command -v redis-server), kafka jars in $KAFKA_LIBS)"
}

# -------------------------------------------------------------------- kafka --
kafka_java() {
    java -cp "$KAFKA_LIBS/*" "$@"
}

# pid of our broker: from the pid file, else any process running kafka.Kafka
# with our server.properties (an orphan whose pid file was lost)
kafka_pid() {
    local pid="" p
    if [[ -f $KAFKA_PIDFILE ]]; then
        pid=$(<"$KAFKA_PIDFILE")
        if pid_alive "$pid" && [[ $(cmdline_of "$pid") == *kafka.Kafka*"$KAFKA_CONF"* ]]; then
            printf '%s' "$pid"
            return 0
        fi
    fi
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $p == "$$" ]] && continue
        if [[ $(cmdline_of "$p") == *kafka.Kafka*"$KAFKA_CONF"* ]]; then
            printf '%s' "$p"
            return 0
        fi
    done
    return 0
}

# Send a Kafka ApiVersions v0 request and expect a response with our
# correlation id and error_code 0: proves the broker answers the protocol.
kafka_answers() {
    local resp
    resp=$(
        exec 3<>"/dev/tcp/$HOST/$KAFKA_PORT" || exit 1
        # size=14 | api_key=18 | api_version=0 | correlation_id=42 | client_id="qmsh"
        printf '\x00\x00\x00\x0e\x00\x12\x00\x00\x00\x00\x00\x2a\x00\x04qmsh' >&3
        timeout 5 head -c 10 <&3 | od -An -tx1 | tr -d ' \n'
    ) 2>/dev/null || return 1
    # response: int32 size | int32 correlation_id | int16 error_code
    [[ ${resp:8:8} == 0000002a && ${resp:16:4} == 0000 ]]
}

kafka_write_config() {
    mkdir -p "$KAFKA_DATA" "$KAFKA_LOGS"
    cat >"$KAFKA_CONF" <<EOF
# generated by deploy/local/stack.sh -- edits are overwritten on every 'up'
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DATA

# a single-node test broker: topics come from the registry, nothing implicit
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
# the group coordinator batches offset-commit appends for this long (5 ms by default):
# every synchronous commit pays it, so a single-node test broker appends at once
group.coordinator.append.linger.ms=0

# internal topics must fit on one broker, or idempotent/transactional
# producers and consumer groups never become ready
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

num.network.threads=3
num.io.threads=4
# no time-based retention: tests replay data with old event timestamps, and
# time retention would delete those segments; cap by size per partition instead
log.retention.ms=-1
log.retention.bytes=1073741824
log.segment.bytes=104857600
log.retention.check.interval.ms=60000
delete.topic.enable=true
EOF
    cat >"$KAFKA_LOG4J" <<EOF
# generated by deploy/local/stack.sh
status = warn
name = quantmesh-local-kafka
appender.server.type = RollingFile
appender.server.name = SERVER
appender.server.fileName = $KAFKA_LOG
appender.server.filePattern = $KAFKA_LOG.%i
appender.server.layout.type = PatternLayout
appender.server.layout.pattern = [%d] %p %m (%c)%n
appender.server.policies.type = Policies
appender.server.policies.size.type = SizeBasedTriggeringPolicy
appender.server.policies.size.size = 50MB
appender.server.strategy.type = DefaultRolloverStrategy
appender.server.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.server.ref = SERVER
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.requestchannel.name = kafka.network.RequestChannel\$
logger.requestchannel.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
EOF
}

kafka_format_if_needed() {
    if [[ -f $KAFKA_DATA/meta.properties ]]; then
        local formatted_port
        formatted_port=$(cat "$KAFKA_DIR/formatted.controller-port" 2>/dev/null || echo "$KAFKA_CONTROLLER_PORT")
        if [[ $formatted_port != "$KAFKA_CONTROLLER_PORT" ]]; then
            die "kafka: $KAFKA_DATA was formatted for controller port $formatted_port but QM_KAFKA_CONTROLLER_PORT is now $KAFKA_CONTROLLER_PORT; the KRaft quorum stores it, so run '$0 reset' (deletes the local data) or use the old port"
        fi
        return 0
    fi
    local cluster_id
    if [[ -s $KAFKA_DIR/cluster.id ]]; then
        cluster_id=$(<"$KAFKA_DIR/cluster.id")
    else
        cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid 2>"$KAFKA_LOGS/format.log" | tail -n 1) ||
            die_with_logs "kafka: 'StorageTool random-uuid' failed" "$KAFKA_LOGS/format.log"
        [[ -n $cluster_id ]] || die_with_logs "kafka: 'StorageTool random-uuid' printed no id" "$KAFKA_LOGS/format.log"
        printf '%s\n' "$cluster_id" >"$KAFKA_DIR/cluster.id"
    fi
    # a half-done earlier format leaves files behind without meta.properties
    rm -rf "$KAFKA_DATA"
    mkdir -p "$KAFKA_DATA"
    say "kafka: formatting $KAFKA_DATA (KRaft standalone, cluster id $cluster_id)"
    kafka_java kafka.tools.StorageTool format \
        --standalone --cluster-id "$cluster_id" --config "$KAFKA_CONF" >"$KAFKA_LOGS/format.log" 2>&1 ||
        die_with_logs "kafka: 'StorageTool format --standalone' failed" "$KAFKA_LOGS/format.log"
    printf '%s\n' "$KAFKA_CONTROLLER_PORT" >"$KAFKA_DIR/formatted.controller-port"
}

# copy what this start wrote to server.log / kafka.out, for error reports
kafka_startup_logs() {
    tail -c +"$(($1 + 1))" "$KAFKA_LOG" >"$KAFKA_LOGS/startup.log" 2>/dev/null || true
    tail -c +"$(($2 + 1))" "$KAFKA_OUT" >"$KAFKA_LOGS/startup.out" 2>/dev/null || true
}

kafka_stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_gone "$pid" "$KAFKA_STOP_TIMEOUT"; then
        say "kafka: pid $pid did not exit within $KAFKA_STOP_TIMEOUT s of SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_pid_gone "$pid" 10 || die "kafka: pid $pid survived SIGKILL"
    fi
}

kafka_up() {
    local pid start log_offset out_offset
    pid=$(kafka_pid)
    if [[ -n $pid ]]; then
        if kafka_answers; then
            say "kafka: already running (pid $pid) on $HOST:$KAFKA_PORT"
            printf '%s\n' "$pid" >"$KAFKA_PIDFILE"
            return 0
        fi
        say "kafka: process $pid exists but does not answer yet; waiting for it"
        printf '%s\n' "$pid" >"$KAFKA_PIDFILE"
        log_offset=0
        out_offset=0
    else
        if [[ -f $KAFKA_PIDFILE ]]; then
            say "kafka: removing stale pid file (pid $(<"$KAFKA_PIDFILE") is not our broker)"
            rm -f "$KAFKA_PIDFILE"
        fi
        require_port_free kafka "$KAFKA_PORT"
        require_port_free "kafka controller" "$KAFKA_CONTROLLER_PORT"
        kafka_write_config
        kafka_format_if_needed
        log_offset=$(stat -c %s "$KAFKA_LOG" 2>/dev/null || echo 0)
        out_offset=$(stat -c %s "$KAFKA_OUT" 2>/dev/null || echo 0)
        # shellcheck disable=SC2086 # KAFKA_HEAP_OPTS is a list of JVM flags
        nohup setsid java $KAFKA_HEAP_OPTS \
            -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
            -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
            -Dkafka.logs.dir="$KAFKA_LOGS" -Dlog4j2.configurationFile="$KAFKA_LOG4J" \
            -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_CONF" >>"$KAFKA_OUT" 2>&1 </dev/null 9>&- &
        pid=$!
        printf '%s\n' "$pid" >"$KAFKA_PIDFILE"
        say "kafka: started pid $pid, waiting for $HOST:$KAFKA_PORT (up to $KAFKA_START_TIMEOUT s)"
    fi
    start=$(now)
    while :; do
        if ! pid_alive "$pid"; then
            rm -f "$KAFKA_PIDFILE"
            kafka_startup_logs "$log_offset" "$out_offset"
            die_with_logs "kafka: broker process $pid exited during startup" "$KAFKA_LOGS/startup.log" "$KAFKA_LOGS/startup.out"
        fi
        if tail -c +"$((log_offset + 1))" "$KAFKA_LOG" 2>/dev/null | grep -q 'Kafka Server started' && kafka_answers; then
            say "kafka: ready on $HOST:$KAFKA_PORT (pid $pid, $(($(now) - start)) s)"
            return 0
        fi
        if (($(now) - start >= KAFKA_START_TIMEOUT)); then
            say "kafka: giving up, stopping pid $pid"
            kafka_stop_pid "$pid"
            rm -f "$KAFKA_PIDFILE"
            kafka_startup_logs "$log_offset" "$out_offset"
            die_with_logs "kafka: broker did not answer on $HOST:$KAFKA_PORT within $KAFKA_START_TIMEOUT s (stopped it again)" "$KAFKA_LOGS/startup.log" "$KAFKA_LOGS/startup.out"
        fi
        sleep 0.5
    done
}

kafka_down() {
    local pid
    pid=$(kafka_pid)
    if [[ -z $pid ]]; then
        if [[ -f $KAFKA_PIDFILE ]]; then
            say "kafka: removing stale pid file"
            rm -f "$KAFKA_PIDFILE"
        fi
        say "kafka: already stopped"
        return 0
    fi
    say "kafka: stopping pid $pid (SIGTERM, up to $KAFKA_STOP_TIMEOUT s)"
    kafka_stop_pid "$pid"
    rm -f "$KAFKA_PIDFILE"
    # an orphan from a lost pid file would show up now
    pid=$(kafka_pid)
    if [[ -n $pid ]]; then
        say "kafka: stopping another broker on the same config (pid $pid)"
        kafka_stop_pid "$pid"
    fi
    say "kafka: stopped"
}

kafka_status() {
    local pid
    pid=$(kafka_pid)
    if [[ -z $pid ]]; then
        printf '%-9s %-9s %-11s %s\n' kafka stopped "-" "$HOST:$KAFKA_PORT"
        return 1
    fi
    if kafka_answers; then
        printf '%-9s %-9s %-11s %s\n' kafka running "pid $pid" "$HOST:$KAFKA_PORT (controller $HOST:$KAFKA_CONTROLLER_PORT)"
        return 0
    fi
    printf '%-9s %-9s %-11s %s\n' kafka unhealthy "pid $pid" "$HOST:$KAFKA_PORT (process up, broker does not answer)"
    return 1
}

# ----------------------------------------------------------------- postgres --
pg_is_root_mode() { ((EUID == 0)); }

# run a PostgreSQL binary as the owner of the cluster
as_pg() {
    if pg_is_root_mode; then
        runuser -u "$PG_OS_USER" -- "$@"
    else
        "$@"
    fi
}

pg_ensure_os_user() {
    pg_is_root_mode || return 0
    if ! id -u "$PG_OS_USER" >/dev/null 2>&1; then
        say "postgres: creating system user $PG_OS_USER"
        useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash "$PG_OS_USER" ||
            die "postgres: could not create system user $PG_OS_USER"
    fi
}

# the postgres user must be able to traverse every ancestor of its data dir
pg_ensure_traversable() {
    pg_is_root_mode || return 0
    local d=$PG_DIR ancestors=()
    while [[ $d != / && -n $d ]]; do
        d=$(dirname "$d")
        ancestors=("$d" "${ancestors[@]}")
    done
    # from / downwards, so a fixed parent is not blamed on its children
    for d in "${ancestors[@]}"; do
        if ! runuser -u "$PG_OS_USER" -- test -x "$d"; then
            say "postgres: making $d traversable (chmod o+x) so user $PG_OS_USER can reach $PG_DATA"
            chmod o+x "$d" || die "postgres: cannot chmod o+x $d; set QM_STACK_DIR to a directory user $PG_OS_USER can reach"
        fi
    done
}

pg_bin() {
    local d
    d=$(pg_bindir)
    [[ -n $d ]] || die "postgres: server binaries not found (run '$0 install')"
    printf '%s/%s' "$d" "$1"
}

pg_running() {
    [[ -f $PG_DATA/PG_VERSION ]] || return 1
    as_pg "$(pg_bin pg_ctl)" status -D "$PG_DATA" >/dev/null 2>&1
}

pg_pid() {
    head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null || true
}

pg_initdb_if_needed() {
    [[ -f $PG_DATA/PG_VERSION ]] && return 0
    local tmp=$PG_DIR/data.init locale_args=(--no-locale)
    if locale -a 2>/dev/null | grep -qix 'c\.utf-\?8'; then
        locale_args=(--locale=C.UTF-8)
    fi
    rm -rf "$tmp" "$PG_DATA"
    say "postgres: initdb $PG_DATA ($(pg_bindir))"
    # initdb into a temporary dir and rename, so an interrupted initdb never
    # leaves a half-initialised data dir behind
    as_pg "$(pg_bin initdb)" -D "$tmp" -U postgres -E UTF8 "${locale_args[@]}" \
        --auth-local=trust --auth-host=scram-sha-256 --no-sync >"$PG_DIR/log/initdb.log" 2>&1 ||
        die_with_logs "postgres: initdb failed" "$PG_DIR/log/initdb.log"
    as_pg mv "$tmp" "$PG_DATA"
    printf "\n# local stack settings (deploy/local/stack.sh)\ninclude_if_exists = 'quantmesh.conf'\n" |
        as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
}

pg_write_config() {
    # rewritten on every 'up' so port changes apply
    as_pg tee "$PG_DATA/quantmesh.conf" >/dev/null <<EOF
# generated by deploy/local/stack.sh -- edits are overwritten on every 'up'
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
unix_socket_permissions = 0700
max_connections = 200
shared_buffers = 128MB
password_encryption = scram-sha-256
# durable enough for a dev/test stack, without waiting on every commit
fsync = on
synchronous_commit = off
full_page_writes = on
log_timezone = 'UTC'
timezone = 'UTC'
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    as_pg tee "$PG_DATA/pg_hba.conf" >/dev/null <<EOF
# generated by deploy/local/stack.sh
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  trust
host    all       all   127.0.0.1/32   scram-sha-256
EOF
}

pg_bootstrap_roles() {
    as_pg "$(pg_bin psql)" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCKET_DIR" -p "$PG_PORT" -U postgres -d postgres \
        >"$PG_DIR/log/bootstrap.log" 2>&1 <<EOF ||
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$DB_USER') THEN
        CREATE ROLE $DB_USER;
    END IF;
END
\$\$;
ALTER ROLE $DB_USER WITH LOGIN CREATEDB PASSWORD '$DB_PASSWORD';
SELECT 'CREATE DATABASE $DB_NAME OWNER $DB_USER'
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_NAME')\gexec
SELECT 'CREATE DATABASE $DB_TEST_NAME OWNER $DB_USER'
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$DB_TEST_NAME')\gexec
EOF
        die_with_logs "postgres: creating role/databases $DB_USER/$DB_NAME/$DB_TEST_NAME failed" "$PG_DIR/log/bootstrap.log" "$PG_LOG"
    # prove the URL the tests use actually works (TCP + password)
    PGPASSWORD=$DB_PASSWORD PGCONNECT_TIMEOUT=5 "$(pg_bin psql)" -X -q -At -h "$HOST" -p "$PG_PORT" -U "$DB_USER" -d "$DB_NAME" \
        -c 'SELECT 1' >"$PG_DIR/log/bootstrap.log" 2>&1 ||
        die_with_logs "postgres: cannot log in as $DB_USER on $HOST:$PG_PORT/$DB_NAME" "$PG_DIR/log/bootstrap.log" "$PG_LOG"
}

pg_up() {
    pg_ensure_os_user
    mkdir -p "$STACK_DIR" "$PG_DIR"
    pg_ensure_traversable
    if pg_is_root_mode; then
        chown "$PG_OS_USER:" "$PG_DIR"
    fi
    chmod 0700 "$PG_DIR"
    as_pg mkdir -p "$PG_DIR/log" "$PG_SOCKET_DIR"
    as_pg chmod 0700 "$PG_SOCKET_DIR"
    if [[ -f $PG_DATA/PG_VERSION && -z $(pg_bindir) ]]; then
        die "postgres: $PG_DATA was created by PostgreSQL $(<"$PG_DATA/PG_VERSION") but /usr/lib/postgresql/$(<"$PG_DATA/PG_VERSION")/bin is missing; install that version or '$0 reset'"
    fi
    if pg_running; then
        say "postgres: already running (pid $(pg_pid)) on $HOST:$PG_PORT"
        pg_bootstrap_roles
        return 0
    fi
    require_port_free postgres "$PG_PORT"
    pg_initdb_if_needed
    pg_write_config
    local start
    start=$(now)
    say "postgres: starting on $HOST:$PG_PORT (up to $PG_START_TIMEOUT s)"
    # pg_ctl removes a stale postmaster.pid itself
    # (fd 9 is the stack lock: daemons must not inherit it)
    as_pg "$(pg_bin pg_ctl)" -D "$PG_DATA" -l "$PG_LOG" -w -t "$PG_START_TIMEOUT" -s start >"$PG_DIR/log/pg_ctl.log" 2>&1 </dev/null 9>&- ||
        die_with_logs "postgres: server did not start on $HOST:$PG_PORT within $PG_START_TIMEOUT s" "$PG_DIR/log/pg_ctl.log" "$PG_LOG"
    pg_bootstrap_roles
    say "postgres: ready on $HOST:$PG_PORT (pid $(pg_pid), $(($(now) - start)) s)"
}

pg_down() {
    if [[ ! -f $PG_DATA/PG_VERSION ]]; then
        say "postgres: already stopped (not initialised)"
        return 0
    fi
    if [[ -z $(pg_bindir) ]]; then
        say "postgres: binaries missing; nothing to stop"
        return 0
    fi
    if ! pg_running; then
        say "postgres: already stopped"
        return 0
    fi
    local pid
    pid=$(pg_pid)
    say "postgres: stopping pid $pid (pg_ctl stop -m fast)"
    if ! as_pg "$(pg_bin pg_ctl)" -D "$PG_DATA" -m fast -w -t 30 -s stop >"$PG_DIR/log/pg_ctl.log" 2>&1; then
        say "postgres: fast shutdown timed out; trying immediate"
        as_pg "$(pg_bin pg_ctl)" -D "$PG_DATA" -m immediate -w -t 15 -s stop >>"$PG_DIR/log/pg_ctl.log" 2>&1 || true
        if pid_alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
            wait_pid_gone "$pid" 10 || die_with_logs "postgres: postmaster $pid does not stop" "$PG_DIR/log/pg_ctl.log" "$PG_LOG"
        fi
    fi
    say "postgres: stopped"
}

pg_status() {
    if [[ -n $(pg_bindir) ]] && pg_running; then
        if "$(pg_bin pg_isready)" -q -h "$HOST" -p "$PG_PORT" -t 3; then
            printf '%-9s %-9s %-11s %s\n' postgres running "pid $(pg_pid)" "$HOST:$PG_PORT (db $DB_NAME, $DB_TEST_NAME)"
            return 0
        fi
        printf '%-9s %-9s %-11s %s\n' postgres unhealthy "pid $(pg_pid)" "$HOST:$PG_PORT (not accepting connections)"
        return 1
    fi
    printf '%-9s %-9s %-11s %s\n' postgres stopped "-" "$HOST:$PG_PORT"
    return 1
}

# -------------------------------------------------------------------- redis --
redis_ping() {
    [[ $(timeout 5 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

# a redis-server whose working dir is our data dir is ours
redis_is_ours() {
    [[ $(cat "/proc/$1/comm" 2>/dev/null) == redis-server* ]] &&
        [[ $(readlink "/proc/$1/cwd" 2>/dev/null) == "$REDIS_DATA" ]]
}

redis_pid() {
    local pid="" p
    if [[ -f $REDIS_PIDFILE ]]; then
        pid=$(<"$REDIS_PIDFILE")
        if pid_alive "$pid" && redis_is_ours "$pid"; then
            printf '%s' "$pid"
            return 0
        fi
    fi
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        if redis_is_ours "$p"; then
            printf '%s' "$p"
            return 0
        fi
    done
    return 0
}

redis_write_config() {
    mkdir -p "$REDIS_DATA"
    cat >"$REDIS_CONF" <<EOF
# generated by deploy/local/stack.sh -- edits are overwritten on every 'up'
bind $HOST
port $REDIS_PORT
protected-mode yes
daemonize yes
supervised no
pidfile $REDIS_PIDFILE
logfile $REDIS_LOG
loglevel notice
dir $REDIS_DATA
databases 16
# an ephemeral cache for dev/tests: no RDB snapshots, no AOF
save ""
appendonly no
EOF
}

redis_up() {
    local pid start
    pid=$(redis_pid)
    if [[ -n $pid ]] && redis_ping; then
        say "redis: already running (pid $pid) on $HOST:$REDIS_PORT"
        return 0
    fi
    if [[ -z $pid ]]; then
        if [[ -f $REDIS_PIDFILE ]]; then
            say "redis: removing stale pid file"
            rm -f "$REDIS_PIDFILE"
        fi
        require_port_free redis "$REDIS_PORT"
        redis_write_config
        say "redis: starting on $HOST:$REDIS_PORT"
        redis-server "$REDIS_CONF" >"$REDIS_DIR/redis-start.out" 2>&1 </dev/null 9>&- ||
            die_with_logs "redis: 'redis-server $REDIS_CONF' failed" "$REDIS_DIR/redis-start.out" "$REDIS_LOG"
    fi
    start=$(now)
    until redis_ping; do
        if (($(now) - start >= REDIS_START_TIMEOUT)); then
            die_with_logs "redis: server did not answer PING on $HOST:$REDIS_PORT within $REDIS_START_TIMEOUT s" "$REDIS_LOG" "$REDIS_DIR/redis-start.out"
        fi
        sleep 0.2
    done
    say "redis: ready on $HOST:$REDIS_PORT (pid $(redis_pid))"
}

redis_down() {
    local pid
    pid=$(redis_pid)
    if [[ -z $pid ]]; then
        if [[ -f $REDIS_PIDFILE ]]; then
            say "redis: removing stale pid file"
            rm -f "$REDIS_PIDFILE"
        fi
        say "redis: already stopped"
        return 0
    fi
    say "redis: stopping pid $pid (SHUTDOWN NOSAVE)"
    timeout 10 redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    if ! wait_pid_gone "$pid" 10; then
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_pid_gone "$pid" 10; then
            kill -KILL "$pid" 2>/dev/null || true
            wait_pid_gone "$pid" 5 || die "redis: pid $pid survived SIGKILL"
        fi
    fi
    rm -f "$REDIS_PIDFILE"
    say "redis: stopped"
}

redis_status() {
    local pid
    pid=$(redis_pid)
    if [[ -z $pid ]]; then
        printf '%-9s %-9s %-11s %s\n' redis stopped "-" "$HOST:$REDIS_PORT"
        return 1
    fi
    if redis_ping; then
        printf '%-9s %-9s %-11s %s\n' redis running "pid $pid" "$HOST:$REDIS_PORT"
        return 0
    fi
    printf '%-9s %-9s %-11s %s\n' redis unhealthy "pid $pid" "$HOST:$REDIS_PORT (no PONG)"
    return 1
}

# ----------------------------------------------------------------- commands --
env_lines() {
    printf 'QM_KAFKA_BOOTSTRAP=%s:%s\n' "$HOST" "$KAFKA_PORT"
    printf 'QM_DATABASE_URL=postgresql://%s:%s@%s:%s/%s\n' "$DB_USER" "$DB_PASSWORD" "$HOST" "$PG_PORT" "$DB_NAME"
    printf 'QM_REDIS_URL=redis://%s:%s/0\n' "$HOST" "$REDIS_PORT"
}

cmd_up() {
    local start
    start=$(now)
    lock_stack
    install_packages
    install_kafka_libs
    redis_up
    pg_up
    kafka_up
    env_lines >"$ENV_FILE"
    say "up: stack ready in $(($(now) - start)) s; env written to $ENV_FILE"
    env_lines
}

cmd_down() {
    lock_stack
    local rc=0
    # stop everything even if one component fails, then report
    (kafka_down) || rc=1
    (pg_down) || rc=1
    (redis_down) || rc=1
    ((rc == 0)) || die "down: at least one component failed to stop (see above)"
}

cmd_status() {
    local rc=0
    kafka_status || rc=1
    pg_status || rc=1
    redis_status || rc=1
    return "$rc"
}

cmd_logs() {
    local follow=0 lines=40 which=() f files=()
    while (($# > 0)); do
        case $1 in
            -f | --follow) follow=1 ;;
            -n) lines=${2:?-n needs a number}; shift ;;
            kafka | postgres | redis) which+=("$1") ;;
            *) die "logs: unknown argument '$1' (use: logs [kafka|postgres|redis] [-f] [-n N])" ;;
        esac
        shift
    done
    ((${#which[@]} > 0)) || which=(kafka postgres redis)
    for f in "${which[@]}"; do
        case $f in
            kafka) files+=("$KAFKA_LOG" "$KAFKA_OUT") ;;
            postgres) files+=("$PG_LOG") ;;
            redis) files+=("$REDIS_LOG") ;;
        esac
    done
    local existing=()
    for f in "${files[@]}"; do
        [[ -f $f ]] && existing+=("$f")
    done
    ((${#existing[@]} > 0)) || die "logs: no log files yet under $STACK_DIR (run '$0 up')"
    if ((follow)); then
        exec tail -n "$lines" -F "${existing[@]}"
    fi
    tail -n "$lines" "${existing[@]}"
}

cmd_reset() {
    cmd_down
    case $STACK_DIR in
        / | "" | "$HOME" | "$SCRIPT_DIR") die "reset: refusing to delete under suspicious QM_STACK_DIR '$STACK_DIR'" ;;
    esac
    say "reset: deleting $KAFKA_DIR $PG_DIR $REDIS_DIR $ENV_FILE (jar cache in $CACHE_DIR is kept)"
    rm -rf "$KAFKA_DIR" "$PG_DIR" "$REDIS_DIR" "$ENV_FILE"
    say "reset: done"
}

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
    check_port_number QM_KAFKA_PORT "$KAFKA_PORT"
    KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}
    check_port_number QM_KAFKA_CONTROLLER_PORT "$KAFKA_CONTROLLER_PORT"
    check_port_number QM_PG_PORT "$PG_PORT"
    check_port_number QM_REDIS_PORT "$REDIS_PORT"
    local cmd=${1:-}
    (($# > 0)) && shift
    case $cmd in
        install) cmd_install ;;
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        logs) cmd_logs "$@" ;;
        reset) cmd_reset ;;
        -h | --help | help) usage ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
