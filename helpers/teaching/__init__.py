"""The teaching machinery: exercise checkers' framework, the exercise generator, notebook execution, plots.

``checks`` (the :class:`Checker` framework the tracks' checkers are built on), ``exercises``
(``python -m helpers.teaching.exercises``: notebooks with solutions replaced by stubs), ``execute``
(``python -m helpers.teaching.execute``: re-run notebooks in place), ``plotting`` (one plot style).
"""
