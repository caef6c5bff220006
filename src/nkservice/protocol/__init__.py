"""The wire protocol with no I/O: messages, framing and the per-connection state machine."""
