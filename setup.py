"""Build hook for the one optional C extension (everything else is in pyproject.toml).

`kvtier.tiers._chainhash` computes chained block keys in one C loop; it is `optional`: where no C
compiler is available the install still succeeds and `kvtier.tiers.keys` falls back to its Python loop
(the same keys, ~2x the time).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kvtier.tiers._chainhash", ["tiers/_chainhash.c"], optional=True,
                             extra_compile_args=["-O3"])])
