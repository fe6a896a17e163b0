"""Run directories, metrics files, tables and plots."""
