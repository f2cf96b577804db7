"""Build hook for the optional C extensions (everything else is in pyproject.toml).

Both are `optional`: where no C compiler is available the install still succeeds and the Python code
falls back to its own loops (the same results, slower):
- `kvtier.tiers._chainhash` computes chained block keys in one C loop (`kvtier.tiers.keys`; ~2x faster);
- `kvtier.scheduler.policies._fastpolicy` keeps LRU / ARC / S3-FIFO books in C for `auto`
  (`kvtier.scheduler.policies.native`; ~10x faster).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("kvtier.tiers._chainhash", ["tiers/_chainhash.c"], optional=True, extra_compile_args=["-O3"]),
    Extension("kvtier.scheduler.policies._fastpolicy", ["scheduler/policies/_fastpolicy.c"], optional=True,
              depends=["scheduler/policies/_fastlanes.h", "scheduler/policies/_fastshadow.h"], extra_compile_args=["-O3"]),
])
