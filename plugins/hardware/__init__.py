"""Built-in hardware plugins: one module per plugin, each exposing its class as ``PLUGIN``."""
