"""The ``padim`` commands, one module per group; :mod:`padim_cli.main` mounts them on the app.

* :mod:`~padim_cli.commands.train` - ``train``, ``retrain``.
* :mod:`~padim_cli.commands.score` - ``score``, ``nightly``, ``watch``.
* :mod:`~padim_cli.commands.evaluate` - ``evaluate``.
* :mod:`~padim_cli.commands.report` - ``report``.
* :mod:`~padim_cli.commands.models` - ``models``, ``models promote``, ``models prune``.
* :mod:`~padim_cli.commands.ops` - ``demo``, ``serve``, ``configure``.

Their shared options and choices are :mod:`padim_cli.options`.
"""
