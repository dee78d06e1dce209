"""The sweep's report: tables, plots, Markdown and HTML."""
