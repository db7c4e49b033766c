"""``python -m ngc_trl.eval`` / ``ngc-eval``: accuracy against peak-KV-cache compression.

The loop lives in `ngc_trl.evaluation.run`; run ``python -m ngc_trl.eval --help`` for the arguments.
"""

from ngc_trl.evaluation.run import main

if __name__ == "__main__":
    main()
