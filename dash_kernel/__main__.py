"""``python -m dash_kernel``: start the "DASH distributed" kernel (what the kernelspec runs)."""

from .kernel import main

main()
