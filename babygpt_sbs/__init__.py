"""The side-by-side reader: `babygpt_jax/X.py` beside `babygpt_torch/X.py`, aligned by name.

`align` cuts and pairs the sources and checks the mirror rule (what CI tests); `render` writes the
HTML site, styled by `style.css`. `python -m parity.side_by_side` is the command.
"""
