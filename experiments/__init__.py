"""Launch scripts that produce the project's tables, plots and demos."""
