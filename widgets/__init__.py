"""Interactive views for the minimoe book (ipywidgets + plotly).

This folder installs as ``minimoe.widgets``. Every widget has a static plotly
counterpart (a plain ``plotly.graph_objects.Figure``) for the built book, where
Python callbacks cannot run.
"""
