"""Differential tests of popek against unicorn, generated from the instruction declarations."""
