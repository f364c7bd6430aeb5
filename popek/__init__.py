"""popek: an efficient, isolated duplicate of a real RISC-V machine."""

__version__ = "0.1.0"
