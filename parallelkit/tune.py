"""``python -m parallelkit.tune``: the command; its work is in ``parallelkit/advisor/tune.py``."""
from parallelkit.advisor.tune import main

if __name__ == "__main__":
    main()
