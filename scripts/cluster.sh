#!/usr/bin/env bash
# An emulated multi-node cluster on one Linux box: N network namespaces as nodes.
#
#   scripts/cluster.sh up N [--bw 100mbit] [--delay 0] [--loss 0] [--cpus 16] [--gpus 4] [--no-pin] [--replace]
#   scripts/cluster.sh down                     # stop everything, delete namespaces/interfaces, verify
#   scripts/cluster.sh status                   # nodes, links, daemons, Slurm view
#   scripts/cluster.sh exec NODE CMD...         # run CMD inside NODE (its network, hostname, /etc/hosts)
#   scripts/cluster.sh shape NODE|all [--bw R] [--delay D] [--loss P]   # re-shape links at run time
#   scripts/cluster.sh link NODE down|up        # cut / restore a node's link (carrier off on both ends)
#   scripts/cluster.sh kill NODE                # power a node off: SIGKILL every process inside it
#   scripts/cluster.sh start NODE               # power it on again (hostname anchor, sshd, slurmd)
#   scripts/cluster.sh hosts [SLOTS]            # node1:SLOTS,node2:SLOTS,... for horovodrun/mpirun -H
#   scripts/cluster.sh env                      # shell exports for sbatch/squeue from the root namespace
#
# Each node: a network namespace with eth0 = 10.77.0.(10+i)/24 on a bridge (10.77.0.1) in the
# root namespace; an "anchor" process holding its own UTS namespace (hostname nodeI) and mount
# namespace (a generated /etc/hosts bind-mounted over the real one, which is never edited); an
# sshd on its address (own host key, authorized_keys, config); a slurmd (-N nodeI, per-node spool,
# pid, log and TmpFS). Every process of node i runs on CPU (i-1) mod nproc (taskset; --no-pin
# lets them float), so nodes share the box's cores instead of each seeing all of them; Slurm is
# told --cpus per node (default 16, config_overrides) and --gpus placeholder GPUs (default 4,
# nothing bound), so the sbatch scripts' defaults schedule. One munged and one slurmctld run in the root namespace. Links are shaped
# with tc and nftables: a tbf at the rate on both ends of each node's veth (what the node sends
# and what it receives); netem delay on what it sends (needs sch_netem, which some minimal
# kernels lack: then --delay is refused); loss as a random drop of what the node sends, after it
# left the node (nftables, netdev ingress of the host-side veth). Between two nodes a packet
# sees the rate, one delay and one loss draw. Only addresses inside the created namespaces (and
# the bridge address) are used; nodes have no default route. --bw 0 leaves links unshaped.
#
# Needs root, iproute2 (ip, tc; kernel: veth, bridge, sch_tbf; sch_netem for --delay), nftables
# (for --loss), util-linux (nsenter, unshare), openssh-server + openssh-client, slurm-wlm, munge.
# State: $HVD_RSGC_CLUSTER_DIR (default /run/hvd_rsgc-cluster): pid files, logs, slurm.conf,
# hosts, ssh keys.
# Environment: HVD_RSGC_CLUSTER_NET (first three octets, default 10.77.0),
# HVD_RSGC_CLUSTER_PREFIX (interface/namespace prefix, default hrs), HVD_RSGC_CLUSTER_PORT
# (slurmctld port; slurmd listens on PORT+1 inside the nodes; default 17817).
set -eEuo pipefail

D="${HVD_RSGC_CLUSTER_DIR:-/run/hvd_rsgc-cluster}"
P="${HVD_RSGC_CLUSTER_PREFIX:-hrs}"
NET="${HVD_RSGC_CLUSTER_NET:-10.77.0}"
PORT="${HVD_RSGC_CLUSTER_PORT:-17817}"
BR="${P}-br0"
NFT="${P//-/_}_loss"     # nftables table for packet loss

die() { echo "cluster: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "'$1' needs root (network namespaces, tc, the nodes' daemons): run it with sudo or as root; see README 'Emulated cluster'"; }
log() { echo "cluster: $*" >&2; }
exe() { command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; } || return 1; }
ns() { echo "${P}-node$1"; }
vh() { echo "${P}-veth$1"; }
addr() { echo "$NET.$((10 + $1))"; }
node_index() {          # node3 | 3 -> 3
    local n="${1#node}"
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] || die "bad node name '$1' (node1, node2, ...)"
    [ -f "$D/cluster.env" ] || die "no cluster is up (no $D/cluster.env)"
    # shellcheck disable=SC1091
    . "$D/cluster.env"
    [ "$n" -le "$N" ] || die "node$n does not exist (the cluster has $N nodes)"
    echo "$n"
}
load_env() {
    [ -f "$D/cluster.env" ] || die "no cluster is up (no $D/cluster.env); start one with: $0 up N"
    # shellcheck disable=SC1091
    . "$D/cluster.env"
}
pid_alive() {           # running (a zombie waiting to be reaped counts as dead)
    [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
    local st; st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
read_pid() { [ -f "$1" ] && tr -dc 0-9 <"$1" || true; }
ours_pid() {            # ours_pid FILE: its PID if that process is alive and is the daemon the
    # file is named after (anchor-nodeI: the anchor's sleep; sshd-nodeI[.sshd]; slurmd-nodeI;
    # slurmctld; munged), not a later process that happens to have reused the PID
    local p want
    p="$(read_pid "$1")"
    pid_alive "$p" || return 0
    want="$(basename "$1" .pid)"; want="${want%%-node*}"; want="${want%%.*}"
    [ "$want" = anchor ] && want=sleep
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$want" ] && echo "$p"
    return 0
}
wait_for() {            # wait_for SECONDS DESCRIPTION CMD...
    local t="$1" what="$2"; shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$end" ] || { log "timed out after ${t}s waiting for $what (logs: $D/log)"; return 1; }
        sleep 0.2
    done
}

# ---------------------------------------------------------------------------------- shaping
rate_bps() {            # 100mbit -> 100000000 ; 0 / none -> 0
    local r="${1,,}"
    case "$r" in 0|none|"") echo 0; return;; esac
    [[ "$r" =~ ^([0-9]+(\.[0-9]+)?)(bit|kbit|mbit|gbit|tbit)?$ ]] || die "bad rate '$1' (e.g. 100mbit, 1gbit)"
    local num="${BASH_REMATCH[1]}" unit="${BASH_REMATCH[3]:-bit}" mul
    case "$unit" in bit) mul=1;; kbit) mul=1000;; mbit) mul=1000000;; gbit) mul=1000000000;; tbit) mul=1000000000000;; esac
    awk -v n="$num" -v m="$mul" 'BEGIN { printf "%.0f\n", n * m }'
}

has_netem() {           # the kernel's sch_netem (absent from some minimal kernels)
    local i="$1"
    ip netns exec "$(ns "$i")" tc qdisc add dev lo root handle 1: netem delay 0ms 2>/dev/null || return 1
    ip netns exec "$(ns "$i")" tc qdisc del dev lo root 2>/dev/null || true
}

shape_one() {           # shape_one I BW DELAY LOSS
    local i="$1" bw="$2" delay="${3:-0}" loss="${4:-0}" bps burst
    bps="$(rate_bps "$bw")"
    loss="${loss%\%}"
    [[ "$loss" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "bad loss '$4' (percent, e.g. 1 or 0.5%)"
    case "$delay" in 0|0ms|0us|0s) delay=0;; esac
    burst=$(( bps / 8 / 250 )); [ "$burst" -ge 16000 ] || burst=16000      # 4 ms at the rate
    local inside=(ip netns exec "$(ns "$i")")
    "${inside[@]}" tc qdisc del dev eth0 root 2>/dev/null || true
    tc qdisc del dev "$(vh "$i")" root 2>/dev/null || true
    # rate: tbf on what the node sends (its eth0) and on what it receives (the host-side veth);
    # delay: netem on what it sends, tbf below it
    if [ "$delay" != 0 ]; then
        has_netem "$i" || die "--delay needs the kernel's sch_netem qdisc, which this kernel lacks (rate and loss work without it)"
        "${inside[@]}" tc qdisc add dev eth0 root handle 1: netem delay "$delay" limit 100000
        [ "$bps" -gt 0 ] && "${inside[@]}" tc qdisc add dev eth0 parent 1:1 handle 10: tbf rate "$bps" burst "$burst" latency 100ms
    elif [ "$bps" -gt 0 ]; then
        "${inside[@]}" tc qdisc add dev eth0 root handle 10: tbf rate "$bps" burst "$burst" latency 100ms
    fi
    [ "$bps" -gt 0 ] && tc qdisc add dev "$(vh "$i")" root handle 10: tbf rate "$bps" burst "$burst" latency 100ms
    # loss: drop a random fraction of what the node sends, after it left the node (nftables on
    # the host-side veth's ingress), so the sender's TCP sees real loss. The node then sends
    # one segment per packet (gso_max_segs 1): a dropped packet is one wire packet, not a
    # 64 KiB GSO burst.
    local chain="node$i"
    nft delete chain netdev "$NFT" "$chain" 2>/dev/null || true
    if awk -v l="$loss" 'BEGIN { exit !(l > 0) }'; then
        command -v nft >/dev/null || die "--loss needs nftables (apt-get install nftables)"
        local per10k; per10k="$(awk -v l="$loss" 'BEGIN { printf "%d", l * 100 + 0.5 }')"
        nft add table netdev "$NFT"
        nft add chain netdev "$NFT" "$chain" "{ type filter hook ingress device \"$(vh "$i")\" priority 0; policy accept; }"
        nft add rule netdev "$NFT" "$chain" numgen random mod 10000 "<" "$per10k" counter drop
        "${inside[@]}" ip link set dev eth0 gso_max_segs 1
    else
        "${inside[@]}" ip link set dev eth0 gso_max_segs 65535
    fi
    return 0
}

parse_link_opts() {     # sets BW DELAY LOSS from --bw/--delay/--loss; leaves the rest in REST
    REST=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --bw) BW="$2"; shift 2;;
            --delay) DELAY="$2"; shift 2;;
            --loss) LOSS="$2"; shift 2;;
            --bw=*) BW="${1#*=}"; shift;;
            --delay=*) DELAY="${1#*=}"; shift;;
            --loss=*) LOSS="${1#*=}"; shift;;
            *) REST+=("$1"); shift;;
        esac
    done
    rate_bps "$BW" >/dev/null
}

# ---------------------------------------------------------------------------------- nodes
anchor_pid() { read_pid "$D/run/anchor-node$1.pid"; }
node_cpu() { echo $(( ($1 - 1) % NCPU )); }
pin() {                 # pin I: "taskset -c CPU" when nodes are pinned (each node gets its share of the box)
    if [ "${PIN:-0}" = 1 ]; then echo "taskset -c $(node_cpu "$1")"; fi
}

node_start() {          # anchor (hostname + /etc/hosts), sshd, slurmd for node I
    local i="$1" name="node$1" a
    a="$(ours_pid "$D/run/anchor-$name.pid")"
    if [ -z "$a" ]; then
        rm -f "$D/run/anchor-$name.pid"
        # shellcheck disable=SC2046
        $(pin "$i") nsenter --net="/run/netns/$(ns "$i")" unshare --uts --mount --propagation private \
            sh -c "hostname $name && mount --bind '$D/etc/hosts' /etc/hosts && echo \$\$ > '$D/run/anchor-$name.pid' && exec sleep infinity" \
            </dev/null >>"$D/log/anchor-$name.log" 2>&1 &
        wait_for 10 "$name's anchor" test -s "$D/run/anchor-$name.pid" || return 1
        a="$(anchor_pid "$i")"
    fi
    local in
    read -r -a in <<<"$(pin "$i") nsenter -t $a --net --uts --mount"
    [ "$("${in[@]}" hostname)" = "$name" ] || { log "$name: hostname not set"; return 1; }
    if [ -z "$(ours_pid "$D/run/sshd-$name.pid")" ]; then
        "${in[@]}" "$(exe sshd)" -D -e -f "$D/ssh/sshd_config" -o "ListenAddress=$(addr "$i")" \
            -o "PidFile=$D/run/sshd-$name.sshd.pid" </dev/null >>"$D/log/sshd-$name.log" 2>&1 &
        echo $! >"$D/run/sshd-$name.pid"
    fi
    if [ -z "$(ours_pid "$D/run/slurmd-$name.pid")" ]; then
        # a (re)booted node: empty spool and TmpFS (a killed step's PMIx socket left there
        # would make the next step with the same id -- a requeued job -- fail to bind)
        rm -rf "${D:?}/slurm/spool/$name" "${D:?}/tmp/$name"
        mkdir -p "$D/slurm/spool/$name" "$D/tmp/$name"
        "${in[@]}" env SLURM_CONF="$D/etc/slurm.conf" "$(exe slurmd)" -D -N "$name" -f "$D/etc/slurm.conf" \
            </dev/null >>"$D/log/slurmd-$name.out" 2>&1 &
        echo $! >"$D/run/slurmd-$name.pid"
    fi
}

node_kill() {           # every process whose network namespace is node I's, SIGKILL
    local i="$1" n pids
    for n in 1 2 3 4 5 6 7 8 9 10; do
        pids="$(ip netns pids "$(ns "$i")" 2>/dev/null || true)"
        [ -n "$pids" ] || return 0
        # shellcheck disable=SC2086
        kill -9 $pids 2>/dev/null || true
        sleep 0.2
    done
    pids="$(ip netns pids "$(ns "$i")" 2>/dev/null || true)"
    [ -z "$pids" ] || { log "node$i: processes survived SIGKILL: $pids"; return 1; }
}

# ---------------------------------------------------------------------------------- up
ours_present() {        # anything of ours (namespaces, interfaces, live pid files)?
    ip netns list 2>/dev/null | awk '{print $1}' | grep -q "^${P}-node[0-9]" && return 0
    ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | grep -q "^${P}-" && return 0
    command -v nft >/dev/null && nft list table netdev "$NFT" >/dev/null 2>&1 && return 0
    local f
    for f in "$D"/run/*.pid; do [ -e "$f" ] && [ -n "$(ours_pid "$f")" ] && return 0; done
    return 1
}

cmd_up() {
    local n="${1:-}"; shift || true
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "usage: $0 up N [--bw 100mbit] [--delay 1ms] [--loss 0] [--cpus C] [--gpus G] [--replace]"
    BW=100mbit DELAY=0 LOSS=0
    local cpus=16 gpus=4 replace=0
    PIN=1 NCPU="$(nproc)"
    parse_link_opts "$@"
    set -- ${REST[@]+"${REST[@]}"}
    while [ $# -gt 0 ]; do
        case "$1" in
            --cpus) cpus="$2"; shift 2;;
            --gpus) gpus="$2"; shift 2;;
            --replace) replace=1; shift;;
            --no-pin) PIN=0; shift;;
            *) die "unknown option '$1'";;
        esac
    done
    need_root up
    local e
    for e in ip tc nsenter unshare sshd ssh ssh-keygen munged slurmctld slurmd sbatch scontrol sinfo; do
        exe "$e" >/dev/null || die "$e not found (Debian: apt-get install iproute2 util-linux openssh-server openssh-client slurm-wlm munge)"
    done
    if ours_present || [ -f "$D/cluster.env" ]; then
        if [ "$replace" = 1 ]; then (cmd_down); else
            die "a cluster (or what is left of one) exists: prefix '$P', state $D. Run '$0 down' first, or 'up --replace'"
        fi
    fi
    local t0=$SECONDS host
    host="$(hostname -s)"
    # $D is wiped: only a directory of ours (its marker; or nothing but an earlier cluster's
    # log/ in it), an empty or an absent one -- never e.g. /tmp or $HOME
    if [ -d "$D" ] && [ ! -e "$D/.hvd_rsgc-cluster" ] && [ -n "$(ls -A "$D" 2>/dev/null | grep -vx log)" ]; then
        die "state directory $D exists and is not a cluster's (no $D/.hvd_rsgc-cluster): choose an empty or new HVD_RSGC_CLUSTER_DIR"
    fi
    rm -rf "$D"
    mkdir -p "$D"/{run,log,etc,ssh,bin,dev,tmp,munge,slurm/state,slurm/spool}
    touch "$D/.hvd_rsgc-cluster"
    chmod 755 "$D"
    # any failure from here on (a command failing under set -e, die's exit, SIGINT/SIGTERM)
    # takes down what was built so far: bridge, namespaces, veths, daemons
    UP_DONE=0
    trap 'if [ "$UP_DONE" != 1 ]; then log "up failed; cleaning up (logs kept in $D/log)"; cmd_down >&2 || true; fi' EXIT
    trap 'exit 130' INT TERM

    # --- network: bridge + one veth pair per node
    ip link add "$BR" type bridge
    # keep the host's iptables/nftables FORWARD rules (br_netfilter) out of the bridged traffic:
    # a DROP policy there (Docker sets one) would otherwise cut the nodes off each other
    ip link set dev "$BR" type bridge nf_call_iptables 0 nf_call_ip6tables 0 nf_call_arptables 0 2>/dev/null || true
    ip addr add "$NET.1/24" dev "$BR"
    ip link set "$BR" up
    local i
    for i in $(seq 1 "$n"); do
        ip netns add "$(ns "$i")"
        ip link add "$(vh "$i")" type veth peer name eth0 netns "$(ns "$i")"
        ip link set "$(vh "$i")" master "$BR" up
        ip netns exec "$(ns "$i")" ip addr add "$(addr "$i")/24" dev eth0
        ip netns exec "$(ns "$i")" ip link set eth0 up
        ip netns exec "$(ns "$i")" ip link set lo up
        shape_one "$i" "$BW" "$DELAY" "$LOSS"
    done

    # --- hosts file seen inside every node (the real /etc/hosts is not edited)
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        echo "$NET.1 $host hvd-rsgc-head"
        for i in $(seq 1 "$n"); do echo "$(addr "$i") node$i"; done
    } >"$D/etc/hosts"

    # --- ssh: one client key, one host key, sshd config per cluster; ssh wrapper for MPI/Horovod
    ssh-keygen -q -t ed25519 -N '' -C hvd-rsgc-cluster -f "$D/ssh/id_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C hvd-rsgc-cluster-host -f "$D/ssh/host_ed25519"
    cp "$D/ssh/id_ed25519.pub" "$D/ssh/authorized_keys"
    mkdir -p /run/sshd
    cat >"$D/ssh/sshd_config" <<EOF
Port 22
HostKey $D/ssh/host_ed25519
AuthorizedKeysFile $D/ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
StrictModes no
X11Forwarding no
PrintMotd no
MaxStartups 200:30:400
MaxSessions 200
SetEnv OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 SLURM_CONF=$D/etc/slurm.conf HVD_RSGC_CLUSTER_DIR=$D
EOF
    cat >"$D/ssh/ssh_config" <<EOF
Host *
    IdentityFile $D/ssh/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    GlobalKnownHostsFile /dev/null
    LogLevel ERROR
    GSSAPIAuthentication no
    BatchMode yes
    ConnectTimeout 10
    ServerAliveInterval 5
    ServerAliveCountMax 3
EOF
    cat >"$D/bin/ssh" <<EOF
#!/bin/sh
# ssh with this cluster's key and client settings (first on PATH inside the nodes, for
# mpirun's and horovodrun's remote launches)
exec $(exe ssh) -F $D/ssh/ssh_config "\$@"
EOF
    chmod 755 "$D/bin/ssh"

    # --- munge: one daemon, its socket is reachable from every network namespace
    dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
    chmod 700 "$D/munge"; chmod 400 "$D/munge/munge.key"
    "$(exe munged)" --foreground --force --key-file="$D/munge/munge.key" --socket="$D/munge/munge.socket" \
        --pid-file="$D/munge/munged.pid" --seed-file="$D/munge/munged.seed" --log-file="$D/log/munged.log" \
        </dev/null >>"$D/log/munged.out" 2>&1 &
    echo $! >"$D/run/munged.pid"
    wait_for 10 "munged's socket" test -S "$D/munge/munge.socket"
    chmod 711 "$D/munge"

    # --- slurm
    mkdir -p "$D/dev"
    # placeholder GPUs for the scheduler (character devices like /dev/null; nothing uses them)
    for i in $(seq 0 $((gpus - 1))); do mknod -m 666 "$D/dev/gpu$i" c 1 3 2>/dev/null || : >"$D/dev/gpu$i"; done
    {
        cat <<EOF
# generated by scripts/cluster.sh
ClusterName=hvdrsgcemu
SlurmctldHost=$host($NET.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/munge
AuthInfo=socket=$D/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$D/slurm/state
SlurmdSpoolDir=$D/slurm/spool/%n
TmpFS=$D/tmp/%n
SlurmctldPidFile=$D/run/slurmctld.slurm.pid
SlurmdPidFile=$D/run/slurmd-%n.slurm.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
SlurmdTimeout=30
MessageTimeout=10
KillWait=5
MinJobAge=600
MailProg=/bin/true
GresTypes=gpu
EOF
        if [ "$gpus" -gt 0 ]; then g="Gres=gpu:$gpus"; else g=""; fi
        for i in $(seq 1 "$n"); do
            echo "NodeName=node$i NodeAddr=$(addr "$i") NodeHostname=node$i CPUs=$cpus $g State=UNKNOWN"
        done
        echo "PartitionName=emu Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    } >"$D/etc/slurm.conf"
    if [ "$gpus" -gt 0 ]; then
        echo "AutoDetect=off" >"$D/etc/gres.conf"
        echo "NodeName=node[1-$n] Name=gpu File=$D/dev/gpu[0-$((gpus - 1))]" >>"$D/etc/gres.conf"
    else
        echo "AutoDetect=off" >"$D/etc/gres.conf"
    fi
    export SLURM_CONF="$D/etc/slurm.conf"
    "$(exe slurmctld)" -D -c -f "$SLURM_CONF" </dev/null >>"$D/log/slurmctld.out" 2>&1 &
    echo $! >"$D/run/slurmctld.pid"

    cat >"$D/cluster.env" <<EOF
N=$n
P=$P
NET=$NET
PORT=$PORT
BW=$BW
DELAY=$DELAY
LOSS=$LOSS
CPUS=$cpus
GPUS=$gpus
HEAD=$host
PIN=$PIN
NCPU=$NCPU
EOF
    for i in $(seq 1 "$n"); do node_start "$i"; done

    wait_for 60 "all $n nodes idle in Slurm" all_idle "$n"
    wait_for 30 "sshd on every node" ssh_all "$n"
    UP_DONE=1
    trap - EXIT INT TERM
    log "up: $n nodes in $((SECONDS - t0)) s; links $BW delay $DELAY loss $LOSS; state $D"
    log "    export SLURM_CONF=$SLURM_CONF   |   $0 exec node1 <cmd>   |   $0 down"
}

all_idle() {
    local st
    st="$(SLURM_CONF="$D/etc/slurm.conf" sinfo -h -N -o '%N %T' 2>/dev/null)" || return 1
    [ "$(echo "$st" | grep -cE ' (idle|mixed|allocated)$')" -eq "$1" ]
}
ssh_all() {
    local i a
    a="$(anchor_pid 1)"
    for i in $(seq 1 "$1"); do
        nsenter -t "$a" --net --uts --mount "$D/bin/ssh" "node$i" true </dev/null || return 1
    done
}

# ---------------------------------------------------------------------------------- down
cmd_down() {
    need_root down
    if [ -f "$D/cluster.env" ]; then    # the prefix / bridge / table it was brought up with
        # shellcheck disable=SC1091
        . "$D/cluster.env"
    fi
    BR="${P}-br0" NFT="${P//-/_}_loss"
    local n i pids f p left=()
    # 1. everything inside our namespaces (daemons, jobs, launched ranks): TERM, then KILL
    local nss
    nss="$(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${P}-node[0-9]" || true)"
    for n in $nss; do
        pids="$(ip netns pids "$n" 2>/dev/null || true)"
        # shellcheck disable=SC2086
        [ -n "$pids" ] && kill -TERM $pids 2>/dev/null || true
    done
    for f in "$D/run/slurmctld.pid" "$D/run/munged.pid"; do
        p="$(ours_pid "$f")"; [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true
    done
    for _ in $(seq 1 25); do
        local alive=0
        for n in $nss; do [ -n "$(ip netns pids "$n" 2>/dev/null || true)" ] && alive=1; done
        for f in "$D"/run/*.pid; do [ -e "$f" ] && [ -n "$(ours_pid "$f")" ] && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.2
    done
    for n in $nss; do
        pids="$(ip netns pids "$n" 2>/dev/null || true)"
        # shellcheck disable=SC2086
        [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    done
    for f in "$D"/run/*.pid; do
        [ -e "$f" ] || continue
        p="$(ours_pid "$f")"; [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
    done
    sleep 0.2
    # 2. namespaces (their eth0 goes with them, and with it the host-side peer), veths, bridge
    for n in $nss; do ip netns del "$n" 2>/dev/null || true; done
    for i in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep "^${P}-veth" || true); do
        ip link del "$i" 2>/dev/null || true
    done
    ip link del "$BR" 2>/dev/null || true
    command -v nft >/dev/null && nft delete table netdev "$NFT" 2>/dev/null || true
    for _ in $(seq 1 25); do
        ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | grep -q "^${P}-" || break
        sleep 0.2
    done
    # 3. verify
    for n in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${P}-node[0-9]" || true); do left+=("netns $n"); done
    for i in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep "^${P}-" || true); do left+=("link $i"); done
    command -v nft >/dev/null && nft list table netdev "$NFT" >/dev/null 2>&1 && left+=("nftables table $NFT")
    for f in "$D"/run/*.pid; do
        [ -e "$f" ] || continue
        p="$(ours_pid "$f")"; [ -n "$p" ] && left+=("process $p ($(basename "$f" .pid))")
    done
    if [ "${#left[@]}" -gt 0 ]; then
        log "down: left behind: ${left[*]}"
        return 1
    fi
    # keep the logs for post-mortems; drop everything else (keys, sockets, spool, state) --
    # in a state directory of ours only
    if [ -d "$D" ] && [ -e "$D/.hvd_rsgc-cluster" ]; then
        find "$D" -mindepth 1 -maxdepth 1 ! -name log ! -name .hvd_rsgc-cluster -exec rm -rf {} +
    fi
    log "down: no namespace, interface or daemon of the cluster is left (logs in $D/log)"
}

# ---------------------------------------------------------------------------------- the rest
cmd_status() {
    need_root status
    if [ ! -f "$D/cluster.env" ]; then
        echo "no cluster up (state dir $D)"; ours_present && echo "but leftovers exist: run '$0 down'"; return 0
    fi
    load_env
    echo "cluster: $N nodes, prefix $P, subnet $NET.0/24, state $D"
    local i p
    for i in $(seq 1 "$N"); do
        local a s d h
        a="$(anchor_pid "$i")"; s="$(read_pid "$D/run/sshd-node$i.pid")"; d="$(read_pid "$D/run/slurmd-node$i.pid")"
        h="-"; pid_alive "$a" && h="$(nsenter -t "$a" --uts hostname)"
        printf 'node%-3s %-12s host=%-8s cpu=%-3s anchor=%-4s sshd=%-4s slurmd=%-4s link=%s\n' "$i" "$(addr "$i")" "$h" "$([ "${PIN:-0}" = 1 ] && node_cpu "$i" || echo all)" \
            "$(pid_alive "$a" && echo up || echo DOWN)" "$(pid_alive "$s" && echo up || echo DOWN)" \
            "$(pid_alive "$d" && echo up || echo DOWN)" \
            "$(ip -o link show "$(vh "$i")" 2>/dev/null | grep -q 'state UP' && echo up || echo DOWN)"
        echo "        qdisc: $(ip netns exec "$(ns "$i")" tc qdisc show dev eth0 2>/dev/null | awk '{$1=$1};1' | tr '\n' ';')"
    done
    for p in munged slurmctld; do
        echo "$p: $(pid_alive "$(read_pid "$D/run/$p.pid")" && echo up || echo DOWN)"
    done
    SLURM_CONF="$D/etc/slurm.conf" sinfo -N 2>/dev/null || true
}

cmd_exec() {
    [ $# -ge 2 ] || die "usage: $0 exec NODE CMD..."
    need_root exec
    load_env
    local i a
    i="$(node_index "$1")"; shift
    a="$(anchor_pid "$i")"
    pid_alive "$a" || die "node$i is down (start it with: $0 start node$i)"
    # shellcheck disable=SC2046
    exec $(pin "$i") nsenter -t "$a" --net --uts --mount --wd="$PWD" env PATH="$D/bin:$PATH" SLURM_CONF="$D/etc/slurm.conf" \
        HVD_RSGC_CLUSTER_DIR="$D" OMPI_MCA_plm_rsh_agent="$D/bin/ssh" \
        OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 "$@"
}

cmd_shape() {
    [ $# -ge 1 ] || die "usage: $0 shape NODE|all [--bw R] [--delay D] [--loss P]"
    need_root shape
    load_env
    NFT="${P//-/_}_loss"
    local which="$1"; shift
    parse_link_opts "$@"
    [ "${#REST[@]}" -eq 0 ] || die "unknown option(s) ${REST[*]}"
    local i list
    if [ "$which" = all ]; then list="$(seq 1 "$N")"; else list="$(node_index "$which")"; fi
    for i in $list; do shape_one "$i" "$BW" "$DELAY" "$LOSS"; done
    if [ "$which" = all ]; then
        sed -i -e "s/^BW=.*/BW=$BW/" -e "s/^DELAY=.*/DELAY=$DELAY/" -e "s/^LOSS=.*/LOSS=$LOSS/" "$D/cluster.env"
    fi
    log "shaped $which: bw $BW delay $DELAY loss $LOSS"
}

cmd_link() {
    [ $# -eq 2 ] || die "usage: $0 link NODE down|up"
    need_root link
    load_env
    local i; i="$(node_index "$1")"
    case "$2" in
        down|up) ip link set "$(vh "$i")" "$2";;
        *) die "link state must be up or down";;
    esac
    log "node$i link $2"
}

cmd_kill() {
    [ $# -eq 1 ] || die "usage: $0 kill NODE"
    need_root kill
    load_env
    local i; i="$(node_index "$1")"
    node_kill "$i"
    log "node$i killed (every process in its namespaces)"
}

cmd_start() {
    [ $# -eq 1 ] || die "usage: $0 start NODE"
    need_root start
    load_env
    local i; i="$(node_index "$1")"
    export SLURM_CONF="$D/etc/slurm.conf"
    node_start "$i"
    wait_for 30 "node$i's sshd" nsenter -t "$(anchor_pid "$i")" --net --uts --mount "$D/bin/ssh" "node$i" true
    log "node$i started"
}

cmd_hosts() {
    load_env
    local slots="${1:-1}" i out=""
    for i in $(seq 1 "$N"); do out+="${out:+,}node$i:$slots"; done
    echo "$out"
}

cmd_env() {
    load_env
    echo "export SLURM_CONF=$D/etc/slurm.conf HVD_RSGC_CLUSTER_DIR=$D"
}

case "${1:-}" in
    up) shift; cmd_up "$@";;
    down) shift; cmd_down "$@";;
    status) shift; cmd_status "$@";;
    exec) shift; cmd_exec "$@";;
    shape) shift; cmd_shape "$@";;
    link) shift; cmd_link "$@";;
    kill) shift; cmd_kill "$@";;
    start) shift; cmd_start "$@";;
    hosts) shift; cmd_hosts "$@";;
    env) shift; cmd_env "$@";;
    *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2;;
esac
