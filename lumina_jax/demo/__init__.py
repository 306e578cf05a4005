"""Everything only the shipped demo model needs; the core package never imports it.

`shapes` (the synthetic captioned set), `shape_analysis` (what a generated image shows), `vqgan` (the demo's
VQGAN run on the shapes), `recipe` (the whole recipe of the shipped weights) and `evaluate` (the quality table).
"""
