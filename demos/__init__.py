"""The demo training scripts, shipped in the package as ``neurotop.demos`` so that
``neurotop demo`` finds them in an installed wheel as in a checkout. Each module is a
script (run as ``python demos/NAME.py`` or ``neurotop demo --name NAME``); its docstring's
first line is what ``neurotop demo --list`` shows."""
