#!/usr/bin/env bash
# A single-node Apache Kafka 4.1.1 broker (KRaft: broker and controller in one JVM) for the
# tests and for trying distributed mode locally. No tarball: the broker's jars come from Maven
# Central with `mvn dependency:copy-dependencies` (scripts/kafka/pom.xml), once, into a cache.
#
#   scripts/kafka.sh fetch                 fetch the jars (idempotent); prints the lib dir
#   scripts/kafka.sh classpath             prints the broker's Java classpath
#   scripts/kafka.sh format PROPS          formats the log dir of PROPS (a server.properties)
#                                          with a new cluster id, unless already formatted
#   scripts/kafka.sh run PROPS             runs a broker on PROPS in the foreground (exec: the
#                                          caller's pid is the JVM's, to stop, kill or pause)
#   scripts/kafka.sh start [DIR] [PORT]    format DIR (default ./kafka-data) if new and run a
#                                          broker on 127.0.0.1:PORT (default 9092) in the
#                                          foreground; the controller listens on PORT+1
#
# Needs Java 17+ and Maven. Cache: $SENSORFLOW_KAFKA_HOME (default
# ~/.cache/sensorflow/kafka-4.1.1); the pytest fixture `kafka_broker` uses the same jars.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
KAFKA_VERSION=4.1.1
KAFKA_HOME=${SENSORFLOW_KAFKA_HOME:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/sensorflow/kafka-$KAFKA_VERSION}
LIBS="$KAFKA_HOME/libs"

fetch() {
    # A complete fetch leaves a marker; a half-finished one (interrupted) is redone from scratch.
    if [ -f "$LIBS/.complete" ]; then
        return 0
    fi
    command -v mvn >/dev/null || { echo "kafka.sh: maven (mvn) is needed to fetch the Kafka jars" >&2; exit 1; }
    local tmp="$KAFKA_HOME/libs.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$KAFKA_HOME"
    echo "kafka.sh: fetching the jars of Kafka $KAFKA_VERSION into $LIBS" >&2
    (cd "$HERE/kafka" && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime \
        -DoutputDirectory="$tmp") >&2
    touch "$tmp/.complete"
    rm -rf "$LIBS"
    mv "$tmp" "$LIBS"
}

java_opts() {
    # SENSORFLOW_KAFKA_JAVA_OPTS replaces the defaults below (e.g. full JIT for benchmarks).
    if [ -n "${SENSORFLOW_KAFKA_JAVA_OPTS:-}" ]; then
        echo "$SENSORFLOW_KAFKA_JAVA_OPTS -Dlog4j2.configurationFile=$HERE/kafka/log4j2.properties"
        return
    fi
    # 1 GiB heap at most; C1 only, which starts faster and is plenty for a test broker.
    echo "-Xms256m -Xmx1g -XX:+UseG1GC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
-Dlog4j2.configurationFile=$HERE/kafka/log4j2.properties"
}

start() {
    local dir=${1:-./kafka-data} port=${2:-9092}
    local cport=$((port + 1))
    mkdir -p "$dir/logs"
    dir=$(cd "$dir" && pwd)
    cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/logs
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
    format "$dir/server.properties"
    echo "kafka.sh: broker on 127.0.0.1:$port (controller :$cport), data in $dir" >&2
    run "$dir/server.properties"
}

format() {
    local props=$1 cluster_id
    cluster_id=$(java -cp "$LIBS/*" kafka.tools.StorageTool random-uuid)
    # shellcheck disable=SC2046
    java $(java_opts) -cp "$LIBS/*" kafka.tools.StorageTool format --ignore-formatted \
        -t "$cluster_id" -c "$props" >&2
}

run() {
    # shellcheck disable=SC2046
    exec java $(java_opts) -cp "$LIBS/*" kafka.Kafka "$1"
}

case "${1:-}" in
fetch) fetch; echo "$LIBS" ;;
classpath) fetch; echo "$LIBS/*" ;;
start) shift; fetch; start "$@" ;;
format) fetch; format "$2" ;;
run) fetch; run "$2" ;;
*) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
