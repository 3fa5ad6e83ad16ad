"""Data: dataset names (catalog, torch-free), the built-in datasets, datasets from anywhere (sources),
the device-resident splits with their seeded batch stream, and the dispatcher that picks one.
"""
