"""Transport adapters: they move bytes between sockets and a `Connection`, nothing more."""
