"""The composition root and process life: the app that wires the layers, serving, workers, admin,
logging.
"""
