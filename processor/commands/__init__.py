"""The subcommands: ``serve``, ``demo``, ``tail``, ``top``, ``notify`` and ``report``.

Each module has ``add_parser(subparsers)`` and ``run(args) -> exit status``; processor/cli.py
only dispatches to them. ``common`` and ``consume`` are what the stream readers share.
"""
