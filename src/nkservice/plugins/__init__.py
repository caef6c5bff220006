"""Service logic that plugs into a service's chain: built-in plugins, Lua."""
