"""Comparison of finished runs: tables, plots, energy and CO2 estimates (``fedasr compare``)."""
