"""The teaching machinery: the checkers' framework, the exercise generator, notebook execution, figures.

``checks`` (the :class:`Checker` framework the tracks' checkers are built on), ``exercises``
(``python -m helpers.teaching.exercises``: notebooks with solutions replaced by stubs), ``execute``
(``python -m helpers.teaching.execute``: re-run notebooks in place, save their minutes), ``readme``
(the README's benchmark figures written from the saved results), ``plotting`` (one plot style), ``widgets`` (a slider beside a
static default plot, so the site and nbval still show it).
"""
