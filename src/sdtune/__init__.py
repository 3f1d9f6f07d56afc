"""sdtune: full fine-tuning of Stable Diffusion 1.x and 2.x.

Importing the package is cheap (no torch); heavy modules are imported by the commands that need them.
"""

__version__ = "0.1.0"
