"""``backflow report``: production's baselines and events mapped back onto a source checkout.

- ``store``: reads baselines, events and per-version summaries from Redis.
- ``source``: the checkout's Python functions (``ast``) and the mapping of production
  locations onto them; which functions are instrumented.
- ``findings``: per-file findings, unplaced locations, instrumented functions never seen.
- ``sarif``: SARIF 2.1.0 for code-scanning views.
- ``since``: functions changed in REV..HEAD and production before/after their version.
- ``command``: the ``backflow report`` subcommand.
"""
