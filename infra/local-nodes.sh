#!/usr/bin/env bash
# Nodes on one machine, for local multi-node clusters (sourced by local-slurm.sh and local-ray.sh).
#
# A node is a network namespace with its own address on a bridge (xlpbr0, 10.77.0.0/24; this machine
# is 10.77.0.1 on it) and its own host name (a UTS namespace around the daemon we start in it), named
# in /etc/hosts. The filesystem stays shared, as a cluster's shared filesystem is. So every connection
# between nodes (srun's I/O, the rendezvous of the ranks, gloo, Ray's object transfers) crosses a real
# network interface to a real address, and `hostname` on a node says which node it is.
#   local_node_up NAME IP      create the node (idempotent)
#   local_node_run NAME CMD..  run CMD on the node (in its namespaces, with its host name)
#   local_node_pids NAME       the processes running on the node
# Needs root (ip netns, unshare).

LOCAL_BRIDGE=xlpbr0
LOCAL_BRIDGE_IP=10.77.0.1
LOCAL_HOSTS_TAG="# xlp-local node"

local_bridge_up() {
  if ! ip link show "$LOCAL_BRIDGE" >/dev/null 2>&1; then
    ip link add "$LOCAL_BRIDGE" type bridge
    ip addr add "$LOCAL_BRIDGE_IP/24" dev "$LOCAL_BRIDGE"
  fi
  ip link set "$LOCAL_BRIDGE" up
}

local_node_up() {
  local name=$1 ip=$2 veth
  local_bridge_up
  if ! ip netns list | grep -qw "^$name"; then
    ip netns add "$name"
  fi
  if ! ip netns exec "$name" ip -4 addr show dev eth0 2>/dev/null | grep -q "inet $ip/"; then
    veth="xv$(printf %s "$name" | tail -c 12)"  # the host side's name (at most 15 characters)
    ip link del "$veth" >/dev/null 2>&1 || true
    ip link add "$veth" type veth peer name eth0 netns "$name"
    ip link set "$veth" master "$LOCAL_BRIDGE" up
    ip netns exec "$name" ip addr add "$ip/24" dev eth0
    ip netns exec "$name" ip link set eth0 up
    ip netns exec "$name" ip link set lo up
    ip netns exec "$name" ip route add default via "$LOCAL_BRIDGE_IP" 2>/dev/null || true
  fi
  # every node (and this machine) resolves every node's name
  local line="$ip $name $LOCAL_HOSTS_TAG"
  if ! grep -qxF "$line" /etc/hosts; then
    grep -v " $name $LOCAL_HOSTS_TAG\$" /etc/hosts > /etc/hosts.xlp-new || true
    echo "$line" >> /etc/hosts.xlp-new
    cat /etc/hosts.xlp-new > /etc/hosts  # in place: /etc/hosts may be a bind mount
    rm -f /etc/hosts.xlp-new
  fi
}

local_node_run() {
  local name=$1; shift
  # nsenter, not `ip netns exec`: that one also gives a mount namespace with a fresh /sys, without
  # the cgroup filesystem slurmd needs
  nsenter --net="/run/netns/$name" unshare --uts -- sh -c 'hostname "$0" && exec "$@"' "$name" "$@"
}

local_node_pids() {
  ip netns pids "$1" 2>/dev/null || true
}
