"""The terminal UI (``neurotop.tui``). Never imports torch: it must start fast on a laptop
without it.
"""
