"""python -m tpserve.route calibrate ... (see tpserve.route.calibrate)."""

import sys

from tpserve.route.calibrate import cli

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "calibrate":
        print("usage: python -m tpserve.route calibrate --model DIR --small-model DIR --prompts FILE --out FILE "
              "(--help for more)", file=sys.stderr)
        sys.exit(2)
    sys.exit(cli(sys.argv[2:]))
