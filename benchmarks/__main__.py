"""python -m benchmarks: run every benchmark script present (see benchmarks/run_all.py)."""
import sys

from .run_all import main

sys.exit(main())
