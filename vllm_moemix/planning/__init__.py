"""Bit allocation: score modules, then choose widths under a budget."""
