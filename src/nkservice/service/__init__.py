"""Services: configuration, sessions, login, roles and the core commands."""
