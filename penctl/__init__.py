"""``penctl``: the one command line over the product and its developer tools.

It lives in a package of its own because it is the only place allowed to import
both sides: the product's commands (``serve``, ``users``, ``audit``, ``ingest``
from ``controller``) and the developer tools' (``demo`` and ``bench`` from
``devtools``, ``simulate`` from ``simulated_pen``). ``controller`` itself
imports neither of the latter (``tests/test_layering.py``), so the product can
be read, typed and reviewed without them. ``python -m penctl`` is ``penctl``.
"""
