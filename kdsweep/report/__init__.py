"""The report: studies read back from MLflow, confirmation seeds, the tables, metrics and statistics,
plots, the one-page report.html, and `kdsweep status`.
"""
