"""The subcommands besides ``serve``: ``demo``, ``tail``, ``top`` and ``notify``.

Each module has ``add_parser(subparsers)`` and ``run(args) -> exit status``.
"""
