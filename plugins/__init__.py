"""Built-in plugins, one sub-package per kind. Imported only through framework.registry."""
