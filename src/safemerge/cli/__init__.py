"""The `safemerge` command line: one module per command group, options defined once, one error boundary."""
