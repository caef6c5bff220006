"""The cluster: several processes (workers, nodes) joined over NATS, behind the seams of one."""
