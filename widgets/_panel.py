"""What every widget of the book shares: a panel of controls above an output area that shows one figure.

A widget class subclasses ``FigurePanel``, builds ``self.panel`` (an ipywidgets box that contains
``self.output``) and calls ``self.draw(figure)`` whenever its controls change.
"""

from __future__ import annotations


class FigurePanel:
    panel = None  # the ipywidgets box shown in the notebook
    output = None  # the ipywidgets.Output inside it that holds the figure

    def draw(self, figure) -> None:
        """Show ``figure`` in the output area (kept in ``self.figure`` for tests and scripts)."""
        from IPython import get_ipython

        self.figure = figure
        if get_ipython() is not None:  # outside IPython (tests, scripts) there is nowhere to draw
            # replace the output's content directly: displaying a plotly figure inside `with self.output:`
            # never returns under nbclient (nbconvert --execute, the book build)
            self.output.outputs = ()
            self.output.append_display_data(figure)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.panel)
