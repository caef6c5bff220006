"""Events: the subscription index and fan-out (PROTOCOL.md §5)."""
