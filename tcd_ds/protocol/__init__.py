"""The one-command TCD protocol (launchers/reproduce.py): preset, stages, report and plots."""
