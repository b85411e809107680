"""`python -m tpserve` is the client CLI (`python -m tpserve.client` works too)."""

import sys

from tpserve.client import main

sys.exit(main())
