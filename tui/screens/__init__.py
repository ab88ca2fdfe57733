"""The UI's screens and widgets (Textual). They read only the data side's public types.
"""
