"""`python -m vlmdistill.eval.elevater [elevater] --model ... --data-root ...` or `... demo --out DIR`."""
import sys

from .cli import main

sys.exit(main())
