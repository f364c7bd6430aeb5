"""A GDB remote-serial-protocol server for ``popek run``, ``popek exec`` and VMM guests."""
